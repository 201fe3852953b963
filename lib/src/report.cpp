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
  return out;
}

}  // namespace closewise
