#pragma once
// The operations of closewise::basic_tls_stream: handshake, read, write and
// close, each an Asio composed operation over the stream's shared state.
// Implementation: included at the end of closewise/tls.hpp.

#include <boost/asio/append.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/post.hpp>

namespace closewise {

template <class NextLayer>
struct basic_tls_stream<NextLayer>::handshake_op {
  std::shared_ptr<impl_type> impl;
  asio::ssl::stream_base::handshake_type type;
  bool started = false;
  std::chrono::steady_clock::time_point t0{};

  template <class Self>
  void operator()(Self& self, error_code ec = {}, std::size_t = 0) {
    auto& i = *impl;
    if (!started) {
      started = true;
      t0 = std::chrono::steady_clock::now();
      if (i.opts.handshake_timeout.count() > 0) i.arm_cut(impl, t0 + i.opts.handshake_timeout);
      i.async_handshake(type, asio::bind_cancellation_slot(i.cut.slot(), std::move(self)));
      return;
    }
    i.timer.cancel();
    i.facts.handshake_time = std::chrono::steady_clock::now() - t0;
    if (!ec) {
      i.facts.handshake = tls_handshake::ok;
      SSL* s = i.engine.native_handle();
      i.facts.version = ::SSL_get_version(s);
      i.facts.session_resumed = ::SSL_session_reused(s) == 1;
      const unsigned char* alpn = nullptr;
      unsigned int alpn_len = 0;
      ::SSL_get0_alpn_selected(s, &alpn, &alpn_len);
      if (alpn) i.facts.alpn.assign(reinterpret_cast<const char*>(alpn), alpn_len);
    } else {
      if (i.timer_fired) ec = asio::error::timed_out;
      i.facts.handshake = i.timer_fired ? tls_handshake::timeout : classify_handshake_error(ec);
      i.facts.handshake_error = ec.message();
    }
    self.complete(ec);
  }
};

template <class NextLayer>
template <class Buffers>
struct basic_tls_stream<NextLayer>::read_op {
  std::shared_ptr<impl_type> impl;
  Buffers buffers;
  bool started = false;

  template <class Self>
  void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
    auto& i = *impl;
    if (!started) {
      started = true;
      if (i.close_started) {
        asio::post(asio::append(std::move(self), error_code(asio::error::operation_aborted), std::size_t{0}));
        return;
      }
      i.app_read_in_flight = true;
      if (auto slot = self.get_cancellation_state().slot(); slot.is_connected()) {
        slot.assign([sig = &i.read_cancel](asio::cancellation_type t) { sig->emit(t); });
      }
      // A copy taken before `self` (and the `buffers` in it) is moved into the binder.
      const Buffers b = buffers;
      i.async_read_some(b, asio::bind_cancellation_slot(i.read_cancel.slot(), std::move(self)));
      return;
    }
    if (i.app_read_in_flight) {
      i.app_read_in_flight = false;
      i.facts.app_bytes_in += n;
      if (n > 0) i.in_message = true;
      i.read_ended(ec);
      i.op_done();
    }
    self.complete(ec, n);
  }
};

template <class NextLayer>
template <class Buffers>
struct basic_tls_stream<NextLayer>::write_op {
  std::shared_ptr<impl_type> impl;
  Buffers buffers;
  bool started = false;

  template <class Self>
  void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
    auto& i = *impl;
    if (!started) {
      started = true;
      if (i.close_started && i.facts.close_notify_sent) {
        asio::post(asio::append(std::move(self), error_code(asio::error::broken_pipe), std::size_t{0}));
        return;
      }
      ++i.writes_in_flight;
      i.async_write_some(buffers, std::move(self));
      return;
    }
    --i.writes_in_flight;
    i.facts.app_bytes_out += n;
    i.op_done();
    self.complete(ec, n);
  }
};

template <class NextLayer>
struct basic_tls_stream<NextLayer>::shutdown_op {
  std::shared_ptr<impl_type> impl;
  enum { starting, close_notify, fin } stage = starting;

  template <class Self>
  void operator()(Self& self, error_code ec = {}, std::size_t = 0) {
    auto& i = *impl;
    switch (stage) {
      case starting:
        if (i.close_started || i.facts.handshake != tls_handshake::ok) {
          asio::post(asio::append(std::move(self), error_code(asio::error::broken_pipe)));
          return;
        }
        if (i.facts.close_notify_sent) {
          stage = fin;
          i.tcp.async_shutdown_write(std::move(self));
          return;
        }
        i.cork();  // our FIN follows at once: one segment with close_notify (see close_op)
        stage = close_notify;
        i.async_close_notify(std::move(self));
        return;
      case close_notify:
        if (ec) return self.complete(ec);
        i.facts.close_notify_sent = true;
        stage = fin;
        i.tcp.async_shutdown_write(std::move(self));
        return;
      case fin:
        self.complete(ec);
        return;
    }
  }
};

template <class NextLayer>
struct basic_tls_stream<NextLayer>::close_op {
  std::shared_ptr<impl_type> impl;
  close_policy policy;
  enum {
    starting,
    second,        // another close is in progress: wait for its report
    waiting,       // for the application's read and writes in flight to complete
    close_notify,  // our close_notify is being written
    fin,           // our FIN is going out
    drain_start,   // (our FIN went out before)
    draining,      // reading through TLS for the peer's close_notify or FIN
    peer_fin,      // reading the FIN that followed the peer's close_notify
    tcp_close,     // the TCP close finishes
  } stage = starting;
  std::chrono::steady_clock::time_point drain_started{};
  bool exchange_complete = false;  // as the application left it before our close_notify
  std::uint64_t discarded = 0;
  std::unique_ptr<char[]> buf{};
  std::optional<stream_options> saved{};
  reset_refusal refusal = reset_refusal::none;

  static constexpr std::size_t drain_chunk = 4096;

  template <class Self>
  void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
    auto& i = *impl;
    auto& tcp = i.tcp;
    switch (stage) {
      case starting:
        if (i.close_started) {
          // Another close runs. An abortive one overrides it (the TCP layer
          // resets now; the first close's TLS read then fails and it ends
          // with the same report); any other waits for its report.
          if (policy == close_policy::abortive && !i.close_done) return finish_tcp(self, policy);
          if (i.close_done) return complete_now(self);
          stage = second;
          i.done.async_wait(std::move(self));
          return;
        }
        i.close_started = true;
        i.record->close_began = std::chrono::steady_clock::now();
        if (tcp.report() || policy == close_policy::abortive || i.facts.handshake != tls_handshake::ok)
          return finish_tcp(self, policy);  // no TLS session to end, or RST: nothing to say in TLS
        if (i.app_read_in_flight) i.read_cancel.emit(asio::cancellation_type::terminal);
        [[fallthrough]];
      case waiting:
        if (i.app_read_in_flight || i.writes_in_flight > 0) {
          stage = waiting;
          i.idle.async_wait(std::move(self));  // woken by op_done; the TCP layer bounds the write
          return;
        }
        if (tcp.report()) return finish_tcp(self, policy);
        if (i.facts.close_notify_sent) return after_close_notify(self);                 // async_shutdown_write sent it
        if (tcp.state().write() != write_state::open) return finish_tcp(self, policy);  // our FIN is out already
        // Graceful and fin_close send our FIN right behind close_notify: held
        // back (TCP_CORK) until the FIN, they leave in one segment, so a
        // peer that answers close_notify by closing does not cross our FIN
        // with its own (a simultaneous close leaves TIME_WAIT on both sides).
        if (policy != close_policy::rst_if_safe) i.cork();
        exchange_complete = tcp.state().exchange_complete();
        stage = close_notify;
        i.async_close_notify(std::move(self));
        return;
      case close_notify:
        if (ec) return finish_tcp(self, policy);  // the write failed: the TCP report says why
        i.facts.close_notify_sent = true;
        // close_notify is teardown, not an answer: the exchange the
        // application marked complete stays complete (rst_if_safe needs it).
        if (exchange_complete) tcp.mark_exchange_complete();
        return after_close_notify(self);
      case peer_fin:
        return finish_tcp(self, close_policy::graceful);
      case fin:
        if (ec) return finish_tcp(self, close_policy::graceful);
        [[fallthrough]];
      case drain_start:
        stage = draining;
        drain_started = std::chrono::steady_clock::now();
        buf = std::make_unique_for_overwrite<char[]>(drain_chunk);
        return read_more(self);
      case draining:
        i.timer.cancel();
        discarded += n;
        i.facts.app_bytes_discarded += n;
        if (!ec) {
          if (discarded > tcp.options().max_discard_bytes) return finish_tcp(self, close_policy::graceful, false, true);
          return read_more(self);
        }
        i.read_ended(ec);
        return finish_tcp(self, close_policy::graceful, i.timer_fired && ec == asio::error::operation_aborted);
      case second:
        return complete_now(self);
      case tcp_close:
        return;  // completed by the close_report overload
    }
  }

  // The TCP close has its report.
  template <class Self>
  void operator()(Self& self, close_report r) {
    auto& tcp = impl->tcp;
    if (saved) tcp.set_options(*saved);
    if (refusal != reset_refusal::none && r.refusal == reset_refusal::none) r.refusal = refusal;
    impl->finalize(r);
    if (!impl->close_done) {
      impl->close_done = true;
      impl->done.cancel();
    }
    self.complete(std::move(r));
  }

 private:
  // Our close_notify went out: what the policy does next.
  template <class Self>
  void after_close_notify(Self& self) {
    auto& i = *impl;
    auto& tcp = i.tcp;
    if (policy == close_policy::fin_close) return finish_tcp(self, policy);
    if (policy == close_policy::rst_if_safe) {
      if (i.unread_in_tls() == 0) return finish_tcp(self, policy);
      refusal = reset_refusal::unread_input;  // a RST would discard what OpenSSL holds
    }
    if (i.facts.close_notify_received || tcp.state().read() != read_state::open) {
      // The peer ended its side already. Its FIN may wait in the kernel behind
      // its close_notify, which TLS read without reaching it: the TCP layer
      // takes it first, or it would take our FIN for the first one.
      if (tcp.state().read() == read_state::open && tcp.probe(probe_state).state == tcp_state::close_wait) {
        stage = peer_fin;
        buf = std::make_unique_for_overwrite<char[]>(drain_chunk);
        const auto b = asio::buffer(buf.get(), drain_chunk);  // taken before `self` is moved
        tcp.async_read_some(b, std::move(self));
        return;
      }
      return finish_tcp(self, close_policy::graceful);
    }
    if (tcp.state().write() == write_state::open) {
      stage = fin;
      tcp.async_shutdown_write(std::move(self));
      return;
    }
    stage = drain_start;
    (*this)(self);
  }

  // The first close completed: its report, posted (this may run inside the initiation).
  template <class Self>
  void complete_now(Self& self) {
    auto r = impl->tcp.report();
    close_report out = r ? *r : close_report{};
    impl->finalize(out);
    stage = tcp_close;
    asio::post(asio::append(std::move(self), std::move(out)));
  }

  template <class Self>
  void read_more(Self& self) {
    auto& i = *impl;
    const auto& o = i.tcp.options();
    auto at = std::chrono::steady_clock::now() + o.linger_timeout;
    at = std::min(at, drain_started + o.linger_max);
    i.arm_cut(impl, at);
    // Taken before `self` is moved into the binder: moved, its `buf` is null.
    const auto b = asio::buffer(buf.get(), drain_chunk);
    i.async_read_some(b, asio::bind_cancellation_slot(i.cut.slot(), std::move(self)));
  }

  // Hands the connection to the TCP layer's close. After a TLS drain, the
  // TCP drain gets what is left of its bounds: none if the TLS drain ran
  // out of time (`timed_out`) or of budget (`over_budget`), so the close
  // ends with a RST reported as linger_timeout or linger_limit.
  template <class Self>
  void finish_tcp(Self& self, close_policy p, bool timed_out = false, bool over_budget = false) {
    auto& tcp = impl->tcp;
    if (stage == draining) {
      saved = tcp.options();
      stream_options o = *saved;
      using std::chrono::milliseconds;
      const auto spent = std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - drain_started);
      o.linger_max = std::max(milliseconds(1), o.linger_max - spent);
      if (timed_out) o.linger_timeout = o.linger_max = milliseconds(1);
      if (over_budget) o.max_discard_bytes = 0;
      tcp.set_options(o);
    }
    stage = tcp_close;
    impl->record->tcp_close_began = std::chrono::steady_clock::now();
    tcp.async_close(p, std::move(self));
  }
};

}  // namespace closewise
