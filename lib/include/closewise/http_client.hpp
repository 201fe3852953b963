#pragma once
// closewise::http_client: HTTP/1.1 requests on Beast over a client_pool,
// which never fail a request they may retry and never send twice one they
// may not.
//
// A request sent on a reused keep-alive connection can cross the server's
// FIN on the wire: it then fails with end-of-file or ECONNRESET before any
// byte of a response arrived, and the server may or may not have seen it.
// Such a request is sent once more, on a fresh connection, if and only if
// it may be repeated: its method is idempotent (RFC 9110 section 9.2.2: GET,
// HEAD, OPTIONS, TRACE, PUT, DELETE) or it carries an `Idempotency-Key`
// (or `X-Idempotency-Key`) header, as Go's net/http decides. Any other
// request fails with `errc::stale_reuse_not_retried`, and the result says
// whether it was fully written. A failure on a fresh connection, or after
// a response byte arrived, is never retried.
//
// Over TLS ("tls:" targets) the rules are the same; the server's
// close_notify or a FIN without it (asio::ssl::error::stream_truncated)
// before any response byte is the stale-connection signature as a FIN is
// over TCP.
//
// Beast's HTTP types appear in this header, which is why closewise.hpp does
// not include it: Beast is part of the Boost the library already requires,
// but its HTTP headers are heavy for users of the stream and server alone.
//
// Thread-safety: as the pool's (one executor). Each response carries its
// teardown facts: reused or fresh, retried, and the close report of a
// connection that ended with it.

#include <chrono>
#include <optional>
#include <string>

#include <boost/asio/awaitable.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>

#include "closewise/client_pool.hpp"
#include "closewise/error.hpp"
#include "closewise/export.hpp"
#include "closewise/report.hpp"

namespace closewise {

namespace http = boost::beast::http;

/// The request and response types of http_client.
using http_request = http::request<http::string_body>;
using http_response = http::response<http::string_body>;

/// A request's time limits. The idle limit of the connections it uses is the
/// pool's (pool_options::idle_timeout and the server's Keep-Alive hint).
struct request_timeouts {
  /// Each connect (also bounded by `whole`).
  std::chrono::milliseconds connect{5000};
  /// From the call to the response's last byte, waiting for a connection and
  /// a retry included. On expiry the connection in use is reset and the
  /// result is asio::error::timed_out.
  std::chrono::milliseconds whole{30000};
};

/// The outcome of one request and its teardown facts.
struct http_result {
  /// No error, or: the connect's, closewise::errc's (stale_reuse_not_retried,
  /// pool_wait_timeout, pool_overloaded, pool_closed), asio::error::timed_out
  /// (the whole-request deadline), a connection error (end-of-stream,
  /// connection_reset, broken_pipe), or Beast's parse error for a malformed
  /// response.
  error_code ec;
  http_response response;  ///< meaningful without `ec`
  bool reused = false;     ///< the last attempt ran on a connection taken idle
  bool retried = false;    ///< the request was sent again, on a fresh connection
  /// The last attempt's request reached the kernel whole (for
  /// stale_reuse_not_retried: whether the server may have executed it).
  bool request_fully_written = false;
  bool response_started = false;  ///< some byte of a response arrived on the last attempt
  /// The close report of the connection of the last attempt, if it ended
  /// (Connection: close, an error, a timeout); none if it went back to the pool.
  std::optional<close_report> report;
  /// The close report of the reused connection whose failure was retried or
  /// reported as stale_reuse_not_retried.
  std::optional<close_report> stale_report;
};

/// RFC 9110 section 9.2.2, or an Idempotency-Key / X-Idempotency-Key header.
CLOSEWISE_API bool may_retry(const http_request& req);

/// HTTP/1.1 requests over a client_pool (which must outlive it).
class CLOSEWISE_API http_client {
 public:
  explicit http_client(client_pool& pool) noexcept : pool_(&pool) {}

  /// Sends `req` to `target` ("HOST:PORT", "unix:PATH", or either behind
  /// "tls:" for HTTPS, client_pool.hpp) and reads the response. Sets Host
  /// (to `target`) if missing, the body's length, and keep-alive; errors are
  /// values (see http_result). For "unix:PATH" the Host is "localhost"; for
  /// a TLS target, the server name of pool_tls_options::server_names (with
  /// the port unless 443) or else HOST:PORT.
  asio::awaitable<http_result> request(std::string target, http_request req, request_timeouts t = {});

  client_pool& pool() noexcept { return *pool_; }

 private:
  client_pool* pool_;
};

}  // namespace closewise
