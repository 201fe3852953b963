#pragma once
// closewise::client_pool: kept-alive client connections per target, which
// notice the server's FIN while they wait idle.
//
// The usual way a request is lost: a client sends it on a kept-alive
// connection that the server has just closed, and it fails with ECONNRESET or
// with end-of-file before a response. The pool narrows that window three
// ways. Every idle connection keeps a wait for input outstanding, so the
// server's FIN or RST removes it the moment it arrives (counted as
// `fins_seen_idle` / `resets_seen_idle`), and so do bytes nobody asked for
// (`bytes_seen_idle`). A connection is checked once more as it is taken
// (`dropped_at_reuse`). And a connection idle for longer than its idle limit
// (the smaller of `pool_options::idle_timeout` and the server's
// `Keep-Alive: timeout=` hint less a margin) is closed by the pool, before
// the server would. The rest of the window, a FIN crossing a request on the
// wire, is the protocol layer's to handle (http_client.hpp: retry only what
// may be retried).
//
// TLS: a target spelled "tls:HOST:PORT" (or "tls:unix:PATH") is reached
// over TLS, with `pool_options::tls` (the client context, the name for SNI
// and certificate checks); its handshake counts within the connect timeout,
// and a failed handshake is a failed connect. The lease gives the TLS stream
// (`pool_lease::tls()`), and http_client speaks through it, so callers use
// either kind of target the same way. What differs while idle: the wait is a
// one-byte read through TLS, not a readiness wait on the socket, so that
// records that carry no application data (TLS 1.3 NewSessionTicket, sent by
// a server after its handshake, possibly while the connection idles) are
// consumed by OpenSSL and leave the connection in the pool. The server's
// close_notify, with or without its FIN after it, and a bare FIN count as
// `fins_seen_idle`; application data counts as `bytes_seen_idle`. The check
// at reuse also asks OpenSSL for held input (SSL_has_pending) and polls the
// socket: any record or FIN waiting then drops the connection
// (`dropped_at_reuse`), a ticket included (rare: tickets come right after the
// handshake). The pool ends an idle TLS connection with its close policy:
// graceful sends close_notify, then our FIN (closewise/tls.hpp).
//
// Thread-safety: a pool and its leases are used from one executor (a
// single-threaded io_context, or a strand): the one given to the
// constructor, on which every connection runs. `stats()` may be read from
// any thread.
//
// Teardown: every connection ends with a close report, passed to the
// `on_close` callback. Destroying the pool closes its idle connections
// (with `pool_options::policy`) and fails its waiters with
// `errc::pool_closed`; leases still out keep their connection until they
// are released or destroyed.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include "closewise/error.hpp"
#include "closewise/export.hpp"
#include "closewise/report.hpp"
#include "closewise/server.hpp"

namespace closewise {

/// TLS for the pool's "tls:" targets.
struct pool_tls_options {
  /// The client context of every TLS connection (make_client_context),
  /// shared: connections still closing after the pool is gone keep it. Null:
  /// the pool makes one on first use, which verifies the server's
  /// certificate against the system's default trust store
  /// (SSL_CTX_set_default_verify_paths) and offers ALPN http/1.1.
  std::shared_ptr<asio::ssl::context> context;
  /// Per target ("tls:HOST:PORT", as given to acquire): the server's name,
  /// sent as SNI and matched against its certificate when the context
  /// verifies peers (SSL_set1_host), and the Host http_client sends. A
  /// target not here uses its HOST: an IP address is matched against the
  /// certificate's IP entries and sends no SNI (RFC 6066 allows only host
  /// names there); "tls:unix:PATH" uses "localhost".
  std::map<std::string, std::string, std::less<>> server_names;
  /// The TLS layer's limits; its handshake_timeout is replaced by what is
  /// left of the connect timeout once TCP connected.
  tls_options stream;
  /// Session resumption: a connection given back with `release`, or closed
  /// with `close`, leaves its session (a TLS 1.3 ticket, or a TLS 1.2
  /// session) with its target, and the target's next new connection offers
  /// it, once: a resumed handshake skips the certificate and its
  /// verification. Once, because RFC 8446 (appendix C.4) asks clients not to
  /// reuse a ticket: several connections opened at once resume at most one
  /// of them. Off: every handshake is full.
  bool resume_sessions = true;
};

/// Limits and timeouts of a client_pool.
struct pool_options {
  /// Connections open or opening per target, idle ones included.
  std::size_t max_connections_per_target = 32;
  /// Requests waiting for a connection per target; beyond it `acquire` fails
  /// at once with errc::pool_overloaded (backpressure).
  std::size_t max_waiters = 4096;
  /// Longest wait in the FIFO of waiters (a request's own deadline may be shorter).
  std::chrono::milliseconds wait_timeout{10000};
  /// Longest TCP (or Unix) connect, the TLS handshake included for a TLS
  /// target (a request's own deadline may be shorter).
  std::chrono::milliseconds connect_timeout{5000};
  /// An idle connection is closed by the pool after this long. Keep it below
  /// the server's idle timeout: the side that sends the next request should
  /// be the one that closes.
  std::chrono::milliseconds idle_timeout{30000};
  /// Subtracted from the server's `Keep-Alive: timeout=N` hint; when that
  /// leaves nothing, half the hint is used.
  std::chrono::milliseconds hint_margin{1000};
  /// How the pool ends the connections it closes (idle limit, FIN seen, shutdown).
  close_policy policy = close_policy::graceful;
  /// Teardown limits of each connection. Its idle and read timeouts are the
  /// pool's to set: the idle limit while idle, none while leased (the
  /// protocol layer bounds its exchange).
  stream_options stream;
  /// For "tls:" targets.
  pool_tls_options tls;
};

/// What one pool counted, since it was made. Failures are those that reached
/// a caller, by class (a retried request that then succeeded is no failure).
struct CLOSEWISE_API pool_stats {
  std::uint64_t connects = 0;                        ///< connections opened
  std::uint64_t connect_failures = 0;                ///< connects that failed or timed out
  std::uint64_t reuses = 0;                          ///< leases of an idle connection
  std::uint64_t fins_seen_idle = 0;                  ///< idle connections the peer's FIN removed
  std::uint64_t resets_seen_idle = 0;                ///< idle connections the peer's RST removed
  std::uint64_t bytes_seen_idle = 0;                 ///< idle connections discarded because bytes arrived
  std::uint64_t idle_expired = 0;                    ///< idle connections the pool closed at their idle limit
  std::uint64_t dropped_at_reuse = 0;                ///< connections found ended or readable as they were taken
  std::uint64_t retries = 0;                         ///< requests sent again on a fresh connection
  std::uint64_t wait_timeouts = 0;                   ///< acquires that waited out their deadline
  std::uint64_t overloaded = 0;                      ///< acquires refused because too many waited
  std::uint64_t closed = 0;                          ///< connections ended (each with a close report)
  std::uint64_t failed_connect = 0;                  ///< failures: the connect failed
  std::uint64_t failed_pool = 0;                     ///< failures: no connection in time, or overloaded, or shut down
  std::uint64_t failed_timeout = 0;                  ///< failures: the request's deadline passed
  std::uint64_t failed_stale_reuse_not_retried = 0;  ///< failures: errc::stale_reuse_not_retried
  std::uint64_t failed_connection = 0;               ///< failures: the connection broke (other than the stale case)
  std::uint64_t failed_protocol = 0;                 ///< failures: the peer's answer was malformed
  std::uint64_t tls_resumed = 0;                     ///< TLS handshakes that resumed a session
  /// Adds every counter of `other` (the figures of several pools together).
  pool_stats& operator+=(const pool_stats& other) noexcept;
  /// One line: "connects=.. connect_failures=.. reuses=.. ...", every counter.
  std::string describe() const;
};

/// The classes of failure a protocol layer reports (`client_pool::record_failure`).
enum class failure_class : std::uint8_t { connect, pool, timeout, stale_reuse_not_retried, connection, protocol };

/// Called with every connection's close report and its target, on the pool's executor.
using pool_close_observer = std::function<void(const std::string& target, const close_report&)>;

namespace internal {
struct pool_state;
struct pooled;
}  // namespace internal

/// One connection taken from the pool. Give it back with
/// `client_pool::release` (reusable) or `client_pool::close`; a lease
/// destroyed otherwise resets its connection (its exchange is in an unknown
/// state). Move-only; used on the pool's executor.
class CLOSEWISE_API pool_lease {
 public:
  pool_lease() noexcept = default;
  pool_lease(pool_lease&&) noexcept = default;
  pool_lease& operator=(pool_lease&& other) noexcept;
  pool_lease(const pool_lease&) = delete;
  pool_lease& operator=(const pool_lease&) = delete;
  ~pool_lease();

  explicit operator bool() const noexcept { return conn_ != nullptr; }
  /// The connection's stream. For a TLS target, the TCP stream under TLS
  /// (its state, options and probes; reading or writing it bypasses TLS):
  /// use `tls()`.
  stream& io() noexcept;
  /// The TLS stream of a TLS target (its handshake done), else null.
  tls_stream* tls() noexcept;
  /// True when the connection had served an exchange before (taken idle).
  bool reused() const noexcept;
  /// Exchanges this connection finished before this lease.
  std::uint64_t uses() const noexcept;
  /// "HOST:PORT", "unix:PATH" or "tls:HOST:PORT", as given to acquire.
  const std::string& target() const noexcept;
  /// The connection's close report, once it ended.
  const std::optional<close_report>& report() const noexcept;

 private:
  friend struct internal::pool_state;
  friend class client_pool;
  pool_lease(std::shared_ptr<internal::pool_state> pool, std::shared_ptr<internal::pooled> conn) noexcept
      : pool_(std::move(pool)), conn_(std::move(conn)) {}
  std::shared_ptr<internal::pool_state> pool_;
  std::shared_ptr<internal::pooled> conn_;
};

/// Kept-alive connections per target ("HOST:PORT" with a numeric host,
/// "unix:PATH", or either behind "tls:"), limited per target, with a FIFO
/// of waiters.
class CLOSEWISE_API client_pool {
 public:
  /// A pool whose connections run on `ex` (see the thread-safety note above).
  client_pool(asio::any_io_executor ex, pool_options opts = {});
  ~client_pool();
  client_pool(const client_pool&) = delete;
  client_pool& operator=(const client_pool&) = delete;

  /// A connection to `target`: the most recently used idle one (checked as it
  /// is taken), else a new one if the target is under its limit, else the
  /// first one freed, in FIFO order, before `deadline` (and within
  /// `wait_timeout`). `fresh`: never an idle one (for a retry); at the limit
  /// an idle connection is closed to make room. Errors: the connect's
  /// (timed_out on its timeout), errc::pool_wait_timeout,
  /// errc::pool_overloaded, errc::pool_closed; for a TLS target, the
  /// handshake's (closewise/tls.hpp: tls().handshake classes it in the close
  /// report). `connect_timeout`: this acquire's (0: the pool's).
  asio::awaitable<std::pair<error_code, pool_lease>> acquire(
      std::string target, std::chrono::steady_clock::time_point deadline, bool fresh = false,
      std::chrono::milliseconds connect_timeout = std::chrono::milliseconds(0));
  /// Gives a connection whose exchange ended cleanly back to the pool (or to
  /// the first waiter). `keep_alive_hint`: the server's Keep-Alive timeout,
  /// if it sent one. A connection that is closing or has unread input is
  /// closed instead.
  void release(pool_lease lease, std::optional<std::chrono::milliseconds> keep_alive_hint = std::nullopt);
  /// Ends a leased connection with `policy` and returns its report.
  asio::awaitable<close_report> close(pool_lease lease, close_policy policy);

  /// Sets the observer of every close report (before the first acquire).
  void on_close(pool_close_observer f);
  /// A snapshot of the counters; from any thread.
  pool_stats stats() const;
  /// Idle connections to `target` now.
  std::size_t idle(const std::string& target) const;
  /// Connections open or opening to `target` now (idle and leased).
  std::size_t open(const std::string& target) const;
  const pool_options& options() const noexcept;
  asio::any_io_executor get_executor() const noexcept;

  /// For a protocol layer: a request was sent again on a fresh connection.
  void record_retry() noexcept;
  /// For a protocol layer: a failure reached its caller.
  void record_failure(failure_class c) noexcept;

 private:
  std::shared_ptr<internal::pool_state> st_;
};

}  // namespace closewise
