#include "closewise/report.hpp"

#include <fmt/format.h>

namespace closewise {

std::string_view to_string(timeout_kind t) noexcept {
  switch (t) {
    case timeout_kind::none:
      return "none";
    case timeout_kind::idle:
      return "idle";
    case timeout_kind::read:
      return "read";
    case timeout_kind::write:
      return "write";
  }
  return "?";
}

std::string_view to_string(tls_handshake h) noexcept {
  switch (h) {
    case tls_handshake::none:
      return "none";
    case tls_handshake::ok:
      return "ok";
    case tls_handshake::timeout:
      return "timeout";
    case tls_handshake::alert_received:
      return "alert_received";
    case tls_handshake::wrong_version:
      return "wrong_version";
    case tls_handshake::plaintext_http:
      return "plaintext_http";
    case tls_handshake::peer_closed:
      return "peer_closed";
    case tls_handshake::error:
      return "error";
  }
  return "?";
}

std::string_view to_string(tls_ending e) noexcept {
  switch (e) {
    case tls_ending::none:
      return "none";
    case tls_ending::close_notify:
      return "close_notify";
    case tls_ending::peer_fin_no_close_notify:
      return "peer_fin_no_close_notify";
    case tls_ending::truncated:
      return "truncated";
    case tls_ending::reset:
      return "reset";
  }
  return "?";
}

std::string close_report::describe() const {
  std::string out =
      fmt::format("cause={} policy={}{} in={} out={} discarded={} drain={}", to_string(cause),
                  close_requested ? to_string(policy) : std::string_view{"none"},
                  refusal != reset_refusal::none ? fmt::format(" (refused: {})", to_string(refusal)) : std::string{},
                  bytes_in, bytes_out, bytes_discarded, to_string(drain));
  if (drain != drain_end::none)
    out += fmt::format(" drain_ms={:.3f}", std::chrono::duration<double, std::milli>(drain_time).count());
  out += fmt::format(" first_fin={} time_wait={} rst_sent={} rst_received={} final_state={}", to_string(first_fin),
                     to_string(time_wait), rst_sent, rst_received, to_string(final_state));
  if (unread_at_close > 0) out += fmt::format(" unread_at_close={} (kernel sent RST)", unread_at_close);
  if (unacked_at_close > 0) out += fmt::format(" unacked_at_close={}", unacked_at_close);
  if (timeout != timeout_kind::none) out += fmt::format(" timeout={}", to_string(timeout));
  if (!error.empty()) out += fmt::format(" error=\"{}\"", error);
  if (tls) {
    out +=
        fmt::format(" tls={} handshake={} handshake_ms={:.3f}", tls->version.empty() ? "none" : tls->version,
                    to_string(tls->handshake), std::chrono::duration<double, std::milli>(tls->handshake_time).count());
    if (!tls->alpn.empty()) out += fmt::format(" alpn={}", tls->alpn);
    if (tls->session_resumed) out += " resumed=true";
    if (!tls->handshake_error.empty()) out += fmt::format(" handshake_error=\"{}\"", tls->handshake_error);
    out += fmt::format(" close_notify_sent={} close_notify_received={} peer_end={} app_in={} app_out={}",
                       tls->close_notify_sent, tls->close_notify_received, to_string(tls->peer_end), tls->app_bytes_in,
                       tls->app_bytes_out);
    if (tls->app_bytes_discarded > 0) out += fmt::format(" app_discarded={}", tls->app_bytes_discarded);
  }
  return out;
}

}  // namespace closewise
