#pragma once
// Helpers of the echo tests: an in-process echo server on its own threads,
// a peer that drives one echo exchange over a raw socket, child processes
// (the closewise-echo binary, nc, socat) and the after-test checks.

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../support/loopback.hpp"
#include "closewise/server.hpp"
#include "echo/session.hpp"

namespace closewise::echo::test {

using namespace std::chrono_literals;

/// CLOSEWISE_ECHO_SCALE (default 1.0, clamped to [0.01, 1]): sanitizer
/// presets set it below 1 to scale connection counts and sizes down.
double scale();
/// `n` scaled, at least `floor`.
std::uint64_t scaled(std::uint64_t n, std::uint64_t floor);

/// Server options for a test: 127.0.0.1:0, `threads` I/O threads, no timeouts.
server_options local_options(unsigned threads = 1);

/// An echo server running on its own thread for the length of a test; every
/// close report is kept.
class running_echo_server {
 public:
  explicit running_echo_server(server_options o, session_options s = {});
  ~running_echo_server();
  running_echo_server(const running_echo_server&) = delete;
  running_echo_server& operator=(const running_echo_server&) = delete;

  server& get() { return srv_; }
  /// The first TCP endpoint's port (0 when listening on Unix sockets only).
  std::uint16_t port() const { return port_; }
  std::vector<close_report> reports();
  /// Waits (bounded) until `n` connections were closed and reported.
  bool wait_closed(std::uint64_t n, std::chrono::milliseconds limit = 30s);

 private:
  server srv_;
  std::uint16_t port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::vector<close_report> reports_;
};

/// A connected blocking client socket (IPv4 loopback or a Unix path), or -1.
/// `rcvbuf`/`sndbuf` > 0 are set before connect (so the window is small from the start).
int connect_tcp(std::uint16_t port, int rcvbuf = 0, int sndbuf = 0);
int connect_unix(const std::string& path);

/// What one echo exchange should look like from the peer's side.
struct exchange_plan {
  std::uint64_t bytes = 0;
  std::uint64_t seed = 1;             ///< of the payload (seeded_bytes)
  std::size_t min_chunk = 64 * 1024;  ///< each send() offers a random size in [min_chunk, max_chunk]
  std::size_t max_chunk = 64 * 1024;
  double pause_probability = 0;  ///< after a chunk, stop sending for up to max_pause (still reading)
  std::chrono::microseconds max_pause{0};
  std::uint64_t rng_seed = 7;                   ///< chunk sizes and pauses
  std::chrono::milliseconds stall_limit = 30s;  ///< give up after this long without progress
};

/// What the peer saw.
struct exchange_result {
  std::uint64_t sent = 0;
  std::uint64_t received = 0;
  std::string sent_sha256;
  std::string received_sha256;
  bool eof = false;       ///< the stream ended with EOF
  int error = 0;          ///< errno that ended it (ECONNRESET, ETIMEDOUT for a stall, ...)
  bool sent_fin = false;  ///< shutdown(SHUT_WR) after the last byte
  bool matches() const { return sent == received && sent_sha256 == received_sha256 && eof && error == 0; }
};

/// Sends the plan's bytes over `fd` (made non-blocking) while receiving, one
/// thread, poll(): half-closes after the last byte and reads until EOF or an
/// error. Does not close `fd`.
exchange_result run_exchange(int fd, const exchange_plan& plan);

/// No server-side socket of `port` in CLOSE_WAIT or FIN_WAIT2 (sock_diag).
void expect_no_half_closed_leftovers(std::uint16_t port);

/// Descriptors open in process `pid` (0: this one).
std::size_t fd_count(pid_t pid = 0);
/// Resident set size of this process, bytes.
std::uint64_t rss_bytes();

/// A temporary directory removed (with its files) on destruction (tests/support).
using ::closewise::test::temp_dir;

/// Writes `n` seeded bytes to `path`; returns their SHA-256 (hex).
std::string write_seeded_file(const std::string& path, std::uint64_t n, std::uint64_t seed);
/// SHA-256 (hex) and size of a file; nullopt when it cannot be read.
std::optional<std::pair<std::string, std::uint64_t>> file_digest(const std::string& path);

/// Absolute path of `tool` on PATH, or empty.
std::string find_tool(const std::string& tool);

/// A child process. Killed (SIGKILL) and reaped on destruction if still running.
class child {
 public:
  struct io {
    std::string stdin_path;      ///< empty: /dev/null
    std::string stdout_path;     ///< empty: a pipe, read with read_line() and out()
    bool capture_stderr = true;  ///< a pipe; false: /dev/null
  };
  child(const std::vector<std::string>& argv, const io& how);
  child(const std::vector<std::string>& argv) : child(argv, io{}) {}
  ~child();
  child(const child&) = delete;
  child& operator=(const child&) = delete;

  pid_t pid() const { return pid_; }
  bool started() const { return pid_ > 0; }
  /// One line of stdout (without '\n'), or nullopt at EOF or after `limit`.
  std::optional<std::string> read_line(std::chrono::milliseconds limit = 20s);
  /// Sends `sig`.
  void signal(int sig);
  /// Waits (bounded) for the exit, collecting the rest of stdout and stderr.
  /// Returns the exit status, 128+signal when killed, or nullopt after `limit`.
  std::optional<int> wait(std::chrono::milliseconds limit = 30s);
  const std::string& out() const { return out_; }
  const std::string& err() const { return err_; }

 private:
  void pump(int timeout_ms);
  pid_t pid_ = -1;
  int out_fd_ = -1;
  int err_fd_ = -1;
  std::string out_;
  std::string err_;
  std::size_t out_consumed_ = 0;  // bytes of out_ handed out by read_line
  std::optional<int> status_;
};

/// The echo binary under test.
std::string echo_binary();

/// Starts closewise-echo with `args` and reads its "listening on" line(s).
struct echo_process {
  explicit echo_process(std::vector<std::string> args, std::size_t endpoints = 1);
  child proc;
  std::vector<std::string> endpoints;  ///< "127.0.0.1:PORT", "unix:PATH"
  std::uint16_t port() const;
};

}  // namespace closewise::echo::test
