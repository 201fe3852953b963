#pragma once
// The state shared by a closewise::basic_tls_stream and its operations.
// Implementation: included by closewise/tls.hpp.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/steady_timer.hpp>

#include "closewise/impl/tls_engine.hpp"

namespace closewise {

/// Classifies a failed handshake's error (OpenSSL's reason, or the socket's).
CLOSEWISE_API tls_handshake classify_handshake_error(const error_code& ec) noexcept;

namespace detail {

// What the TLS layer knows, shared with the close-report callback (which
// may run while the stream is being destroyed).
struct tls_record {
  tls_facts facts;
  bool in_message = false;   // plaintext arrived since the last mark_message_complete
  bool until_close = false;  // mark_message_until_close
  // When our close began, and when it handed over to the TCP close (whose
  // report counts drain_time from there): the TLS part (close_notify, the
  // drain through TLS) belongs to the close's time too.
  std::chrono::steady_clock::time_point close_began{};
  std::chrono::steady_clock::time_point tcp_close_began{};

  // A FIN without close_notify: truncated unless the last message was complete.
  tls_ending bare_fin() const noexcept {
    return in_message || until_close ? tls_ending::truncated : tls_ending::peer_fin_no_close_notify;
  }
  void peer_ended(tls_ending e) noexcept {
    if (facts.peer_end == tls_ending::none) facts.peer_end = e;
  }
  // Fills in a TCP report's TLS facts.
  void finalize(close_report& r) const {
    r.tls = facts;
    if (r.close_requested && close_began != std::chrono::steady_clock::time_point{} && tcp_close_began > close_began)
      r.drain_time += tcp_close_began - close_began;
    if (facts.handshake == tls_handshake::ok && r.tls->peer_end == tls_ending::none && !facts.close_notify_received) {
      const bool peer_fin = r.first_fin == side::peer || r.cause == close_cause::ours_then_peer_fin ||
                            (r.cause == close_cause::server_drain && r.first_fin == side::local);
      if (r.rst_received) {
        r.tls->peer_end = tls_ending::reset;
      } else if (peer_fin && r.bytes_discarded == 0) {
        // The TCP layer met the peer's FIN with nothing before it that TLS
        // did not see: no close_notify came.
        r.tls->peer_end = bare_fin();
      }
      // A FIN behind bytes the TCP layer discarded unread by TLS (a close
      // that fell back from rst_if_safe): whether they held close_notify is
      // unknown, and the report says none rather than guess.
    }
    if (facts.close_notify_received && r.tls->peer_end == tls_ending::none) r.tls->peer_end = tls_ending::close_notify;
  }
};

template <class NextLayer>
struct tls_stream_impl {
  using clock = std::chrono::steady_clock;
  using tcp_stream_type = basic_stream<NextLayer>;

  tls_stream_impl(tcp_stream_type&& t, asio::ssl::context& ctx, tls_options o)
      : tcp(std::move(t)),
        engine(ctx.native_handle()),
        flush_done(tcp.get_executor()),
        opts(o),
        record(std::make_shared<tls_record>()),
        timer(tcp.get_executor()),
        idle(tcp.get_executor()),
        done(tcp.get_executor()) {
    idle.expires_at(clock::time_point::max());
    done.expires_at(clock::time_point::max());
    flush_done.expires_at(clock::time_point::max());
  }

  tcp_stream_type tcp;
  tls_engine engine;
  bool flushing = false;          // an operation is writing records (tls_io_op)
  asio::steady_timer flush_done;  // never expires; cancelled when a flush ends
  tls_options opts;
  std::shared_ptr<tls_record> record;
  tls_facts& facts = record->facts;
  bool& in_message = record->in_message;
  bool& until_close = record->until_close;

  asio::steady_timer timer;  // the handshake deadline, then the close's TLS drain bound
  bool timer_fired = false;
  asio::cancellation_signal cut;          // emitted by `timer`: cancels the handshake or the drain read
  asio::steady_timer idle;                // never expires; cancelled when a read or write in flight completes
  asio::cancellation_signal read_cancel;  // a close takes over the application's read
  bool app_read_in_flight = false;
  int writes_in_flight = 0;
  bool close_started = false;
  bool close_done = false;
  asio::steady_timer done;  // never expires; cancelled when the first close completed (a second one waits on it)

  void finalize(close_report& r) const { record->finalize(r); }

  // A read or write in flight completed: wake a close waiting for it.
  void op_done() {
    if (close_started) idle.cancel();
  }

  // Arms `timer` to emit `cut` at `at`.
  void arm_cut(const std::shared_ptr<tls_stream_impl>& self, clock::time_point at) {
    timer_fired = false;
    timer.expires_at(at);
    timer.async_wait([w = std::weak_ptr<tls_stream_impl>(self)](const error_code& ec) {
      auto p = w.lock();
      if (ec || !p) return;
      p->timer_fired = true;
      p->cut.emit(asio::cancellation_type::terminal);
    });
  }

  // Runs one engine call to its end (tls_io_op).
  template <class Call, class Token>
  auto async_io(Call call, Token&& token) {
    return asio::async_compose<Token, void(error_code, std::size_t)>(
        tls_io_op<tls_stream_impl, Call>{this, std::move(call)}, token, tcp);
  }
  template <class Token>
  auto async_handshake(asio::ssl::stream_base::handshake_type type, Token&& token) {
    return async_io([type](tls_engine& e) { return e.handshake(type); }, std::forward<Token>(token));
  }
  // Reads into the first non-empty buffer of `buffers`, as Asio's ssl::stream does.
  template <class Buffers, class Token>
  auto async_read_some(const Buffers& buffers, Token&& token) {
    asio::mutable_buffer first;
    for (auto it = asio::buffer_sequence_begin(buffers); it != asio::buffer_sequence_end(buffers); ++it) {
      if (asio::mutable_buffer b(*it); b.size() > 0) {
        first = b;
        break;
      }
    }
    return async_io(
        [first](tls_engine& e) { return first.size() == 0 ? tls_engine::step{} : e.read(first.data(), first.size()); },
        std::forward<Token>(token));
  }
  // Encrypts up to max_write bytes of `buffers` into records and sends them
  // in one write: several small buffers (a header and a body) become one
  // record, where Asio's ssl::stream writes one buffer per operation.
  static constexpr std::size_t max_write = 64 * 1024;
  template <class Buffers, class Token>
  auto async_write_some(const Buffers& buffers, Token&& token) {
    return async_io(
        [buffers](tls_engine& e) {
          const std::size_t total = std::min(asio::buffer_size(buffers), max_write);
          if (total == 0) return tls_engine::step{};
          for (auto it = asio::buffer_sequence_begin(buffers); it != asio::buffer_sequence_end(buffers); ++it) {
            const asio::const_buffer b(*it);
            if (b.size() == 0) continue;
            if (b.size() >= total) return e.write(b.data(), total);  // all of it in the first non-empty buffer
            break;
          }
          auto staged = std::make_unique_for_overwrite<unsigned char[]>(total);
          asio::buffer_copy(asio::buffer(staged.get(), total), buffers);
          return e.write(staged.get(), total);
        },
        std::forward<Token>(token));
  }
  // Sends our close_notify once, without waiting for the peer's: Asio's own
  // async_shutdown waits for it with no limit.
  template <class Token>
  auto async_close_notify(Token&& token) {
    return async_io([](tls_engine& e) { return e.close_notify(); }, std::forward<Token>(token));
  }

  // The peer's FIN without close_notify, as a read met it: `truncated` as
  // well when the FIN cut a record (OpenSSL holds the first bytes of one),
  // whatever the application marked: the peer had sent more than arrived.
  tls_ending bare_fin() noexcept {
    return ::SSL_has_pending(engine.native_handle()) == 1 ? tls_ending::truncated : record->bare_fin();
  }

  // TCP_CORK on the socket (a Unix socket refuses it, harmlessly): what is
  // written waits for the FIN, which pushes it out with it.
  void cork() noexcept {
    const int one = 1;
    static_cast<void>(::setsockopt(tcp.lowest_layer().native_handle(), IPPROTO_TCP, TCP_CORK, &one, sizeof(one)));
  }

  // A TLS read ended with `ec`: what it says of the peer's ending.
  void read_ended(const error_code& ec) {
    if (ec == asio::error::eof) {
      facts.close_notify_received = true;
      record->peer_ended(tls_ending::close_notify);
    } else if (ec == asio::ssl::error::stream_truncated) {
      record->peer_ended(bare_fin());
    } else if (ec == asio::error::connection_reset) {
      record->peer_ended(tls_ending::reset);
    }
  }

  // Input OpenSSL holds that no read has taken: decrypted, or records not yet processed.
  std::size_t unread_in_tls() const noexcept { return engine.unread(); }
};

}  // namespace detail
}  // namespace closewise
