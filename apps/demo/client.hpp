#pragma once
// The demo's HTTP client: a raw blocking socket with poll() timeouts, so that
// each scenario decides byte by byte when to read, stop reading, half-close,
// close or reset, and a minimal response reader around it.
//
// Thread-safety: a client belongs to one thread.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace closewise::demo {

/// A connected TCP socket (IPv4 or IPv6), closed (plain close) on destruction.
class raw_client {
 public:
  /// Connects to numeric "HOST:PORT" within `limit`. `rcvbuf` > 0 sets
  /// SO_RCVBUF before connecting (which also turns receive autotuning off).
  /// On failure returns nullopt and sets `error`.
  static std::optional<raw_client> connect(const std::string& target, int rcvbuf, std::chrono::milliseconds limit,
                                           std::string& error);
  raw_client(raw_client&& o) noexcept;
  raw_client& operator=(raw_client&& o) noexcept;
  raw_client(const raw_client&) = delete;
  raw_client& operator=(const raw_client&) = delete;
  ~raw_client() { close(); }

  int fd() const noexcept { return fd_; }
  std::uint16_t local_port() const noexcept;
  std::uint16_t remote_port() const noexcept;

  /// Sends everything, waiting at most `limit` for room each time; 0 or errno.
  int send_all(std::string_view data, std::chrono::milliseconds limit) noexcept;
  /// One recv() after waiting at most `limit`: bytes, 0 on EOF, -errno, -ETIMEDOUT.
  long recv_some(char* data, std::size_t n, std::chrono::milliseconds limit) noexcept;
  /// shutdown(SHUT_WR): our FIN, the read side stays open.
  void shutdown_write() noexcept;
  /// SO_LINGER {1,0} + close: the server gets RST, nobody keeps TIME_WAIT.
  void reset() noexcept;
  /// Plain close (FIN, or RST if unread bytes remain).
  void close() noexcept;

 private:
  explicit raw_client(int fd) noexcept : fd_(fd) {}
  int fd_ = -1;
};

/// How reading a response ended.
enum class read_end : std::uint8_t {
  none,     ///< we stopped reading (we had what we wanted, or we reset/closed)
  eof,      ///< recv returned 0 after the bytes: the server's FIN
  reset,    ///< ECONNRESET
  timeout,  ///< nothing arrived within the limit
  error,    ///< another errno (see `error`)
};
std::string_view to_string(read_end) noexcept;

/// A response as far as it was read.
struct response_read {
  bool head_complete = false;
  int status = 0;
  std::optional<std::uint64_t> content_length;
  bool connection_close = false;
  std::uint64_t head_bytes = 0;
  std::uint64_t body_bytes = 0;                 ///< body bytes received (what followed the head)
  std::uint64_t extra_bytes = 0;                ///< bytes after Content-Length (must stay 0)
  bool check_pattern = false;                   ///< compare the body with the response pattern
  std::optional<std::uint64_t> first_bad_byte;  ///< offset of the first body byte off the pattern
  std::string body_prefix;                      ///< the first bytes of the body (up to 4 KiB), for small answers
  read_end end = read_end::none;
  int error = 0;  ///< errno for read_end::error / reset

  bool intact() const noexcept { return !first_bad_byte && extra_bytes == 0; }
  bool complete() const noexcept { return head_complete && content_length && body_bytes >= *content_length; }
};

/// `read_response` goals: the whole body (as Content-Length says), or
/// everything until the stream ends (EOF, reset, timeout).
inline constexpr std::uint64_t whole_body = UINT64_MAX - 1;
inline constexpr std::uint64_t until_end = UINT64_MAX;

/// Reads into `r` until the head is complete and the body holds at least
/// `body_goal` bytes (capped at Content-Length when known), or the stream
/// ends; never reads past the goal, so the rest stays in the kernel. With
/// `until_end` it reads until EOF or an error. Each wait is bounded by `limit`.
void read_response(raw_client& c, response_read& r, std::uint64_t body_goal, std::chrono::milliseconds limit);

/// "ECONNRESET", "EPIPE", ... or the number.
std::string errno_name(int e);

}  // namespace closewise::demo
