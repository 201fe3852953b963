#include "closewise/server.hpp"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <list>
#include <stdexcept>
#include <system_error>
#include <thread>

#include <fmt/format.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/version.hpp>

namespace closewise {

namespace {

using clock = std::chrono::steady_clock;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
using acceptor_type = asio::basic_socket_acceptor<asio::generic::stream_protocol>;

// A steady_timer used as a condition: waits "forever" until cancelled.
void arm_forever(asio::steady_timer& t) { t.expires_at(clock::time_point::max()); }

accept_error classify_accept(const error_code& ec) {
  switch (ec.value()) {
    case EMFILE:
      return accept_error::emfile;
    case ENFILE:
      return accept_error::enfile;
    case ENOBUFS:
    case ENOMEM:
      return accept_error::nobufs;
    case ECONNABORTED:
      return accept_error::aborted;
    // accept(2): "already-pending network errors" to be treated like EAGAIN.
    case EPROTO:
    case ENOPROTOOPT:
    case EHOSTDOWN:
    case ENONET:
    case EHOSTUNREACH:
    case EOPNOTSUPP:
    case ENETUNREACH:
    case ENETDOWN:
    case EPERM:
      return accept_error::protocol;
    default:
      return accept_error::other;
  }
}

// The peer of an accepted connection, kept as an address and formatted only
// when someone asks (most servers never do: formatting at every accept cost
// 3.5% of a short connection's server time).
struct peer_address {
  asio::ip::tcp::endpoint tcp;
  bool is_tcp = false;
};

peer_address to_peer_address(const asio::generic::stream_protocol::endpoint& e) {
  peer_address p;
  if (e.protocol().family() == AF_INET || e.protocol().family() == AF_INET6) {
    std::memcpy(p.tcp.data(), e.data(), std::min<std::size_t>(e.size(), sizeof(sockaddr_in6)));
    p.is_tcp = true;
  }
  return p;
}

// Why a connection's session starts: its input is ready (or it was never
// parked); its input waited too long to become ready (serve it anyway); or
// it leaves the wait without ever having sent a byte.
enum class session_start : std::uint8_t { serve, ready_timeout, idle_timeout, drain };

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
  int error = 0;                               // what a read met (ECONNRESET), for the session
  std::string input;                           // read so far, for the session's stream (basic_stream::preload)
};
using parked_list = std::list<parked_connection>;

}  // namespace

struct worker {
  asio::io_context ioc{1};
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard{ioc.get_executor()};
  // Touched only on this worker's thread. Declared after the io_context, so
  // destroyed before it: parked sockets deregister from a live reactor.
  std::list<connection_impl*> connections;
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

struct connection_impl {
  connection_impl(stream s, peer_address p, clock::time_point since, server::impl* srv, worker* w, close_policy policy)
      : io(std::move(s)),
        peer_addr(p),
        input_since(since),
        owner(srv),
        home(w),
        policy(policy),
        queue_signal(io.get_executor()) {
    arm_forever(queue_signal);
  }

  stream io;
  peer_address peer_addr;
  clock::time_point input_since;
  std::string peer;  // formatted from peer_addr on first use
  server::impl* owner;
  worker* home;
  close_policy policy;
  std::list<connection_impl*>::iterator registration{};
  // Queued writes (connection::send) and the writer draining them.
  std::list<std::string> queue;  // a list: empty costs nothing (a deque allocates ~600 B up front)
  std::size_t queued_bytes = 0;
  bool writer_running = false;
  error_code write_error;
  asio::steady_timer queue_signal;  // cancelled whenever the queue shrank or failed
  bool exchange_open = false;       // the session said an exchange is in progress
  bool drained = false;             // closed by a drain while idle
  bool forced = false;              // reset at the drain deadline
};

struct server::impl : std::enable_shared_from_this<server::impl> {
  impl(server_options o, session_handler s) : opts(std::move(o)), session(std::move(s)) {
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
  server_stats counters;
  std::atomic<bool> draining{false};
  std::atomic<clock::rep> drain_deadline{0};  // written before `draining` is set
  std::atomic<bool> paused{false};
  std::atomic<std::uint64_t> forced{0};
  std::size_t next_worker = 0;                  // touched only by the accept loops (worker 0)
  std::optional<asio::steady_timer> slot_free;  // on worker 0: wakes paused accept loops
  std::optional<asio::signal_set> signals;

  worker& acceptor_home() { return *workers.front(); }

  void release_all() {
    for (auto& w : workers) asio::post(w->ioc, [w = w.get()] { w->guard.reset(); });
  }

  // Runs on the worker that owned the connection, after its close report.
  void connection_done(const std::shared_ptr<connection_impl>& c, const close_report& r) {
    counters.record(r);
    if (c->drained) counters.drain_closed();
    if (c->forced) counters.drain_forced();
    if (observer) observer(connection(c), r);
    if (paused.exchange(false)) {
      asio::post(acceptor_home().ioc, [self = shared_from_this()] {
        if (self->slot_free) self->slot_free->cancel();
      });
    }
    if (draining && counters.open() == 0) release_all();
  }

  void start_drain() {
    if (draining) return;
    drain_deadline = (clock::now() + opts.drain_timeout).time_since_epoch().count();
    if (draining.exchange(true)) return;
    asio::post(acceptor_home().ioc, [self = shared_from_this()] {
      for (auto& a : self->acceptors) {
        error_code ignored;
        a->close(ignored);
      }
      if (self->slot_free) self->slot_free->cancel();
      if (self->signals) self->signals->cancel();
      if (self->counters.open() == 0) self->release_all();
    });
    const clock::time_point deadline(clock::duration(drain_deadline.load()));
    for (auto& w : workers) {
      asio::post(w->ioc, [self = shared_from_this(), w = w.get(), deadline] { self->drain_pass(*w, deadline); });
    }
  }

  // A drain's graceful close of the connections that are idle: waiting for
  // a new exchange, for the grace at least, with no input in the kernel either.
  void close_idle(worker& w) {
    const auto now = clock::now();
    for (connection_impl* c : w.connections) {
      if (c->io.state().closing()) continue;
      if (c->io.read_pending() && !c->io.state().mid_exchange() && !c->exchange_open &&
          now - c->io.read_pending_since() >= opts.drain_idle_grace &&
          // Bytes its pending read has not taken yet: a request that came as
          // the drain did; a graceful close would read and discard it.
          c->io.preloaded() == 0 && c->io.probe(probe_unread).unread.value_or(0) == 0) {
        c->drained = true;
        c->io.async_close(close_policy::graceful, [](close_report) {});
      }
    }
  }

  // Closes idle connections gracefully once they have been idle for the
  // grace; at the deadline resets the rest. Repeats while connections
  // remain: a session that finishes its exchange after the first pass goes
  // idle later, and an idle one reaches the grace later.
  void drain_pass(worker& w, clock::time_point deadline) {
    const auto now = clock::now();
    const bool force = now >= deadline;
    if (force) {
      for (connection_impl* c : w.connections) {
        if (c->io.state().closing()) continue;
        c->forced = true;
        forced.fetch_add(1, std::memory_order_relaxed);
        c->io.async_close(close_policy::abortive, [](close_report) {});
      }
    } else {
      // Decided one turn of the queue later: a read that has completed with
      // bytes whose handler is queued but has not run yet looks idle now
      // (read pending, nothing unanswered), and closing it would read and
      // discard a request the client already sent. Handlers run in order,
      // so by then it has run and the exchange shows.
      asio::post(w.ioc, [self = shared_from_this(), &w] { self->close_idle(w); });
    }
    // Connections still waiting for their first byte are idle: they leave
    // the wait (unpark) and close gracefully as server_drain, once they have
    // waited for the grace (a proxy writes its request right after connecting).
    // Those with input are mid-request: their sessions start and finish it.
    for (parked_list* list : {&w.parked, &w.partial}) {
      for (parked_connection& p : *list) {
        if (p.start != session_start::serve) continue;
        if (!force && !p.has_input && now - p.parked_since < opts.drain_idle_grace) continue;
        p.start = p.has_input ? session_start::ready_timeout : session_start::drain;
        error_code ignored;
        p.sock.cancel(ignored);
      }
    }
    w.park_timer_at = clock::time_point::max();
    w.park_timer.cancel();  // nothing parks any more; a pending wait would keep run() going
    if (w.connections.empty() && w.parked.empty() && w.partial.empty()) return;
    w.drain_tick.expires_after(std::chrono::milliseconds(20));
    w.drain_tick.async_wait([self = shared_from_this(), &w, deadline](const error_code& ec) {
      if (!ec) self->drain_pass(w, deadline);
    });
  }
};

// ---- connection -----------------------------------------------------------

stream& connection::io() noexcept { return impl_->io; }
const connection_state& connection::state() const noexcept { return impl_->io.state(); }
const std::string& connection::peer() const noexcept {
  connection_impl& c = *impl_;
  if (c.peer.empty()) c.peer = c.peer_addr.is_tcp ? to_string(c.peer_addr.tcp) : std::string("unix");
  return c.peer;
}
std::uint64_t connection::id() const noexcept { return impl_->io.id(); }
std::chrono::steady_clock::time_point connection::input_since() const noexcept { return impl_->input_since; }
bool connection::draining() const noexcept { return impl_->owner->draining.load(std::memory_order_relaxed); }
void connection::set_close_policy(close_policy p) noexcept { impl_->policy = p; }
close_policy connection::policy() const noexcept { return impl_->policy; }
std::size_t connection::queued() const noexcept { return impl_->queued_bytes; }
void connection::mark_exchange_complete() {
  impl_->exchange_open = false;
  impl_->io.mark_exchange_complete();
}
void connection::mark_exchange_open() noexcept { impl_->exchange_open = true; }

namespace {

// The writer of one connection's queue: a named coroutine taking its state
// by value (no capturing lambda coroutines: g++ 12, asio#858).
asio::awaitable<void> run_writer(std::shared_ptr<connection_impl> c) {
  while (!c->queue.empty() && !c->write_error) {
    auto [ec, n] = co_await asio::async_write(c->io, asio::buffer(c->queue.front()), use_tuple);
    if (ec) {
      c->write_error = ec;
      break;
    }
    c->queued_bytes -= c->queue.front().size();
    c->queue.pop_front();
    c->queue_signal.cancel();
    arm_forever(c->queue_signal);
  }
  if (c->write_error) {
    c->queue.clear();
    c->queued_bytes = 0;
  }
  c->writer_running = false;
  c->queue_signal.cancel();
  arm_forever(c->queue_signal);
}

// Waits until the queue holds at most `limit` bytes (or a write failed).
asio::awaitable<error_code> wait_queue_below(connection_impl& c, std::size_t limit) {
  while (c.queued_bytes > limit && !c.write_error) {
    co_await c.queue_signal.async_wait(use_tuple);
  }
  co_return c.write_error;
}

}  // namespace

error_code connection::send(std::string bytes) {
  if (impl_->write_error) return impl_->write_error;
  if (bytes.empty()) return {};
  impl_->queued_bytes += bytes.size();
  impl_->queue.push_back(std::move(bytes));
  if (!impl_->writer_running) {
    impl_->writer_running = true;
    asio::co_spawn(impl_->io.get_executor(), run_writer(impl_), asio::detached);
  }
  return {};
}

asio::awaitable<error_code> connection::flush() { co_return co_await wait_queue_below(*impl_, 0); }

asio::awaitable<std::pair<error_code, std::size_t>> connection::read_some(asio::mutable_buffer b) {
  auto& c = *impl_;
  if (c.queued_bytes > c.owner->opts.write_high_watermark) {
    // Backpressure: stop reading until the peer takes what we owe it.
    if (auto ec = co_await wait_queue_below(c, c.owner->opts.write_low_watermark)) co_return std::pair{ec, 0};
  }
  auto [ec, n] = co_await c.io.async_read_some(b, use_tuple);
  co_return std::pair{ec, n};
}

asio::awaitable<error_code> connection::write(asio::const_buffer b) {
  if (auto ec = co_await flush()) co_return ec;
  auto [ec, n] = co_await asio::async_write(impl_->io, b, use_tuple);
  co_return ec;
}

asio::awaitable<error_code> connection::shutdown_write() {
  if (auto ec = co_await flush()) co_return ec;
  auto [ec] = co_await impl_->io.async_shutdown_write(use_tuple);
  co_return ec;
}

asio::awaitable<close_report> connection::close(close_policy p) {
  auto [r] = co_await impl_->io.async_close(p, use_tuple);
  co_return r;
}

// ---- sessions and accept loops -------------------------------------------

namespace {

asio::awaitable<void> run_session(std::shared_ptr<server::impl> srv, worker* w, socket s, peer_address peer,
                                  session_start start, clock::time_point input_since, std::string input = {},
                                  int socket_error = 0) {
  stream_options so = srv->opts.stream;
  so.no_delay = peer.is_tcp;  // TCP_NODELAY, set before the second write (see stream_options)
  so.probe_final_state = so.probe_final_state && peer.is_tcp;
  stream io(std::move(s), so);
  if (!input.empty()) io.preload(std::move(input));
  if (socket_error != 0) io.note_socket_error(error_code(socket_error, asio::error::get_system_category()));
  auto c = std::make_shared<connection_impl>(std::move(io), peer, input_since, srv.get(), w, srv->opts.policy);
  c->registration = w->connections.insert(w->connections.end(), c.get());
  if (start == session_start::serve || start == session_start::ready_timeout) {
    connection conn(c);
    try {
      co_await srv->session(conn);
    } catch (const std::exception& e) {
      // A session that throws still gets a policy close; the error is logged.
      closewise::logger()->warn("[conn {}] session failed: {}", c->io.id(), e.what());
    }
  } else if (start == session_start::idle_timeout) {
    // What a session's first read would have met: the idle timeout, then
    // the close with the connection's policy.
    closewise::logger()->info("[conn {}] idle timeout before the first byte", c->io.id());
    c->io.note_timeout(timeout_kind::idle);
  } else {
    c->drained = true;
    c->policy = close_policy::graceful;
  }
  if (!c->io.report()) {
    if (!c->io.state().closing() && c->policy != close_policy::abortive) co_await wait_queue_below(*c, 0);
    co_await c->io.async_close(c->policy, use_tuple);
  }
  w->connections.erase(c->registration);
  close_report r = *c->io.report();
  // A drain ended this idle connection: that is its cause. first_fin and
  // time_wait still say how the FINs went.
  if (c->drained && (r.cause == close_cause::ours_then_peer_fin || r.cause == close_cause::peer_fin_then_ours))
    r.cause = close_cause::server_drain;
  srv->connection_done(c, r);
}

void arm_park_timer(const std::shared_ptr<server::impl>& srv, worker& w);
void wait_for_input(const std::shared_ptr<server::impl>& srv, worker& w, parked_list::iterator it);

// A parked connection leaves its wait: its input is ready, or a timeout or a
// drain cancelled the wait. It becomes a session (which, for a connection
// that never sent a byte, only closes it).
void unpark(const std::shared_ptr<server::impl>& srv, worker& w, parked_list::iterator it) {
  socket s = std::move(it->sock);
  const peer_address peer = it->peer;
  const session_start start = it->start;
  const int error = it->error;
  const clock::time_point since = it->has_input ? it->input_since : clock::now();
  std::string input = std::move(it->input);
  (it->has_input ? w.partial : w.parked).erase(it);
  srv->counters.unparked();
  asio::co_spawn(w.ioc, run_session(srv, &w, std::move(s), peer, start, since, std::move(input), error),
                 asio::detached);
}

// One read of a connection waiting for its input, into its worker's buffer.
struct input_read {
  ssize_t n = -1;
  int error = EAGAIN;
};

input_read read_input(const server::impl& srv, worker& w, int fd, std::size_t have) {
  const std::size_t limit = srv.opts.input_limit;
  if (!w.read_buffer) w.read_buffer = std::make_unique_for_overwrite<char[]>(limit);
  input_read r;
  r.n = ::recv(fd, w.read_buffer.get(), limit - have, MSG_DONTWAIT);
  r.error = r.n < 0 ? errno : 0;
  return r;
}

// Reads what a waking parked connection has (server_options::input_limit
// in all) and says whether it must wait for more: its input is not ready
// (server_options::input_ready), and no FIN, reset, error or full limit makes
// it the session's to meet. The bytes are read, not peeked: the kernel frees
// the buffers that held them (several times their size), the socket stops
// being readable until more come, and the session's first read costs no
// syscall (they reach it through basic_stream::preload).
bool needs_more_input(const server::impl& srv, worker& w, parked_connection& p, const input_read* done = nullptr) {
  const auto& o = srv.opts;
  if (o.input_limit == 0 || p.input.size() >= o.input_limit) return false;
  const input_read r = done ? *done : read_input(srv, w, static_cast<int>(p.sock.native_handle()), p.input.size());
  if (r.n < 0 && (r.error == EAGAIN || r.error == EWOULDBLOCK || r.error == EINTR)) return true;  // nothing yet
  // A reset with nothing queued: this read took the socket's pending error,
  // and a read after it would see EOF. The session's stream gets it.
  if (r.n < 0) p.error = r.error;
  if (r.n <= 0) return false;  // a FIN (or an error) after the input: the session meets it
  p.input.append(w.read_buffer.get(), static_cast<std::size_t>(r.n));
  if (!o.input_ready || p.input.size() >= o.input_limit) return false;
  return !o.input_ready(p.input);
}

// The wait of a parked connection ended. Input, FIN and RST all make a
// socket readable; an error of the wait itself is left to the session.
// Returns whether it is still parked.
bool on_readable(const std::shared_ptr<server::impl>& srv, worker& w, parked_list::iterator it,
                 const input_read* done = nullptr) {
  if (it->start != session_start::serve || !needs_more_input(*srv, w, *it, done)) {
    unpark(srv, w, it);
    return false;
  }
  if (!it->has_input && !it->input.empty()) {
    // Its first byte: from now on the ready timeout bounds the wait.
    const auto now = clock::now();
    it->has_input = true;
    it->input_since = now;
    auto limit = srv->opts.ready_timeout;
    if (limit.count() <= 0) limit = srv->opts.stream.idle_timeout;  // one limit for the whole list: it stays in order
    it->deadline = limit.count() > 0 ? now + limit : clock::time_point::max();
    w.partial.splice(w.partial.end(), w.parked, it);
    if (it->deadline < w.park_timer_at) arm_park_timer(srv, w);
  }
  wait_for_input(srv, w, it);
  return true;
}

void wait_for_input(const std::shared_ptr<server::impl>& srv, worker& w, parked_list::iterator it) {
  it->sock.async_wait(asio::socket_base::wait_read,
                      [srv, w = &w, it](const error_code&) { static_cast<void>(on_readable(srv, *w, it)); });
}

// Runs on the connection's worker.
// `first`: the read the accept loop made before it registered the socket.
void park(const std::shared_ptr<server::impl>& srv, worker& w, socket s, peer_address peer,
          const input_read* first = nullptr) {
  const auto idle = srv->opts.stream.idle_timeout;
  const auto now = clock::now();
  const auto deadline = idle.count() > 0 ? now + idle : clock::time_point::max();
  w.parked.emplace_back(std::move(s), peer, now, deadline);
  const auto it = std::prev(w.parked.end());
  srv->counters.parked();
  if (srv->draining) {
    // Accepted as the drain began, after its pass over this worker. A proxy
    // that just connected is writing its request: with a grace, the drain's
    // passes (restarted here, they may have ended) leave it that long to come.
    if (srv->opts.drain_idle_grace.count() <= 0) {
      it->start = session_start::drain;
      if (first) static_cast<void>(needs_more_input(*srv, w, *it, first));  // its bytes or error go with it
      return unpark(srv, w, it);
    }
    asio::post(w.ioc,
               [srv, w = &w] { srv->drain_pass(*w, clock::time_point(clock::duration(srv->drain_deadline.load()))); });
  }
  if (srv->opts.input_limit > 0) {
    // A client that sent its request with the handshake has it waiting
    // already: no wait, no wake-up, the session starts now.
    if (!on_readable(srv, w, it, first) || it->has_input) return;
  } else {
    wait_for_input(srv, w, it);
  }
  if (deadline < w.park_timer_at) arm_park_timer(srv, w);
}

// The earliest deadline still waiting in a list (each list is in deadline order).
clock::time_point first_deadline(const parked_list& list) {
  for (const parked_connection& p : list) {
    if (p.start == session_start::serve) return p.deadline;
  }
  return clock::time_point::max();
}

// Cancels the waits of a list whose deadline passed, marking why.
void expire(parked_list& list, clock::time_point now, session_start why) {
  for (parked_connection& p : list) {
    if (p.start != session_start::serve) continue;  // leaving already
    if (p.deadline > now) break;
    p.start = why;
    error_code ignored;
    p.sock.cancel(ignored);
  }
}

void arm_park_timer(const std::shared_ptr<server::impl>& srv, worker& w) {
  const auto at = std::min(first_deadline(w.parked), first_deadline(w.partial));
  w.park_timer_at = at;
  if (at == clock::time_point::max()) {
    w.park_timer.cancel();
    return;
  }
  w.park_timer.expires_at(at);
  w.park_timer.async_wait([srv, w = &w, at](const error_code& ec) {
    if (ec || w->park_timer_at != at) return;  // cancelled, or re-armed for an earlier deadline
    w->park_timer_at = clock::time_point::max();
    const auto now = clock::now();
    expire(w->parked, now, session_start::idle_timeout);
    expire(w->partial, now, session_start::ready_timeout);
    arm_park_timer(srv, *w);
  });
}

// What Asio keeps about a socket (asio::detail::socket_ops::state_type),
// reached the way a derived class may: through a pointer to the protected
// member, applied to the socket.
struct socket_state_access : socket {
  static auto& implementation(socket& s) noexcept { return (s.*&socket_state_access::impl_).get_implementation(); }
  static asio::detail::socket_ops::state_type& of(socket& s) noexcept { return implementation(s).state_; }
};

// One accept4(2) on the non-blocking listener. The new socket is
// non-blocking and close-on-exec from the start.
int accept_raw(acceptor_type& a, asio::generic::stream_protocol::endpoint& from, error_code& ec) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  const int fd = ::accept4(static_cast<int>(a.native_handle()), reinterpret_cast<sockaddr*>(&addr), &len,
                           SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) {
    ec = error_code(errno, asio::error::get_system_category());
    return -1;
  }
  from.resize(std::min<std::size_t>(len, sizeof addr));
  std::memcpy(from.data(), &addr, from.size());
  ec = {};
  return fd;
}

// Hands an accepted descriptor to Asio (which registers it with the
// reactor), and tells Asio what it is: its own accept marks a socket as a
// possible dup and leaves it blocking, which costs an FIONBIO before the
// first operation and an EPOLL_CTL_DEL before the close (a descriptor that is
// no dup leaves the epoll set when it is closed). Two syscalls of about a
// dozen per connection. Closes the descriptor if Asio cannot take it.
error_code adopt(socket& s, int fd, const asio::generic::stream_protocol::endpoint& from) {
  const int family = from.protocol().family();
  const int protocol = family == AF_UNIX ? 0 : static_cast<int>(IPPROTO_TCP);
  error_code ec;
  s.assign(asio::generic::stream_protocol(family, protocol), fd, ec);
  if (ec) {
    ::close(fd);
    return ec;
  }
  auto& state = socket_state_access::of(s);
  state = static_cast<asio::detail::socket_ops::state_type>((state & ~asio::detail::socket_ops::possible_dup) |
                                                            asio::detail::socket_ops::internal_non_blocking);
  return {};
}

#if BOOST_VERSION == 108100 && defined(BOOST_ASIO_HAS_EPOLL) && !defined(BOOST_ASIO_HAS_IO_URING_AS_DEFAULT)
// Two private members of Asio 1.81's epoll reactor's per-descriptor state,
// named where the language lets a private name be used (an explicit
// instantiation) and handed out by a friend function of that instantiation.
namespace epoll_access {
using descriptor = asio::detail::epoll_reactor::descriptor_state;
template <class Tag, typename Tag::type Member>
struct grant {
  friend typename Tag::type get(Tag) noexcept { return Member; }
};
struct try_speculative {
  using type = bool (descriptor::*)[asio::detail::epoll_reactor::max_ops];
  friend type get(try_speculative) noexcept;
};
struct mutex {
  using type = asio::detail::conditionally_enabled_mutex descriptor::*;
  friend type get(mutex) noexcept;
};
template struct grant<try_speculative, &descriptor::try_speculative_>;
template struct grant<mutex, &descriptor::mutex_>;
}  // namespace epoll_access

// For a socket read to the end of its input (a short read) *before* it was
// registered, registered since on this thread with nothing run in between:
// Asio's next read on it waits for the reactor's next readiness event
// instead of trying the socket first (its "speculative" read, which would
// answer EAGAIN). Sound because the reactor registers the socket
// edge-triggered and epoll checks readiness when a socket is added: a FIN
// already queued behind the bytes (a short read does not show it) makes the
// socket ready at registration, and bytes, a FIN or a RST that come later
// raise an event; either event turns speculation back on. After a short
// read of a socket that was registered already, an event may have been
// handled before the read, and a FIN behind the bytes would then raise no
// other: this is only for the read before registration. Saves a
// server-close connection's graceful drain the read that finds nothing
// before the client's FIN: one syscall of about eight.
void expect_input_event(socket& s) noexcept {
  auto* d = socket_state_access::implementation(s).reactor_data_;
  if (d == nullptr) return;
  asio::detail::conditionally_enabled_mutex::scoped_lock lock(d->*get(epoll_access::mutex{}));
  (d->*get(epoll_access::try_speculative{}))[asio::detail::epoll_reactor::read_op] = false;
}
#else
// Another Asio or reactor: Asio's next read tries the socket first.
void expect_input_event(socket&) noexcept {}
#endif

asio::awaitable<void> run_accept_loop(std::shared_ptr<server::impl> srv, acceptor_type* acceptor) {
  auto& home = srv->acceptor_home();
  asio::steady_timer backoff(home.ioc);
  asio::generic::stream_protocol::endpoint from;
  const auto& o = srv->opts;
  // Accepts in a row without a wait; after a burst the loop lets the
  // sessions of its thread run, as a completion through the scheduler would.
  constexpr unsigned max_burst = 16;
  unsigned burst = 0;
  while (!srv->draining) {
    if (o.overflow == overflow_action::pause_accept && srv->counters.open() >= o.max_connections) {
      srv->paused = true;
      if (srv->counters.open() < o.max_connections) {  // a close raced the check
        srv->paused = false;
        continue;
      }
      srv->counters.limit_paused();
      closewise::logger()->info("connection limit {} reached: accepting paused", o.max_connections);
      arm_forever(*srv->slot_free);
      co_await srv->slot_free->async_wait(use_tuple);
      continue;
    }
    if (burst == max_burst) {
      burst = 0;
      co_await asio::post(home.ioc, asio::use_awaitable);
      continue;  // the drain, the limit and the listener may have changed meanwhile
    }
    if (!acceptor->is_open()) break;
    worker& target = *srv->workers[srv->next_worker % srv->workers.size()];
    error_code ec;
    const int fd = accept_raw(*acceptor, from, ec);
    if (ec == asio::error::would_block || ec == asio::error::try_again) {
      // The backlog is empty: wait for the next connection (a close of the
      // listener by a drain or a stop ends the wait).
      burst = 0;
      const auto [wait_ec] = co_await acceptor->async_wait(asio::socket_base::wait_read, use_tuple);
      if (wait_ec == asio::error::operation_aborted || !acceptor->is_open()) break;
      continue;
    }
    if (ec == asio::error::interrupted) continue;
    ++burst;
    if (ec) {
      const accept_error kind = classify_accept(ec);
      srv->counters.accept_failed(kind);
      if (kind == accept_error::aborted || kind == accept_error::protocol) continue;
      // Out of descriptors or memory: retrying at once spins (FIELD-NOTES).
      closewise::logger()->info("accept failed ({}): backing off {} ms", ec.message(), o.accept_backoff.count());
      backoff.expires_after(o.accept_backoff);
      co_await backoff.async_wait(use_tuple);
      continue;
    }
    if (srv->counters.open() >= o.max_connections) {
      // overflow_action::reject: a RST tells the client at once, and costs no TIME_WAIT.
      const ::linger reset{1, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
      ::close(fd);
      srv->counters.limit_rejected();
      continue;
    }
    // A client that sent its request with the handshake has it waiting: on
    // this thread, it is read before the socket is registered, so that the
    // reactor's registration tells whether anything (its FIN) follows it.
    const bool read_first = o.start_on_input && o.input_limit > 0 && &target == &home;
    const input_read first = read_first ? read_input(*srv, home, fd, 0) : input_read{};
    socket s(target.ioc);
    if (const error_code adopt_ec = adopt(s, fd, from)) {
      srv->counters.accept_failed(classify_accept(adopt_ec));
      closewise::logger()->info("accepted connection not registered: {}", adopt_ec.message());
      continue;
    }
    if (read_first && first.n > 0 && static_cast<std::size_t>(first.n) < o.input_limit) expect_input_event(s);
    const peer_address peer = to_peer_address(from);
    srv->counters.accepted();
    ++srv->next_worker;
    if (!o.start_on_input) {
      asio::co_spawn(target.ioc, run_session(srv, &target, std::move(s), peer, session_start::serve, clock::now()),
                     asio::detached);
    } else if (&target == &home) {
      park(srv, target, std::move(s), peer, read_first ? &first : nullptr);
    } else {
      // The wait list belongs to the target's thread.
      asio::post(target.ioc,
                 [srv, w = &target, s = std::move(s), peer]() mutable { park(srv, *w, std::move(s), peer); });
    }
  }
}

}  // namespace

// ---- server ----------------------------------------------------------------

server::server(server_options opts, session_handler session)
    : impl_(std::make_shared<impl>(std::move(opts), std::move(session))) {}

server::~server() {
  stop();
  // Pending sessions hold the server's state; destroy them (with their
  // io_contexts) before anything they refer to, listeners first.
  impl_->acceptors.clear();
  impl_->signals.reset();
  impl_->slot_free.reset();
  impl_->workers.clear();
  for (const auto& path : impl_->unix_files) ::unlink(path.c_str());
}

void server::on_close(close_observer f) { impl_->observer = std::move(f); }
const server_stats& server::stats() const noexcept { return impl_->counters; }
std::uint64_t server::forced_in_drain() const noexcept { return impl_->forced.load(); }
std::vector<std::string> server::local_endpoints() const { return impl_->endpoints; }

void server::start() {
  auto& home = impl_->acceptor_home();
  impl_->slot_free.emplace(home.ioc);
  for (const auto& text : impl_->opts.listen) {
    const auto ep = parse_endpoint(text);
    auto a = std::make_unique<acceptor_type>(home.ioc);
    const asio::generic::stream_protocol::endpoint gep(ep);
    a->open(gep.protocol());
    a->set_option(asio::socket_base::reuse_address(true));
    if (impl_->opts.reuse_port) a->set_option(asio::detail::socket_option::boolean<SOL_SOCKET, SO_REUSEPORT>(true));
    if (ep.address().is_v6()) a->set_option(asio::ip::v6_only(true));
    a->bind(gep);
    a->listen(impl_->opts.backlog);
    a->native_non_blocking(true);  // accept_raw must not block
    asio::ip::tcp::endpoint bound;
    const auto local = a->local_endpoint();
    std::memcpy(bound.data(), local.data(), std::min<std::size_t>(local.size(), sizeof(sockaddr_in6)));
    impl_->endpoints.push_back(to_string(bound));
    impl_->acceptors.push_back(std::move(a));
  }
  for (const auto& path : impl_->opts.unix_paths) {
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
    const asio::generic::stream_protocol::endpoint gep{asio::local::stream_protocol::endpoint(path)};
    auto a = std::make_unique<acceptor_type>(home.ioc);
    a->open(gep.protocol());
    a->bind(gep);
    a->listen(impl_->opts.backlog);
    a->native_non_blocking(true);
    impl_->unix_files.push_back(path);
    impl_->endpoints.push_back("unix:" + path);
    impl_->acceptors.push_back(std::move(a));
  }
  for (auto& a : impl_->acceptors) {
    asio::co_spawn(home.ioc, run_accept_loop(impl_, a.get()), asio::detached);
  }
  if (impl_->opts.handle_signals) {
    impl_->signals.emplace(home.ioc, SIGINT, SIGTERM);
    impl_->signals->async_wait([self = impl_](const error_code& ec, int sig) {
      if (ec) return;
      closewise::logger()->info("signal {}: draining", sig);
      self->start_drain();
    });
  }
}

void server::run() {
  std::vector<std::thread> threads;
  for (std::size_t i = 1; i < impl_->workers.size(); ++i) {
    threads.emplace_back([w = impl_->workers[i].get()] { w->ioc.run(); });
  }
  impl_->workers.front()->ioc.run();
  for (auto& t : threads) t.join();
}

void server::drain() { impl_->start_drain(); }

void server::stop() {
  for (auto& w : impl_->workers) w->ioc.stop();
}

// ---- endpoints and client ----------------------------------------------

asio::ip::tcp::endpoint parse_endpoint(const std::string& text) {
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon + 1 == text.size())
    throw std::invalid_argument("expected HOST:PORT, got '" + text + "'");
  std::string host = text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.empty() || host == "*") host = "0.0.0.0";
  if (host == "localhost") host = "127.0.0.1";
  error_code ec;
  const auto address = asio::ip::make_address(host, ec);
  if (ec) throw std::invalid_argument("not a numeric address: '" + host + "' in '" + text + "'");
  unsigned long port = 0;
  try {
    std::size_t used = 0;
    port = std::stoul(text.substr(colon + 1), &used);
    if (used != text.size() - colon - 1) throw std::invalid_argument("trailing characters");
  } catch (const std::exception&) {
    throw std::invalid_argument("not a port: '" + text.substr(colon + 1) + "' in '" + text + "'");
  }
  if (port > 65535) throw std::invalid_argument("port out of range in '" + text + "'");
  return {address, static_cast<unsigned short>(port)};
}

std::string to_string(const asio::ip::tcp::endpoint& e) {
  if (e.address().is_v6()) return fmt::format("[{}]:{}", e.address().to_string(), e.port());
  return fmt::format("{}:{}", e.address().to_string(), e.port());
}

asio::awaitable<std::pair<error_code, std::optional<stream>>> connect(asio::any_io_executor ex, std::string target,
                                                                      std::chrono::milliseconds timeout,
                                                                      stream_options opts) {
  asio::ip::tcp::endpoint ep;
  try {
    ep = parse_endpoint(target);
  } catch (const std::invalid_argument&) {
    co_return std::pair{error_code(asio::error::invalid_argument), std::optional<stream>{}};
  }
  const asio::generic::stream_protocol::endpoint gep(ep);
  socket s(ex);
  error_code ec;
  s.open(gep.protocol(), ec);
  if (ec) co_return std::pair{ec, std::optional<stream>{}};
  asio::steady_timer timer(ex);
  bool timed_out = false;
  timer.expires_after(timeout);
  timer.async_wait([&s, &timed_out](const error_code& e) {
    if (e) return;
    timed_out = true;
    error_code ignored;
    s.cancel(ignored);
  });
  auto [cec] = co_await s.async_connect(gep, use_tuple);
  timer.cancel();
  if (cec) co_return std::pair{timed_out ? error_code(asio::error::timed_out) : cec, std::optional<stream>{}};
  s.set_option(asio::ip::tcp::no_delay(true), ec);
  co_return std::pair{error_code{}, std::optional<stream>{stream(std::move(s), opts)}};
}

}  // namespace closewise
