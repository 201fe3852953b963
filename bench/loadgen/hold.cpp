#include "hold.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "closewise/probe.hpp"
#include "closewise/sock_diag.hpp"
#include "response_parser.hpp"
#include "tls_client.hpp"

namespace closewise::bench {

namespace {

using clock = std::chrono::steady_clock;

struct fd_guard {
  int fd = -1;
  ~fd_guard() {
    if (fd >= 0) ::close(fd);
  }
};

struct ssl_free {
  void operator()(SSL* s) const noexcept { ::SSL_free(s); }
};
using ssl_ptr = std::unique_ptr<SSL, ssl_free>;

// A client SSL object over `fd`, with the run's SNI; null when OpenSSL fails.
ssl_ptr new_client_ssl(SSL_CTX* ctx, int fd, const hold_config& cfg) {
  ssl_ptr s{::SSL_new(ctx)};
  if (!s || ::SSL_set_fd(s.get(), fd) != 1) return nullptr;
  if (!cfg.tls_server_name.empty()) ::SSL_set_tlsext_host_name(s.get(), cfg.tls_server_name.c_str());
  ::SSL_set_connect_state(s.get());
  return s;
}

void close_rst(int fd) {
  const linger l{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  ::close(fd);
}

// One whole exchange on a blocking socket (over TLS when `ctx` is given);
// true when the response was whole.
bool exchange(const hold_config& cfg, SSL_CTX* ctx) {
  fd_guard s{::socket(cfg.target.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  if (s.fd < 0) return false;
  timeval tv{2, 0};
  ::setsockopt(s.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(s.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (::connect(s.fd, reinterpret_cast<const sockaddr*>(&cfg.target), cfg.target_len) != 0) return false;
  ssl_ptr tls;
  if (ctx != nullptr) {
    tls = new_client_ssl(ctx, s.fd, cfg);
    ::ERR_clear_error();
    if (!tls || ::SSL_connect(tls.get()) != 1) return false;
  }
  const std::string& req = cfg.full_request;
  if (tls ? ::SSL_write(tls.get(), req.data(), static_cast<int>(req.size())) != static_cast<int>(req.size())
          : ::send(s.fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size()))
    return false;
  // TLS: close_notify reads as the end of the stream; any other failure as an error.
  auto receive = [&](char* b, std::size_t len) -> ssize_t {
    if (!tls) return ::recv(s.fd, b, len, 0);
    const int k = ::SSL_read(tls.get(), b, static_cast<int>(len));
    if (k > 0) return k;
    return ::SSL_get_error(tls.get(), k) == SSL_ERROR_ZERO_RETURN ? 0 : -1;
  };
  response_parser p;
  std::array<char, 16384> buf{};
  for (;;) {
    const ssize_t n = receive(buf.data(), buf.size());
    if (n <= 0) return n == 0 && p.on_eof() == response_parser::status::complete;
    if (p.feed(buf.data(), static_cast<std::size_t>(n)).st != response_parser::status::need_more) break;
  }
  const bool ok = p.status_code() >= 200 && p.status_code() < 300;
  close_rst(s.fd);
  s.fd = -1;
  return ok;
}

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

}  // namespace

long read_rss_kib(int pid) {
  if (pid <= 0) return -1;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/status", pid);
  std::FILE* f = std::fopen(path, "re");
  if (f == nullptr) return -1;
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, "VmRSS:", 6) == 0) {
      kib = std::strtol(line + 6, nullptr, 10);
      break;
    }
  }
  std::fclose(f);
  return kib;
}

long accept_queue_length(std::uint16_t port, int family) {
  closewise::error_code ec;  // a failed query lists what it had: the queues read so far count
  long found = -1;
  for (const auto& s : list_tcp_sockets(port, family, tcp_states(tcp_state::listen), ec)) {
    // For a listener, rqueue is the accept queue's current length.
    if (s.local_port == port) found = (found < 0 ? 0 : found) + static_cast<long>(s.rqueue);
  }
  return found;
}

hold_result run_hold(const hold_config& cfg, const hold_progress_fn& progress) {
  hold_result r;
  auto say = [&](const std::string& s) {
    if (progress) progress(s);
  };

  std::optional<boost::asio::ssl::context> tls_context;
  SSL_CTX* ctx = nullptr;
  if (cfg.tls) {
    tls_context.emplace(make_bench_client_context(cfg.tls_versions));
    ctx = tls_context->native_handle();
    ::SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);  // the client's own memory, not measured, kept small
  }

  for (unsigned i = 0; i < cfg.warmup_requests; ++i) {
    if (!exchange(cfg, ctx)) ++r.warmup_failed;
  }
  sleep_ms(200);
  r.rss_before_kib = read_rss_kib(cfg.server_pid);

  fd_guard ep{::epoll_create1(EPOLL_CLOEXEC)};
  if (ep.fd < 0) return r;
  std::vector<int> fds;  // connected (held) connections
  fds.reserve(cfg.connections);
  std::vector<ssl_ptr> held_tls;  // TLS: the SSL object of fds[i]
  struct pending {
    int fd;
    clock::time_point since;
    ssl_ptr tls;  // set once connected, while the handshake runs
  };
  std::vector<pending> connecting;  // small: bounded by max_in_flight
  constexpr std::size_t max_in_flight = 128;
  constexpr long max_backlog = 128;
  unsigned launched = 0;
  const auto t0 = clock::now();
  auto next_say = t0 + std::chrono::seconds(1);

  auto settle_accept_queue = [&](long below, std::chrono::milliseconds limit) {
    const auto until = clock::now() + limit;
    for (;;) {
      const long q = accept_queue_length(cfg.port, cfg.target.ss_family);
      if (q < below || clock::now() >= until) return q < 0 ? 0 : q;
      sleep_ms(1);
    }
  };

  std::array<epoll_event, 256> events{};
  while (fds.size() + r.failed < cfg.connections) {
    // Pace by the server's accept queue: a full listen backlog drops SYNs and
    // turns the measurement into a one-second retransmission wait.
    while (connecting.size() < max_in_flight && launched < cfg.connections) {
      if (launched % 512 == 0 && launched > 0) settle_accept_queue(max_backlog, std::chrono::milliseconds(2000));
      ++launched;
      const int fd = ::socket(cfg.target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) {
        ++r.failed;
        continue;
      }
      if (::connect(fd, reinterpret_cast<const sockaddr*>(&cfg.target), cfg.target_len) != 0 && errno != EINPROGRESS) {
        ::close(fd);
        ++r.failed;
        continue;
      }
      epoll_event ev{};
      ev.events = EPOLLOUT;
      ev.data.fd = fd;
      ::epoll_ctl(ep.fd, EPOLL_CTL_ADD, fd, &ev);
      connecting.push_back({fd, clock::now(), nullptr});
    }
    const int n = ::epoll_wait(ep.fd, events.data(), static_cast<int>(events.size()), 10);
    for (int i = 0; i < n; ++i) {
      const int fd = events[static_cast<std::size_t>(i)].data.fd;
      const auto ev = events[static_cast<std::size_t>(i)].events;
      for (std::size_t k = 0; k < connecting.size(); ++k) {
        if (connecting[k].fd != fd) continue;
        pending p = std::move(connecting[k]);
        connecting[k] = std::move(connecting.back());
        connecting.pop_back();
        auto drop = [&](bool handshake) {
          close_rst(fd);
          ++r.failed;
          if (handshake) ++r.handshake_failed;
        };
        if (!p.tls) {
          int err = 0;
          socklen_t len = sizeof(err);
          ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
          if (err != 0 || (ev & (EPOLLERR | EPOLLHUP)) != 0) {
            ::close(fd);
            ++r.failed;
            break;
          }
          if (ctx != nullptr && !(p.tls = new_client_ssl(ctx, fd, cfg))) {
            drop(true);
            break;
          }
        }
        if (p.tls) {
          // One step of the handshake; until it completes, wait for what it asks.
          ::ERR_clear_error();
          const int rc = ::SSL_do_handshake(p.tls.get());
          if (rc != 1) {
            const int e = ::SSL_get_error(p.tls.get(), rc);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
              drop(true);
              break;
            }
            epoll_event want{};
            want.events = e == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT;
            want.data.fd = fd;
            ::epoll_ctl(ep.fd, EPOLL_CTL_MOD, fd, &want);
            connecting.push_back(std::move(p));
            break;
          }
          ++(::SSL_version(p.tls.get()) == TLS1_3_VERSION ? r.tls13 : r.tls12);
        }
        const std::string& part = cfg.partial_request;
        if (cfg.half_request &&
            (p.tls
                 ? ::SSL_write(p.tls.get(), part.data(), static_cast<int>(part.size())) != static_cast<int>(part.size())
                 : ::send(fd, part.data(), part.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(part.size()))) {
          drop(false);
          break;
        }
        // Watched again (for the server's FIN, RST or bytes) once all are open.
        ::epoll_ctl(ep.fd, EPOLL_CTL_DEL, fd, nullptr);
        fds.push_back(fd);
        if (ctx != nullptr) held_tls.push_back(std::move(p.tls));
        break;
      }
    }
    const auto now = clock::now();
    for (std::size_t k = 0; k < connecting.size();) {
      if (now - connecting[k].since > cfg.connect_timeout) {
        close_rst(connecting[k].fd);
        ++r.failed;
        if (connecting[k].tls) ++r.handshake_failed;
        connecting[k] = std::move(connecting.back());
        connecting.pop_back();
      } else {
        ++k;
      }
    }
    if (now >= next_say) {
      say("opened " + std::to_string(fds.size()) + "/" + std::to_string(cfg.connections) + ", failed " +
          std::to_string(r.failed));
      next_say += std::chrono::seconds(1);
    }
  }
  r.opened = static_cast<unsigned>(fds.size());
  r.open_s = std::chrono::duration<double>(clock::now() - t0).count();

  // Every connection accepted, then the RSS still for three readings in a row.
  const long left = settle_accept_queue(1, std::chrono::milliseconds(5000));
  r.accept_queue_left = static_cast<std::size_t>(left);
  if (cfg.server_pid > 0) {
    const auto until = clock::now() + cfg.settle_max;
    long prev = read_rss_kib(cfg.server_pid);
    int still = 0;
    sleep_ms(100);
    while (clock::now() < until && still < 3) {
      const long cur = read_rss_kib(cfg.server_pid);
      still = std::labs(cur - prev) <= 8 ? still + 1 : 0;
      prev = cur;
      sleep_ms(100);
    }
    r.rss_after_kib = read_rss_kib(cfg.server_pid);
    if (r.rss_before_kib >= 0 && r.rss_after_kib >= 0 && r.opened > 0) {
      r.kib_per_connection = static_cast<double>(r.rss_after_kib - r.rss_before_kib) / static_cast<double>(r.opened);
    }
  }
  closewise::error_code ec;
  r.server_established = count_tcp_state(cfg.port, tcp_state::established, ec).local_side;

  // Watch the held connections: the server should leave them alone.
  for (int fd : fds) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = fd;
    ::epoll_ctl(ep.fd, EPOLL_CTL_ADD, fd, &ev);
  }
  const auto hold_until = clock::now() + cfg.hold;
  const std::size_t fd_end = fds.empty() ? 1 : static_cast<std::size_t>(*std::max_element(fds.begin(), fds.end())) + 1;
  std::vector<char> seen(fd_end, 0);
  std::vector<SSL*> tls_of(ctx != nullptr ? fd_end : 0, nullptr);
  for (std::size_t k = 0; k < held_tls.size(); ++k) tls_of[static_cast<std::size_t>(fds[k])] = held_tls[k].get();
  do {
    const int n = ::epoll_wait(ep.fd, events.data(), static_cast<int>(events.size()), 10);
    for (int i = 0; i < n; ++i) {
      const int fd = events[static_cast<std::size_t>(i)].data.fd;
      if (ctx != nullptr && (events[static_cast<std::size_t>(i)].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) == 0) {
        // TLS: a record that carries no application data (a TLS 1.3 session
        // ticket) leaves the connection idle; bytes, close_notify or an error do not.
        SSL* t = tls_of[static_cast<std::size_t>(fd)];
        std::array<char, 512> b{};
        ::ERR_clear_error();
        const int k = ::SSL_read(t, b.data(), static_cast<int>(b.size()));
        if (k <= 0 && ::SSL_get_error(t, k) == SSL_ERROR_WANT_READ) continue;
      }
      if (!seen[static_cast<std::size_t>(fd)]) {
        seen[static_cast<std::size_t>(fd)] = 1;
        ++r.closed_by_server;
      }
      ::epoll_ctl(ep.fd, EPOLL_CTL_DEL, fd, nullptr);
    }
  } while (clock::now() < hold_until);

  for (int fd : fds) close_rst(fd);
  return r;
}

}  // namespace closewise::bench
