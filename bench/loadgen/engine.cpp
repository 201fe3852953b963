#include "engine.hpp"

#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <ctime>
#include <memory>
#include <system_error>
#include <thread>
#include <vector>

#include "coordinator.hpp"
#include "response_parser.hpp"

namespace closewise::bench {

std::string_view to_string(mode m) noexcept {
  switch (m) {
    case mode::client_fin:
      return "client-fin";
    case mode::client_rst:
      return "client-rst";
    case mode::server_close:
      return "server-close";
    case mode::keepalive:
      return "keepalive";
  }
  return "?";
}

std::string_view to_string(error_class e) noexcept {
  switch (e) {
    case error_class::refused:
      return "refused";
    case error_class::reset:
      return "reset";
    case error_class::broken_pipe:
      return "broken_pipe";
    case error_class::timeout:
      return "timeout";
    case error_class::truncated:
      return "truncated";
    case error_class::addr_unavailable:
      return "addr_unavailable";
    case error_class::bad_status:
      return "bad_status";
    case error_class::protocol:
      return "protocol";
    case error_class::tls_handshake:
      return "tls_handshake";
    case error_class::tls:
      return "tls";
    case error_class::other:
      return "other";
  }
  return "?";
}

namespace {

using detail::control;
using detail::live_counters;
using detail::now_ns;
using detail::phase;

using detail::classify_errno;

enum class slot_state : std::uint8_t {
  idle,          // no connection, nothing to start (stopping, or out of tickets)
  sleeping,      // backing off after a connect-level error
  connecting,    // connect in progress, request not written yet
  writing,       // request partly written
  reading,       // waiting for (the rest of) the response
  awaiting_fin,  // whole response received; waiting for the server's FIN
};

struct slot {
  int fd = -1;
  std::uint32_t generation = 0;  // tells this connection's events from a previous one's on the same slot
  slot_state state = slot_state::idle;
  bool ticketed = false;  // count mode: this cycle was started inside the window
  std::size_t written = 0;
  std::uint64_t requests_on_conn = 0;
  std::int64_t cycle_start = 0;    // connect(): the start of the whole cycle
  std::int64_t request_start = 0;  // keepalive: the start of this request
  std::int64_t deadline = 0;
  std::int64_t wake_at = 0;  // sleeping
  response_parser parser;
};

class worker {
 public:
  worker(const load_config& cfg, control& ctl, live_counters& live, unsigned connections)
      : cfg_(cfg), ctl_(ctl), live_(live), slots_(connections) {
    ep_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0) throw std::system_error(errno, std::system_category(), "epoll_create1");
    timeout_ns_ = cfg.timeout.count();
    grace_ns_ = cfg.grace.count();
  }
  ~worker() {
    for (auto& s : slots_) {
      if (s.fd >= 0) ::close(s.fd);
    }
    if (ep_ >= 0) ::close(ep_);
  }
  worker(const worker&) = delete;
  worker& operator=(const worker&) = delete;

  load_result& result() noexcept { return res_; }

  void run() {
    std::int64_t now = now_ns();
    for (std::uint32_t i = 0; i < slots_.size(); ++i) start_cycle(i, now);
    std::array<epoll_event, 256> events{};
    std::int64_t next_scan = now + 100'000'000;
    std::int64_t stop_deadline = 0;
    for (;;) {
      const phase ph = ctl_.get();
      if (ph == phase::stopping) {
        if (stop_deadline == 0) stop_deadline = now + grace_ns_;
        if (active_ == 0) break;
        if (now >= stop_deadline) {
          abort_all();
          break;
        }
      } else if (ctl_.count_mode && ph == phase::measuring && active_ == 0 &&
                 ctl_.tickets.load(std::memory_order_relaxed) <= 0) {
        break;  // every ticket used and every counted cycle ended
      }
      const int wait_ms = sleepers_ > 0 ? 1 : (ph == phase::warmup ? 10 : 50);
      const int n = ::epoll_wait(ep_, events.data(), static_cast<int>(events.size()), wait_ms);
      now = now_ns();
      for (int i = 0; i < n; ++i) {
        const std::uint64_t key = events[static_cast<std::size_t>(i)].data.u64;
        const auto index = static_cast<std::uint32_t>(key & 0xffffffffu);
        const auto gen = static_cast<std::uint32_t>(key >> 32);
        if (index >= slots_.size() || slots_[index].generation != gen || slots_[index].fd < 0) continue;
        on_event(index, events[static_cast<std::size_t>(i)].events, now);
      }
      if (sleepers_ > 0) wake_sleepers(now);
      if (now >= next_scan) {
        scan_timeouts(now);
        next_scan = now + 100'000'000;
      }
    }
    res_.bytes_in += bytes_in_;
  }

 private:
  static constexpr std::size_t read_buffer_size = 64 * 1024;

  bool counted(const slot& s) const noexcept { return detail::counted(ctl_, s.ticketed); }

  // Decides whether a new cycle may start now and, in count mode, takes its ticket.
  bool may_start(slot& s) noexcept { return detail::may_start(ctl_, s.ticketed); }

  static void set_idle(slot& s) noexcept { s.state = slot_state::idle; }

  void start_cycle(std::uint32_t index, std::int64_t now) {
    slot& s = slots_[index];
    if (!may_start(s)) return set_idle(s);
    s.cycle_start = now;
    s.requests_on_conn = 0;
    open_connection(index, now);
  }

  void open_connection(std::uint32_t index, std::int64_t now) {
    slot& s = slots_[index];
    s.parser.reset();
    s.written = 0;
    s.deadline = now + timeout_ns_;
    s.fd = ::socket(cfg_.target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s.fd < 0) return connect_failed(index, errno, now);
    ++s.generation;
    if (!cfg_.sources.empty()) {
      // The port is chosen at connect() time, for the whole 4-tuple.
      const int one = 1;
      ::setsockopt(s.fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
      const sockaddr_storage& src = cfg_.sources[next_source_++ % cfg_.sources.size()];
      const socklen_t len = src.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
      if (::bind(s.fd, reinterpret_cast<const sockaddr*>(&src), len) != 0) {
        const int err = errno;
        ::close(s.fd);
        s.fd = -1;
        return connect_failed(index, err, now);
      }
    }
    if (::connect(s.fd, reinterpret_cast<const sockaddr*>(&cfg_.target), cfg_.target_len) != 0 &&
        errno != EINPROGRESS) {
      const int err = errno;
      ::close(s.fd);
      s.fd = -1;
      return connect_failed(index, err, now);
    }
    if (counted(s)) ++res_.connections_opened;
    ++active_;
    epoll_event ev{};
    // Edge-triggered and registered once: no epoll_ctl per state change.
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = (static_cast<std::uint64_t>(s.generation) << 32) | index;
    if (::epoll_ctl(ep_, EPOLL_CTL_ADD, s.fd, &ev) != 0) {
      const int err = errno;
      return fail(index, classify_errno(err), now, false);
    }
    s.state = slot_state::connecting;
    // On loopback the handshake has usually finished by the time connect()
    // returns EINPROGRESS: try the request at once and save a wakeup. If it
    // has not, send() says EAGAIN and EPOLLOUT brings us back.
    send_request(index, now);
  }

  // A connect that failed before any connection existed: back off 1 ms so
  // that a refused or port-starved target does not become a busy loop.
  void connect_failed(std::uint32_t index, int err, std::int64_t now) {
    slot& s = slots_[index];
    count_error(s, classify_errno(err));
    s.state = slot_state::sleeping;
    s.wake_at = now + 1'000'000;
    ++sleepers_;
  }

  void send_request(std::uint32_t index, std::int64_t now) {
    slot& s = slots_[index];
    if (s.written == 0) s.request_start = now;
    s.state = slot_state::writing;
    const std::string& req = cfg_.request;
    const ssize_t n = ::send(s.fd, req.data() + s.written, req.size() - s.written, MSG_NOSIGNAL);
    if (n >= 0) {
      s.written += static_cast<std::size_t>(n);
      if (s.written == req.size()) s.state = slot_state::reading;
      return;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (s.written == 0 && s.requests_on_conn == 0) s.state = slot_state::connecting;
      return;
    }
    fail(index, classify_errno(errno), now, false);
  }

  void on_event(std::uint32_t index, std::uint32_t events, std::int64_t now) {
    slot& s = slots_[index];
    if (s.state == slot_state::connecting && (events & EPOLLERR) != 0) {
      int err = 0;
      socklen_t len = sizeof(err);
      ::getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len);
      return fail(index, classify_errno(err != 0 ? err : ECONNREFUSED), now, false);
    }
    if (s.state == slot_state::connecting || s.state == slot_state::writing) {
      send_request(index, now);
      if (s.state != slot_state::reading) return;
    }
    if (s.state == slot_state::reading || s.state == slot_state::awaiting_fin) read_some(index, events, now);
  }

  void read_some(std::uint32_t index, std::uint32_t events, std::int64_t now) {
    slot& s = slots_[index];
    const std::uint32_t gen = s.generation;
    for (;;) {
      const ssize_t n = ::recv(s.fd, buffer_.get(), read_buffer_size, 0);
      if (n > 0) {
        bytes_in_ += static_cast<std::uint64_t>(n);
        if (s.state == slot_state::awaiting_fin) return fail(index, error_class::protocol, now, true);
        const auto r = s.parser.feed(buffer_.get(), static_cast<std::size_t>(n));
        if (r.st == response_parser::status::error) return fail(index, error_class::protocol, now, true);
        if (r.st == response_parser::status::complete) {
          if (r.consumed != static_cast<std::size_t>(n)) return fail(index, error_class::protocol, now, true);
          response_complete(index, now);
          // A new connection (or none) may be on this slot now.
          if (s.generation != gen || s.fd < 0) return;
          if (s.state == slot_state::writing || s.state == slot_state::connecting) return;
        }
        // Edge-triggered: a short read emptied the queue, and any later
        // arrival raises a new edge. Only a FIN already reported in this
        // event (EPOLLRDHUP) is read now.
        if (static_cast<std::size_t>(n) < read_buffer_size && (events & (EPOLLRDHUP | EPOLLHUP)) == 0) return;
        continue;
      }
      if (n == 0) return on_eof(index, now);
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      const int err = errno;
      if (s.state == slot_state::awaiting_fin && err == ECONNRESET) {
        // The response was whole; the server ended with RST instead of FIN.
        if (counted(s)) ++res_.server_reset_after_response;
        return connection_ended_by_server(index, now);
      }
      return fail(index, classify_errno(err), now, true);
    }
  }

  void response_complete(std::uint32_t index, std::int64_t now) {
    slot& s = slots_[index];
    const int code = s.parser.status_code();
    if (code < 200 || code > 299) return fail(index, error_class::bad_status, now, true);
    switch (cfg_.run_mode) {
      case mode::client_fin:
        close_slot(index, false);
        success(s, now - s.cycle_start);
        return start_cycle(index, now);
      case mode::client_rst:
        close_slot(index, true);
        success(s, now - s.cycle_start);
        return start_cycle(index, now);
      case mode::server_close:
        // A server that keeps the connection open although we asked it not
        // to would leave us waiting: the --timeout counts it as a timeout.
        s.state = slot_state::awaiting_fin;
        return;
      case mode::keepalive: {
        success(s, now - s.request_start);
        ++s.requests_on_conn;
        if (!s.parser.keep_alive()) {
          s.state = slot_state::awaiting_fin;  // the server closes (e.g. its keep-alive request limit)
          return;
        }
        const bool enough = cfg_.requests_per_conn > 0 && s.requests_on_conn >= cfg_.requests_per_conn;
        if (enough) {
          close_slot(index, false);
          return start_cycle(index, now);
        }
        if (!may_start(s)) {
          close_slot(index, false);
          return set_idle(s);
        }
        s.parser.reset();
        s.written = 0;
        s.deadline = now + timeout_ns_;
        return send_request(index, now);
      }
    }
  }

  void on_eof(std::uint32_t index, std::int64_t now) {
    slot& s = slots_[index];
    if (s.state == slot_state::awaiting_fin) return connection_ended_by_server(index, now);
    if (s.parser.on_eof() == response_parser::status::complete) {
      // A close-delimited body: the FIN was its end.
      const int code = s.parser.status_code();
      if (code < 200 || code > 299) return fail(index, error_class::bad_status, now, true);
      if (cfg_.run_mode == mode::keepalive) {
        success(s, now - s.request_start);
        close_slot(index, false);
        return start_cycle(index, now);
      }
      close_slot(index, cfg_.run_mode == mode::client_rst);
      success(s, now - s.cycle_start);
      return start_cycle(index, now);
    }
    fail(index, error_class::truncated, now, false);
  }

  // The server's FIN (or RST) after a whole response.
  void connection_ended_by_server(std::uint32_t index, std::int64_t now) {
    slot& s = slots_[index];
    close_slot(index, false);
    if (cfg_.run_mode == mode::server_close) success(s, now - s.cycle_start);
    start_cycle(index, now);
  }

  void success(slot& s, std::int64_t latency_ns) {
    if (!counted(s)) return;
    res_.latency.record(static_cast<std::uint64_t>(latency_ns > 0 ? latency_ns : 0));
    ++res_.completed;
    live_.completed.fetch_add(1, std::memory_order_relaxed);
  }

  void count_error(slot& s, error_class e) {
    if (!counted(s)) return;
    ++res_.errors[static_cast<std::size_t>(e)];
    live_.errors.fetch_add(1, std::memory_order_relaxed);
  }

  // Ends the cycle with an error; `abort` resets the connection (a timeout,
  // or bytes we will never read) so that a failed cycle leaves no TIME_WAIT.
  void fail(std::uint32_t index, error_class e, std::int64_t now, bool abort) {
    slot& s = slots_[index];
    count_error(s, e);
    if (s.fd >= 0) close_slot(index, abort);
    start_cycle(index, now);
  }

  void close_slot(std::uint32_t index, bool rst) {
    slot& s = slots_[index];
    if (rst) {
      // An explicit close after linger {1,0}: RST, no TIME_WAIT.
      const linger l{1, 0};
      ::setsockopt(s.fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    }
    ::close(s.fd);  // also removes it from the epoll set
    s.fd = -1;
    ++s.generation;
    s.state = slot_state::idle;
    --active_;
  }

  void wake_sleepers(std::int64_t now) {
    for (std::uint32_t i = 0; i < slots_.size(); ++i) {
      slot& s = slots_[i];
      if (s.state != slot_state::sleeping || s.wake_at > now) continue;
      --sleepers_;
      s.state = slot_state::idle;
      if (!may_start(s)) {
        set_idle(s);
        continue;
      }
      if (s.requests_on_conn == 0) s.cycle_start = now;
      open_connection(i, now);
    }
  }

  void scan_timeouts(std::int64_t now) {
    for (std::uint32_t i = 0; i < slots_.size(); ++i) {
      slot& s = slots_[i];
      if (s.fd >= 0 && s.deadline <= now) fail(i, error_class::timeout, now, true);
    }
  }

  void abort_all() {
    for (std::uint32_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].fd >= 0) {
        close_slot(i, true);
        ++res_.aborted_at_end;
      }
    }
  }

  const load_config& cfg_;
  control& ctl_;
  live_counters& live_;
  std::vector<slot> slots_;
  std::unique_ptr<char[]> buffer_ = std::make_unique<char[]>(read_buffer_size);
  int ep_ = -1;
  std::int64_t timeout_ns_ = 0;
  std::int64_t grace_ns_ = 0;
  std::size_t active_ = 0;    // slots with a connection
  std::size_t sleepers_ = 0;  // slots backing off
  std::size_t next_source_ = 0;
  std::uint64_t bytes_in_ = 0;
  load_result res_;
};

}  // namespace

void detail::merge_result(load_result& out, const load_result& r) {
  out.latency.merge(r.latency);
  out.completed += r.completed;
  for (std::size_t i = 0; i < error_class_count; ++i) out.errors[i] += r.errors[i];
  out.connections_opened += r.connections_opened;
  out.bytes_in += r.bytes_in;
  out.server_reset_after_response += r.server_reset_after_response;
  out.aborted_at_end += r.aborted_at_end;
  out.tls.merge(r.tls);
}

load_result run_load(const load_config& cfg, const progress_fn& progress) {
  if (cfg.tls) return run_tls_load(cfg, progress);
  return detail::coordinate(cfg, progress, [&](control& ctl, live_counters& live, unsigned share) {
    return std::make_unique<worker>(cfg, ctl, live, share);
  });
}

}  // namespace closewise::bench
