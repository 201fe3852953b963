#pragma once
// closewise::server: listeners, I/O threads, per-connection sessions,
// limits, graceful drain and teardown statistics.
//
// The application supplies a session: a coroutine that receives one
// `connection` and returns when it is done with it. The server then ends the
// connection through the connection's close policy (graceful by default) and
// counts the close report. A connection lives on one I/O thread from accept
// to close, so a session never needs a lock for its own connection.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "closewise/export.hpp"
#include "closewise/stats.hpp"
#include "closewise/stream.hpp"
#include "closewise/tls.hpp"

namespace closewise {

/// The socket type of server and client connections: one type for TCP and
/// Unix stream sockets.
using socket = asio::generic::stream_protocol::socket;
/// The closewise stream over it.
using stream = basic_stream<socket>;
/// TLS over it.
using tls_stream = basic_tls_stream<socket>;

/// What the server does with a connection that arrives at the connection limit.
enum class overflow_action : std::uint8_t {
  /// Stop accepting until a connection closes: newcomers wait in the kernel's
  /// listen backlog (bounded by `backlog`) and are served in turn. Counted
  /// once per pause. The default: nothing is refused that could be served.
  pause_accept,
  /// Accept and reset at once (RST, no TIME_WAIT): the client learns
  /// immediately. Counted per connection.
  reject,
};

/// The stream options a server starts from: every wait bounded.
///
/// The idle timeout is 75 s, deliberately longer than the 60 s that proxies
/// keep idle upstream connections by default (nginx's upstream
/// keepalive_timeout, most load balancers): the side that closes an idle
/// kept-alive connection must be the one that would send the next request on
/// it, or a request and our FIN cross on the wire and the proxy answers 502.
inline stream_options server_stream_defaults() noexcept {
  stream_options o;
  o.idle_timeout = std::chrono::seconds(75);
  o.read_timeout = std::chrono::seconds(30);
  o.write_timeout = std::chrono::seconds(30);
  return o;
}

/// Server configuration.
struct server_options {
  std::vector<std::string> listen;      ///< "HOST:PORT" (port 0: any free port), e.g. "127.0.0.1:0", "[::1]:8080"
  std::vector<std::string> unix_paths;  ///< Unix stream socket paths (an existing socket file is replaced)
  /// Listening sockets opened by someone else (systemd socket activation,
  /// a parent process): TCP (IPv4, IPv6) or Unix stream descriptors that are
  /// bound and listening already. Each behaves as a listener the server
  /// opened itself (non-blocking, close-on-exec, closed by a drain) and
  /// appears in `local_endpoints` ("unix:PATH" for a Unix socket, whose file
  /// the server leaves in place). `start` takes them in order and throws
  /// std::system_error for one that is not a listening stream socket of
  /// those families; the server owns those it took, the rest stay the caller's.
  std::vector<int> inherited_listeners;
  unsigned threads = 0;  ///< I/O threads; 0: hardware concurrency
  /// Per-connection timeouts and teardown limits. Unlike a bare stream, a
  /// server bounds every wait by default: idle 75 s, read 30 s, write 30 s.
  stream_options stream = server_stream_defaults();
  close_policy policy = close_policy::graceful;  ///< how the server ends connections by default
  std::size_t max_connections = 10000;           ///< open connections at most; see `overflow`
  overflow_action overflow = overflow_action::pause_accept;
  std::size_t write_high_watermark = 1 << 20;      ///< above this many queued bytes, reading pauses
  std::size_t write_low_watermark = 256 << 10;     ///< reading resumes below this
  std::chrono::milliseconds drain_timeout{10000};  ///< drain: force (RST) what is still open after this
  /// Drain: an idle keep-alive connection is closed only once it has waited
  /// this long for a request. A proxy reuses the connection it used last
  /// first, so closing one that just finished an exchange races the proxy's
  /// next request on it: our FIN and the request cross, and the proxy answers
  /// 502 for a request it may not retry (POST). Until then a request that
  /// arrives is answered with Connection: close, and the proxy closes the
  /// connection itself after reading the answer. 0: close idle connections at once.
  std::chrono::milliseconds drain_idle_grace{0};
  std::chrono::milliseconds accept_backoff{100};  ///< pause after EMFILE/ENFILE/ENOBUFS
  int backlog = 1024;           ///< listen(2) backlog: where paused newcomers wait (capped by net.core.somaxconn)
  bool handle_signals = false;  ///< SIGTERM/SIGINT start a drain (after `drain_delay`)
  /// With handle_signals: how long after SIGTERM/SIGINT the server keeps
  /// serving everything normally (keep-alive included) while saying it is
  /// not ready (`server::ready`, `connection::ready`), so that a load
  /// balancer's readiness probe takes it out of rotation before the drain
  /// closes anything. A second signal during the delay drains at once.
  /// 0: the drain starts with the first signal.
  std::chrono::milliseconds drain_delay{0};
  /// SO_REUSEPORT on TCP listeners: several processes share one port, so a
  /// restarted instance can listen before the old one stops. Connections
  /// still queued on a listener that closes are reset by Linux unless
  /// net.ipv4.tcp_migrate_req=1 moves them to a sibling listener.
  bool reuse_port = false;
  /// Starts a connection's session only once input arrives (its first byte,
  /// or the peer's FIN or RST). Until then an accepted connection costs a
  /// socket and one wait: no session frame, no stream state, no buffer, so
  /// thousands of connections that opened and sent nothing cost kilobytes,
  /// not megabytes. The idle timeout bounds the wait; a connection that
  /// reaches it is closed with `policy` and reported like a session whose
  /// first read timed out (`timeout = idle`); a drain closes it gracefully
  /// as `server_drain`. For protocols where the client speaks first (HTTP);
  /// a server that greets its clients must leave it off.
  bool start_on_input = false;
  /// With start_on_input: whether the input read so far is enough for the
  /// session to start (for HTTP: a whole request header). A waiting
  /// connection's bytes are read as they come (at most `input_limit` in
  /// all) into a string as long as they are, and handed to the session's
  /// stream (`read_ahead`): a connection whose input is
  /// incomplete costs those bytes and no session, stream or buffer, and a
  /// complete one's session starts without a read. A FIN, a RST, an error
  /// or `input_limit` bytes start the session whatever this says. Empty:
  /// the first bytes start it. Called on the connection's I/O thread.
  std::function<bool(std::string_view input)> input_ready;
  /// The most bytes a connection waiting for its input reads before its
  /// session starts. 0: none (the session's own first read takes them).
  std::size_t input_limit = 16 * 1024;
  /// How long input may wait without `input_ready` saying yes, from its first
  /// byte; then the session starts anyway and applies its own limits
  /// (`connection::input_since` tells it when the input began). 0: the idle
  /// timeout, counted from the first byte.
  std::chrono::milliseconds ready_timeout{10000};
  /// With start_on_input: how long a new connection may stay silent before
  /// the server closes it, when that should differ from the idle timeout
  /// between exchanges (`stream.idle_timeout`): nginx's
  /// client_header_timeout beside its keepalive_timeout. A short keep-alive
  /// idle timeout then does not also close a new connection whose client is
  /// slow to send its first request (a busy client, a handshake in the
  /// queue). 0: the idle timeout.
  std::chrono::milliseconds first_input_timeout{0};

  /// TLS on every listener: a server context (make_server_context). Each
  /// connection's session starts after its handshake, bounded by
  /// `tls_limits.handshake_timeout`; a failed handshake is counted by class
  /// and closed gracefully without a session. With TLS, `input_ready` is not
  /// consulted (the first bytes are a ClientHello): the first bytes start it.
  /// Null: plain TCP.
  std::shared_ptr<asio::ssl::context> tls;
  tls_options tls_limits;
  /// Written in the clear to a client that spoke plain HTTP to the TLS port
  /// (an HTTP server answers 400, as nginx does), before the graceful close.
  /// Empty: just the close.
  std::string plaintext_reply;
};

class server;
namespace internal {
struct connection_impl;
struct server_state;
}  // namespace internal

/// One accepted connection, as its session sees it. Lives on one I/O thread;
/// every member must be called from the session (or its thread).
class CLOSEWISE_API connection {
 public:
  /// The AsyncStream of a plain connection: use it directly, e.g. under
  /// beast::http::async_read. Over TLS, the TCP stream under TLS (its state
  /// and options; reading or writing it bypasses TLS): use `tls()`.
  stream& io() noexcept;
  /// The TLS stream of a TLS connection (its handshake done), else null.
  tls_stream* tls() noexcept;
  /// The connection's half-close state machine (read side, write side, phase).
  const connection_state& state() const noexcept;
  /// "HOST:PORT" of the peer, or "unix" for a Unix socket.
  const std::string& peer() const noexcept;
  /// The number in this connection's log lines ("[conn N]").
  std::uint64_t id() const noexcept;
  /// When this connection's input began: its first byte as the server saw it
  /// while waiting for input to be ready (server_options::input_ready), or
  /// else when the session started. A per-request deadline that must count
  /// from the first byte starts here for the first request.
  std::chrono::steady_clock::time_point input_since() const noexcept;

  /// True once the server drains: finish the exchange in progress (HTTP:
  /// answer with Connection: close) and return.
  bool draining() const noexcept;
  /// False once the server is shutting down: from the signal that starts
  /// `drain_delay` (requests are still served normally then) and during a
  /// drain. A readiness endpoint answers "not ready" from then on.
  bool ready() const noexcept;

  /// How the server closes this connection when the session returns.
  void set_close_policy(close_policy p) noexcept;
  /// The policy the server will close with (the server's default until set).
  close_policy policy() const noexcept;

  /// Reads some bytes; completes with asio::error::eof for the peer's FIN
  /// (the write side stays open), timed_out for the idle/read timeout. While
  /// more than the high watermark is queued for writing it first waits until
  /// the queue drains below the low watermark (backpressure).
  asio::awaitable<std::pair<error_code, std::size_t>> read_some(asio::mutable_buffer b);
  /// Writes the whole buffer (after anything queued by `send`).
  asio::awaitable<error_code> write(asio::const_buffer b);
  /// Queues bytes; a writer sends them in order. Check `queued()` or await
  /// `flush()`; `read_some` applies the watermarks: it waits while more than
  /// the high watermark is queued, so the queue stays below the high
  /// watermark plus what the session sends per read. Returns the write error
  /// that broke the queue (the bytes are then dropped), or no error.
  error_code send(std::string bytes);
  /// Bytes queued by `send` and not yet written.
  std::size_t queued() const noexcept;
  /// Waits until everything queued was written; the first write error.
  asio::awaitable<error_code> flush();
  /// Flushes, then sends our FIN. The read side stays open.
  asio::awaitable<error_code> shutdown_write();
  /// Marks the exchange complete (see basic_stream::mark_exchange_complete).
  void mark_exchange_complete();
  /// Says an exchange is in progress although no input is unanswered, e.g.
  /// after an interim response (HTTP 100 Continue): a drain then waits for it
  /// instead of closing the connection as idle. Cleared by mark_exchange_complete.
  void mark_exchange_open() noexcept;
  /// Ends the connection now with `p` and returns the report (the server
  /// does not close it again).
  asio::awaitable<close_report> close(close_policy p);

  /// Copies share the connection (an observer may keep one; a session gets
  /// its own by reference).
  connection(const connection&) = default;
  connection& operator=(const connection&) = default;

 private:
  friend struct internal::connection_impl;  // the server makes connections
  explicit connection(std::shared_ptr<internal::connection_impl> impl) noexcept : impl_(std::move(impl)) {}
  std::shared_ptr<internal::connection_impl> impl_;
};

/// The application's session: runs once per connection.
using session_handler = std::function<asio::awaitable<void>(connection&)>;
/// Called on the connection's thread with every close report.
using close_observer = std::function<void(const connection&, const close_report&)>;

/// A multi-threaded server.
///
/// Thread-safety: `start`, `run` and the destructor from one thread;
/// `drain`, `stop`, `stats`, `local_endpoints`, `ready` and `draining` from
/// any thread.
class CLOSEWISE_API server {
 public:
  /// Prepares the I/O threads' contexts; nothing listens until `start`.
  server(server_options opts, session_handler session);
  /// Stops the I/O threads (if `run` is still going, call `stop` and join it
  /// first). Sessions still suspended are destroyed: their sockets close
  /// without a policy (a plain close), and no report is counted for them.
  ~server();
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  /// Opens the listeners. Throws std::system_error on setup errors (bad
  /// address, port in use).
  void start();
  /// The bound endpoints, "HOST:PORT" with the real port (and "unix:PATH").
  std::vector<std::string> local_endpoints() const;
  /// Runs the I/O threads (the calling thread is one of them) until a drain
  /// finished or `stop` was called.
  void run();
  /// Stops accepting, lets sessions finish their exchange, closes idle
  /// connections gracefully and resets what is left at the drain deadline.
  /// `run` returns when every connection is gone.
  void drain();
  /// Stops everything now (connections are closed by their destructors).
  void stop();
  /// True once a drain started (`drain`, or a signal after `drain_delay`).
  bool draining() const noexcept;
  /// False from the first SIGTERM/SIGINT (the start of `drain_delay`) or the
  /// start of a drain on: the state a readiness probe reports.
  bool ready() const noexcept;

  /// Sets an observer of every close report (before `start`).
  void on_close(close_observer f);

  /// The teardown counters (see stats.hpp); read them from any thread.
  const server_stats& stats() const noexcept;
  /// Connections forced at the drain deadline in the last drain.
  std::uint64_t forced_in_drain() const noexcept;

 private:
  std::shared_ptr<internal::server_state> impl_;
};

/// Parses "HOST:PORT" / "[V6]:PORT" into a TCP endpoint; throws std::invalid_argument.
CLOSEWISE_API asio::ip::tcp::endpoint parse_endpoint(const std::string& text);
/// "HOST:PORT" of a TCP endpoint ("[::1]:80" for IPv6).
CLOSEWISE_API std::string to_string(const asio::ip::tcp::endpoint& e);

/// Connects to "HOST:PORT" (numeric host) or "unix:PATH" within `timeout`; the result is a
/// closewise stream with `opts`. Errors are values (timed_out on timeout).
CLOSEWISE_API asio::awaitable<std::pair<error_code, std::optional<stream>>> connect(asio::any_io_executor ex,
                                                                                    std::string target,
                                                                                    std::chrono::milliseconds timeout,
                                                                                    stream_options opts = {});

}  // namespace closewise
