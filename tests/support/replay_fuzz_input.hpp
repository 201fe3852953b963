#pragma once
// fuzz_replay's input and oracle, shared by the libFuzzer target
// (fuzz/fuzz_replay.cpp) and the replay test (tests/reqresp/net_fuzz_replay_test.cpp).
//
// An input is a script of socket operations on up to three raw client
// connections to two in-process servers on loopback: the echo session
// (apps/echo) and the HTTP session (apps/reqresp). Operations: open a
// connection, send, SHUT_WR, RST (SO_LINGER {1,0} + close), a plain close,
// pause and resume reading, wait a few ms, and finish (SHUT_WR, read to EOF,
// close). fuzz/README.md has the byte layout.
//
// The oracle: what the echo returns is always a prefix of what was sent, and
// all of it once the client half-closed and read to EOF; an HTTP connection
// read to EOF holds complete responses only; after every input both servers
// have closed every connection, no server socket is left in CLOSE_WAIT or
// FIN_WAIT2 beyond a settle time, and the process has as many sockets open as
// it had before the input (within a settle time; sockets only, since the
// sanitizers' runtime opens pipes of its own in any thread).

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "net_fuzz.hpp"

namespace closewise::test {

enum class replay_op : std::uint8_t {
  open,            ///< connect the slot (operand: even echo, odd HTTP)
  send,            ///< send what the kernel takes now (operand: size for echo, request for HTTP)
  shut_wr,         ///< SHUT_WR
  reset,           ///< SO_LINGER {1,0} + close: RST
  close,           ///< plain close (RST by the kernel if replies are unread)
  pause_reading,   ///< stop reading the slot
  resume_reading,  ///< read it again
  wait,            ///< serve every reading slot for operand % 5 ms
  finish,          ///< SHUT_WR, read to EOF (bounded), check, close
};
inline constexpr std::size_t replay_op_count = 9;
inline constexpr std::size_t replay_slots = 3;
inline constexpr std::size_t max_replay_steps = 64;
/// Echo bytes sent per input at most.
inline constexpr std::uint64_t max_replay_bytes = 1u << 20;

struct replay_step {
  replay_op op = replay_op::open;
  std::uint8_t slot = 0;
  std::uint8_t operand = 0;
};

/// Every byte string decodes to a script (at most max_replay_steps steps).
std::vector<replay_step> decode_replay_input(const std::uint8_t* data, std::size_t size);

/// Bytes an echo send of size operand `b` asks for: b < 64: b bytes;
/// 64..127: (b & 63) * 256; 128..255: (b & 127) * 4 KiB.
std::size_t replay_send_size(std::uint8_t b) noexcept;

/// The two in-process servers and the oracle. One per process (libFuzzer) or per test.
class replay_fuzz_target {
 public:
  /// The real echo and HTTP sessions. The kernel's socket table is read
  /// (sock_diag) after every `diag_every`-th input: a dump costs several ms
  /// on a busy machine, while the per-input checks (open connections,
  /// descriptors) already catch a session that keeps its socket, so the
  /// fuzzer reads it now and then and the replay test after every input.
  explicit replay_fuzz_target(unsigned diag_every = 1);
  /// Other sessions (tests: broken ones, to show the oracle fails).
  replay_fuzz_target(session_handler echo, session_handler http, unsigned diag_every = 1);

  /// Runs one input; the broken promise, if any.
  std::optional<std::string> run(const std::uint8_t* data, std::size_t size);
  std::uint16_t echo_port() const noexcept { return echo_.port(); }
  std::uint16_t http_port() const noexcept { return http_.port(); }

 private:
  fuzz_server echo_;
  fuzz_server http_;
  std::uint64_t echo_connections_ = 0;
  std::uint64_t http_connections_ = 0;
  unsigned diag_every_ = 1;
  std::uint64_t inputs_ = 0;
};

}  // namespace closewise::test
