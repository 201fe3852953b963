#pragma once
// What the socket-level fuzz targets (fuzz_http, fuzz_replay) share with the
// tests that replay their inputs: an in-process closewise::server on loopback
// port 0, a raw non-blocking client socket whose every wait has a deadline,
// and a checker that splits what a server sent into HTTP/1.1 responses.
//
// libFuzzer runs every input in one process, so nothing here may keep a
// descriptor, a thread or memory from one input to the next: servers are
// started once and reused, client sockets close when they go out of scope.
//
// Thread-safety: fuzz_server may be queried from any thread; a client_socket
// belongs to one thread.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "closewise/server.hpp"
#include "descriptors.hpp"

namespace closewise::test {

using steady_clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

/// A closewise::server on 127.0.0.1:0, run on its own thread from
/// construction to destruction, that wakes waiters on every close.
class fuzz_server {
 public:
  /// Throws std::system_error if it cannot listen.
  fuzz_server(server_options o, session_handler h);
  ~fuzz_server();
  fuzz_server(const fuzz_server&) = delete;
  fuzz_server& operator=(const fuzz_server&) = delete;

  std::uint16_t port() const noexcept { return port_; }
  server& get() noexcept { return srv_; }
  /// Waits (bounded) until the server has taken `connections` connections
  /// from its listener (accepted, or lost to a reset in the backlog) and
  /// closed and counted every one; false if that is not so at `limit`.
  bool wait_all_closed(std::uint64_t connections, milliseconds limit);

 private:
  // Before the server: its destructor may still report closes.
  std::mutex mu_;
  std::condition_variable cv_;
  server srv_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};

/// Options for a fuzzed server on 127.0.0.1:0: one I/O thread (so an input's
/// events keep their order), idle/read/write timeouts of `timeouts`, a
/// graceful drain bounded by `linger` without progress and `linger_max` in all.
server_options fuzz_server_options(milliseconds timeouts, milliseconds linger, milliseconds linger_max);

/// How a read of a client socket ended.
enum class read_end : std::uint8_t { eof, reset, error, deadline, quiet };
std::string_view to_string(read_end e) noexcept;

/// A raw TCP client of 127.0.0.1, non-blocking, every wait bounded by poll().
/// Closed (plain close) on destruction.
class client_socket {
 public:
  client_socket() = default;
  client_socket(client_socket&& o) noexcept;
  client_socket& operator=(client_socket&& o) noexcept;
  ~client_socket() { close(); }

  /// Connects (blocking: loopback answers at once); an invalid socket on failure.
  static client_socket connect_to(std::uint16_t port);
  bool valid() const noexcept { return fd_ >= 0; }
  int fd() const noexcept { return fd_; }

  /// Sends all of `data` before `deadline`. 0, or the errno that stopped it
  /// (ETIMEDOUT at the deadline); `sent` says how much went out either way.
  /// With a `sink`, whatever arrives while the send waits is read into it, so
  /// a server answering pipelined requests cannot block on us while we block
  /// on it.
  int send_all(std::string_view data, steady_clock::time_point deadline, std::size_t* sent = nullptr,
               std::string* sink = nullptr);
  /// Sends what the kernel takes now without waiting; bytes sent, or -errno.
  long send_now(std::string_view data) noexcept;
  /// Reads into `sink` until EOF, an error, `deadline`, or (quiet > 0) no
  /// byte for `quiet`.
  read_end read(std::string& sink, steady_clock::time_point deadline, milliseconds quiet = milliseconds(0));
  /// Reads what is already queued, without waiting. EOF, reset and error end
  /// the stream; `quiet` means "nothing more for now".
  read_end read_now(std::string& sink);
  void shutdown_write() noexcept;
  /// SO_LINGER {1,0} + close: the server gets RST.
  void reset() noexcept;
  void close() noexcept;

 private:
  explicit client_socket(int fd) noexcept : fd_(fd) {}
  int fd_ = -1;
};

/// One response as the checker parsed it.
struct parsed_response {
  unsigned status = 0;
  bool keep_alive = true;
};

/// The responses found in what a server sent on one connection.
struct response_sequence {
  std::vector<parsed_response> responses;  ///< interim (1xx) responses included, in order
  std::size_t final_count = 0;             ///< responses that are not 1xx
  std::size_t leftover = 0;                ///< trailing bytes that are not (yet) a complete response
  std::optional<std::string> error;        ///< bytes that cannot be a response, with why
};

/// Splits `bytes` into HTTP/1.1 responses with Beast's response parser. The
/// n-th final response answers a HEAD request when `head[n]` is true (its
/// Content-Length then announces a body that is not sent). A final response
/// must carry Content-Length or be chunked: a response framed by the close
/// would hide what follows it.
response_sequence parse_responses(std::string_view bytes, const std::vector<bool>& head);

/// The methods of the requests in `bytes`, in order, as Beast's request parser
/// reads them with `header_limit`: every complete request, then the method of
/// an incomplete or malformed one if its request line was read.
struct request_sequence {
  std::vector<bool> head;    ///< per request: is it a HEAD
  std::size_t complete = 0;  ///< requests parsed completely
};
request_sequence parse_requests(std::string_view bytes, std::size_t header_limit);

/// Server sockets of `port` in CLOSE_WAIT or FIN_WAIT2 (what a server that
/// forgets to close, or closes without reading its peer's FIN, leaves behind).
/// Waits up to `settle` for them to go; returns what is left, or an error text.
std::optional<std::string> stuck_server_sockets(std::uint16_t port, milliseconds settle);

}  // namespace closewise::test
