#include "loopback.hpp"

#include <dirent.h>
#include <poll.h>
#include <sys/un.h>

#include <cstring>

#include <cstdlib>
#include <filesystem>
#include <stdexcept>

namespace closewise::test {

bool ipv6_available() {
  int fd = ::socket(AF_INET6, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_addr = in6addr_loopback;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  ::close(fd);
  return ok;
}

std::uint16_t raw_peer::local_port() const {
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
  return a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port)
                                 : ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
}

void raw_peer::close() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void raw_peer::reset() noexcept {
  if (fd_ < 0) return;
  linger l{1, 0};
  ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close();
}

long raw_peer::send(const void* data, std::size_t n) noexcept {
  const ssize_t r = ::send(fd_, data, n, MSG_NOSIGNAL);
  return r < 0 ? -errno : r;
}

long raw_peer::send_all(const void* data, std::size_t n) noexcept {
  const char* p = static_cast<const char*>(data);
  std::size_t done = 0;
  while (done < n) {
    const long r = send(p + done, n - done);
    if (r < 0) {
      if (r == -EINTR) continue;
      return r;
    }
    done += static_cast<std::size_t>(r);
  }
  return static_cast<long>(done);
}

long raw_peer::recv_some(void* data, std::size_t n) noexcept {
  const ssize_t r = ::recv(fd_, data, n, 0);
  return r < 0 ? -errno : r;
}

raw_peer::drained raw_peer::drain(std::string* sink, std::chrono::milliseconds recv_timeout) {
  drained d;
  std::vector<char> buf(64 * 1024);
  for (;;) {
    pollfd p{fd_, POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(recv_timeout.count()));
    // A failed poll (EINTR) must not fall through to a blocking recv with no bound.
    if (ready < 0) {
      if (errno == EINTR) continue;
      d.error = errno;
      return d;
    }
    if (ready == 0) {
      d.error = ETIMEDOUT;
      return d;
    }
    const long r = recv_some(buf.data(), buf.size());
    if (r == -EINTR) continue;
    if (r < 0) {
      d.error = static_cast<int>(-r);
      return d;
    }
    if (r == 0) {
      d.eof = true;
      return d;
    }
    d.bytes += static_cast<std::uint64_t>(r);
    if (sink) sink->append(buf.data(), static_cast<std::size_t>(r));
  }
}

void raw_peer::set_rcvbuf(int bytes) noexcept { ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes)); }
void raw_peer::set_sndbuf(int bytes) noexcept { ::setsockopt(fd_, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes)); }

int connect_loopback(int fd, std::uint16_t port) noexcept {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  return ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 ? 0 : errno;
}

raw_peer connect_to(std::uint16_t port, int rcvbuf) {
  raw_peer p(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (p.fd() < 0) return p;
  if (rcvbuf > 0) p.set_rcvbuf(rcvbuf);
  if (connect_loopback(p.fd(), port) != 0) return raw_peer{};
  return p;
}

raw_peer connect_unix(const std::string& path) {
  raw_peer p(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (p.fd() < 0 || path.size() >= sizeof(a.sun_path)) return raw_peer{};
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  if (::connect(p.fd(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return raw_peer{};
  return p;
}

loopback_pair_factory::loopback_pair_factory(asio::io_context& ioc, bool ipv6)
    : ioc_(ioc),
      acceptor_(ioc, tcp::endpoint(ipv6 ? asio::ip::address(asio::ip::address_v6::loopback())
                                        : asio::ip::address(asio::ip::address_v4::loopback()),
                                   0)),
      ipv6_(ipv6) {
  port_ = acceptor_.local_endpoint().port();
}

raw_peer loopback_pair_factory::connect(int rcvbuf, int sndbuf) {
  raw_peer p(::socket(ipv6_ ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (rcvbuf > 0) p.set_rcvbuf(rcvbuf);
  if (sndbuf > 0) p.set_sndbuf(sndbuf);
  int rc;
  if (ipv6_) {
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_loopback;
    a.sin6_port = htons(port_);
    rc = ::connect(p.fd(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
  } else {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port_);
    rc = ::connect(p.fd(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
  }
  if (rc != 0) throw std::runtime_error("connect failed");
  return p;
}

tcp_stream loopback_pair_factory::accept(stream_options opts, read_ahead ahead) {
  tcp::socket s(ioc_);
  acceptor_.accept(s);
  return tcp_stream(std::move(s), opts, std::move(ahead));
}

std::string pattern(std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = pattern_byte(i);
  return s;
}

std::size_t open_fd_count() {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d)) ++n;
    ::closedir(d);
  }
  return n;
}

temp_dir::temp_dir() {
  const char* base = std::getenv("TMPDIR");
  // Short: a Unix socket path must fit in sun_path (108 bytes).
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/closewise-XXXXXX";
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

temp_dir::~temp_dir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

}  // namespace closewise::test
