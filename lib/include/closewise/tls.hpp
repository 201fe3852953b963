#pragma once
// closewise::basic_tls_stream: TLS over closewise::basic_stream, with a
// teardown whose every wait is bounded and whose every ending is explained.
//
// Layering: OpenSSL behind closewise's own record engine
// (closewise/impl/tls_engine.hpp), over a closewise `basic_stream`. The TCP facts (FINs, RSTs, TIME_WAIT, bytes of
// records) stay with the basic_stream's state machine; this layer adds what
// only TLS knows: the handshake (bounded by a deadline), close_notify sent
// and received, and how the peer ended the byte stream. One close report
// per connection, the TCP report with `tls` filled in.
//
// - Reads complete with asio::error::eof for the peer's close_notify (an
//   authenticated end) and with asio::ssl::error::stream_truncated for a FIN
//   without it; the report then says `peer_fin_no_close_notify` when the
//   last message was complete by its own framing (the application says so
//   with `mark_message_complete`) and `truncated` otherwise.
// - async_close(graceful) sends close_notify once, without waiting for the
//   peer's (Asio's own `async_shutdown` waits for it with no limit), then our
//   FIN, then reads and discards through TLS until the peer's close_notify
//   or FIN, bounded by the stream's linger_timeout / linger_max /
//   max_discard_bytes, then the TCP graceful close finishes with what is
//   left of those bounds.
// - abortive: RST, no close_notify. rst_if_safe: close_notify, then RST only
//   once it and every byte before it are acknowledged and nothing is unread
//   (in the kernel or in OpenSSL); otherwise graceful, with the reason.
//
// Thread-safety: as basic_stream, one stream on one executor at a time.
// One read and one write may be outstanding at once.

#include <openssl/ssl.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/stream_base.hpp>

#include "closewise/export.hpp"
#include "closewise/report.hpp"
#include "closewise/stream.hpp"

namespace closewise {

/// The TLS layer's limits.
struct tls_options {
  /// The whole handshake, from its first step to its end: a peer that
  /// trickles its handshake bytes is cut here (asio::error::timed_out).
  std::chrono::milliseconds handshake_timeout{10000};
};

/// A certificate and its private key, PEM-encoded.
struct certificate_pem {
  std::string certificate;
  std::string private_key;
};

/// A throwaway self-signed ECDSA P-256 certificate for `common_name` (also
/// its DNS subject alternative name, with IP 127.0.0.1 and ::1), valid for
/// a day, made with OpenSSL's API: for demos and tests.
CLOSEWISE_API certificate_pem make_self_signed_certificate(const std::string& common_name = "localhost");

/// The protocol versions a context allows.
enum class tls_versions : std::uint8_t { tls12_and_13, tls12_only, tls13_only };

/// How closewise builds its TLS contexts.
struct tls_context_options {
  tls_versions versions = tls_versions::tls12_and_13;
  /// ALPN: a server selects `http/1.1` when the client offers it; a client offers it.
  bool alpn_http11 = true;
  /// A server: session resumption through stateless tickets (TLS 1.3 session
  /// tickets, TLS 1.2 RFC 5077 tickets, under a key the context makes). Off:
  /// no ticket is sent and every handshake is full. Either way the server
  /// keeps no session cache: its memory does not grow with past clients.
  bool session_tickets = true;
};

/// A server context: the certificate chain and key, TLS 1.2 and 1.3 (or as
/// asked), ALPN http/1.1, SSL_MODE_RELEASE_BUFFERS (an idle connection gives
/// its record buffers back), no renegotiation, and no
/// SSL_OP_IGNORE_UNEXPECTED_EOF, so a bare FIN is reported, not taken for
/// close_notify. Throws boost::system::system_error on a bad certificate or key.
CLOSEWISE_API asio::ssl::context make_server_context(const certificate_pem& pem, const tls_context_options& o = {});
/// The same from PEM files (the certificate file may hold a chain).
CLOSEWISE_API asio::ssl::context make_server_context_from_files(const std::string& certificate_file,
                                                                const std::string& key_file,
                                                                const tls_context_options& o = {});
/// A client context that trusts `trust` (PEM certificates), or verifies
/// nothing when `trust` is empty (tests and the demo, against their own
/// throwaway certificate).
CLOSEWISE_API asio::ssl::context make_client_context(const std::string& trust = {}, const tls_context_options& o = {});

}  // namespace closewise

#include "closewise/impl/tls_impl.hpp"

namespace closewise {

/// An Asio AsyncStream that speaks TLS over a closewise basic_stream.
template <class NextLayer>
class basic_tls_stream {
  using impl_type = detail::tls_stream_impl<NextLayer>;

 public:
  using tcp_stream_type = basic_stream<NextLayer>;
  using executor_type = typename tcp_stream_type::executor_type;

  /// Wraps `socket` (connected, not yet shaken hands) in a basic_stream with
  /// `opts`, and TLS over it with `ctx` (which must outlive the stream).
  basic_tls_stream(NextLayer&& socket, asio::ssl::context& ctx, stream_options opts = {}, tls_options topts = {})
      : impl_(std::make_shared<impl_type>(tcp_stream_type(std::move(socket), opts), ctx, topts)) {}
  /// TLS over an existing closewise stream (e.g. one made with `read_ahead`).
  basic_tls_stream(tcp_stream_type&& tcp, asio::ssl::context& ctx, tls_options topts = {})
      : impl_(std::make_shared<impl_type>(std::move(tcp), ctx, topts)) {}

  basic_tls_stream(basic_tls_stream&&) noexcept = default;
  basic_tls_stream& operator=(basic_tls_stream&&) noexcept = default;
  basic_tls_stream(const basic_tls_stream&) = delete;
  basic_tls_stream& operator=(const basic_tls_stream&) = delete;

  executor_type get_executor() noexcept { return impl_->tcp.get_executor(); }
  /// The closewise stream under TLS: its state machine, options and probes.
  tcp_stream_type& tcp() noexcept { return impl_->tcp; }
  const tcp_stream_type& tcp() const noexcept { return impl_->tcp; }
  /// OpenSSL's connection object (certificate, cipher, session queries).
  /// Reading, writing or shutting it down directly bypasses this layer.
  SSL* native_handle() noexcept { return impl_->engine.native_handle(); }
  /// The half-close state machine of the TCP connection.
  const connection_state& state() const noexcept { return tcp().state(); }
  std::uint64_t id() const noexcept { return tcp().id(); }
  /// The TLS facts so far (handshake, close_notify each way, how the peer ended).
  const tls_facts& tls() const noexcept { return impl_->facts; }

  /// Shakes hands as `type`, bounded by tls_options::handshake_timeout
  /// (then asio::error::timed_out). On failure, `tls().handshake` says how
  /// it failed; end the connection with async_close (no close_notify is
  /// sent without a session).
  template <class CompletionToken>
  auto async_handshake(asio::ssl::stream_base::handshake_type type, CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(error_code)>(handshake_op{impl_, type}, token, impl_->tcp);
  }

  /// Reads some plaintext. asio::error::eof: the peer's close_notify.
  /// asio::ssl::error::stream_truncated: the peer's FIN without close_notify.
  template <class MutableBufferSequence, class CompletionToken>
  auto async_read_some(const MutableBufferSequence& buffers, CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(error_code, std::size_t)>(
        read_op<MutableBufferSequence>{impl_, buffers}, token, impl_->tcp);
  }

  /// Writes some plaintext (one or more records).
  template <class ConstBufferSequence, class CompletionToken>
  auto async_write_some(const ConstBufferSequence& buffers, CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(error_code, std::size_t)>(
        write_op<ConstBufferSequence>{impl_, buffers}, token, impl_->tcp);
  }

  /// Ends our output: close_notify (once), then our FIN, once the writes in
  /// flight completed (the caller's to ensure). Reads go on until the peer ends its side (TLS 1.3
  /// half-close; a TLS 1.2 peer may answer with its own close_notify).
  template <class CompletionToken>
  auto async_shutdown_write(CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(error_code)>(shutdown_op{impl_}, token, impl_->tcp);
  }

  /// The message in progress is complete by its own framing (a whole
  /// Content-Length or chunked body, a whole request): a bare FIN now ends
  /// the stream as `peer_fin_no_close_notify`, not `truncated`. Bytes read
  /// afterwards start the next message.
  void mark_message_complete() noexcept {
    impl_->in_message = false;
    impl_->until_close = false;
  }
  /// The message being read is framed by the end of the connection (an HTTP
  /// body without length): only close_notify completes it; a bare FIN is `truncated`.
  void mark_message_until_close() noexcept { impl_->until_close = true; }
  /// As basic_stream::mark_exchange_complete (rst_if_safe requires it).
  void mark_exchange_complete() { tcp().mark_exchange_complete(); }

  /// Ends the connection with `policy` (see the top of this file) and
  /// completes with the report, `tls` filled in. Takes over a pending read
  /// (it completes with operation_aborted); a write in flight finishes first.
  template <class CompletionToken>
  auto async_close(close_policy policy, CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(close_report)>(close_op{impl_, policy}, token, impl_->tcp);
  }

  /// The close report with its TLS facts, once the connection finished.
  std::optional<close_report> report() const {
    auto r = tcp().report();
    if (r) impl_->finalize(*r);
    return r;
  }
  /// Called once, with the report (TLS facts included), when the connection finishes.
  void on_close(std::function<void(const close_report&)> f) {
    tcp().on_close([i = std::weak_ptr<impl_type>(impl_), f = std::move(f)](const close_report& r) {
      close_report copy = r;
      if (auto p = i.lock()) p->finalize(copy);
      f(copy);
    });
  }

 private:
  template <class Buffers>
  struct read_op;
  template <class Buffers>
  struct write_op;
  struct handshake_op;
  struct shutdown_op;
  struct close_op;

  std::shared_ptr<impl_type> impl_;
};

}  // namespace closewise

#include "closewise/impl/tls.hpp"
