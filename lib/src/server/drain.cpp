// The graceful drain (SIGTERM/SIGINT after drain_delay, server::drain): stop
// accepting, let exchanges in flight finish, close idle connections
// gracefully once they have been idle for the grace, reset what is left at
// the deadline.
#include <boost/asio/post.hpp>

#include "server_state.hpp"

namespace closewise::internal {

void server_state::wait_for_signal() {
  signals->async_wait([self = shared_from_this()](const error_code& ec, int sig) {
    if (ec) return;
    if (self->opts.drain_delay.count() > 0 && self->ready.exchange(false)) {
      closewise::logger()->info("signal {}: not ready; draining in {} ms (a second signal drains now)", sig,
                                self->opts.drain_delay.count());
      self->delay_timer.emplace(self->acceptor_home().ioc);
      self->delay_timer->expires_after(self->opts.drain_delay);
      self->delay_timer->async_wait([self](const error_code& tec) {
        if (tec) return;
        self->start_drain();
        closewise::logger()->info("drain delay over: draining");
      });
      self->wait_for_signal();
      return;
    }
    self->start_drain();  // before the line: a reader of the log may rely on the state
    closewise::logger()->info("signal {}: draining", sig);
  });
}

void server_state::start_drain() {
  ready = false;
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
    if (self->delay_timer) self->delay_timer->cancel();
    if (self->counters.open() == 0) self->release_all();
  });
  const clock::time_point deadline(clock::duration(drain_deadline.load()));
  for (auto& w : workers) {
    asio::post(w->ioc, [self = shared_from_this(), w = w.get(), deadline] { self->drain_pass(*w, deadline); });
  }
}

// A drain's graceful close of the connections that are idle: waiting for
// a new exchange, for the grace at least, with no input in the kernel either.
void server_state::close_idle(worker& w) {
  const auto cutoff = clock::now() - opts.drain_idle_grace;
  for (connection_impl& c : w.connections) {
    if (!c.tcp().idle_since(cutoff)) continue;
    c.drained = true;
    c.tcp().note_server_drain();
    c.async_close(close_policy::graceful, [](close_report) {});
  }
}

// Closes idle connections gracefully once they have been idle for the
// grace; at the deadline resets the rest. Repeats while connections
// remain: a session that finishes its exchange after the first pass goes
// idle later, and an idle one reaches the grace later.
void server_state::drain_pass(worker& w, clock::time_point deadline) {
  const auto now = clock::now();
  const bool force = now >= deadline;
  if (force) {
    for (connection_impl& c : w.connections) {
      if (c.tcp().state().closing()) continue;
      c.forced = true;
      forced.fetch_add(1, std::memory_order_relaxed);
      c.async_close(close_policy::abortive, [](close_report) {});
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

}  // namespace closewise::internal
