#pragma once
// fuzz_http's input and oracle, shared by the libFuzzer target
// (fuzz/fuzz_http.cpp) and the replay test (tests/reqresp/net_fuzz_replay_test.cpp).
//
// An input is raw request bytes plus where to split them, how long to pause
// between the pieces, and how the client ends (fuzz/README.md has the byte
// layout). Each input runs on one new connection to an in-process
// closewise-reqresp server (closewise::server + reqresp::http_session) whose
// limits and timeouts are small, so one input costs milliseconds and every
// refusal (408, 413, 414, 431) is in reach of a 4 KiB input.
//
// The oracle: what the server sent is a sequence of complete HTTP/1.1
// responses with documented statuses; nothing follows a response that closes
// the connection (so nothing pipelined behind a refusal was answered); the
// server never answers more requests than the client sent; the server ends
// the connection within a bound; its counters add up.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "net_fuzz.hpp"
#include "reqresp/http_session.hpp"

namespace closewise::test {

/// How the client ends its connection.
enum class http_fuzz_ending : std::uint8_t {
  half_close,       ///< SHUT_WR, then read to EOF: every response must be complete
  read_then_reset,  ///< read until the server is quiet for 2 ms, then RST
  reset,            ///< RST right after the last piece
};

/// One decoded input.
struct http_fuzz_plan {
  http_fuzz_ending ending = http_fuzz_ending::half_close;
  std::string payload;  ///< the bytes sent, in order
  /// Piece boundaries: offsets into `payload`, ascending, each with the pause
  /// after the piece that ends there.
  struct split {
    std::size_t at = 0;
    std::chrono::microseconds pause{0};
  };
  std::vector<split> splits;
};

inline constexpr std::size_t max_http_fuzz_payload = 64 * 1024;
inline constexpr std::size_t max_http_fuzz_splits = 8;
/// The pauses of one input add up to at most this much: an input must never
/// wait seconds.
inline constexpr std::chrono::milliseconds max_http_fuzz_pause{40};

/// Every byte string decodes to a plan.
http_fuzz_plan decode_http_input(const std::uint8_t* data, std::size_t size);

/// The server's HTTP limits under the fuzzer: small, so refusals are cheap to reach.
reqresp::http_options http_fuzz_options();
/// The server's connection options under the fuzzer: every timeout in ms.
server_options http_fuzz_server_options();

/// The in-process server and the oracle. One per process (libFuzzer) or per test.
class http_fuzz_target {
 public:
  /// The real closewise-reqresp session.
  http_fuzz_target();
  /// Another session (tests: a broken one, to show the oracle fails).
  explicit http_fuzz_target(session_handler h);

  /// Runs one input; the broken promise, if any.
  std::optional<std::string> run(const std::uint8_t* data, std::size_t size);
  std::uint16_t port() const noexcept { return srv_.port(); }
  /// The statuses of the final responses the last run() read, in order
  /// (interim 100s left out), whatever its verdict.
  const std::vector<unsigned>& last_statuses() const noexcept { return last_statuses_; }

 private:
  std::vector<unsigned> last_statuses_;
  std::shared_ptr<reqresp::http_service> svc_;
  fuzz_server srv_;
  std::uint64_t connections_ = 0;  ///< made by this target so far
};

}  // namespace closewise::test
