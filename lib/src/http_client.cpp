// closewise::http_client: one attempt per connection, a second one on a
// fresh connection only for what may be repeated.

#include "closewise/http_client.hpp"

#include <charconv>
#include <limits>
#include <memory>
#include <string_view>

#include <boost/asio/as_tuple.hpp>
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
struct deadline_state {
  stream* target = nullptr;
  bool fired = false;
};

struct attempt_outcome {
  error_code ec;
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
bool connection_gone(const error_code& ec) {
  return ec == http::error::end_of_stream || ec == asio::error::eof || ec == asio::error::connection_reset ||
         ec == asio::error::broken_pipe || ec == asio::error::connection_aborted;
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

// One request/response on `lease`'s connection. The deadline resets the
// connection (abortive close), which ends the write or read in progress.
// References: awaited at once by `request_on`, whose frame owns them.
asio::awaitable<attempt_outcome> exchange(pool_lease& lease, http_request& req, http_response& res,
                                          clock::time_point deadline, std::shared_ptr<deadline_state>& dl) {
  attempt_outcome out;
  stream& s = lease.io();
  dl = std::make_shared<deadline_state>();
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
      res = p.release();
      // Bytes after the response nobody asked for: the connection is not reusable.
      out.keep_alive = res.keep_alive() && buffer.size() == 0;
      out.hint = keep_alive_hint(res);
    }
  }
  timer.cancel();
  dl->target = nullptr;
  if (dl->fired) out.ec = asio::error::timed_out;
  co_return out;
}

asio::awaitable<http_result> request_on(client_pool* pool, std::string target, http_request req, request_timeouts t) {
  const auto deadline = clock::now() + t.whole;
  http_result result;
  // A Unix socket has no host name to give: "localhost", as curl sends.
  if (req.find(http::field::host) == req.end())
    req.set(http::field::host, target.starts_with("unix:") ? "localhost" : target);
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
    std::shared_ptr<deadline_state> dl;
    attempt_outcome a = co_await exchange(lease, req, result.response, deadline, dl);
    result.request_fully_written = a.fully_written;
    result.response_started = a.response_started;
    const bool timed_out = dl && dl->fired;
    if (!a.ec) {
      if (a.keep_alive) {
        pool->release(std::move(lease), a.hint);
      } else {
        result.report = co_await pool->close(std::move(lease), close_policy::graceful);
      }
      co_return result;
    }
    // The peer ended it (a FIN: finish it with ours) or the exchange broke (reset).
    const bool peer_fin = a.ec == http::error::end_of_stream || a.ec == asio::error::eof;
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
