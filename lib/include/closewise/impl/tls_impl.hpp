#pragma once
// The state shared by a closewise::basic_tls_stream and its operations.
// Implementation: included by closewise/tls.hpp.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <sys/socket.h>

#include <array>
#include <limits>

#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/steady_timer.hpp>

namespace closewise {

/// Classifies a failed handshake's error (OpenSSL's reason, or the socket's).
tls_handshake classify_handshake_error(const error_code& ec) noexcept;

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

  tls_stream_impl(tcp_stream_type&& tcp, asio::ssl::context& ctx, tls_options o)
      : ssl(std::move(tcp), ctx),
        opts(o),
        record(std::make_shared<tls_record>()),
        timer(ssl.get_executor()),
        idle(ssl.get_executor()),
        done(ssl.get_executor()) {
    idle.expires_at(clock::time_point::max());
    done.expires_at(clock::time_point::max());
  }

  asio::ssl::stream<tcp_stream_type> ssl;
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

  // Sends close_notify once without waiting for the peer's: with the peer's
  // marked as received, SSL_shutdown sends ours and reports the shutdown
  // complete, so ssl::stream writes it and stops. close_notify_went() takes
  // the mark back, so reads still see the peer's.
  template <class Handler>
  void send_close_notify(Handler&& h) {
    SSL* s = ssl.native_handle();
    received_before_shutdown = (::SSL_get_shutdown(s) & SSL_RECEIVED_SHUTDOWN) != 0;
    ::SSL_set_shutdown(s, ::SSL_get_shutdown(s) | SSL_RECEIVED_SHUTDOWN);
    ssl.async_shutdown(std::forward<Handler>(h));
  }
  void close_notify_went() noexcept {
    SSL* s = ssl.native_handle();
    if (!received_before_shutdown) ::SSL_set_shutdown(s, ::SSL_get_shutdown(s) & ~SSL_RECEIVED_SHUTDOWN);
  }
  bool received_before_shutdown = false;
  // The peer's FIN without close_notify, as a read met it: `truncated` as
  // well when the FIN cut a record (OpenSSL holds the first bytes of one),
  // whatever the application marked: the peer had sent more than arrived.
  tls_ending bare_fin() noexcept {
    return ::SSL_has_pending(ssl.native_handle()) == 1 ? tls_ending::truncated : record->bare_fin();
  }

  // TCP_CORK on the socket (a Unix socket refuses it, harmlessly): what is
  // written waits for the FIN, which pushes it out with it.
  void cork() noexcept {
    const int one = 1;
    static_cast<void>(
        ::setsockopt(ssl.next_layer().lowest_layer().native_handle(), IPPROTO_TCP, TCP_CORK, &one, sizeof(one)));
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

  // Input OpenSSL holds that no read has taken: decrypted (SSL_pending) or
  // records not yet processed (its read BIO).
  std::size_t unread_in_tls() noexcept {
    SSL* s = ssl.native_handle();
    BIO* rbio = ::SSL_get_rbio(s);
    return static_cast<std::size_t>(::SSL_pending(s)) + (rbio ? ::BIO_ctrl_pending(rbio) : 0);
  }
};

}  // namespace detail
}  // namespace closewise
