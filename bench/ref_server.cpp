// closewise-ref-server: the raw reference of the teardown benchmark.
//
// A minimal single-threaded epoll HTTP/1.1 server, written the way a careful
// C programmer writes one, without closewise, Asio or Beast: it answers every
// request (any method, any target) with "200 OK" and the same body, keeps
// connections alive unless the request says "Connection: close" (or is
// HTTP/1.0 without keep-alive), and handles pipelined requests, requests
// split across reads, and partial writes.
//
// How it closes after a "Connection: close" response (--close, part of what
// the comparison compares):
//   linger (default)  shutdown(SHUT_WR) once the response is written, read and
//                     discard until the client's FIN, then close(): a lingering
//                     close like nginx's and closewise's `graceful`, so unread
//                     client bytes can never turn the close into a RST. Bounded
//                     by --linger-timeout (then a plain close).
//   direct            close() as soon as the response is written: one syscall
//                     and one wakeup fewer per connection, but unread input
//                     makes the kernel send RST (docs/design.md, 'Kernel
//                     experiments', row 7).
// Either way the server's FIN goes first, so the server keeps the TIME_WAIT.
//
// Like nginx, it sets TCP_NODELAY when a connection is kept alive after a
// response (nginx's tcp_nodelay), not at accept.
//
// Memory: a connection costs a 40-byte slot in a table indexed by descriptor;
// buffers are allocated only for a request split across reads or a response
// the kernel did not take at once.
//
// Exit status: 0 after SIGINT/SIGTERM, 1 on a setup failure, 2 on a usage error.

#include <arpa/inet.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#ifndef CLOSEWISE_REF_VERSION
#define CLOSEWISE_REF_VERSION "0.1.0"
#endif

namespace {

constexpr const char* name = "closewise-ref-server";
constexpr std::size_t read_size = 64 * 1024;
constexpr std::size_t max_header = 8 * 1024;

volatile sig_atomic_t stop_requested = 0;
void on_signal(int) { stop_requested = 1; }

std::int64_t now_ms() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1'000'000;
}

enum class conn_state : std::uint8_t { free, open, lingering, peer_fin };

struct conn {
  conn_state state = conn_state::free;
  bool close_after = false;     // the response in progress is the last
  bool nodelay = false;         // TCP_NODELAY set (once the connection is kept alive)
  std::uint64_t serial = 0;     // tells a lingering entry from a later connection on the same fd
  std::uint64_t body_left = 0;  // request body bytes still to skip
  std::string* in = nullptr;    // a request split across reads
  std::string* out = nullptr;   // response bytes the kernel did not take yet
};

struct linger_entry {
  int fd;
  std::uint64_t serial;
  std::int64_t deadline_ms;
};

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool istarts(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    if (lower(s[i]) != prefix[i]) return false;
  }
  return true;
}

bool has_token(std::string_view value, std::string_view token) {
  while (!value.empty()) {
    const auto comma = value.find(',');
    std::string_view t = value.substr(0, comma);
    while (!t.empty() && (t.front() == ' ' || t.front() == '\t')) t.remove_prefix(1);
    while (!t.empty() && (t.back() == ' ' || t.back() == '\t' || t.back() == '\r')) t.remove_suffix(1);
    if (t.size() == token.size() && istarts(t, token)) return true;
    if (comma == std::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
  return false;
}

class server {
 public:
  server(int listen_fd, std::string body, bool linger, std::int64_t linger_ms)
      : lfd_(listen_fd), linger_(linger), linger_ms_(linger_ms) {
    const std::string head =
        "HTTP/1.1 200 OK\r\nServer: closewise-ref\r\nContent-Type: text/plain\r\nContent-Length: " +
        std::to_string(body.size()) + "\r\n";
    keep_ = head + "\r\n" + body;
    keep10_ = head + "Connection: keep-alive\r\n\r\n" + body;
    close_ = head + "Connection: close\r\n\r\n" + body;
    bad_ = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    buf_.resize(read_size);
    conns_.resize(1024);
  }

  int run() {
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0) return perror_fail("epoll_create1");
    watch_listener(true);
    std::vector<epoll_event> events(512);
    while (!stop_requested) {
      int timeout = -1;
      if (!lingering_.empty()) timeout = 500;
      if (accept_paused_until_ != 0) timeout = 100;
      const int n = epoll_wait(ep_, events.data(), static_cast<int>(events.size()), timeout);
      if (n < 0) {
        if (errno == EINTR) continue;
        return perror_fail("epoll_wait");
      }
      for (int i = 0; i < n; ++i) {
        const int fd = events[static_cast<std::size_t>(i)].data.fd;
        if (fd == lfd_) {
          accept_all();
        } else {
          on_event(fd, events[static_cast<std::size_t>(i)].events);
        }
      }
      if (!lingering_.empty() || accept_paused_until_ != 0) timers();
    }
    return 0;
  }

 private:
  int perror_fail(const char* what) {
    std::fprintf(stderr, "%s: error: %s: %s\n", name, what, std::strerror(errno));
    return 1;
  }

  void watch_listener(bool on) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = lfd_;
    epoll_ctl(ep_, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, lfd_, on ? &ev : nullptr);
  }

  void accept_all() {
    for (;;) {
      const int fd = accept4(lfd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          // Out of descriptors: a listener left armed would wake us forever.
          // Stop accepting for 100 ms, as nginx does.
          watch_listener(false);
          accept_paused_until_ = now_ms() + 100;
          return;
        }
        continue;  // ECONNABORTED, EPROTO and the network errors: the next one may be fine
      }
      if (static_cast<std::size_t>(fd) >= conns_.size()) conns_.resize(static_cast<std::size_t>(fd) * 2);
      conn& c = conns_[static_cast<std::size_t>(fd)];
      c = conn{};
      c.state = conn_state::open;
      c.serial = ++serial_;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev);
    }
  }

  void on_event(int fd, std::uint32_t events) {
    conn& c = conns_[static_cast<std::size_t>(fd)];
    if (c.state == conn_state::free) return;
    if ((events & EPOLLOUT) != 0 && c.out != nullptr) {
      if (!flush(fd)) return;
    }
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0 && c.state != conn_state::peer_fin) on_readable(fd);
  }

  void on_readable(int fd) {
    conn& c = conns_[static_cast<std::size_t>(fd)];
    const ssize_t n = recv(fd, buf_.data(), buf_.size(), 0);
    if (n > 0) {
      if (c.state == conn_state::lingering || c.close_after) return;  // discarded: the last response is decided
      if (c.in != nullptr) {
        c.in->append(buf_.data(), static_cast<std::size_t>(n));
        std::string pending;
        pending.swap(*c.in);
        delete c.in;
        c.in = nullptr;
        process(fd, pending.data(), pending.size());
      } else {
        process(fd, buf_.data(), static_cast<std::size_t>(n));
      }
      return;
    }
    if (n == 0) {
      if (c.out != nullptr && c.state == conn_state::open) {
        // The client half-closed with our answer still queued: finish it, then close.
        c.state = conn_state::peer_fin;
        modify(fd, EPOLLOUT);
        return;
      }
      return close_conn(fd);
    }
    if (errno == EAGAIN || errno == EINTR) return;
    close_conn(fd);  // ECONNRESET and the like
  }

  // Answers every whole request in [data, data + size); keeps a partial one.
  void process(int fd, const char* data, std::size_t size) {
    conn& c = conns_[static_cast<std::size_t>(fd)];
    batch_.clear();
    std::size_t pos = 0;
    while (pos < size) {
      if (c.body_left > 0) {
        const std::size_t skip = static_cast<std::size_t>(std::min<std::uint64_t>(c.body_left, size - pos));
        c.body_left -= skip;
        pos += skip;
        continue;
      }
      const void* end = memmem(data + pos, size - pos, "\r\n\r\n", 4);
      if (end == nullptr) {
        if (size - pos > max_header) {
          batch_ += bad_;
          c.close_after = true;
        } else {
          c.in = new std::string(data + pos, size - pos);
        }
        break;
      }
      const std::size_t head_end = static_cast<std::size_t>(static_cast<const char*>(end) - data) + 4;
      const std::string_view head(data + pos, head_end - pos);
      pos = head_end;
      answer(c, head);
      if (c.close_after) break;  // nothing after a closing response is read
    }
    if (batch_.empty()) return;
    send_batch(fd);
  }

  void answer(conn& c, std::string_view head) {
    const auto line_end = head.find("\r\n");
    const std::string_view line = head.substr(0, line_end);
    if (line.size() < 14 || line.substr(line.size() - 8, 7) != "HTTP/1.") {
      batch_ += bad_;
      c.close_after = true;
      return;
    }
    const bool http10 = line.back() == '0';
    bool keep = !http10;
    std::string_view rest = head.substr(line_end + 2);
    while (!rest.empty()) {
      const auto eol = rest.find("\r\n");
      const std::string_view field = rest.substr(0, eol);
      rest.remove_prefix(eol == std::string_view::npos ? rest.size() : eol + 2);
      if (field.empty()) break;
      if (istarts(field, "connection:")) {
        const std::string_view v = field.substr(11);
        if (has_token(v, "close")) keep = false;
        if (http10 && has_token(v, "keep-alive")) keep = true;
      } else if (istarts(field, "content-length:")) {
        c.body_left = std::strtoull(std::string(field.substr(15)).c_str(), nullptr, 10);
      } else if (istarts(field, "transfer-encoding:")) {
        // Chunked request bodies are beyond this reference: refuse and close.
        batch_ += bad_;
        c.close_after = true;
        return;
      }
    }
    if (!keep) {
      batch_ += close_;
      c.close_after = true;
    } else {
      batch_ += http10 ? keep10_ : keep_;
    }
  }

  void send_batch(int fd) {
    conn& c = conns_[static_cast<std::size_t>(fd)];
    const ssize_t n = send(fd, batch_.data(), batch_.size(), MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN) return close_conn(fd);
    const std::size_t sent = n < 0 ? 0 : static_cast<std::size_t>(n);
    if (sent < batch_.size()) {
      c.out = new std::string(batch_, sent);
      modify(fd, EPOLLIN | EPOLLOUT);
      return;
    }
    if (c.close_after) return finish(fd);
    if (!c.nodelay) {
      // As nginx does (tcp_nodelay on): once a connection is kept alive, a
      // small response must not wait for the ACK of the previous one.
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      c.nodelay = true;
    }
  }

  // Writes what is queued; false when the connection is gone.
  bool flush(int fd) {
    conn& c = conns_[static_cast<std::size_t>(fd)];
    const ssize_t n = send(fd, c.out->data(), c.out->size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EAGAIN) return true;
      close_conn(fd);
      return false;
    }
    c.out->erase(0, static_cast<std::size_t>(n));
    if (!c.out->empty()) return true;
    delete c.out;
    c.out = nullptr;
    if (c.state == conn_state::peer_fin) {
      close_conn(fd);
      return false;
    }
    modify(fd, EPOLLIN);
    if (c.close_after) {
      finish(fd);
      return c.state != conn_state::free;
    }
    return true;
  }

  // The last response is written: end the connection the --close way.
  void finish(int fd) {
    conn& c = conns_[static_cast<std::size_t>(fd)];
    if (!linger_) return close_conn(fd);
    shutdown(fd, SHUT_WR);
    c.state = conn_state::lingering;
    lingering_.push_back({fd, c.serial, now_ms() + linger_ms_});
  }

  void modify(int fd, std::uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    epoll_ctl(ep_, EPOLL_CTL_MOD, fd, &ev);
  }

  void close_conn(int fd) {
    conn& c = conns_[static_cast<std::size_t>(fd)];
    delete c.in;
    delete c.out;
    c = conn{};
    close(fd);
  }

  void timers() {
    const std::int64_t now = now_ms();
    // Entries are in deadline order (one fixed timeout): pop the expired ones.
    while (!lingering_.empty() && lingering_.front().deadline_ms <= now) {
      const linger_entry e = lingering_.front();
      lingering_.pop_front();
      conn& c = conns_[static_cast<std::size_t>(e.fd)];
      if (c.state == conn_state::lingering && c.serial == e.serial) close_conn(e.fd);
    }
    // Entries of connections that already closed are dropped as they reach the front.
    while (!lingering_.empty()) {
      const linger_entry& e = lingering_.front();
      const conn& c = conns_[static_cast<std::size_t>(e.fd)];
      if (c.state == conn_state::lingering && c.serial == e.serial) break;
      lingering_.pop_front();
    }
    if (accept_paused_until_ != 0 && now >= accept_paused_until_) {
      accept_paused_until_ = 0;
      watch_listener(true);
    }
  }

  int lfd_;
  int ep_ = -1;
  bool linger_;
  std::int64_t linger_ms_;
  std::string keep_, keep10_, close_, bad_;
  std::string buf_;
  std::string batch_;
  std::vector<conn> conns_;
  std::deque<linger_entry> lingering_;
  std::uint64_t serial_ = 0;
  std::int64_t accept_paused_until_ = 0;
};

void usage(std::FILE* to) {
  std::fprintf(to,
               "Usage: %s [--listen HOST:PORT] [--body TEXT | --body-file PATH] [--close linger|direct]\n"
               "       [--linger-timeout SECONDS] [--backlog N]\n"
               "A minimal single-threaded epoll HTTP/1.1 server: 200 OK with the same body for every request.\n"
               "  --listen HOST:PORT       numeric address; port 0 picks one (default 127.0.0.1:0);\n"
               "                           prints 'listening on HOST:PORT' first\n"
               "  --body TEXT              the response body (default: closewise-ref-server's greeting)\n"
               "  --body-file PATH         the response body, from a file\n"
               "  --close linger|direct    after a Connection: close response: shutdown(SHUT_WR), drain to\n"
               "                           the client's FIN, close (linger, default); or close() at once (direct)\n"
               "  --linger-timeout S       lingering bound in seconds (default 5)\n"
               "  --backlog N              listen backlog (default 1024)\n"
               "  --version, --help\n",
               name);
}

int usage_error(const char* msg) {
  std::fprintf(stderr, "%s: error: %s (see %s --help)\n", name, msg, name);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string listen_at = "127.0.0.1:0";
  std::string body = "closewise-ref-server: the raw epoll reference.\n";
  bool linger = true;
  double linger_s = 5.0;
  int backlog = 1024;
  static const option opts[] = {{"listen", required_argument, nullptr, 'l'},
                                {"body", required_argument, nullptr, 'b'},
                                {"body-file", required_argument, nullptr, 'f'},
                                {"close", required_argument, nullptr, 'c'},
                                {"linger-timeout", required_argument, nullptr, 't'},
                                {"backlog", required_argument, nullptr, 'q'},
                                {"version", no_argument, nullptr, 'V'},
                                {"help", no_argument, nullptr, 'h'},
                                {nullptr, 0, nullptr, 0}};
  opterr = 0;
  for (;;) {
    const int o = getopt_long(argc, argv, "", opts, nullptr);
    if (o == -1) break;
    switch (o) {
      case 'l':
        listen_at = optarg;
        break;
      case 'b':
        body = optarg;
        break;
      case 'f': {
        std::ifstream in(optarg, std::ios::binary);
        if (!in) return usage_error("--body-file: cannot read the file");
        std::ostringstream ss;
        ss << in.rdbuf();
        body = ss.str();
        break;
      }
      case 'c':
        if (std::strcmp(optarg, "linger") == 0) {
          linger = true;
        } else if (std::strcmp(optarg, "direct") == 0) {
          linger = false;
        } else {
          return usage_error("--close must be linger or direct");
        }
        break;
      case 't': {
        char* end = nullptr;
        linger_s = std::strtod(optarg, &end);
        if (end == optarg || *end != '\0' || !(linger_s > 0)) return usage_error("--linger-timeout must be > 0");
        break;
      }
      case 'q':
        backlog = std::atoi(optarg);
        break;
      case 'V':
        std::printf("%s %s\n", name, CLOSEWISE_REF_VERSION);
        return 0;
      case 'h':
        usage(stdout);
        return 0;
      default:
        return usage_error("unknown option or missing value");
    }
  }
  if (optind < argc) return usage_error("unexpected argument");

  std::string host;
  std::string port;
  if (!listen_at.empty() && listen_at.front() == '[') {
    const auto close = listen_at.find("]:");
    if (close == std::string::npos) return usage_error("--listen expects HOST:PORT or [V6]:PORT");
    host = listen_at.substr(1, close - 1);
    port = listen_at.substr(close + 2);
  } else {
    const auto colon = listen_at.rfind(':');
    if (colon == std::string::npos) return usage_error("--listen expects HOST:PORT");
    host = listen_at.substr(0, colon);
    port = listen_at.substr(colon + 1);
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
    return usage_error("--listen expects a numeric HOST:PORT");
  }
  const int lfd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  const int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (lfd < 0 || bind(lfd, res->ai_addr, res->ai_addrlen) != 0 || listen(lfd, backlog) != 0) {
    std::fprintf(stderr, "%s: error: cannot listen on %s: %s\n", name, listen_at.c_str(), std::strerror(errno));
    freeaddrinfo(res);
    return 1;
  }
  freeaddrinfo(res);
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(lfd, reinterpret_cast<sockaddr*>(&bound), &len);
  char text[INET6_ADDRSTRLEN] = "?";
  unsigned short bound_port = 0;
  if (bound.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&bound);
    inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof(text));
    bound_port = ntohs(a->sin6_port);
    std::printf("listening on [%s]:%u\n", text, bound_port);
  } else {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&bound);
    inet_ntop(AF_INET, &a->sin_addr, text, sizeof(text));
    bound_port = ntohs(a->sin_port);
    std::printf("listening on %s:%u\n", text, bound_port);
  }
  std::fflush(stdout);

  struct sigaction sa {};
  sa.sa_handler = on_signal;  // no SA_RESTART: epoll_wait returns EINTR
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  server s(lfd, body, linger, static_cast<std::int64_t>(linger_s * 1000));
  return s.run();
}
