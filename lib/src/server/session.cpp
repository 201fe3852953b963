// A connection's session: its handle (connection), its write queue, the
// session coroutine, its close with the connection's policy and its count.
#include <exception>
#include <utility>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include "server_state.hpp"

namespace closewise {

using internal::clock;
using internal::connection_impl;
using internal::use_tuple;

stream& connection::io() noexcept { return impl_->tcp(); }
tls_stream* connection::tls() noexcept { return impl_->tls.get(); }
const connection_state& connection::state() const noexcept { return impl_->tcp().state(); }
const std::string& connection::peer() const noexcept {
  connection_impl& c = *impl_;
  if (c.peer.empty()) c.peer = c.peer_addr.is_tcp ? to_string(c.peer_addr.tcp) : std::string("unix");
  return c.peer;
}
std::uint64_t connection::id() const noexcept { return impl_->tcp().id(); }
std::chrono::steady_clock::time_point connection::input_since() const noexcept { return impl_->input_since; }
bool connection::draining() const noexcept { return impl_->owner->draining.load(std::memory_order_relaxed); }
bool connection::ready() const noexcept { return impl_->owner->ready.load(std::memory_order_relaxed); }
void connection::set_close_policy(close_policy p) noexcept { impl_->policy = p; }
close_policy connection::policy() const noexcept { return impl_->policy; }
std::size_t connection::queued() const noexcept { return impl_->queued_bytes; }
void connection::mark_exchange_complete() { impl_->tcp().mark_exchange_complete(); }
void connection::mark_exchange_open() noexcept { impl_->tcp().mark_exchange_open(); }

namespace internal {

// Writes all of `b` through TLS or not. Plain functions: g++ 12 evaluates
// both arms of a conditional expression under co_await.
asio::awaitable<std::tuple<error_code, std::size_t>> write_all(connection_impl& c, asio::const_buffer b) {
  if (c.tls) return asio::async_write(*c.tls, b, use_tuple);
  return asio::async_write(c.io, b, use_tuple);
}

// The writer of one connection's queue: a named coroutine taking its state
// by value (no capturing lambda coroutines: g++ 12, asio#858).
asio::awaitable<void> run_writer(std::shared_ptr<connection_impl> c) {
  while (!c->queue.empty() && !c->write_error) {
    auto [ec, n] = co_await write_all(*c, asio::buffer(c->queue.front()));
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

}  // namespace internal

using internal::run_writer;
using internal::wait_queue_below;

error_code connection::send(std::string bytes) {
  if (impl_->write_error) return impl_->write_error;
  if (bytes.empty()) return {};
  impl_->queued_bytes += bytes.size();
  impl_->queue.push_back(std::move(bytes));
  if (!impl_->writer_running) {
    impl_->writer_running = true;
    asio::co_spawn(impl_->tcp().get_executor(), run_writer(impl_), asio::detached);
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
  auto [ec, n] = co_await c.read_some(b);
  co_return std::pair{ec, n};
}

asio::awaitable<error_code> connection::write(asio::const_buffer b) {
  if (auto ec = co_await flush()) co_return ec;
  auto [ec, n] = co_await internal::write_all(*impl_, b);
  co_return ec;
}

asio::awaitable<error_code> connection::shutdown_write() {
  if (auto ec = co_await flush()) co_return ec;
  auto [ec] = co_await impl_->shutdown_write();
  co_return ec;
}

asio::awaitable<close_report> connection::close(close_policy p) {
  auto [r] = co_await impl_->async_close(p, use_tuple);
  co_return r;
}

namespace internal {

stream make_stream(const server_state& srv, socket s, const peer_address& peer, read_ahead ahead) {
  stream_options so = srv.opts.stream;
  so.no_delay = peer.is_tcp;  // TCP_NODELAY, set before the second write (see stream_options)
  so.probe_final_state = so.probe_final_state && peer.is_tcp;
  return stream(std::move(s), so, std::move(ahead));
}

// TLS: the connection's handshake, bounded by tls_limits.handshake_timeout.
// True when the session may start. A failed handshake closes gracefully
// with no session (no close_notify: there is no TLS session to end); a
// client that spoke plain HTTP first gets `plaintext_reply` in the clear.
asio::awaitable<bool> shake_hands(server_state& srv, connection_impl& c) {
  c.tls = std::make_unique<tls_stream>(std::move(c.io), *srv.opts.tls, srv.opts.tls_limits);
  auto [ec] = co_await c.tls->async_handshake(asio::ssl::stream_base::server, use_tuple);
  if (!ec) co_return true;
  const auto& t = c.tls->tls();
  closewise::logger()->info("[conn {}] TLS handshake failed ({}): {}", c.tcp().id(), to_string(t.handshake),
                            t.handshake_error);
  if (t.handshake == tls_handshake::plaintext_http && !srv.opts.plaintext_reply.empty()) {
    auto [wec, n] = co_await asio::async_write(c.tcp(), asio::buffer(srv.opts.plaintext_reply), use_tuple);
    static_cast<void>(wec);  // a peer gone already: the close reports it
    c.tcp().mark_exchange_complete();
  }
  c.policy = close_policy::graceful;
  co_return false;
}

asio::awaitable<void> run_session(std::shared_ptr<server_state> srv, worker* w, stream io, peer_address peer,
                                  session_start start, clock::time_point input_since) {
  auto c = std::make_shared<connection_impl>(std::move(io), peer, input_since, srv.get(), w, srv->opts.policy);
  w->connections.push_back(*c);
  bool serve = start == session_start::serve || start == session_start::ready_timeout;
  if (serve && srv->opts.tls) serve = co_await shake_hands(*srv, *c);
  if (serve) {
    connection conn = connection_impl::handle(c);
    try {
      co_await srv->session(conn);
    } catch (const std::exception& e) {
      // A session that throws still gets a policy close; the error is logged.
      closewise::logger()->warn("[conn {}] session failed: {}", c->tcp().id(), e.what());
    }
  } else if (start == session_start::idle_timeout) {
    // What a session's first read would have met: the idle timeout, then
    // the close with the connection's policy.
    closewise::logger()->info("[conn {}] idle timeout before the first byte", c->tcp().id());
    c->tcp().note_timeout(timeout_kind::idle);
  } else if (start == session_start::drain) {
    // A drain met it silent while it waited for its first byte.
    c->drained = true;
    c->tcp().note_server_drain();
    c->policy = close_policy::graceful;
  }
  if (!c->report()) {
    if (!c->tcp().state().closing() && c->policy != close_policy::abortive) co_await wait_queue_below(*c, 0);
    co_await c->async_close(c->policy, use_tuple);
  }
  c->registration.unlink();
  srv->connection_done(c, *c->report());
}

// Runs on the worker that owned the connection, after its close report.
void server_state::connection_done(const std::shared_ptr<connection_impl>& c, const close_report& r) {
  counters.record(r);
  if (c->drained) counters.drain_closed();
  if (c->forced) counters.drain_forced();
  if (observer) observer(connection_impl::handle(c), r);
  if (paused.exchange(false)) {
    asio::post(acceptor_home().ioc, [self = shared_from_this()] {
      if (self->slot_free) self->slot_free->cancel();
    });
  }
  if (draining && counters.open() == 0) release_all();
}

}  // namespace internal
}  // namespace closewise
