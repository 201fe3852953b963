#pragma once
// A TCP relay that delays each direction by a fixed one-way delay: the race
// sweep's stand-in for a network path with latency where netem is not
// available (loopback delivers a FIN within microseconds, so a request and
// the server's FIN seldom cross on the wire there).
//
// It listens on 127.0.0.1, port 0, and connects to the upstream target for
// every connection it accepts. Each chunk read from one side is written to
// the other `delay` after it was read, in order. The ending is forwarded the
// same way: a FIN read from one side becomes shutdown(SHUT_WR) of the other
// side `delay` later; a reset (ECONNRESET on a read, a pending socket error
// after the FIN, or a write the peer refused) becomes an abortive close
// (SO_LINGER {1, 0}, then close) of the other side `delay` later. The
// handshake is not delayed: the relay accepts at once and connects upstream
// at once, so a connection costs no extra round trip, each exchange on it 2
// x `delay`.
//
// Buffering is bounded: a direction holding `max_queued_bytes` not yet
// written stops reading from its source until the writes catch up (the
// source then sees TCP's own backpressure).
//
// Thread-safety: the relay runs its own io_context on a thread of its own;
// the constructor returns once it listens. `endpoint()` and `stats()` may be
// called from any thread. The destructor closes every connection and joins
// the thread.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace closewise::poolsweep {

struct delay_relay_options {
  std::chrono::milliseconds delay{10};        ///< one-way delay, each direction
  std::size_t max_queued_bytes = 256 * 1024;  ///< per direction, read but not yet written
  std::chrono::milliseconds connect_timeout{5000};
};

/// What a relay forwarded, since it was made.
struct delay_relay_stats {
  std::uint64_t accepted = 0;           ///< connections accepted
  std::uint64_t upstream_failures = 0;  ///< upstream connects that failed (the client was reset)
  std::uint64_t bytes = 0;              ///< bytes written, both directions
  std::uint64_t fins = 0;               ///< FINs forwarded (shutdown of the other side)
  std::uint64_t resets = 0;             ///< resets forwarded (abortive close of the other side)
  std::uint64_t paused = 0;             ///< reads held back because a direction's queue was full
  /// Connections on which a FIN and bytes were in flight in opposite
  /// directions at once (the FIN and a request crossed on the wire).
  std::uint64_t crossings = 0;
  std::uint64_t open = 0;  ///< connections open now

  /// "accepted=.. fins=.. resets=.. ...".
  std::string line() const;
};

class delay_relay {
 public:
  /// Relays to `upstream` ("HOST:PORT", numeric host). Throws
  /// std::runtime_error when the target does not parse or it cannot listen.
  delay_relay(const std::string& upstream, delay_relay_options options);
  ~delay_relay();
  delay_relay(const delay_relay&) = delete;
  delay_relay& operator=(const delay_relay&) = delete;

  /// "127.0.0.1:PORT": where clients connect.
  std::string endpoint() const;
  delay_relay_stats stats() const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace closewise::poolsweep
