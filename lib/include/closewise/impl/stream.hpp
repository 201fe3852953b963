#pragma once
// The operations of closewise::basic_stream: read, write, shutdown and close,
// each an Asio composed operation over the stream's shared state.
// Implementation: included at the end of closewise/stream.hpp.

#include <boost/asio/append.hpp>
#include <boost/asio/post.hpp>

namespace closewise {

template <class NextLayer>
template <class Buffers>
struct basic_stream<NextLayer>::read_op {
  std::shared_ptr<impl_type> impl;
  Buffers buffers;
  enum { starting, reading, posted } stage = starting;
  error_code posted_ec{};

  template <class Self>
  void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
    switch (stage) {
      case starting:
        if (impl->core.closing()) {
          // The close owns the read side now (draining or closed).
          stage = posted;
          posted_ec = impl->read_refused();
          asio::post(std::move(self));
          return;
        }
        stage = reading;
        impl->app_read_in_flight = true;
        impl->app_read_started = std::chrono::steady_clock::now();
        if (impl->preloaded_left() > 0) {
          // Input the stream already has: no wait, so no clock to watch it.
          const std::size_t taken = impl->take_preloaded(buffers);
          asio::post(asio::append(std::move(self), error_code{}, taken));
          return;
        }
        impl->start_watch(impl, true, impl->app_read_started);
        // The caller's cancellation reaches the socket through our own
        // signal, which async_close also uses to take over the read side.
        if (auto slot = self.get_cancellation_state().slot(); slot.is_connected()) {
          slot.assign([sig = &impl->read_cancel](asio::cancellation_type t) { sig->emit(t); });
        }
        if (impl->pending_socket_error) {
          asio::post(asio::append(std::move(self), std::exchange(impl->pending_socket_error, {}), std::size_t{0}));
          return;
        }
        // A copy taken before `self` (and the `buffers` in it) moves into the
        // binder: a moved buffer sequence (a std::vector) is empty.
        {
          const Buffers b = buffers;
          impl->next.async_read_some(b, asio::bind_cancellation_slot(impl->read_cancel.slot(), std::move(self)));
        }
        return;
      case reading:
        impl->app_read_in_flight = false;
        impl->on_read(ec, n);
        impl->stop_watch(true, ec);  // our own timeout: timed_out, not operation_aborted
        self.complete(ec, n);
        return;
      case posted:
        self.complete(posted_ec, 0);
        return;
    }
  }
};

template <class NextLayer>
struct basic_stream<NextLayer>::wait_readable_op {
  std::shared_ptr<impl_type> impl;
  enum { starting, waiting, posted } stage = starting;
  error_code posted_ec{};

  template <class Self>
  void operator()(Self& self, error_code ec = {}) {
    switch (stage) {
      case starting:
        stage = posted;
        if (impl->core.closing()) {
          posted_ec = impl->read_refused();
          asio::post(std::move(self));
          return;
        }
        if (impl->preloaded_left() > 0 || impl->pending_socket_error) {
          asio::post(std::move(self));  // a read takes them at once
          return;
        }
        stage = waiting;
        impl->app_read_in_flight = true;
        impl->app_read_started = std::chrono::steady_clock::now();
        impl->start_watch(impl, true, impl->app_read_started);
        if (auto slot = self.get_cancellation_state().slot(); slot.is_connected()) {
          slot.assign([sig = &impl->read_cancel](asio::cancellation_type t) { sig->emit(t); });
        }
        impl->next.async_wait(asio::socket_base::wait_read,
                              asio::bind_cancellation_slot(impl->read_cancel.slot(), std::move(self)));
        return;
      case waiting:
        impl->app_read_in_flight = false;
        impl->note_error(ec);
        impl->stop_watch(true, ec);
        self.complete(ec);
        return;
      case posted:
        self.complete(posted_ec);
        return;
    }
  }
};

template <class NextLayer>
template <class Buffers>
struct basic_stream<NextLayer>::write_op {
  std::shared_ptr<impl_type> impl;
  Buffers buffers;
  bool started = false;
  bool counted = false;

  template <class Self>
  void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
    if (!started) {
      started = true;
      if (const error_code refused = impl->write_refused()) {
        asio::post(asio::append(std::move(self), refused, std::size_t{0}));
        return;
      }
      counted = impl->feed(event::write_start(asio::buffer_size(buffers))).accepted;
      impl->app_write_in_flight = true;
      impl->start_watch(impl, false);
      if (auto slot = self.get_cancellation_state().slot(); slot.is_connected()) {
        slot.assign([sig = &impl->write_cancel](asio::cancellation_type t) { sig->emit(t); });
      }
      if (impl->pending_socket_error) {
        asio::post(asio::append(std::move(self), std::exchange(impl->pending_socket_error, {}), std::size_t{0}));
        return;
      }
      impl->before_write();
      const Buffers b = buffers;  // before `self` moves into the binder (see read_op)
      impl->next.async_write_some(b, asio::bind_cancellation_slot(impl->write_cancel.slot(), std::move(self)));
      return;
    }
    impl->app_write_in_flight = false;
    const error_code raw = ec;
    impl->stop_watch(false, ec);
    if (!counted) {
      self.complete(ec, n);
      return;
    }
    if (raw && raw != asio::error::operation_aborted) {
      impl->note_error(ec);
      if (raw == asio::error::eof) {
        // A socket write never says EOF; a next layer such as TLS does when
        // the peer closed its side. The write is over, and so is the input.
        impl->feed(event::wrote(n));
        impl->feed(event::read_eof());
      } else {
        impl->feed(event::write_failed(to_io_error(ec)));
      }
      self.complete(ec, n);
      return;
    }
    // Run the caller's continuation first: a composed write (asio::async_write,
    // beast::http::async_write) issues its next write_some from inside it, and
    // a FIN requested meanwhile must wait for that one too.
    auto keep = impl;
    keep->write_completing = n;  // counted in a report made inside the continuation
    keep->in_write_continuation = true;
    self.complete(ec, n);
    keep->in_write_continuation = false;
    keep->write_completing = 0;
    if (keep->core.closing()) keep->touch();
    keep->feed(event::wrote(n));
  }
};

template <class NextLayer>
struct basic_stream<NextLayer>::shutdown_op {
  std::shared_ptr<impl_type> impl;
  enum { starting, waiting, posted } stage = starting;
  error_code result{};

  template <class Self>
  void operator()(Self& self, error_code = {}) {
    switch (stage) {
      case starting: {
        const step s = impl->feed(event::shutdown());
        if (!s.accepted) result = asio::error::broken_pipe;
        if (!s.accepted || impl->core.write() == write_state::fin_sent || impl->core.finished()) {
          stage = posted;
          asio::post(std::move(self));
          return;
        }
        stage = waiting;  // flushing: the last write in flight sends the FIN
        impl->timers().fin.async_wait(std::move(self));
        return;
      }
      case waiting:
        if (impl->core.write() != write_state::fin_sent) result = asio::error::broken_pipe;
        self.complete(result);
        return;
      case posted:
        self.complete(result);
        return;
    }
  }
};

template <class NextLayer>
struct basic_stream<NextLayer>::close_op {
  std::shared_ptr<impl_type> impl;
  close_policy policy;
  enum { starting, safe_wait, draining, waiting_finish, posted } stage = starting;
  std::chrono::milliseconds poll{1};
  typename impl_type::clock::time_point safe_deadline{};
  std::unique_ptr<asio::steady_timer> poll_timer{};

  template <class Self>
  void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
    auto& s = *impl;
    switch (stage) {
      case starting:
        // Asked from inside a write's completion handler: that write is
        // done but not yet retired (see async_write_some). Decide once it is,
        // or rst_if_safe would refuse over a write that already finished.
        if (s.in_write_continuation) return asio::post(std::move(self));
        if (s.core.finished()) return post_complete(self);
        if (s.core.closing() && policy != close_policy::abortive) return wait_finish(self);
        if (!s.core.closing()) {
          s.close_requested = true;
          s.close_started = impl_type::clock::now();
          s.hard_deadline = s.close_started + s.opts.linger_max;
          s.touch();
        }
        if (s.app_read_in_flight) s.read_cancel.emit(asio::cancellation_type::terminal);
        if (policy == close_policy::rst_if_safe && s.core.exchange_complete() && s.core.writes_in_flight() == 0) {
          safe_deadline = impl_type::clock::now() + s.opts.safe_reset_wait;
          return safe_poll(self);
        }
        // Only rst_if_safe decides on the kernel's queues; the other policies
        // cost no probe here.
        return decide(self, policy == close_policy::rst_if_safe ? queues_now() : queue_probe{});
      case safe_wait:
        return safe_poll(self);
      case draining:
        s.on_read(ec, n);
        if (ec == asio::error::operation_aborted && !s.core.finished() && s.core.draining()) {
          // Our own read was cancelled while still draining (an application
          // cancellation raced us): keep draining.
          return drain(self);
        }
        if (!ec && s.core.draining()) {
          if (n > 0) s.touch();
          if (!s.drain_buffer && n >= std::min(sizeof s.timers().first_drain, s.opts.drain_buffer_size)) {
            s.drain_buffer = std::make_unique_for_overwrite<char[]>(s.opts.drain_buffer_size);  // more is coming
          }
          return drain(self);
        }
        if (s.core.finished()) return self.complete(*s.report);
        return wait_finish(self);
      case waiting_finish:
        if (s.core.finished()) return self.complete(*s.report);
        return wait_finish(self);
      case posted:
        return self.complete(*s.report);
    }
  }

  // rst_if_safe: wait (bounded) until the peer acknowledged every byte we
  // sent, then let the core decide. Input arriving meanwhile is a reason not
  // to reset, so it is decided at once.
  template <class Self>
  void safe_poll(Self& self) {
    auto& s = *impl;
    if (s.core.finished()) return self.complete(*s.report);
    const queue_probe q = queues_now();
    if (!q.valid || q.unacked == 0 || q.unread > 0 || impl_type::clock::now() >= safe_deadline) {
      return decide(self, q);
    }
    stage = safe_wait;
    if (!poll_timer) poll_timer = std::make_unique<asio::steady_timer>(s.next.get_executor());
    poll_timer->expires_after(poll);
    poll = std::min(poll * 2, std::chrono::milliseconds{16});
    poll_timer->async_wait(std::move(self));
  }

  queue_probe queues_now() const noexcept {
    const int fd = impl->fd();
    queue_probe q = fd >= 0 ? closewise::probe(fd, probe_unread | probe_unacked).queues() : queue_probe{};
    q.unread += impl->preloaded_left();  // input read before the stream had it, and not taken since
    return q;
  }

  template <class Self>
  void decide(Self& self, queue_probe q) {
    auto& s = *impl;
    drain_limits limits;
    limits.max_discard_bytes = s.opts.max_discard_bytes;
    const step st = s.feed(event::close_with(policy, q, limits));
    s.discard_preloaded();
    if (s.core.finished()) return post_complete(self);
    if (!st.accepted) return wait_finish(self);
    if (closewise::logger()->should_log(spdlog::level::debug)) {  // to_string(actions) allocates
      s.log(spdlog::level::debug, "close requested: {} ({})", to_string(policy), to_string(st.todo));
    }
    s.arm_deadline(impl);
    if (st.todo.has(action::start_drain)) {
      return drain(self);
    }
    return wait_finish(self);
  }

  // Where the drain reads: the teardown state's small buffer until a read
  // fills it, then a buffer of drain_buffer_size (discarded: no zeroing).
  asio::mutable_buffer drain_target() {
    auto& s = *impl;
    if (s.drain_buffer) return asio::buffer(s.drain_buffer.get(), s.opts.drain_buffer_size);
    auto& first = s.timers().first_drain;
    return asio::buffer(first, std::min(sizeof first, s.opts.drain_buffer_size));
  }

  template <class Self>
  void drain(Self& self) {
    auto& s = *impl;
    stage = draining;
    s.next.async_read_some(drain_target(), std::move(self));
  }

  template <class Self>
  void wait_finish(Self& self) {
    stage = waiting_finish;
    impl->timers().finished.async_wait(std::move(self));
  }

  template <class Self>
  void post_complete(Self& self) {
    stage = posted;
    asio::post(std::move(self));
  }
};

}  // namespace closewise
