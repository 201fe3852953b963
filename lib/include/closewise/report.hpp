#pragma once
// The explanation every closed connection leaves behind.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "closewise/core.hpp"
#include "closewise/export.hpp"
#include "closewise/probe.hpp"

namespace closewise {

/// Which per-operation timeout of a stream fired (see stream_options).
enum class timeout_kind : std::uint8_t { none, idle, read, write };
CLOSEWISE_API std::string_view to_string(timeout_kind) noexcept;

/// How a TLS handshake ended.
enum class tls_handshake : std::uint8_t {
  none,            ///< no handshake was attempted
  ok,              ///< completed
  timeout,         ///< cut at its deadline (tls_options::handshake_timeout)
  alert_received,  ///< the peer sent a fatal alert (e.g. it rejected our certificate)
  wrong_version,   ///< no protocol version in common, or not a TLS record at all
  plaintext_http,  ///< the peer spoke plain HTTP to the TLS port
  peer_closed,     ///< the peer's FIN or RST came before the handshake finished
  error,           ///< any other failure (the report's `tls->handshake_error` says which)
};
CLOSEWISE_API std::string_view to_string(tls_handshake) noexcept;

/// How the peer ended the TLS layer of a connection.
enum class tls_ending : std::uint8_t {
  none,                      ///< the peer had not ended it when the connection closed (we ended it first)
  close_notify,              ///< close_notify: an authenticated end of the byte stream
  peer_fin_no_close_notify,  ///< a bare FIN after a message complete by its own framing: complete, unauthenticated end
  truncated,                 ///< a bare FIN in the middle of a message or of one framed by the end of the connection
  reset,                     ///< a RST, without close_notify
};
CLOSEWISE_API std::string_view to_string(tls_ending) noexcept;

/// The TLS facts of one connection's close report.
struct tls_facts {
  tls_handshake handshake = tls_handshake::none;
  std::chrono::nanoseconds handshake_time{0};  ///< from the first handshake step to its end
  std::string version;                         ///< negotiated protocol, e.g. "TLSv1.3" (empty without a handshake)
  std::string alpn;                            ///< negotiated application protocol, e.g. "http/1.1"
  bool session_resumed = false;                ///< the handshake resumed an earlier session (no certificate exchanged)
  std::string handshake_error;                 ///< the handshake's error text, if it failed
  bool close_notify_sent = false;              ///< we sent close_notify
  bool close_notify_received = false;          ///< the peer's close_notify arrived (before or during our close)
  tls_ending peer_end = tls_ending::none;
  std::uint64_t app_bytes_in = 0;         ///< plaintext delivered to the application
  std::uint64_t app_bytes_out = 0;        ///< plaintext the application wrote
  std::uint64_t app_bytes_discarded = 0;  ///< plaintext read and thrown away by our close's drain
};

/// Why and how one connection ended. Produced exactly once per connection,
/// by `basic_stream::async_close` (or by the stream itself when the peer's
/// reset or both FINs ended the connection first).
struct CLOSEWISE_API close_report {
  close_cause cause = close_cause::none;
  close_policy policy = close_policy::graceful;  ///< the policy asked for (if any close was asked)
  bool close_requested = false;                  ///< false: the connection ended before any close was asked
  std::uint64_t bytes_in = 0;                    ///< bytes delivered to the application
  std::uint64_t bytes_out = 0;                   ///< bytes the kernel accepted from us
  std::uint64_t bytes_discarded = 0;             ///< bytes read and thrown away while draining
  std::chrono::nanoseconds drain_time{0};        ///< time from the close request to the end of the drain
  drain_end drain = drain_end::none;             ///< what ended the drain
  reset_refusal refusal = reset_refusal::none;   ///< rst_if_safe: why it fell back to graceful
  side first_fin = side::none;                   ///< whose FIN went first
  side time_wait = side::none;                   ///< who keeps TIME_WAIT (first FIN, unless a RST ended it)
  bool rst_sent = false;                         ///< we reset the connection (by policy or by limit)
  bool rst_received = false;                     ///< the peer reset the connection
  /// Bytes in our receive queue when we closed (SIOCINQ). Non-zero means the
  /// kernel answered our close with RST instead of FIN (docs/design.md,
  /// 'Kernel experiments', row 7).
  std::uint64_t unread_at_close = 0;
  /// Bytes not yet acknowledged when we reset the connection (SIOCOUTQ):
  /// what the RST threw away. Measured only when we send the RST.
  std::uint64_t unacked_at_close = 0;
  tcp_state final_state = tcp_state::unknown;  ///< TCP_INFO state just before the descriptor was closed
  std::string error;                           ///< the error that ended it, if any (message text)
  timeout_kind timeout = timeout_kind::none;   ///< the operation timeout that fired before the close, if any
  /// Over TLS (closewise::basic_tls_stream): the TLS layer's facts. The
  /// fields above describe the TCP connection under it (bytes are bytes of
  /// TLS records).
  std::optional<tls_facts> tls;

  /// True when the kernel turned our close into a RST because input was unread.
  bool kernel_reset() const noexcept { return unread_at_close > 0 && !rst_sent; }
  /// One line for logs: "cause=ours_then_peer_fin policy=graceful in=.. out=.. ...".
  std::string describe() const;
};

}  // namespace closewise
