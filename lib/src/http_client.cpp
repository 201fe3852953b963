// closewise::http_client: one attempt per connection, a second one on a
// fresh connection only for what may be repeated. The same exchange runs
// over a plain stream or, for a "tls:" target, the lease's TLS stream.

#include "closewise/http_client.hpp"

#include <charconv>
#include <limits>
#include <memory>
#include <string_view>
#include <type_traits>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/field.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/serializer.hpp>
#include <boost/beast/http/write.hpp>

namespace closewise {

namespace {

namespace beast = boost::beast;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
using clock = std::chrono::steady_clock;

// The whole-request deadline's state, shared with its timer's handler, which
// may run after the attempt ended (then `target` is null).
template <class Stream>
struct deadline_state {
  Stream* target = nullptr;
  bool fired = false;
};

struct attempt_outcome {
  error_code ec;
  bool timed_out = false;
  bool fully_written = false;
  bool response_started = false;
  bool keep_alive = false;
  std::optional<std::chrono::milliseconds> hint;
};

// The server's Keep-Alive: timeout=N, if it sent one.
std::optional<std::chrono::milliseconds> keep_alive_hint(const http_response& res) {
  const auto it = res.find("Keep-Alive");
  if (it == res.end()) return std::nullopt;
  const std::string_view v(it->value().data(), it->value().size());
  const auto at = v.find("timeout=");
  if (at == std::string_view::npos) return std::nullopt;
  const char* first = v.data() + at + 8;
  unsigned long seconds = 0;
  const auto [end, ec] = std::from_chars(first, v.data() + v.size(), seconds);
  if (ec != std::errc{} || end == first) return std::nullopt;
  return std::chrono::seconds(seconds);
}

// Errors that say the connection was gone: on a reused connection before
// any response byte, the signature of a request that crossed the server's FIN.
// Over TLS: the server's close_notify (end_of_stream, as Beast maps eof) or
// a FIN without it (stream_truncated).
bool connection_gone(const error_code& ec) {
  return ec == http::error::end_of_stream || ec == asio::error::eof || ec == asio::error::connection_reset ||
         ec == asio::error::broken_pipe || ec == asio::error::connection_aborted ||
         ec == asio::ssl::error::stream_truncated;
}

failure_class classify_failure(const error_code& ec, bool timed_out) {
  if (timed_out) return failure_class::timeout;
  if (ec == errc::stale_reuse_not_retried) return failure_class::stale_reuse_not_retried;
  if (ec.category() == error_category()) return failure_class::pool;
  if (ec.category() == make_error_code(http::error::end_of_stream).category()) {
    return connection_gone(ec) ? failure_class::connection : failure_class::protocol;
  }
  return failure_class::connection;
}

// One request/response on `s` (a lease's stream, plain or TLS). The
// deadline resets the connection (abortive close), which ends the write or
// read in progress. References: awaited at once by `request_on`, whose
// frame owns them.
template <class Stream>
asio::awaitable<attempt_outcome> exchange(Stream& s, http_request& req, http_response& res,
                                          clock::time_point deadline) {
  attempt_outcome out;
  auto dl = std::make_shared<deadline_state<Stream>>();
  dl->target = &s;
  asio::steady_timer timer(s.get_executor());
  timer.expires_at(deadline);
  timer.async_wait([dl](const error_code& ec) {
    if (ec || !dl->target) return;
    dl->fired = true;
    dl->target->async_close(close_policy::abortive, [](const close_report&) {});
  });

  http::request_serializer<http::string_body> sr(req);
  auto [wec, wn] = co_await http::async_write(s, sr, use_tuple);
  out.fully_written = !wec && sr.is_done();
  if (wec) {
    out.ec = wec;
  } else {
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> p;
    p.body_limit(std::numeric_limits<std::uint64_t>::max());
    if (req.method() == http::verb::head) p.skip(true);
    auto [rec, rn] = co_await http::async_read(s, buffer, p, use_tuple);
    out.response_started = p.got_some() || buffer.size() > 0;
    out.ec = rec;
    if (!rec) {
      // A FIN without close_notify now ends a complete message: not a truncation.
      if constexpr (std::is_same_v<Stream, tls_stream>) s.mark_message_complete();
      res = p.release();
      // Bytes after the response nobody asked for: the connection is not reusable.
      out.keep_alive = res.keep_alive() && buffer.size() == 0;
      out.hint = keep_alive_hint(res);
    }
  }
  timer.cancel();
  dl->target = nullptr;
  out.timed_out = dl->fired;
  if (dl->fired) out.ec = asio::error::timed_out;
  co_return out;
}

// The Host of a request to `target`: the target itself; "localhost" for a
// Unix socket (no host name to give, as curl sends); for a TLS target, its
// server name (pool_tls_options::server_names) with the port unless 443, or
// else its HOST:PORT.
std::string host_field(const pool_options& o, const std::string& target) {
  constexpr std::string_view tls_prefix = "tls:";
  std::string_view rest(target);
  if (rest.starts_with(tls_prefix)) rest.remove_prefix(tls_prefix.size());
  if (rest.starts_with("unix:")) {
    const auto it = o.tls.server_names.find(target);
    return it == o.tls.server_names.end() ? std::string("localhost") : it->second;
  }
  if (const auto it = o.tls.server_names.find(target); it != o.tls.server_names.end()) {
    const std::string_view port = rest.substr(rest.rfind(':') + 1);
    std::string host = it->second;
    if (port != "443") host.append(":").append(port);
    return host;
  }
  return std::string(rest);
}

asio::awaitable<http_result> request_on(client_pool* pool, std::string target, http_request req, request_timeouts t) {
  const auto deadline = clock::now() + t.whole;
  http_result result;
  if (req.find(http::field::host) == req.end()) req.set(http::field::host, host_field(pool->options(), target));
  req.keep_alive(true);
  req.prepare_payload();
  const bool repeatable = may_retry(req);
  bool fresh = false;
  for (;;) {
    auto [aec, lease] = co_await pool->acquire(target, deadline, fresh, t.connect);
    if (aec) {
      result.ec = aec;
      pool->record_failure(aec.category() == error_category() ? failure_class::pool : failure_class::connect);
      co_return result;
    }
    result.reused = lease.reused();
    tls_stream* tls = lease.tls();
    attempt_outcome a;
    if (tls) {
      a = co_await exchange(*tls, req, result.response, deadline);
    } else {
      a = co_await exchange(lease.io(), req, result.response, deadline);
    }
    result.request_fully_written = a.fully_written;
    result.response_started = a.response_started;
    const bool timed_out = a.timed_out;
    if (!a.ec) {
      if (a.keep_alive) {
        pool->release(std::move(lease), a.hint);
      } else {
        result.report = co_await pool->close(std::move(lease), close_policy::graceful);
      }
      co_return result;
    }
    // The peer ended it (a FIN: finish it with ours) or the exchange broke (reset).
    const bool peer_fin =
        a.ec == http::error::end_of_stream || a.ec == asio::error::eof || a.ec == asio::ssl::error::stream_truncated;
    close_report report =
        co_await pool->close(std::move(lease), peer_fin ? close_policy::graceful : close_policy::abortive);
    const bool stale = result.reused && !a.response_started && !timed_out && connection_gone(a.ec);
    if (stale && repeatable && !result.retried) {
      result.stale_report = std::move(report);
      result.retried = true;
      pool->record_retry();
      fresh = true;
      continue;
    }
    result.ec = a.ec;
    if (stale && !repeatable) {
      result.ec = errc::stale_reuse_not_retried;
      result.stale_report = report;
    }
    result.report = std::move(report);
    pool->record_failure(classify_failure(result.ec, timed_out));
    co_return result;
  }
}

}  // namespace

bool may_retry(const http_request& req) {
  switch (req.method()) {
    case http::verb::get:
    case http::verb::head:
    case http::verb::options:
    case http::verb::trace:
    case http::verb::put:
    case http::verb::delete_:
      return true;
    default:
      break;
  }
  return req.find("Idempotency-Key") != req.end() || req.find("X-Idempotency-Key") != req.end();
}

asio::awaitable<http_result> http_client::request(std::string target, http_request req, request_timeouts t) {
  return request_on(pool_, std::move(target), std::move(req), t);
}

}  // namespace closewise
