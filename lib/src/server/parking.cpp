// Connections waiting for their input (server_options::start_on_input): a
// socket, one readiness wait and the bytes read so far, per connection; no
// session, stream or buffer until the input is ready, a FIN or RST comes, or
// a deadline passes. One timer per worker serves every deadline.
#include <sys/socket.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>

#include "server_state.hpp"

namespace closewise::internal {

namespace {

void arm_park_timer(const std::shared_ptr<server_state>& srv, worker& w);
void wait_for_input(const std::shared_ptr<server_state>& srv, worker& w, parked_list::iterator it);

// A parked connection leaves its wait: its input is ready, or a timeout or a
// drain cancelled the wait. It becomes a session (which, for a connection
// that never sent a byte, only closes it).
void unpark(const std::shared_ptr<server_state>& srv, worker& w, parked_list::iterator it) {
  const peer_address peer = it->peer;
  const session_start start = it->start;
  const clock::time_point since = it->has_input ? it->input_since : clock::now();
  stream io = make_stream(*srv, std::move(it->sock), peer, std::move(it->ahead));
  (it->has_input ? w.partial : w.parked).erase(it);
  srv->counters.unparked();
  asio::co_spawn(w.ioc, run_session(srv, &w, std::move(io), peer, start, since), asio::detached);
}

// Reads what a waking parked connection has (server_options::input_limit
// in all) and says whether it must wait for more: its input is not ready
// (server_options::input_ready), and no FIN, reset, error or full limit makes
// it the session's to meet. The bytes are read, not peeked: the kernel frees
// the buffers that held them (several times their size), the socket stops
// being readable until more come, and the session's first read costs no
// syscall (they reach it through the stream's read_ahead).
bool needs_more_input(const server_state& srv, worker& w, parked_connection& p, const input_read* done = nullptr) {
  const auto& o = srv.opts;
  if (o.input_limit == 0 || p.ahead.bytes.size() >= o.input_limit) return false;
  const input_read r =
      done ? *done : read_input(srv, w, static_cast<int>(p.sock.native_handle()), p.ahead.bytes.size());
  if (r.n < 0 && (r.error == EAGAIN || r.error == EWOULDBLOCK || r.error == EINTR)) return true;  // nothing yet
  // A reset with nothing queued: this read took the socket's pending error,
  // and a read after it would see EOF. The session's stream gets it.
  if (r.n < 0) p.ahead.error = r.error;
  if (r.n <= 0) return false;  // a FIN (or an error) after the input: the session meets it
  p.ahead.bytes.append(w.read_buffer.get(), static_cast<std::size_t>(r.n));
  if (!o.input_ready || o.tls || p.ahead.bytes.size() >= o.input_limit) return false;  // TLS: a ClientHello
  return !o.input_ready(p.ahead.bytes);
}

// The wait of a parked connection ended. Input, FIN and RST all make a
// socket readable; an error of the wait itself is left to the session.
// Returns whether it is still parked.
bool on_readable(const std::shared_ptr<server_state>& srv, worker& w, parked_list::iterator it,
                 const input_read* done = nullptr) {
  if (it->start != session_start::serve || !needs_more_input(*srv, w, *it, done)) {
    unpark(srv, w, it);
    return false;
  }
  if (!it->has_input && !it->ahead.bytes.empty()) {
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

void wait_for_input(const std::shared_ptr<server_state>& srv, worker& w, parked_list::iterator it) {
  it->sock.async_wait(asio::socket_base::wait_read,
                      [srv, w = &w, it](const error_code&) { static_cast<void>(on_readable(srv, *w, it)); });
}

// How long a new connection may stay silent (server_options::first_input_timeout).
std::chrono::milliseconds silent_limit(const server_state& srv) noexcept {
  const auto first = srv.opts.first_input_timeout;
  return first.count() > 0 ? first : srv.opts.stream.idle_timeout;
}

// The earliest deadline still waiting in a list (each list is in deadline order).
clock::time_point first_deadline(const parked_list& list) {
  for (const parked_connection& p : list) {
    if (p.start == session_start::serve) return p.deadline;
  }
  return clock::time_point::max();
}

// Cancels the waits of a list whose deadline passed, marking why. With
// `renew` (the idle list): a connection whose first bytes are already in its
// receive queue is not idle, whatever the clock says (a busy thread runs the
// timer late, and the wait's completion is queued behind it): it gets a new
// deadline, `renew` from now, at the end of the list (which stays in
// deadline order), and its wait's completion serves it. Closing it would
// discard a request that arrived in time. The ready list has no renewal: its
// deadline bounds the whole header, however its bytes trickle in.
void expire(parked_list& list, clock::time_point now, session_start why,
            std::chrono::milliseconds renew = std::chrono::milliseconds(0)) {
  for (auto it = list.begin(); it != list.end();) {
    parked_connection& p = *it;
    if (p.start != session_start::serve) {  // leaving already
      ++it;
      continue;
    }
    if (p.deadline > now) break;
    error_code ec;
    if (renew.count() > 0 && p.sock.available(ec) > 0 && !ec) {
      p.deadline = now + renew;
      list.splice(list.end(), list, it++);
      continue;
    }
    p.start = why;
    p.sock.cancel(ec);
    ++it;
  }
}

void arm_park_timer(const std::shared_ptr<server_state>& srv, worker& w) {
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
    expire(w->parked, now, session_start::idle_timeout, silent_limit(*srv));
    expire(w->partial, now, session_start::ready_timeout);
    arm_park_timer(srv, *w);
  });
}

}  // namespace

input_read read_input(const server_state& srv, worker& w, int fd, std::size_t have) {
  const std::size_t limit = srv.opts.input_limit;
  if (!w.read_buffer) w.read_buffer = std::make_unique_for_overwrite<char[]>(limit);
  input_read r;
  r.n = ::recv(fd, w.read_buffer.get(), limit - have, MSG_DONTWAIT);
  r.error = r.n < 0 ? errno : 0;
  return r;
}

void park(const std::shared_ptr<server_state>& srv, worker& w, socket s, peer_address peer, const input_read* first) {
  const auto idle = silent_limit(*srv);
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

}  // namespace closewise::internal
