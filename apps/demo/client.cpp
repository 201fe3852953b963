#include "demo/client.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <utility>
#include <vector>

#include <boost/beast/core/string.hpp>

#include "closewise/server.hpp"
#include "closewise/tls.hpp"
#include "reqresp/http_rules.hpp"

namespace closewise::demo {

namespace {

int poll_for(int fd, short events, std::chrono::milliseconds limit) noexcept {
  pollfd p{fd, events, 0};
  for (;;) {
    const int r = ::poll(&p, 1, static_cast<int>(limit.count()));
    if (r < 0 && errno == EINTR) continue;
    return r;
  }
}

std::uint16_t port_of(const sockaddr_storage& a) noexcept {
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&a)->sin6_port);
  return ntohs(reinterpret_cast<const sockaddr_in*>(&a)->sin_port);
}

std::string_view trim(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// Parses "HTTP/1.1 200 OK\r\nName: value\r\n...\r\n\r\n" (the head, terminator included).
void parse_head(std::string_view head, response_read& r) {
  const auto eol = head.find("\r\n");
  const std::string_view status_line = head.substr(0, eol);
  if (status_line.size() >= 12 && status_line.starts_with("HTTP/1.")) {
    std::from_chars(status_line.data() + 9, status_line.data() + 12, r.status);
  }
  std::string_view rest = head.substr(eol + 2);
  while (!rest.empty()) {
    const auto end = rest.find("\r\n");
    const std::string_view line = rest.substr(0, end);
    rest = end == std::string_view::npos ? std::string_view{} : rest.substr(end + 2);
    const auto colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    const std::string_view name = line.substr(0, colon);
    const std::string_view value = trim(line.substr(colon + 1));
    if (boost::beast::iequals(name, "content-length")) {
      std::uint64_t n = 0;
      if (std::from_chars(value.data(), value.data() + value.size(), n).ec == std::errc{}) r.content_length = n;
    } else if (boost::beast::iequals(name, "connection") && boost::beast::iequals(value, "close")) {
      r.connection_close = true;
    } else if (boost::beast::iequals(name, "transfer-encoding")) {
      // chunked is the last coding when it is there at all (RFC 9112 6.1).
      const auto last = value.rfind(',');
      r.chunked =
          boost::beast::iequals(trim(last == std::string_view::npos ? value : value.substr(last + 1)), "chunked");
    }
  }
  // Transfer-Encoding overrides Content-Length (RFC 9112 6.3).
  if (r.chunked) r.content_length.reset();
}

// `flags`: MSG_MORE holds the bytes back for what follows (our FIN).
int send_fd(int fd, std::string_view data, std::chrono::milliseconds limit, int flags = 0) noexcept {
  while (!data.empty()) {
    if (poll_for(fd, POLLOUT, limit) <= 0) return ETIMEDOUT;
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT | flags);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return errno;
    }
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return 0;
}

// A recv()'s result as a read_step: 0 is EOF, -errno an end.
read_step step_of(long n) noexcept {
  if (n > 0) return {static_cast<std::size_t>(n), read_end::none, 0};
  if (n == 0) return {0, read_end::eof, 0};
  const int e = static_cast<int>(-n);
  return {0, e == ECONNRESET ? read_end::reset : e == ETIMEDOUT ? read_end::timeout : read_end::error, e};
}

void take_decoded(response_read& r, std::string_view body) {
  if (r.body_prefix.size() < 4096) r.body_prefix.append(body.substr(0, 4096 - r.body_prefix.size()));
  if (r.check_pattern && !r.first_bad_byte) {
    if (auto bad = reqresp::pattern_mismatch(body, r.body_bytes)) r.first_bad_byte = r.body_bytes + *bad;
  }
  r.body_bytes += body.size();
}

// A chunked body, byte by byte through its framing. A size line that is not
// hex is a protocol error: what follows counts as extra bytes.
void take_chunked(response_read& r, const char* data, std::size_t n) {
  using part = response_read::chunk_part;
  std::string_view in(data, n);
  while (!in.empty()) {
    switch (r.chunk_at) {
      case part::data: {
        const auto k = static_cast<std::size_t>(std::min<std::uint64_t>(in.size(), r.chunk_left));
        take_decoded(r, in.substr(0, k));
        in.remove_prefix(k);
        r.chunk_left -= k;
        if (r.chunk_left == 0) r.chunk_at = part::data_end;
        break;
      }
      case part::size_line:
      case part::data_end:
      case part::trailer: {
        const auto eol = in.find('\n');
        r.chunk_line.append(in.substr(0, eol));
        if (eol == std::string_view::npos) {
          if (r.chunk_line.size() > 4096) r.chunk_at = part::done;  // no such line: give up decoding
          return;
        }
        in.remove_prefix(eol + 1);
        std::string_view line(r.chunk_line);
        if (line.ends_with('\r')) line.remove_suffix(1);
        if (r.chunk_at == part::data_end) {
          r.chunk_at = part::size_line;
        } else if (r.chunk_at == part::trailer) {
          if (line.empty()) {
            r.chunk_at = part::done;
            r.chunked_done = true;
          }
        } else {
          const std::string_view size = trim(line.substr(0, line.find(';')));
          std::uint64_t v = 0;
          const auto [end, ec] = std::from_chars(size.data(), size.data() + size.size(), v, 16);
          if (ec != std::errc{} || end != size.data() + size.size()) {
            r.chunk_at = part::done;  // not a chunked body after all
          } else if (v == 0) {
            r.chunk_at = part::trailer;
          } else {
            r.chunk_left = v;
            r.chunk_at = part::data;
          }
        }
        r.chunk_line.clear();
        break;
      }
      case part::done:
        r.extra_bytes += in.size();
        return;
    }
  }
}

void take_body(response_read& r, const char* data, std::size_t n) {
  if (r.chunked) return take_chunked(r, data, n);
  std::uint64_t wanted = n;
  if (r.content_length) {
    const std::uint64_t room = *r.content_length > r.body_bytes ? *r.content_length - r.body_bytes : 0;
    wanted = std::min<std::uint64_t>(n, room);
    r.extra_bytes += n - wanted;
  }
  take_decoded(r, std::string_view(data, static_cast<std::size_t>(wanted)));
}

}  // namespace

std::string_view to_string(read_end e) noexcept {
  switch (e) {
    case read_end::none:
      return "stopped";
    case read_end::eof:
      return "EOF";
    case read_end::reset:
      return "ECONNRESET";
    case read_end::timeout:
      return "timeout";
    case read_end::error:
      return "error";
    case read_end::close_notify:
      return "close_notify";
  }
  return "?";
}

std::string errno_name(int e) {
  switch (e) {
    case 0:
      return "none";
    case ECONNRESET:
      return "ECONNRESET";
    case EPIPE:
      return "EPIPE";
    case ETIMEDOUT:
      return "ETIMEDOUT";
    case ECONNREFUSED:
      return "ECONNREFUSED";
    case ENOTCONN:
      return "ENOTCONN";
    default:
      return "errno " + std::to_string(e);
  }
}

std::optional<raw_client> raw_client::connect(const std::string& target, int rcvbuf, std::chrono::milliseconds limit,
                                              std::string& error) {
  asio::ip::tcp::endpoint ep;
  try {
    ep = parse_endpoint(target);
  } catch (const std::exception& e) {
    error = e.what();
    return std::nullopt;
  }
  const int fd = ::socket(ep.address().is_v6() ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    error = std::string("socket: ") + std::strerror(errno);
    return std::nullopt;
  }
  raw_client c(fd);
  if (rcvbuf > 0) ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  // Non-blocking only for the connect, so that it is bounded too.
  const int flags = ::fcntl(fd, F_GETFL);
  ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  int rc = ::connect(fd, static_cast<const sockaddr*>(ep.data()), static_cast<socklen_t>(ep.size()));
  if (rc != 0 && errno == EINPROGRESS) {
    if (poll_for(fd, POLLOUT, limit) <= 0) {
      error = "connect to " + target + ": timed out";
      return std::nullopt;
    }
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    rc = err == 0 ? 0 : -1;
    errno = err;
  }
  if (rc != 0) {
    error = "connect to " + target + ": " + std::strerror(errno);
    return std::nullopt;
  }
  ::fcntl(fd, F_SETFL, flags);
  return c;
}

raw_client::raw_client(raw_client&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
raw_client& raw_client::operator=(raw_client&& o) noexcept {
  std::swap(fd_, o.fd_);
  return *this;
}

std::uint16_t raw_client::local_port() const noexcept {
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  if (::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) return 0;
  return port_of(a);
}

std::uint16_t raw_client::remote_port() const noexcept {
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  if (::getpeername(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) return 0;
  return port_of(a);
}

int raw_client::send_all(std::string_view data, std::chrono::milliseconds limit) noexcept {
  return send_fd(fd_, data, limit);
}

long raw_client::recv_some(char* data, std::size_t n, std::chrono::milliseconds limit) noexcept {
  for (;;) {
    if (poll_for(fd_, POLLIN, limit) <= 0) return -ETIMEDOUT;
    const ssize_t r = ::recv(fd_, data, n, MSG_DONTWAIT);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    return r < 0 ? -errno : static_cast<long>(r);
  }
}

void raw_client::shutdown_write() noexcept { ::shutdown(fd_, SHUT_WR); }

void raw_client::reset() noexcept {
  if (fd_ < 0) return;
  const linger l{1, 0};
  ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close();
}

void raw_client::close() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void read_response(raw_client& c, response_read& r, std::uint64_t body_goal, std::chrono::milliseconds limit) {
  read_response(
      [&c](char* data, std::size_t n, std::chrono::milliseconds wait) { return step_of(c.recv_some(data, n, wait)); },
      r, body_goal, limit);
}

void read_response(const byte_source& src, response_read& r, std::uint64_t body_goal, std::chrono::milliseconds limit) {
  // An earlier call saw the end. After ECONNRESET Linux returns 0 on the next
  // read (docs/design.md, 'Kernel experiments', row 8): reading on would turn
  // the reset into an "EOF".
  if (r.end != read_end::none) return;
  std::vector<char> buf(64 * 1024);
  std::string head;
  for (;;) {
    std::size_t want = buf.size();
    if (r.head_complete && body_goal != until_end && r.chunked) {
      // Its length is not known ahead: read on until the last chunk (or the goal).
      if (r.chunked_done || (body_goal != whole_body && r.body_bytes >= body_goal)) return;
    } else if (r.head_complete && body_goal != until_end) {
      const std::uint64_t goal = r.content_length ? std::min(body_goal, *r.content_length) : body_goal;
      if (r.body_bytes >= goal) return;
      // Never read past the goal: the rest must stay in the kernel.
      want = static_cast<std::size_t>(std::min<std::uint64_t>(want, goal - r.body_bytes));
    }
    const read_step step = src(buf.data(), want, limit);
    if (step.end != read_end::none) {
      r.end = step.end;
      r.error = step.error;
      return;
    }
    const std::size_t n = step.n;
    if (r.head_complete) {
      take_body(r, buf.data(), n);
      continue;
    }
    head.append(buf.data(), n);
    const auto end = head.find("\r\n\r\n");
    if (end == std::string::npos) {
      if (head.size() > 64 * 1024) {
        r.end = read_end::error;
        r.error = EPROTO;
        return;
      }
      continue;
    }
    r.head_complete = true;
    r.head_bytes = end + 4;
    parse_head(std::string_view(head).substr(0, end + 4), r);
    take_body(r, head.data() + end + 4, head.size() - end - 4);
  }
}

// ---- TLS ----------------------------------------------------------------

namespace {

SSL_CTX* client_context() {
  // One context for the process: no verification (the demo's server has a
  // throwaway certificate), ALPN http/1.1, no SSL_OP_IGNORE_UNEXPECTED_EOF.
  static asio::ssl::context ctx = make_client_context();
  return ctx.native_handle();
}

}  // namespace

tls_client::tls_client(const raw_client& c) : fd_(c.fd()) {
  ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) | O_NONBLOCK);
  ssl_ = ::SSL_new(client_context());
  BIO* rbio = ::BIO_new_socket(fd_, BIO_NOCLOSE);
  wbio_ = ::BIO_new(::BIO_s_mem());
  ::SSL_set_bio(ssl_, rbio, wbio_);
  ::SSL_set_tlsext_host_name(ssl_, "localhost");
  ::SSL_set_connect_state(ssl_);
}

tls_client::~tls_client() { ::SSL_free(ssl_); }

int tls_client::flush(std::chrono::milliseconds limit, int flags) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(wbio_, &data);
  if (n <= 0) return 0;
  const int e = send_fd(fd_, std::string_view(data, static_cast<std::size_t>(n)), limit, flags);
  (void)BIO_reset(wbio_);
  return e;
}

bool tls_client::handshake(std::chrono::milliseconds limit, std::string& error) {
  const auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    ::ERR_clear_error();
    const int r = ::SSL_do_handshake(ssl_);
    const int err = r == 1 ? SSL_ERROR_NONE : ::SSL_get_error(ssl_, r);
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
    if (const int e = flush(left)) {
      error = "TLS handshake: sending: " + errno_name(e);
      return false;
    }
    if (r == 1) return true;
    if (err != SSL_ERROR_WANT_READ) {
      char text[256] = {};
      ::ERR_error_string_n(::ERR_get_error(), text, sizeof(text));
      error = std::string("TLS handshake: ") + text;
      return false;
    }
    if (left.count() <= 0 || poll_for(fd_, POLLIN, left) <= 0) {
      error = "TLS handshake: timed out";
      return false;
    }
  }
}

int tls_client::send_all(std::string_view plaintext, std::chrono::milliseconds limit) {
  while (!plaintext.empty()) {
    ::ERR_clear_error();
    const int n =
        ::SSL_write(ssl_, plaintext.data(), static_cast<int>(std::min<std::size_t>(plaintext.size(), 1 << 20)));
    if (n <= 0) return EPROTO;  // a memory BIO takes everything: only a TLS error stops it
    if (const int e = flush(limit)) return e;
    plaintext.remove_prefix(static_cast<std::size_t>(n));
  }
  return 0;
}

read_step tls_client::read_some(char* data, std::size_t n, std::chrono::milliseconds limit) {
  for (;;) {
    ::ERR_clear_error();
    errno = 0;
    const int r = ::SSL_read(ssl_, data, static_cast<int>(std::min<std::size_t>(n, 1 << 20)));
    const int saved_errno = errno;
    const int err = r > 0 ? SSL_ERROR_NONE : ::SSL_get_error(ssl_, r);
    (void)flush(limit);  // anything OpenSSL answered on its own (a key update)
    if (r > 0) return {static_cast<std::size_t>(r), read_end::none, 0};
    switch (err) {
      case SSL_ERROR_ZERO_RETURN:
        return {0, read_end::close_notify, 0};
      case SSL_ERROR_WANT_READ:
        if (poll_for(fd_, POLLIN, limit) <= 0) return {0, read_end::timeout, ETIMEDOUT};
        continue;
      case SSL_ERROR_SYSCALL:
        if (saved_errno == ECONNRESET) return {0, read_end::reset, ECONNRESET};
        if (saved_errno == 0) return {0, read_end::eof, 0};
        return {0, read_end::error, saved_errno};
      default:
        // OpenSSL 3 reports a FIN without close_notify as a TLS error.
        if (ERR_GET_REASON(::ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) return {0, read_end::eof, 0};
        return {0, read_end::error, EPROTO};
    }
  }
}

byte_source tls_client::source() {
  return [this](char* data, std::size_t n, std::chrono::milliseconds limit) { return read_some(data, n, limit); };
}

int tls_client::send_close_notify(std::chrono::milliseconds limit) {
  ::ERR_clear_error();
  if (::SSL_shutdown(ssl_) < 0) return EPROTO;
  return flush(limit);
}

int tls_client::send_close_notify_and_fin(std::chrono::milliseconds limit) {
  ::ERR_clear_error();
  if (::SSL_shutdown(ssl_) < 0) return EPROTO;
  const int e = flush(limit, MSG_MORE);
  ::shutdown(fd_, SHUT_WR);  // pushes the held close_notify with the FIN
  return e;
}

read_step tls_client::tcp_end(std::chrono::milliseconds limit) {
  char byte = 0;
  if (poll_for(fd_, POLLIN, limit) <= 0) return {0, read_end::timeout, ETIMEDOUT};
  const ssize_t n = ::recv(fd_, &byte, 1, MSG_DONTWAIT);
  if (n > 0) return {0, read_end::error, EPROTO};  // bytes after close_notify
  return step_of(n < 0 ? -static_cast<long>(errno) : 0);
}

std::string tls_client::version() const { return ::SSL_get_version(ssl_); }

}  // namespace closewise::demo
