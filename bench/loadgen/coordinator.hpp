#pragma once
// What the load engines share: the run's phases (warm-up, measuring,
// stopping), count mode's tickets, the live counters, and the coordinating
// loop that moves the phases and merges the workers' results. A worker is
// any type with `void run()` and `load_result& result()` that reads the
// phase from `control` and counts into `live_counters`.
//
// Thread-safety: `coordinate` owns the worker threads it starts; `control`
// and `live_counters` are shared with them through atomics.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <ctime>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "engine.hpp"

namespace closewise::bench::detail {

inline std::int64_t now_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

enum class phase : int { warmup = 0, measuring = 1, stopping = 2 };

// Shared between the threads and the coordinating thread. Read once per
// event with relaxed loads: a cycle that ends a few nanoseconds across a
// phase boundary may fall on either side, which is what any window does.
struct control {
  std::atomic<int> current{static_cast<int>(phase::warmup)};
  bool count_mode = false;
  std::atomic<std::int64_t> tickets{0};  // count mode: cycles still to start in the window

  phase get() const noexcept { return static_cast<phase>(current.load(std::memory_order_relaxed)); }
};

// Live counters for the progress line, one cache line per thread.
struct alignas(64) live_counters {
  std::atomic<std::uint64_t> completed{0};
  std::atomic<std::uint64_t> errors{0};
};

/// Whether a slot's new cycle is counted: in count mode, when it took a
/// ticket; otherwise, when it ends inside the measured window.
inline bool counted(const control& ctl, bool ticketed) noexcept {
  return ctl.count_mode ? ticketed : ctl.get() == phase::measuring;
}

/// Decides whether a new cycle may start now and, in count mode, takes its ticket.
inline bool may_start(control& ctl, bool& ticketed) noexcept {
  const phase ph = ctl.get();
  if (ph == phase::stopping) return false;
  ticketed = false;
  if (ctl.count_mode && ph == phase::measuring) {
    if (ctl.tickets.fetch_sub(1, std::memory_order_relaxed) <= 0) return false;
    ticketed = true;
  }
  return true;
}

inline error_class classify_errno(int err) noexcept {
  switch (err) {
    case ECONNREFUSED:
      return error_class::refused;
    case ECONNRESET:
      return error_class::reset;
    case EPIPE:
      return error_class::broken_pipe;
    case ETIMEDOUT:
      return error_class::timeout;
    case EADDRNOTAVAIL:
      return error_class::addr_unavailable;
    default:
      return error_class::other;
  }
}

/// Adds `r` into `out` (every count; the window is the coordinator's).
void merge_result(load_result& out, const load_result& r);

/// Runs `threads` workers made by `make(control&, live_counters&, share)`
/// through the phases of `cfg` and returns their merged counts.
template <class MakeWorker>
load_result coordinate(const load_config& cfg, const progress_fn& progress, MakeWorker&& make) {
  const unsigned threads = std::max(1u, std::min(cfg.threads, cfg.connections));
  control ctl;
  ctl.count_mode = cfg.count > 0;
  ctl.tickets.store(static_cast<std::int64_t>(cfg.count));
  std::vector<live_counters> live(threads);
  using worker_ptr = decltype(make(ctl, live[0], 1u));
  std::vector<worker_ptr> workers;
  for (unsigned t = 0; t < threads; ++t) {
    const unsigned share = cfg.connections / threads + (t < cfg.connections % threads ? 1 : 0);
    workers.push_back(make(ctl, live[t], share));
  }
  std::vector<std::thread> pool;
  std::atomic<unsigned> running{threads};
  for (auto& w : workers) {
    pool.emplace_back([&w, &running] {
      w->run();
      running.fetch_sub(1);
    });
  }

  const std::int64_t start = now_ns();
  const std::int64_t warm_end = start + cfg.warmup.count();
  std::int64_t window_start = 0;
  std::int64_t window_end = 0;
  std::int64_t next_progress = start + 1'000'000'000;
  auto totals = [&] {
    std::uint64_t c = 0, e = 0;
    for (auto& l : live) {
      c += l.completed.load(std::memory_order_relaxed);
      e += l.errors.load(std::memory_order_relaxed);
    }
    return std::pair{c, e};
  };
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const std::int64_t now = now_ns();
    const phase ph = ctl.get();
    if (ph == phase::warmup && now >= warm_end) {
      window_start = now_ns();
      ctl.current.store(static_cast<int>(phase::measuring));
    } else if (ph == phase::measuring) {
      const bool time_up = !ctl.count_mode && now - window_start >= cfg.duration.count();
      const bool count_done = ctl.count_mode && totals().first + totals().second >= cfg.count;
      if (time_up || count_done) {
        window_end = now_ns();
        ctl.current.store(static_cast<int>(phase::stopping));
      }
      if (ctl.count_mode && running.load() == 0) {
        window_end = now_ns();
        ctl.current.store(static_cast<int>(phase::stopping));
      }
    } else if (ph == phase::stopping && running.load() == 0) {
      break;
    }
    if (progress && now >= next_progress) {
      const auto [c, e] = totals();
      const phase shown = ctl.get();
      progress(static_cast<double>(now - start) / 1e9,
               shown == phase::warmup      ? "warm-up"
               : shown == phase::measuring ? "measuring"
                                           : "ending",
               c, e);
      next_progress += 1'000'000'000;
    }
  }
  for (auto& t : pool) t.join();

  load_result out;
  for (auto& w : workers) merge_result(out, w->result());
  out.window_s = static_cast<double>(window_end - window_start) / 1e9;
  return out;
}

}  // namespace closewise::bench::detail
