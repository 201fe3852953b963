#pragma once
// The writing side of server_stats: what the server counts, from any of its
// I/O threads (relaxed atomics). Internal: users read server_stats.

#include "closewise/stats.hpp"

namespace closewise::internal {

class stats_recorder : public server_stats {
 public:
  /// Counts one finished connection.
  void record(const close_report& r) noexcept;
  void accepted() noexcept {
    add(accepted_);
    add(open_);
  }
  void accept_failed(accept_error e) noexcept { add(accept_errors_[static_cast<std::size_t>(e)]); }
  void limit_rejected() noexcept { add(limit_rejected_); }
  void limit_paused() noexcept { add(limit_paused_); }
  void drain_closed() noexcept { add(drain_closed_); }
  void drain_forced() noexcept { add(drain_forced_); }
  /// A connection waits for its input without a session (start_on_input), or stops waiting.
  void parked() noexcept { add(waiting_); }
  void unparked() noexcept { waiting_.fetch_sub(1, std::memory_order_relaxed); }

 private:
  static void add(counter& c, std::uint64_t n = 1) noexcept { c.fetch_add(n, std::memory_order_relaxed); }
};

}  // namespace closewise::internal
