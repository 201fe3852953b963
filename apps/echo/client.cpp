#include "echo/client.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "closewise/server.hpp"
#include "echo/sha256.hpp"

namespace closewise::echo {

namespace {

using clock = std::chrono::steady_clock;

std::string errno_text(const char* what, int err) { return std::string(what) + ": " + std::strerror(err); }

// A descriptor closed on scope exit.
struct fd_guard {
  int fd = -1;
  explicit fd_guard(int f) noexcept : fd(f) {}
  fd_guard(const fd_guard&) = delete;
  fd_guard& operator=(const fd_guard&) = delete;
  ~fd_guard() {
    if (fd >= 0) ::close(fd);
  }
};

int poll_ms(std::chrono::milliseconds t) { return static_cast<int>(std::min<std::int64_t>(t.count(), 1 << 30)); }

// Waits (bounded) for `events` on `fd`; 0 when ready, ETIMEDOUT, or errno.
int wait_for(int fd, short events, std::chrono::milliseconds timeout) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, poll_ms(timeout));
    if (r > 0) return 0;  // ready, or an error/hang-up the next call reports
    if (r == 0) return ETIMEDOUT;
    if (errno != EINTR) return errno;
  }
}

// Opens a non-blocking stream socket connected to `target` within `timeout`.
// Returns the descriptor or -errno; `error` says what failed.
int connect_to(const std::string& target, std::chrono::milliseconds timeout, std::string& error) {
  sockaddr_storage addr{};
  socklen_t len = 0;
  int family = AF_UNIX;
  if (target.rfind("unix:", 0) == 0) {
    const std::string path = target.substr(5);
    sockaddr_un un{};
    if (path.empty() || path.size() >= sizeof(un.sun_path)) {
      error = "bad Unix socket path '" + path + "'";
      return -EINVAL;
    }
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, path.c_str(), path.size() + 1);
    std::memcpy(&addr, &un, sizeof(un));
    len = sizeof(un);
  } else {
    asio::ip::tcp::endpoint ep;
    try {
      ep = parse_endpoint(target);
    } catch (const std::invalid_argument& e) {
      error = e.what();
      return -EINVAL;
    }
    family = ep.address().is_v6() ? AF_INET6 : AF_INET;
    len = static_cast<socklen_t>(ep.size());
    std::memcpy(&addr, ep.data(), ep.size());
  }
  const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    error = errno_text("socket", errno);
    return -errno;
  }
  int err = 0;
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), len) != 0) {
    err = errno;
    // EINPROGRESS: TCP handshake under way. (A Unix socket answers EAGAIN when
    // the listener's backlog is full: an error here, not worth waiting on.)
    if (err == EINPROGRESS) {
      err = wait_for(fd, POLLOUT, timeout);
      if (err == 0) {
        socklen_t el = sizeof(err);
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
      }
    }
  }
  if (err != 0) {
    ::close(fd);
    error = errno_text(("connect to " + target).c_str(), err);
    return -err;
  }
  if (family != AF_UNIX) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  return fd;
}

struct send_outcome {
  std::uint64_t bytes = 0;
  std::string digest;
  std::string error;
};

// Sends everything, then half-closes. Runs on its own thread.
void send_all(int fd, int file_fd, const client_options& o, send_outcome& out) {
  std::vector<char> buf(std::max<std::size_t>(o.chunk_size, 1));
  seeded_bytes gen(o.seed);
  sha256 hash;
  std::uint64_t remaining = o.bytes;
  for (;;) {
    std::size_t n = 0;
    if (file_fd >= 0) {
      const ssize_t r = ::read(file_fd, buf.data(), buf.size());
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        out.error = errno_text("read file", errno);
        break;
      }
      n = static_cast<std::size_t>(r);
    } else {
      n = static_cast<std::size_t>(std::min<std::uint64_t>(remaining, buf.size()));
      gen.fill(buf.data(), n);
      remaining -= n;
    }
    if (n == 0) break;
    if (o.verify) hash.update(buf.data(), n);
    std::size_t done = 0;
    while (done < n && out.error.empty()) {
      const ssize_t r = ::send(fd, buf.data() + done, n - done, MSG_NOSIGNAL);
      if (r >= 0) {
        done += static_cast<std::size_t>(r);
        out.bytes += static_cast<std::uint64_t>(r);
        continue;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN) {
        out.error = errno_text("send", errno);
        break;
      }
      if (const int w = wait_for(fd, POLLOUT, o.timeout)) out.error = errno_text("send", w);
    }
    if (!out.error.empty()) break;
  }
  // The half-close: our FIN after the last byte; the server may keep sending.
  if (out.error.empty() && ::shutdown(fd, SHUT_WR) != 0) out.error = errno_text("shutdown", errno);
  if (o.verify) out.digest = to_hex(hash.finish());
}

}  // namespace

std::uint64_t seeded_bytes::next() noexcept {
  std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void seeded_bytes::fill(char* out, std::size_t n) noexcept {
  // Bytes of a word are handed out lowest first, whether the word is split
  // across calls or not, so the stream is independent of chunking.
  while (n > 0 && left_ > 0) {
    *out++ = static_cast<char>(word_ >> (8 * (8 - left_)));
    --left_;
    --n;
  }
  for (; n >= 8; out += 8, n -= 8) {
    const std::uint64_t w = next();
    for (unsigned i = 0; i < 8; ++i) out[i] = static_cast<char>(w >> (8 * i));
  }
  if (n > 0) {
    word_ = next();
    left_ = 8;
    while (n > 0) {
      *out++ = static_cast<char>(word_ >> (8 * (8 - left_)));
      --left_;
      --n;
    }
  }
}

const char* to_string(stream_end e) noexcept {
  switch (e) {
    case stream_end::eof:
      return "eof";
    case stream_end::reset:
      return "reset";
    case stream_end::timeout:
      return "timeout";
    case stream_end::error:
      return "error";
  }
  return "error";
}

client_result run_client(const client_options& o) {
  client_result res;
  int file_fd = -1;
  if (!o.file.empty()) {
    file_fd = ::open(o.file.c_str(), O_RDONLY | O_CLOEXEC);
    if (file_fd < 0) {
      res.error = errno_text(("open " + o.file).c_str(), errno);
      return res;
    }
  }
  fd_guard file(file_fd);
  const auto start = clock::now();
  const int fd = connect_to(o.target, o.timeout, res.error);
  if (fd < 0) return res;
  fd_guard sock(fd);

  send_outcome sent;
  std::thread sender([&] { send_all(fd, file_fd, o, sent); });

  std::vector<char> buf(std::max<std::size_t>(o.chunk_size, 1));
  sha256 hash;
  std::string recv_error;
  for (;;) {
    const ssize_t r = ::recv(fd, buf.data(), buf.size(), 0);
    if (r > 0) {
      if (o.verify) hash.update(buf.data(), static_cast<std::size_t>(r));
      res.bytes_received += static_cast<std::uint64_t>(r);
      continue;
    }
    if (r == 0) {
      res.end = stream_end::eof;
      break;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {
      if (const int w = wait_for(fd, POLLIN, o.timeout)) {
        res.end = w == ETIMEDOUT ? stream_end::timeout : stream_end::error;
        recv_error = errno_text("recv", w);
        break;
      }
      continue;
    }
    res.end = errno == ECONNRESET ? stream_end::reset : stream_end::error;
    if (res.end == stream_end::error) recv_error = errno_text("recv", errno);
    break;
  }
  res.seconds = std::chrono::duration<double>(clock::now() - start).count();
  // Wakes a sender blocked on a peer that will never read again.
  if (res.end != stream_end::eof) ::shutdown(fd, SHUT_RDWR);
  sender.join();

  res.bytes_sent = sent.bytes;
  if (o.verify) {
    res.sent_sha256 = sent.digest;
    res.received_sha256 = to_hex(hash.finish());
  }
  // A reset after the server echoed everything (rst_if_safe) is not an
  // error; whether anything was lost shows in the byte counts and digests.
  if (!recv_error.empty()) {
    res.error = recv_error;
  } else if (!sent.error.empty() && res.end != stream_end::reset) {
    res.error = sent.error;
  }
  return res;
}

}  // namespace closewise::echo
