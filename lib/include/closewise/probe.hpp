#pragma once
// The kernel's view of one socket: TCP state and queue sizes.
//
// Thread-safety: reentrant; each call is a few syscalls on the descriptor.

#include <cstdint>
#include <optional>
#include <string_view>

#include "closewise/core.hpp"
#include "closewise/export.hpp"

namespace closewise {

/// Linux TCP states (include/net/tcp_states.h), plus `unknown` for
/// descriptors that are not TCP sockets or could not be asked.
enum class tcp_state : std::uint8_t {
  unknown = 0,
  established = 1,
  syn_sent,
  syn_recv,
  fin_wait1,
  fin_wait2,
  time_wait,
  close,
  close_wait,
  last_ack,
  listen,
  closing,
};
CLOSEWISE_API std::string_view to_string(tcp_state) noexcept;

/// One reading of a socket's kernel state. Fields the kernel would not give
/// stay empty (a Unix socket has no TCP state; a closed descriptor has nothing).
struct socket_probe {
  tcp_state state = tcp_state::unknown;  ///< TCP_INFO.tcpi_state
  std::optional<std::uint64_t> unread;   ///< SIOCINQ: received, not yet read by us
  std::optional<std::uint64_t> unacked;  ///< SIOCOUTQ: written, not yet acknowledged (unsent included)
  std::optional<std::uint64_t> unsent;   ///< SIOCOUTQNSD: written, not yet sent

  /// The subset the state machine uses to decide rst_if_safe.
  queue_probe queues() const noexcept {
    return {unread.has_value() && unacked.has_value(), unread.value_or(0), unacked.value_or(0)};
  }
};

/// What to read: each field costs one syscall.
enum class probe_field : std::uint8_t {
  state = 1u << 0,    ///< TCP_INFO
  unread = 1u << 1,   ///< SIOCINQ
  unacked = 1u << 2,  ///< SIOCOUTQ
  unsent = 1u << 3,   ///< SIOCOUTQNSD
};
/// A set of `probe_field`s.
using probe_fields = flag_set<probe_field>;
constexpr probe_fields operator|(probe_field a, probe_field b) noexcept { return probe_fields{a} | probe_fields{b}; }
inline constexpr probe_field probe_state = probe_field::state;
inline constexpr probe_field probe_unread = probe_field::unread;
inline constexpr probe_field probe_unacked = probe_field::unacked;
inline constexpr probe_field probe_unsent = probe_field::unsent;
inline constexpr probe_fields probe_all = probe_state | probe_unread | probe_unacked | probe_unsent;

/// Reads TCP_INFO, SIOCINQ, SIOCOUTQ and SIOCOUTQNSD of `fd` (those in
/// `fields`). Never throws.
CLOSEWISE_API socket_probe probe(int fd, probe_fields fields = probe_all) noexcept;

}  // namespace closewise
