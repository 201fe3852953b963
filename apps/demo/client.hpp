#pragma once
// The demo's HTTP client: a raw blocking socket with poll() timeouts, so that
// each scenario decides byte by byte when to read, stop reading, half-close,
// close or reset, and a minimal response reader around it. Over TLS, a raw
// OpenSSL client on that socket: the scenario still decides each step,
// including the ones a TLS library would not let it take (a FIN without
// close_notify, a close_notify never answered).
//
// Thread-safety: a client belongs to one thread.

#include <openssl/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
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
  none,          ///< we stopped reading (we had what we wanted, or we reset/closed)
  eof,           ///< recv returned 0 after the bytes: the server's FIN (over TLS: without close_notify)
  reset,         ///< ECONNRESET
  timeout,       ///< nothing arrived within the limit
  error,         ///< another errno (see `error`)
  close_notify,  ///< over TLS: the server's close_notify (an authenticated end)
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
  /// Over TLS, after close_notify: how the TCP connection under it ended
  /// (EOF: the server's FIN; ECONNRESET: its RST).
  std::optional<read_end> after_close_notify;
  /// Transfer-Encoding: chunked. `body_bytes` then counts the decoded bytes,
  /// and the body is complete once its last chunk and trailer arrived.
  bool chunked = false;
  bool chunked_done = false;
  /// The chunked decoder's state: where it is in the framing, the line read
  /// so far (a size or trailer line), the bytes left in the current chunk.
  enum class chunk_part : std::uint8_t { size_line, data, data_end, trailer, done } chunk_at = chunk_part::size_line;
  std::string chunk_line;
  std::uint64_t chunk_left = 0;

  bool intact() const noexcept { return !first_bad_byte && extra_bytes == 0; }
  bool complete() const noexcept {
    return head_complete && ((content_length && body_bytes >= *content_length) || chunked_done);
  }
};

/// `read_response` goals: the whole body (as Content-Length says), or
/// everything until the stream ends (EOF, reset, timeout).
inline constexpr std::uint64_t whole_body = UINT64_MAX - 1;
inline constexpr std::uint64_t until_end = UINT64_MAX;

/// One read of a response's bytes: `n` > 0 bytes, or how the stream ended.
struct read_step {
  std::size_t n = 0;
  read_end end = read_end::none;
  int error = 0;  ///< errno for read_end::error / reset
};
/// Where a response's bytes come from: one read of at most `n` bytes,
/// waiting at most `limit`.
using byte_source = std::function<read_step(char* data, std::size_t n, std::chrono::milliseconds limit)>;

/// Reads into `r` until the head is complete and the body holds at least
/// `body_goal` bytes (capped at Content-Length when known), or the stream
/// ends; never reads past the goal, so the rest stays in the kernel. With
/// `until_end` it reads until EOF or an error. Each wait is bounded by `limit`.
void read_response(raw_client& c, response_read& r, std::uint64_t body_goal, std::chrono::milliseconds limit);
/// The same from any source of bytes (a TLS client's plaintext).
void read_response(const byte_source& src, response_read& r, std::uint64_t body_goal, std::chrono::milliseconds limit);

/// A TLS client over a raw_client's connected socket (which it does not own
/// and which must outlive it; its descriptor becomes non-blocking). OpenSSL
/// reads records straight from the socket, one at a time, so a client that
/// stops reading leaves the rest in the kernel; what OpenSSL writes goes
/// through a memory BIO and out with MSG_NOSIGNAL. Verifies nothing: the
/// demo's server has a throwaway certificate. Every wait is bounded.
class tls_client {
 public:
  explicit tls_client(const raw_client& c);
  ~tls_client();
  tls_client(const tls_client&) = delete;
  tls_client& operator=(const tls_client&) = delete;

  /// The client's handshake (ALPN http/1.1, SNI localhost) within `limit`.
  /// False on failure, with `error` set.
  bool handshake(std::chrono::milliseconds limit, std::string& error);
  /// Encrypts `plaintext` and sends it; 0 or errno.
  int send_all(std::string_view plaintext, std::chrono::milliseconds limit);
  /// One SSL_read: bytes, or close_notify, EOF (a FIN without close_notify),
  /// ECONNRESET, timeout, or error (EPROTO for a TLS error).
  read_step read_some(char* data, std::size_t n, std::chrono::milliseconds limit);
  /// As a byte_source for read_response.
  byte_source source();
  /// Sends our close_notify (once), without waiting for the peer's; 0 or errno.
  int send_close_notify(std::chrono::milliseconds limit);
  /// close_notify and our FIN in one segment: the server cannot answer the
  /// close_notify before our FIN left (then its FIN would be the first).
  int send_close_notify_and_fin(std::chrono::milliseconds limit);
  /// After the peer's close_notify: how the TCP connection ends (EOF for
  /// its FIN, ECONNRESET for its RST, error EPROTO for bytes after close_notify).
  read_step tcp_end(std::chrono::milliseconds limit);
  /// The negotiated protocol ("TLSv1.3").
  std::string version() const;

 private:
  int flush(std::chrono::milliseconds limit, int flags = 0);  // what OpenSSL wrote, to the socket
  int fd_;
  SSL* ssl_ = nullptr;
  BIO* wbio_ = nullptr;  // owned by ssl_
};

/// "ECONNRESET", "EPIPE", ... or the number.
std::string errno_name(int e);

}  // namespace closewise::demo
