#include "tls_peer.hpp"

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/err.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <vector>

namespace closewise::test {

namespace {

constexpr std::chrono::milliseconds io_limit = std::chrono::seconds(10);

// One client context per (version, verify), shared by every peer of the
// process (SSL_CTX is safe to share once configured).
SSL_CTX* client_ctx(peer_version v, bool verify) {
  static std::once_flag once;
  static SSL_CTX* ctx[2][2] = {};
  std::call_once(once, [] {
    for (int vi = 0; vi < 2; ++vi) {
      for (int ve = 0; ve < 2; ++ve) {
        SSL_CTX* c = ::SSL_CTX_new(::TLS_client_method());
        const int ver = vi == 0 ? TLS1_2_VERSION : TLS1_3_VERSION;
        ::SSL_CTX_set_min_proto_version(c, ver);
        ::SSL_CTX_set_max_proto_version(c, ver);
        // Verification against an empty trust store: the server's
        // certificate is rejected, with an alert.
        ::SSL_CTX_set_verify(c, ve ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, nullptr);
        ::SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
        ctx[vi][ve] = c;
      }
    }
  });
  return ctx[v == peer_version::tls12 ? 0 : 1][verify ? 1 : 0];
}

SSL* new_ssl(peer_version v, bool verify, BIO*& rbio, BIO*& wbio) {
  SSL* s = ::SSL_new(client_ctx(v, verify));
  rbio = ::BIO_new(::BIO_s_mem());
  wbio = ::BIO_new(::BIO_s_mem());
  // An empty read BIO means "no bytes yet" (retry), not EOF.
  BIO_set_mem_eof_return(rbio, -1);
  ::SSL_set_bio(s, rbio, wbio);
  ::SSL_set_tlsext_host_name(s, "localhost");
  ::SSL_set_connect_state(s);
  return s;
}

std::string take_pending(BIO* b) {
  std::string out(static_cast<std::size_t>(BIO_ctrl_pending(b)), '\0');
  if (!out.empty()) {
    const int n = ::BIO_read(b, out.data(), static_cast<int>(out.size()));
    out.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
  }
  return out;
}

}  // namespace

const char* to_string(peer_end e) noexcept {
  switch (e) {
    case peer_end::close_notify:
      return "close_notify";
    case peer_end::eof:
      return "eof";
    case peer_end::reset:
      return "reset";
    case peer_end::timeout:
      return "timeout";
    case peer_end::error:
      return "error";
  }
  return "?";
}

tls_peer::~tls_peer() {
  if (ssl_) ::SSL_free(ssl_);
  close();
}

void tls_peer::fail(const char* what) {
  error_ = what;
  const unsigned long e = ::ERR_get_error();
  if (e != 0) {
    char buf[256] = {};
    ::ERR_error_string_n(e, buf, sizeof(buf));
    error_ += std::string(": ") + buf;
  }
  ::ERR_clear_error();
}

bool tls_peer::connect(std::uint16_t port) {
  fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) return false;
  timeval tv{static_cast<time_t>(io_limit.count() / 1000), 0};
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close();
    return false;
  }
  return true;
}

std::string tls_peer::client_hello(peer_version v) {
  BIO* r = nullptr;
  BIO* w = nullptr;
  SSL* s = new_ssl(v, false, r, w);
  ::SSL_do_handshake(s);  // wants to read: the ClientHello is in the write BIO
  std::string hello = take_pending(w);
  ::SSL_free(s);
  ::ERR_clear_error();
  return hello;
}

bool tls_peer::flush() { return send_raw(take_pending(wbio_)); }

long tls_peer::fill(std::chrono::steady_clock::time_point deadline) {
  char buf[16 * 1024];
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return -ETIMEDOUT;
    pollfd p{fd_, POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(left.count()) + 1);
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return -errno;
    if (ready == 0) continue;  // the deadline check above ends it
    const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    if (n == 0) return 0;
    ::BIO_write(rbio_, buf, static_cast<int>(n));
    return 1;
  }
}

bool tls_peer::handshake(peer_version v, bool verify, std::chrono::milliseconds limit) {
  if (fd_ < 0) {
    error_ = "not connected";
    return false;
  }
  if (ssl_) ::SSL_free(ssl_);
  ssl_ = new_ssl(v, verify, rbio_, wbio_);
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    const int r = ::SSL_do_handshake(ssl_);
    const int e = r == 1 ? SSL_ERROR_NONE : ::SSL_get_error(ssl_, r);
    // Whatever OpenSSL wrote goes out, an alert included.
    if (!flush()) return false;
    if (r == 1) return true;
    if (e != SSL_ERROR_WANT_READ) {
      fail("handshake");
      return false;
    }
    const long got = fill(deadline);
    if (got <= 0) {
      error_ = got == 0 ? "handshake: EOF" : std::string("handshake: ") + std::strerror(static_cast<int>(-got));
      return false;
    }
  }
}

bool tls_peer::write(const std::string& plaintext) {
  if (!ssl_) return false;
  std::size_t done = 0;
  while (done < plaintext.size()) {
    const std::size_t n = std::min<std::size_t>(plaintext.size() - done, 16 * 1024);
    if (::SSL_write(ssl_, plaintext.data() + done, static_cast<int>(n)) <= 0) {
      fail("SSL_write");
      return false;
    }
    done += n;
  }
  return flush();
}

std::size_t tls_peer::write_partial_record(const std::string& plaintext, std::size_t keep_bytes) {
  if (!ssl_ || plaintext.empty() || plaintext.size() > 16 * 1024) return 0;
  (void)take_pending(wbio_);
  if (::SSL_write(ssl_, plaintext.data(), static_cast<int>(plaintext.size())) <= 0) {
    fail("SSL_write");
    return 0;
  }
  std::string record = take_pending(wbio_);
  if (keep_bytes == 0 || keep_bytes >= record.size()) return 0;
  const std::size_t full = record.size();
  record.resize(full - keep_bytes);
  if (!send_raw(record)) return 0;
  return full;
}

bool tls_peer::send_close_notify() {
  if (!ssl_) return false;
  ::SSL_shutdown(ssl_);
  ::ERR_clear_error();
  return flush();
}

bool tls_peer::send_raw(const std::string& bytes) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t r = ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      error_ = std::string("send: ") + std::strerror(errno);
      return false;
    }
    done += static_cast<std::size_t>(r);
  }
  return true;
}

void tls_peer::fin() noexcept {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_WR);
}

void tls_peer::rst() noexcept {
  if (fd_ < 0) return;
  linger l{1, 0};
  ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close();
}

void tls_peer::close() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

tls_peer::read_result tls_peer::read_all_plain(std::chrono::milliseconds limit) {
  return read_plain_until([](const std::string&) { return false; }, limit);
}

tls_peer::read_result tls_peer::read_plain_until(const std::function<bool(const std::string&)>& enough,
                                                 std::chrono::milliseconds limit) {
  read_result out;
  if (!ssl_) {
    out.end = peer_end::error;
    return out;
  }
  const auto deadline = std::chrono::steady_clock::now() + limit;
  char buf[16 * 1024];
  for (;;) {
    const int r = ::SSL_read(ssl_, buf, sizeof(buf));
    if (r > 0) {
      out.plain.append(buf, static_cast<std::size_t>(r));
      if (enough(out.plain)) return out;
      continue;
    }
    const int e = ::SSL_get_error(ssl_, r);
    if (e == SSL_ERROR_ZERO_RETURN) {
      out.end = peer_end::close_notify;
      return out;
    }
    if (e != SSL_ERROR_WANT_READ) {
      fail("SSL_read");
      out.end = peer_end::error;
      return out;
    }
    (void)flush();  // anything OpenSSL answered (a key update)
    const long got = fill(deadline);
    if (got == 1) continue;
    out.end = got == 0             ? peer_end::eof
              : got == -ECONNRESET ? peer_end::reset
              : got == -ETIMEDOUT  ? peer_end::timeout
                                   : peer_end::error;
    if (out.end == peer_end::error) error_ = std::string("recv: ") + std::strerror(static_cast<int>(-got));
    return out;
  }
}

}  // namespace closewise::test
