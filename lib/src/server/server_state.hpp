#pragma once
// The server's state, shared by its parts (internal; users see server.hpp):
//   accept.cpp   listeners and the accept loop: accept4, limits, back-off, hand-off
//   parking.cpp  connections waiting for their input (server_options::start_on_input)
//   session.cpp  a connection's session, its write queue, its close and its count
//   drain.cpp    the graceful drain: idle connections first, the rest at the deadline
//   server.cpp   the public server: start, run, drain, stop
//   connect.cpp  endpoints and the client's connect

#include <sys/types.h>

#include <cerrno>

#include <atomic>
#include <chrono>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/intrusive/list.hpp>

#include "../stats_recorder.hpp"
#include "closewise/server.hpp"

namespace closewise::internal {

using clock = std::chrono::steady_clock;
inline constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
using acceptor_type = asio::basic_socket_acceptor<asio::generic::stream_protocol>;

// A steady_timer used as a condition: waits "forever" until cancelled.
inline void arm_forever(asio::steady_timer& t) { t.expires_at(clock::time_point::max()); }

// The peer of an accepted connection, kept as an address and formatted only
// when someone asks (most servers never do: formatting at every accept cost
// 3.5% of a short connection's server time).
struct peer_address {
  asio::ip::tcp::endpoint tcp;
  bool is_tcp = false;
};

peer_address to_peer_address(const asio::generic::stream_protocol::endpoint& e);

// Why a connection's session starts: its input is ready (or it was never
// parked); its input waited too long to become ready (serve it anyway); or
// it leaves the wait without ever having sent a byte.
enum class session_start : std::uint8_t { serve, ready_timeout, idle_timeout, drain };

struct connection_impl;
struct server_state;
struct worker;

// A worker's connections, linked through a hook in each connection_impl (no
// node to allocate per connection). auto_unlink: a connection destroyed
// while listed (the io_context destroying a session's frame) leaves the list
// by itself, and a list destroyed first unlinks what it holds.
using connection_hook = boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::auto_unlink>>;

// An accepted connection waiting for its input (server_options::start_on_input).
struct parked_connection {
  parked_connection(socket s, peer_address p, clock::time_point since, clock::time_point d)
      : sock(std::move(s)), peer(p), deadline(d), parked_since(since) {}
  socket sock;
  peer_address peer;
  clock::time_point deadline;                  // idle deadline while silent, ready deadline once input came
  clock::time_point parked_since;              // accepted: how long a silent one has waited (drain_idle_grace)
  clock::time_point input_since;               // its first byte arrived; unset while silent
  session_start start = session_start::serve;  // set before its wait is cancelled
  bool has_input = false;                      // in worker::partial, not worker::parked
  read_ahead ahead;                            // read so far, and what a read met (ECONNRESET): the stream's start
};
using parked_list = std::list<parked_connection>;

struct connection_impl {
  connection_impl(stream s, peer_address p, clock::time_point since, server_state* srv, worker* w, close_policy policy)
      : io(std::move(s)),
        peer_addr(p),
        input_since(since),
        owner(srv),
        home(w),
        policy(policy),
        queue_signal(io.get_executor()) {
    arm_forever(queue_signal);
  }

  stream io;                        // a plain connection's stream; moved into `tls` for TLS
  std::unique_ptr<tls_stream> tls;  // TLS: owns the TCP stream
  peer_address peer_addr;
  clock::time_point input_since;
  std::string peer;  // formatted from peer_addr on first use
  server_state* owner;
  worker* home;
  close_policy policy;
  connection_hook registration;  // in home->connections while its session runs
  // Queued writes (connection::send) and the writer draining them.
  std::list<std::string> queue;  // a list: empty costs nothing (a deque allocates ~600 B up front)
  std::size_t queued_bytes = 0;
  bool writer_running = false;
  error_code write_error;
  asio::steady_timer queue_signal;  // cancelled whenever the queue shrank or failed
  bool drained = false;             // closed by a drain while idle
  bool forced = false;              // reset at the drain deadline

  // The TCP stream, under TLS or not.
  stream& tcp() noexcept { return tls ? tls->tcp() : io; }
  std::optional<close_report> report() const { return tls ? tls->report() : io.report(); }
  // Closes with `p` through TLS (close_notify first) or not. These pick the
  // layer with if/else in plain functions: g++ 12 evaluates both arms of a
  // conditional expression awaited in a coroutine.
  template <class Token>
  auto async_close(close_policy p, Token&& token) {
    if (tls) return tls->async_close(p, std::forward<Token>(token));
    return io.async_close(p, std::forward<Token>(token));
  }
  asio::awaitable<std::tuple<error_code, std::size_t>> read_some(asio::mutable_buffer b) {
    if (tls) return tls->async_read_some(b, use_tuple);
    return io.async_read_some(b, use_tuple);
  }
  asio::awaitable<std::tuple<error_code>> shutdown_write() {
    if (tls) return tls->async_shutdown_write(use_tuple);
    return io.async_shutdown_write(use_tuple);
  }

  // The session's and the observer's handle (connection's constructor is private).
  static connection handle(std::shared_ptr<connection_impl> c) { return connection(std::move(c)); }
};

struct worker {
  asio::io_context ioc{1};
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard{ioc.get_executor()};
  // Touched only on this worker's thread. Declared after the io_context, so
  // destroyed before it: parked sockets deregister from a live reactor.
  boost::intrusive::list<
      connection_impl, boost::intrusive::member_hook<connection_impl, connection_hook, &connection_impl::registration>,
      boost::intrusive::constant_time_size<false>>
      connections;
  asio::steady_timer drain_tick{ioc};
  // Silent connections in order of arrival, and so of idle deadline; those
  // with input that is not ready yet in order of their first byte, and so of
  // ready deadline. One timer serves both lists.
  parked_list parked;
  parked_list partial;
  asio::steady_timer park_timer{ioc};
  clock::time_point park_timer_at = clock::time_point::max();  // max: not armed
  std::unique_ptr<char[]> read_buffer;                         // server_options::input_limit, shared by all
};

struct server_state : std::enable_shared_from_this<server_state> {
  server_state(server_options o, session_handler s) : opts(std::move(o)), session(std::move(s)) {
    const unsigned n = opts.threads > 0 ? opts.threads : std::max(1u, std::thread::hardware_concurrency());
    for (unsigned i = 0; i < n; ++i) workers.push_back(std::make_unique<worker>());
  }

  server_options opts;
  session_handler session;
  close_observer observer;
  std::vector<std::unique_ptr<worker>> workers;
  std::vector<std::unique_ptr<acceptor_type>> acceptors;
  std::vector<std::string> endpoints;
  std::vector<std::string> unix_files;
  stats_recorder counters;
  std::atomic<bool> draining{false};
  std::atomic<bool> ready{true};              // false from the first signal (drain_delay) or the drain on
  std::atomic<clock::rep> drain_deadline{0};  // written before `draining` is set
  std::atomic<bool> paused{false};
  std::atomic<std::uint64_t> forced{0};
  std::size_t next_worker = 0;                  // touched only by the accept loops (worker 0)
  std::optional<asio::steady_timer> slot_free;  // on worker 0: wakes paused accept loops
  std::optional<asio::signal_set> signals;
  std::optional<asio::steady_timer> delay_timer;  // on worker 0: drain_delay after the first signal

  worker& acceptor_home() { return *workers.front(); }

  void release_all() {
    for (auto& w : workers) asio::post(w->ioc, [w = w.get()] { w->guard.reset(); });
  }

  // Counts a connection's close report, on the worker that owned it (session.cpp).
  void connection_done(const std::shared_ptr<connection_impl>& c, const close_report& r);

  // The drain (drain.cpp): stop accepting, close idle connections
  // gracefully, reset what is left at the deadline.
  void start_drain();
  // Waits for SIGTERM/SIGINT: the first starts drain_delay (if any), the
  // next (or the first, without a delay) the drain.
  void wait_for_signal();
  void close_idle(worker& w);
  void drain_pass(worker& w, clock::time_point deadline);
};

// session.cpp
stream make_stream(const server_state& srv, socket s, const peer_address& peer, read_ahead ahead = {});
asio::awaitable<void> run_session(std::shared_ptr<server_state> srv, worker* w, stream io, peer_address peer,
                                  session_start start, clock::time_point input_since);

// parking.cpp
// One read of a connection waiting for its input, into its worker's buffer.
struct input_read {
  ssize_t n = -1;
  int error = EAGAIN;
};
input_read read_input(const server_state& srv, worker& w, int fd, std::size_t have);
// Parks an accepted connection on its worker (called on that worker's
// thread). `first`: the read the accept loop made before it registered the socket.
void park(const std::shared_ptr<server_state>& srv, worker& w, socket s, peer_address peer,
          const input_read* first = nullptr);

// accept.cpp
void open_listeners(server_state& srv);
asio::awaitable<void> run_accept_loop(std::shared_ptr<server_state> srv, acceptor_type* acceptor);

}  // namespace closewise::internal
