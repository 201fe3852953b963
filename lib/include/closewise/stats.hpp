#pragma once
// Teardown statistics: how connections ended, counted per server.
//
// Thread-safety: `server_stats` is updated from every I/O thread with relaxed
// atomics and read with `snapshot()` from any thread; a snapshot is a plain
// value (each counter exact, the set not taken atomically as a whole).

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "closewise/core.hpp"
#include "closewise/export.hpp"
#include "closewise/report.hpp"

namespace closewise {

/// Accept errors by kind.
enum class accept_error : std::uint8_t {
  emfile,    ///< EMFILE: this process is out of descriptors (backed off)
  enfile,    ///< ENFILE: the system is out of descriptors (backed off)
  nobufs,    ///< ENOBUFS / ENOMEM: out of kernel memory (backed off)
  aborted,   ///< ECONNABORTED: the client reset before we accepted (survived)
  protocol,  ///< EPROTO and the network errors accept(2) passes on (survived)
  other,     ///< anything else (survived, backed off)
};
inline constexpr std::size_t accept_error_count = 6;
static_assert(static_cast<std::size_t>(accept_error::other) + 1 == accept_error_count, "accept_error_count is stale");
CLOSEWISE_API std::string_view to_string(accept_error) noexcept;

inline constexpr std::size_t close_cause_count = 13;
static_assert(static_cast<std::size_t>(close_cause::server_drain) + 1 == close_cause_count,
              "close_cause_count is stale: server_drain must stay the last cause");
inline constexpr std::size_t timeout_kind_count = 4;
static_assert(static_cast<std::size_t>(timeout_kind::write) + 1 == timeout_kind_count, "timeout_kind_count is stale");
inline constexpr std::size_t tls_handshake_count = 8;
static_assert(static_cast<std::size_t>(tls_handshake::error) + 1 == tls_handshake_count,
              "tls_handshake_count is stale");
inline constexpr std::size_t tls_ending_count = 5;
static_assert(static_cast<std::size_t>(tls_ending::reset) + 1 == tls_ending_count, "tls_ending_count is stale");

/// A copy of the counters at one moment.
struct stats_snapshot {
  std::uint64_t accepted = 0;
  std::uint64_t open = 0;
  std::uint64_t waiting_for_input = 0;  ///< open, no session yet: input not ready (server_options::start_on_input)
  std::uint64_t closed = 0;
  std::array<std::uint64_t, close_cause_count> closed_by_cause{};  ///< indexed by close_cause
  std::uint64_t fin_first_local = 0;                               ///< we sent the first FIN
  std::uint64_t fin_first_peer = 0;                                ///< the peer sent the first FIN
  std::uint64_t time_wait_local = 0;                               ///< connections that left TIME_WAIT on our side
  std::uint64_t time_wait_peer = 0;  ///< connections that left TIME_WAIT on the peer's side
  std::uint64_t rst_sent = 0;        ///< RSTs we sent (policy, limits)
  std::uint64_t rst_received = 0;    ///< RSTs the peer sent
  std::uint64_t kernel_resets = 0;   ///< closes the kernel turned into RST (unread input)
  std::uint64_t bytes_in = 0;
  std::uint64_t bytes_out = 0;
  std::uint64_t bytes_discarded = 0;                              ///< read and thrown away while draining
  std::array<std::uint64_t, timeout_kind_count> timeouts{};       ///< indexed by timeout_kind (none unused)
  std::uint64_t linger_timeouts = 0;                              ///< graceful drains cut by time
  std::uint64_t linger_limits = 0;                                ///< graceful drains cut by the byte budget
  std::uint64_t limit_rejected = 0;                               ///< connections refused over the connection limit
  std::uint64_t limit_paused = 0;                                 ///< times accepting paused at the connection limit
  std::array<std::uint64_t, accept_error_count> accept_errors{};  ///< indexed by accept_error
  std::uint64_t drain_closed = 0;                                 ///< idle connections closed gracefully by a drain
  std::uint64_t drain_forced = 0;                                 ///< connections reset at the drain deadline
  // TLS (server_options::tls): handshakes by outcome, then for connections
  // whose handshake succeeded, the protocol, close_notify each way and how
  // the peer ended the TLS stream.
  std::array<std::uint64_t, tls_handshake_count> tls_handshakes{};  ///< indexed by tls_handshake (none unused)
  std::uint64_t tls_handshake_us = 0;                               ///< total handshake time of successful handshakes
  std::uint64_t tls_v12 = 0;                                        ///< sessions on TLS 1.2
  std::uint64_t tls_v13 = 0;                                        ///< sessions on TLS 1.3
  std::uint64_t tls_close_notify_sent = 0;
  std::uint64_t tls_close_notify_received = 0;
  std::array<std::uint64_t, tls_ending_count> tls_peer_end{};  ///< indexed by tls_ending (none: we ended it first)
};

/// The counters of one server, as its users see them: read-only. The server
/// counts into them (lib/src/stats_recorder.hpp); nothing else can.
class CLOSEWISE_API server_stats {
 public:
  /// A copy of every counter (each exact, the set not taken atomically).
  stats_snapshot snapshot() const noexcept;
  /// Connections open now (accepted and not yet reported closed).
  std::uint64_t open() const noexcept { return open_.load(std::memory_order_relaxed); }

 protected:
  server_stats() = default;
  ~server_stats() = default;
  server_stats(const server_stats&) = delete;
  server_stats& operator=(const server_stats&) = delete;

  using counter = std::atomic<std::uint64_t>;
  counter accepted_{0}, open_{0}, waiting_{0}, closed_{0};
  std::array<counter, close_cause_count> by_cause_{};
  counter fin_first_local_{0}, fin_first_peer_{0}, time_wait_local_{0}, time_wait_peer_{0};
  counter rst_sent_{0}, rst_received_{0}, kernel_resets_{0};
  counter bytes_in_{0}, bytes_out_{0}, bytes_discarded_{0};
  std::array<counter, timeout_kind_count> timeouts_{};
  counter linger_timeouts_{0}, linger_limits_{0};
  counter limit_rejected_{0}, limit_paused_{0};
  std::array<counter, accept_error_count> accept_errors_{};
  counter drain_closed_{0}, drain_forced_{0};
  std::array<counter, tls_handshake_count> tls_handshakes_{};
  counter tls_handshake_us_{0}, tls_v12_{0}, tls_v13_{0}, tls_close_notify_sent_{0}, tls_close_notify_received_{0};
  std::array<counter, tls_ending_count> tls_peer_end_{};
};

/// The snapshot as one JSON object (stable key names, documented in docs/).
CLOSEWISE_API std::string to_json(const stats_snapshot& s);
/// The snapshot in Prometheus text exposition format, metric names prefixed `closewise_`.
CLOSEWISE_API std::string to_prometheus(const stats_snapshot& s);

}  // namespace closewise
