#pragma once
// closewise-bench's load engine: one epoll loop per thread, each driving its
// share of the connections through a fixed cycle, with no allocation and no
// lock on the hot path.
//
// A cycle, by mode:
//   client_fin    connect, request, whole response, close()          (FIN first: the client keeps TIME_WAIT)
//   client_rst    connect, request, whole response, SO_LINGER{1,0} + close()  (RST: nobody keeps TIME_WAIT)
//   server_close  connect, request with "Connection: close", whole response,
//                 the server's FIN, close()                          (the server keeps TIME_WAIT)
//   keepalive     requests one after another on a kept connection; a cycle is one
//                 request, and a connection is replaced after --requests-per-conn
//                 requests or when the server says it closes
//
// A response is a success only when its status is 2xx and its whole body
// arrived (Content-Length, chunked or close-delimited). Everything else is
// an error of exactly one class.
//
// Thread-safety: `run_load` is called once at a time; it owns its threads.

#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "histogram.hpp"

namespace closewise::bench {

enum class mode : std::uint8_t { client_fin, client_rst, server_close, keepalive };
std::string_view to_string(mode m) noexcept;

/// Why a cycle failed. One class per failure.
enum class error_class : std::uint8_t {
  refused,           ///< ECONNREFUSED on connect
  reset,             ///< ECONNRESET before the response was complete (what had arrived was cut short)
  broken_pipe,       ///< EPIPE writing the request
  timeout,           ///< no completion within --timeout (the connection is then reset)
  truncated,         ///< the server's FIN before the end of the response (shorter than its Content-Length, a
                     ///< chunked body without its last chunk, or no response at all)
  addr_unavailable,  ///< EADDRNOTAVAIL on connect: no ephemeral port free (TIME_WAIT holds them)
  bad_status,        ///< a whole response whose status is not 2xx
  protocol,          ///< bytes that are not a response we can delimit, or bytes after it
  other,             ///< any other errno (in the log at debug level)
};
inline constexpr std::size_t error_class_count = 9;
std::string_view to_string(error_class e) noexcept;

/// What a run does.
struct load_config {
  sockaddr_storage target{};
  socklen_t target_len = 0;
  /// Local addresses to connect from, in turn (empty: the kernel's choice).
  /// Each source address has its own ephemeral ports, so N of them lift the
  /// client-side TIME_WAIT cap of client-fin (~14k usable ports per
  /// destination, each reusable 1 s after its TIME_WAIT began) N-fold.
  std::vector<sockaddr_storage> sources;
  mode run_mode = mode::client_fin;
  std::string request;  ///< the request bytes, sent whole on each cycle
  unsigned threads = 1;
  unsigned connections = 1;                                    ///< in total; spread over the threads
  std::uint64_t requests_per_conn = 0;                         ///< keepalive: requests per connection (0: unlimited)
  std::chrono::nanoseconds timeout = std::chrono::seconds(5);  ///< per cycle (keepalive: per request)
  std::chrono::nanoseconds warmup = std::chrono::seconds(1);
  std::chrono::nanoseconds duration = std::chrono::seconds(5);  ///< used when count == 0
  std::uint64_t count = 0;                                      ///< > 0: stop after this many measured cycles instead
  std::chrono::nanoseconds grace = std::chrono::seconds(1);     ///< cycles in flight at the end may finish this long
};

/// What a run measured. Only cycles that ended inside the measured window count.
struct load_result {
  histogram latency;            ///< whole cycle (keepalive: one request), nanoseconds
  std::uint64_t completed = 0;  ///< successful cycles
  std::array<std::uint64_t, error_class_count> errors{};
  std::uint64_t connections_opened = 0;  ///< connect() calls that succeeded or were in progress
  std::uint64_t bytes_in = 0;
  /// server_close / keepalive: the server ended the connection with a RST
  /// instead of a FIN after a whole response (a success, noted).
  std::uint64_t server_reset_after_response = 0;
  std::uint64_t aborted_at_end = 0;  ///< cycles still in flight after the grace period (reset, not counted)
  double window_s = 0;               ///< length of the measured window
  std::uint64_t errors_total() const noexcept {
    std::uint64_t n = 0;
    for (auto e : errors) n += e;
    return n;
  }
};

/// Progress, once a second: seconds since the start, the phase ("warm-up",
/// "measuring", "ending"), successes and errors so far in the window.
using progress_fn =
    std::function<void(double elapsed_s, std::string_view phase, std::uint64_t completed, std::uint64_t errors)>;

/// Runs the load and returns the counts. Throws std::system_error when a
/// thread cannot set up (epoll_create).
load_result run_load(const load_config& cfg, const progress_fn& progress);

}  // namespace closewise::bench
