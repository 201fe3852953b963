#pragma once
// Loopback fixtures: a server-side closewise stream connected to a raw,
// blocking client socket that plays the (possibly misbehaving) peer.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "closewise/stream.hpp"

namespace closewise::test {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using tcp_stream = basic_stream<tcp::socket>;

/// True when the machine has a usable IPv6 loopback.
bool ipv6_available();

/// A raw blocking peer socket. Closed (plain close) on destruction.
class raw_peer {
 public:
  raw_peer() = default;
  explicit raw_peer(int fd) : fd_(fd) {}
  raw_peer(raw_peer&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  raw_peer& operator=(raw_peer&& o) noexcept {
    std::swap(fd_, o.fd_);
    return *this;
  }
  ~raw_peer() { close(); }

  int fd() const noexcept { return fd_; }
  /// Gives the descriptor up to the caller (who closes it); the peer is empty.
  int release() noexcept { return std::exchange(fd_, -1); }
  std::uint16_t local_port() const;
  void close() noexcept;
  /// SO_LINGER {1,0} + close: the other side gets RST.
  void reset() noexcept;
  void shutdown_write() noexcept { ::shutdown(fd_, SHUT_WR); }
  /// send() with MSG_NOSIGNAL; returns bytes sent or -errno.
  long send(const void* data, std::size_t n) noexcept;
  long send(const std::string& s) noexcept { return send(s.data(), s.size()); }
  /// Sends everything or returns -errno.
  long send_all(const void* data, std::size_t n) noexcept;
  /// One recv(); returns bytes, 0 on EOF, or -errno.
  long recv_some(void* data, std::size_t n) noexcept;
  struct drained {
    std::uint64_t bytes = 0;
    int error = 0;     ///< errno that ended it (0: EOF)
    bool eof = false;  ///< ended by EOF
  };
  /// Reads until EOF or error, appending to `sink` if given.
  drained drain(std::string* sink = nullptr, std::chrono::milliseconds recv_timeout = std::chrono::seconds(20));
  void set_rcvbuf(int bytes) noexcept;
  void set_sndbuf(int bytes) noexcept;

 private:
  int fd_ = -1;
};

/// Connects a raw peer to 127.0.0.1:`port` (optionally with a small receive
/// buffer, set before connecting); an empty peer (fd -1) if the connect fails.
raw_peer connect_to(std::uint16_t port, int rcvbuf = 0);

/// Connects an existing TCP socket (options already set, or created while
/// descriptors were still available) to 127.0.0.1:`port`; 0 or the errno.
int connect_loopback(int fd, std::uint16_t port) noexcept;

/// Connects a raw peer to the Unix stream socket at `path`; an empty peer
/// (fd -1) if the path does not fit or the connect fails.
raw_peer connect_unix(const std::string& path);

/// An acceptor on loopback port 0 and a helper that connects a raw peer and
/// accepts the matching server stream.
class loopback_pair_factory {
 public:
  explicit loopback_pair_factory(asio::io_context& ioc, bool ipv6 = false);
  std::uint16_t port() const { return port_; }
  /// Connects a raw peer (optionally with small buffers set before connect).
  raw_peer connect(int rcvbuf = 0, int sndbuf = 0);
  /// Accepts the next connection as a closewise stream (blocking accept).
  tcp_stream accept(stream_options opts = {}, read_ahead ahead = {});
  tcp::acceptor& acceptor() { return acceptor_; }

 private:
  asio::io_context& ioc_;
  tcp::acceptor acceptor_;
  std::uint16_t port_ = 0;
  bool ipv6_ = false;
};

/// Runs `ioc` until `done()` is true or `limit` passes; returns done().
template <class Pred>
bool run_until(asio::io_context& ioc, Pred done, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  ioc.restart();
  while (!done() && std::chrono::steady_clock::now() < end) {
    ioc.run_for(std::chrono::milliseconds(20));
    ioc.restart();
  }
  return done();
}

/// The deterministic pattern byte i of a test payload.
inline char pattern_byte(std::uint64_t i) noexcept { return static_cast<char>('a' + (i * 7 + i / 251) % 26); }
std::string pattern(std::size_t n);

/// Number of descriptors open in this process.
std::size_t open_fd_count();

/// A fresh directory of its own under $TMPDIR (or /tmp), removed with its
/// files on destruction. For Unix socket paths and files: a fixed or pid-based
/// name collides with another test or a stale run; mkdtemp's cannot.
class temp_dir {
 public:
  temp_dir();
  ~temp_dir();
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace closewise::test
