// closewise-ref-echo: the reference for closewise-echo's throughput. The
// plainest correct echo there is: blocking sockets, a thread per connection,
// read() then write() of everything read; at EOF shutdown(SHUT_WR), then
// close. No framework, no timeouts, no limits: what the kernel alone costs.
//
//   closewise-ref-echo [HOST:PORT]     (default 127.0.0.1:0)
// Prints "listening on HOST:PORT" first, like closewise-echo. Runs until killed.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

// The same read size as closewise-echo's session, so that both make as many system calls.
constexpr std::size_t read_size = 64 * 1024;

bool write_all(int fd, const char* p, std::size_t n) {
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return false;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

void serve(int fd) {
  std::vector<char> buf(read_size);
  for (;;) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    if (!write_all(fd, buf.data(), static_cast<std::size_t>(r))) break;
  }
  // The peer's FIN (or an error): everything read was written; answer with
  // our FIN, then let the kernel finish. Nothing is unread, so no RST.
  ::shutdown(fd, SHUT_WR);
  ::close(fd);
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  const std::string where = argc > 1 ? argv[1] : "127.0.0.1:0";
  const auto colon = where.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  char* end = nullptr;
  const unsigned long port = colon == std::string::npos ? 0 : std::strtoul(where.c_str() + colon + 1, &end, 10);
  if (colon == std::string::npos || end == where.c_str() + colon + 1 || *end != '\0' || port > 65535 ||
      ::inet_pton(AF_INET, where.substr(0, colon).c_str(), &addr.sin_addr) != 1) {
    std::fprintf(stderr, "closewise-ref-echo: error: expected IPV4:PORT, got '%s'\n", where.c_str());
    return 2;
  }
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(listener, 1024) != 0) {
    std::fprintf(stderr, "closewise-ref-echo: error: %s: %s\n", where.c_str(), std::strerror(errno));
    return 1;
  }
  socklen_t len = sizeof(addr);
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  char host[INET_ADDRSTRLEN];
  ::inet_ntop(AF_INET, &addr.sin_addr, host, sizeof(host));
  std::printf("listening on %s:%u\n", host, static_cast<unsigned>(ntohs(addr.sin_port)));
  std::fflush(stdout);
  for (;;) {
    const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      std::fprintf(stderr, "closewise-ref-echo: accept: %s\n", std::strerror(errno));
      return 1;
    }
    // closewise-echo sets TCP_NODELAY on accepted sockets too.
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    std::thread(serve, fd).detach();
  }
}
