#pragma once
// The idle race sweep: many users of one closewise::client_pool send HTTP
// requests to one server, each waiting a gap drawn uniformly from a window
// (around the server's idle timeout) between its requests, until the pool
// reused connections a given number of times. What it counts is what the
// callers saw (failures, and which were stale_reuse_not_retried) and what
// the pool saw (FINs while idle, drops at reuse, retries).
//
// Thread-safety: `run_pool_sweep` runs its own io_context on the calling
// thread; call it from one thread at a time per config.

#include <chrono>
#include <cstdint>
#include <map>
#include <string>

#include "closewise/client_pool.hpp"
#include "closewise/http_client.hpp"

namespace closewise::poolsweep {

struct sweep_config {
  std::string target;  ///< "HOST:PORT" or "unix:PATH"
  http::verb method = http::verb::get;
  std::string path = "/";  ///< the request target; POSTs carry a unique id as their body
  unsigned users = 100;    ///< concurrent pool users (coroutines on one io_context)
  std::chrono::milliseconds gap_min{180};
  std::chrono::milliseconds gap_max{220};
  std::uint64_t reuses = 20000;                      ///< run until the pool reused connections this often
  std::chrono::milliseconds request_timeout{20000};  ///< each request's whole deadline
  std::chrono::milliseconds limit{600000};           ///< give up after this long (finished = false)
  pool_options pool;                                 ///< its max_connections_per_target is raised to `users` if lower
  /// One pool of one connection per user instead of one pool for all: each
  /// connection then idles for the user's whole gap, as a client that keeps
  /// one connection per user does (Node's agent with maxSockets 1, a
  /// requests Session). One shared pool hands the most recently used
  /// connection to whichever user asks next, so its connections rarely idle
  /// that long and meet the server's idle close less often.
  bool pool_per_user = false;
};

struct sweep_result {
  bool finished = false;
  std::chrono::milliseconds elapsed{0};
  std::uint64_t requests = 0;
  std::uint64_t failures = 0;                   ///< requests that failed or were not answered 200
  std::uint64_t stale = 0;                      ///< failures with errc::stale_reuse_not_retried
  std::uint64_t stale_written = 0;              ///< ... of which the request was fully written
  std::uint64_t other_failures = 0;             ///< failures of any other kind
  std::map<std::string, std::uint64_t> errors;  ///< failure messages and counts
  pool_stats stats;                             ///< the pool's counters at the end

  /// "requests=.. reuses=.. retries=.. fins_seen_idle=.. ... failures=..".
  std::string line() const;
  /// "message: count; ..." of the failures.
  std::string describe_errors() const;
};

/// Runs the sweep; returns when the pool reused `reuses` times (or `limit`
/// passed) and every connection closed.
sweep_result run_pool_sweep(const sweep_config& config);

}  // namespace closewise::poolsweep
