#pragma once
// A raw, blocking TLS client for tests, written on OpenSSL's public API with
// two memory BIOs over a blocking loopback TCP socket: OpenSSL only turns
// plaintext into records and back, and the peer decides which bytes go on
// the wire and when (a record cut in the middle, a FIN without close_notify,
// a RST). Every blocking call is bounded (poll before recv, SO_SNDTIMEO).

#include <openssl/ssl.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

namespace closewise::test {

/// The protocol version the peer offers: exactly one.
enum class peer_version : std::uint8_t { tls12, tls13 };

/// How the byte stream the peer read ended.
enum class peer_end : std::uint8_t {
  close_notify,  ///< the other side's close_notify
  eof,           ///< a FIN without close_notify
  reset,         ///< ECONNRESET
  timeout,       ///< nothing ended it within the time given
  error,         ///< a TLS error (error() says which)
};
const char* to_string(peer_end e) noexcept;

class tls_peer {
 public:
  tls_peer() = default;
  ~tls_peer();
  tls_peer(const tls_peer&) = delete;
  tls_peer& operator=(const tls_peer&) = delete;

  /// Connects to 127.0.0.1:`port` (blocking, bounded by the kernel's
  /// connect to a listening loopback socket). False on failure.
  bool connect(std::uint16_t port);
  /// Shakes hands offering exactly `v`, SNI localhost. `verify`: verify the
  /// server's certificate against an empty trust store (so it is rejected
  /// with an alert); otherwise verify nothing. False on failure (error()).
  bool handshake(peer_version v, bool verify = false, std::chrono::milliseconds limit = std::chrono::seconds(10));
  /// The ClientHello the peer would send for `v`, without sending it (for
  /// a handshake cut or trickled by hand with send_raw).
  static std::string client_hello(peer_version v);

  /// Encrypts `plaintext` into records (one per 16 KiB) and sends them.
  bool write(const std::string& plaintext);
  /// Encrypts `plaintext` (at most one record) and sends all of its record
  /// but the last `keep_bytes`: the stream can then end mid-record.
  /// Returns the record's full size (0 on failure).
  std::size_t write_partial_record(const std::string& plaintext, std::size_t keep_bytes);
  /// close_notify (SSL_shutdown once), sent at once.
  bool send_close_notify();
  /// Bytes on the wire as they are (no TLS).
  bool send_raw(const std::string& bytes);
  /// shutdown(SHUT_WR): our FIN; the socket stays open for reading.
  void fin() noexcept;
  /// SO_LINGER {1,0} + close: a RST.
  void rst() noexcept;
  /// Closes the descriptor (plain close).
  void close() noexcept;

  struct read_result {
    std::string plain;
    peer_end end = peer_end::timeout;
  };
  /// Reads and decrypts until the other side's close_notify, FIN, RST or
  /// an error, or until `limit` passes.
  read_result read_all_plain(std::chrono::milliseconds limit);
  /// The same, but it also returns (end: timeout) as soon as `enough` says
  /// the plaintext read so far is enough (a whole response on a kept-alive
  /// connection).
  read_result read_plain_until(const std::function<bool(const std::string&)>& enough, std::chrono::milliseconds limit);

  int fd() const noexcept { return fd_; }
  const std::string& error() const noexcept { return error_; }

 private:
  bool flush();  // the write BIO's bytes to the socket
  // One recv into the read BIO, waiting until `deadline`: 1 bytes, 0 EOF, -errno
  // (-ETIMEDOUT when the deadline passed).
  long fill(std::chrono::steady_clock::time_point deadline);
  void fail(const char* what);

  int fd_ = -1;
  SSL* ssl_ = nullptr;
  BIO* rbio_ = nullptr;  // network -> OpenSSL (owned by ssl_)
  BIO* wbio_ = nullptr;  // OpenSSL -> network (owned by ssl_)
  std::string error_;
};

}  // namespace closewise::test
