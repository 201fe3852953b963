#pragma once
// The echo client: sends a file or seeded random bytes in chunks, half-closes
// (shutdown(SHUT_WR)) after the last byte, receives concurrently until the
// server's FIN, and compares what came back with what went out by SHA-256.
//
// Plain blocking sockets and two threads (one sends, one receives): the
// client is meant to be obviously right, and the same client drives the
// closewise echo and the reference echo in the throughput script.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace closewise::echo {

/// A deterministic byte stream: byte i depends only on the seed and i, not on
/// how the stream is cut into chunks (splitmix64, 8 bytes per step).
class seeded_bytes {
 public:
  explicit seeded_bytes(std::uint64_t seed) noexcept : state_(seed) {}
  void fill(char* out, std::size_t n) noexcept;

 private:
  std::uint64_t next() noexcept;
  std::uint64_t state_;
  std::uint64_t word_ = 0;
  unsigned left_ = 0;  // bytes of word_ not handed out yet
};

struct client_options {
  std::string target;       ///< "HOST:PORT" (numeric host) or "unix:PATH"
  std::string file;         ///< send this file ...
  std::uint64_t bytes = 0;  ///< ... or, when `file` is empty, this many seeded random bytes
  std::uint64_t seed = 1;
  std::size_t chunk_size = 64 * 1024;        ///< bytes per send() and per recv()
  bool verify = true;                        ///< SHA-256 both ways (off: count bytes only, for throughput runs)
  std::chrono::milliseconds timeout{30000};  ///< give up after this long without progress
};

/// How the received stream ended.
enum class stream_end { eof, reset, timeout, error };
const char* to_string(stream_end e) noexcept;

struct client_result {
  std::string error;  ///< set when the run could not start or an unexpected error ended it
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_received = 0;
  std::string sent_sha256;      ///< hex; empty without verify
  std::string received_sha256;  ///< hex; empty without verify
  stream_end end = stream_end::error;
  double seconds = 0;  ///< from connect to the end of the received stream

  /// Same byte count and (when verified) the same digest.
  bool match() const noexcept {
    return error.empty() && bytes_sent == bytes_received && sent_sha256 == received_sha256;
  }
  /// Received megabytes (10^6 bytes) per second.
  double mb_per_s() const noexcept { return seconds > 0 ? static_cast<double>(bytes_received) / seconds / 1e6 : 0; }
};

/// Runs one echo exchange. Errors are in the result, never thrown.
client_result run_client(const client_options& o);

}  // namespace closewise::echo
