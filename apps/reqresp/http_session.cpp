#include "reqresp/http_session.hpp"

#include <algorithm>
#include <charconv>
#include <system_error>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/optional/optional.hpp>

#include "closewise/log.hpp"
#include "closewise/version.hpp"
#include "reqresp/http_rules.hpp"

namespace closewise::reqresp {

namespace {

namespace beast = boost::beast;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
// What one read asks for while waiting for a new request.
constexpr std::size_t idle_read_bytes = 16 * 1024;
// Room in the connection's buffer beyond the header limit: Beast reads up to
// 64 KiB at a time, and a chunk-size line longer than this is refused (400)
// instead of growing the buffer without bound.
constexpr std::size_t buffer_slack = 64 * 1024;

using request_parser = http::request_parser<http::string_body>;
using request = http::request<http::string_body>;

const std::string& server_header() {
  static const std::string name = std::string("closewise-reqresp/") + closewise::version_string;
  return name;
}

// GET /bytes/N's body: N bytes of the pattern, served straight from an
// immutable table (no allocation per response, any N up to --max-bytes).
struct pattern_body {
  struct value_type {
    std::uint64_t size = 0;
  };
  static std::uint64_t size(const value_type& v) noexcept { return v.size; }

  class writer {
   public:
    using const_buffers_type = asio::const_buffer;
    template <bool is_request, class Fields>
    writer(const http::header<is_request, Fields>&, const value_type& v) : size_(v.size) {}
    void init(error_code& ec) { ec = {}; }
    boost::optional<std::pair<const_buffers_type, bool>> get(error_code& ec) {
      ec = {};
      if (offset_ >= size_) return boost::none;
      const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(pattern_span, size_ - offset_));
      const asio::const_buffer b(pattern_at(offset_), n);
      offset_ += n;
      return std::make_pair(b, offset_ < size_);
    }

   private:
    std::uint64_t size_ = 0;
    std::uint64_t offset_ = 0;
  };
};

// The whole-request deadline. One per request, started at its first byte and
// never re-armed: the stream's read timeout re-arms on every read, so a
// client sending a byte every few seconds would keep a request open forever.
// On expiry it cancels the read in progress through `signal` (bound to every
// read of the request). Shared with the timer's handler, which may run after
// the request ended; `active` makes such a late expiry a no-op.
struct request_deadline {
  explicit request_deadline(const asio::any_io_executor& ex) : timer(ex) {}
  asio::steady_timer timer;
  asio::cancellation_signal signal;
  bool active = true;
  bool expired = false;
};

class deadline_guard {
 public:
  deadline_guard(const asio::any_io_executor& ex, std::chrono::milliseconds limit)
      : d_(std::make_shared<request_deadline>(ex)) {
    if (limit.count() <= 0) return;
    d_->timer.expires_after(limit);
    d_->timer.async_wait([d = d_](const error_code& ec) {
      if (ec || !d->active) return;
      d->expired = true;
      d->signal.emit(asio::cancellation_type::terminal);
    });
  }
  ~deadline_guard() { stop(); }
  deadline_guard(const deadline_guard&) = delete;
  deadline_guard& operator=(const deadline_guard&) = delete;

  void stop() noexcept {
    d_->active = false;
    d_->timer.cancel();
  }
  bool expired() const noexcept { return d_->expired; }
  auto token() { return asio::bind_cancellation_slot(d_->signal.slot(), use_tuple); }

 private:
  std::shared_ptr<request_deadline> d_;
};

// Writes one response. Coroutine helpers below take references: each is
// awaited at once by the session, whose frame owns the referenced objects.
template <class Body>
asio::awaitable<error_code> write_response(stream& io, http::response<Body>& res, bool head) {
  if (head) {
    // The header of the GET response, Content-Length included, and no body.
    http::response<http::empty_body> header_only{std::move(res.base())};
    auto [ec, n] = co_await http::async_write(io, header_only, use_tuple);
    co_return ec;
  }
  auto [ec, n] = co_await http::async_write(io, res, use_tuple);
  co_return ec;
}

http::response<http::string_body> text_response(http::status status, unsigned version, std::string body,
                                                const char* type = "text/plain; charset=utf-8") {
  http::response<http::string_body> res{status, version};
  res.set(http::field::server, server_header());
  res.set(http::field::content_type, type);
  res.body() = std::move(body);
  res.prepare_payload();
  return res;
}

// Answers a refused request and ends the session with a graceful close. A
// refused HEAD gets the header alone: a body there would be read by the
// client as the start of the next response (RFC 9110 section 9.3.2).
asio::awaitable<void> refuse(connection& c, http_service& svc, const rejection& r, bool head) {
  svc.counters().refused.fetch_add(1, std::memory_order_relaxed);
  if (r.status == http::status::request_timeout) svc.counters().timeouts.fetch_add(1, std::memory_order_relaxed);
  closewise::logger()->info("[conn {}] refused: {} {}", c.id(), static_cast<unsigned>(r.status), r.reason);
  auto res = text_response(r.status, 11, r.reason + "\n");
  res.keep_alive(false);
  // Whatever --teardown says: a fin_close or abortive close here would let the
  // unread rest of the request turn into a RST that destroys this answer.
  c.set_close_policy(close_policy::graceful);
  if (!co_await write_response(c.io(), res, head)) svc.counters().responses.fetch_add(1, std::memory_order_relaxed);
}

std::string stats_text(const http_service& svc, route which) {
  const stats_snapshot snap = svc.stats() ? svc.stats()->snapshot() : stats_snapshot{};
  return which == route::stats ? to_json(snap) + "\n" : to_prometheus(snap);
}

// Runs the route for an accepted request and writes the response. Returns the
// write's error.
asio::awaitable<error_code> serve(connection& c, http_service& svc, request& req, bool keep_alive) {
  const bool head = req.method() == http::verb::head;
  const route_match m = match_route(req.method(), std::string_view(req.target().data(), req.target().size()),
                                    svc.options().max_response_bytes);
  if (!m.which) {
    // 404 / 405 / a bad N: the request was well formed, the connection may live on.
    auto res = text_response(m.refusal->status, req.version(), m.refusal->reason + "\n");
    if (!m.allow.empty()) res.set(http::field::allow, m.allow);
    res.keep_alive(keep_alive);
    co_return co_await write_response(c.io(), res, head);
  }
  svc.counters().routed.fetch_add(1, std::memory_order_relaxed);
  switch (*m.which) {
    case route::bytes: {
      http::response<pattern_body> res{http::status::ok, req.version()};
      res.set(http::field::server, server_header());
      res.set(http::field::content_type, "application/octet-stream");
      res.body().size = m.bytes;
      res.content_length(m.bytes);
      res.keep_alive(keep_alive);
      co_return co_await write_response(c.io(), res, head);
    }
    case route::echo: {
      auto res = text_response(http::status::ok, req.version(), std::move(req.body()), "application/octet-stream");
      if (const auto type = req[http::field::content_type]; !type.empty()) res.set(http::field::content_type, type);
      res.keep_alive(keep_alive);
      co_return co_await write_response(c.io(), res, false);
    }
    case route::stats:
    case route::metrics: {
      auto res = text_response(http::status::ok, req.version(), stats_text(svc, *m.which),
                               *m.which == route::stats ? "application/json" : "text/plain; version=0.0.4");
      res.keep_alive(keep_alive);
      co_return co_await write_response(c.io(), res, head);
    }
    case route::root:
      break;
  }
  auto res = text_response(http::status::ok, req.version(),
                           "closewise-reqresp: TCP teardown done right.\n"
                           "GET /bytes/N, POST /echo, GET /stats, GET /metrics\n");
  res.keep_alive(keep_alive);
  co_return co_await write_response(c.io(), res, head);
}

std::string_view unparsed(const beast::flat_buffer& b) {
  return {static_cast<const char*>(b.data().data()), b.data().size()};
}

bool wants_continue(const request_parser& p) {
  const auto& h = p.get();
  return h.version() >= 11 && h.count(http::field::expect) > 0 && !p.is_done();
}

}  // namespace

asio::awaitable<void> http_session(connection c, std::shared_ptr<http_service> svc) {
  const http_options& o = svc->options();
  // Kept across requests: bytes of the next (pipelined) request stay here.
  beast::flat_buffer buffer(o.max_header_bytes + buffer_slack);
  std::optional<request_parser> parser;
  for (;;) {
    if (buffer.size() == 0) {
      // Between requests: the only place a drain may close the connection.
      if (c.draining()) co_return;
      auto [ec, n] = co_await c.io().async_read_some(buffer.prepare(idle_read_bytes), use_tuple);
      buffer.commit(n);
      // FIN, RST, idle timeout, or a drain's close between requests: nothing to answer.
      if (n == 0) co_return;
    }

    // The request's first byte is here: its deadline starts now.
    deadline_guard deadline(c.io().get_executor(), o.request_timeout);
    parser.emplace();
    parser->header_limit(static_cast<std::uint32_t>(std::min<std::size_t>(o.max_header_bytes, UINT32_MAX)));
    parser->body_limit(o.max_body_bytes);

    std::optional<rejection> refusal;
    auto failed = [&](const error_code& ec) {
      if (deadline.expired() || ec == asio::error::timed_out) {
        return std::optional<rejection>{rejection{http::status::request_timeout, "request timeout"}};
      }
      return classify_parse_error(ec, !parser->get().method_string().empty(), parser->is_header_done(),
                                  unparsed(buffer));
    };
    bool answerable = true;
    auto [hec, hn] = co_await http::async_read_header(c.io(), buffer, *parser, deadline.token());
    if (hec || deadline.expired()) {
      refusal = failed(hec);
      answerable = refusal.has_value();
    } else {
      refusal = check_header(parser->get().base());
    }
    if (!refusal && answerable && !parser->is_done()) {
      if (wants_continue(*parser)) {
        http::response<http::empty_body> go_on{http::status::continue_, 11};
        if (co_await write_response(c.io(), go_on, false)) co_return;
        c.mark_exchange_open();  // the 100 answered nothing: a drain must wait for the final response
      }
      auto [bec, bn] = co_await http::async_read(c.io(), buffer, *parser, deadline.token());
      if (bec || deadline.expired()) {
        refusal = failed(bec);
        answerable = refusal.has_value();
      }
    }
    deadline.stop();
    if (!answerable) co_return;  // the peer ended the stream mid-request or the connection failed
    if (refusal) {
      // The method is known once the request line was parsed (verb::unknown before).
      co_await refuse(c, *svc, *refusal, parser->get().method() == http::verb::head);
      co_return;  // a graceful close; nothing pipelined behind a refused request runs
    }

    svc->counters().requests.fetch_add(1, std::memory_order_relaxed);
    request req = parser->release();
    // A drain answers the request in progress and says the connection ends.
    const bool keep_alive = req.keep_alive() && !c.draining();
    closewise::logger()->debug("[conn {}] {} {}", c.id(), std::string_view(req.method_string()),
                               std::string_view(req.target()));
    if (const error_code ec = co_await serve(c, *svc, req, keep_alive)) co_return;
    svc->counters().responses.fetch_add(1, std::memory_order_relaxed);
    // The requester has everything it asked for, unless a pipelined request
    // already waits in our buffer: then rst_if_safe must not call it complete.
    if (buffer.size() == 0) c.mark_exchange_complete();
    if (!keep_alive) co_return;  // the server closes with --teardown
  }
}

session_handler make_session_handler(std::shared_ptr<http_service> svc) {
  // A plain lambda returning the named coroutine's awaitable: no capturing
  // lambda coroutine (g++ 12, asio#858).
  return [svc = std::move(svc)](connection& c) { return http_session(c, svc); };
}

// ---- http_server -----------------------------------------------------------

std::uint16_t peer_port(const std::string& peer) noexcept {
  const auto colon = peer.rfind(':');
  if (colon == std::string::npos) return 0;
  unsigned value = 0;
  const auto [end, err] = std::from_chars(peer.data() + colon + 1, peer.data() + peer.size(), value);
  if (err != std::errc{} || end != peer.data() + peer.size() || value > 65535) return 0;
  return static_cast<std::uint16_t>(value);
}

http_server::http_server(server_options so, http_options ho) : svc_(std::make_shared<http_service>(std::move(ho))) {
  if (so.listen.empty() && so.unix_paths.empty()) so.listen = {"127.0.0.1:0"};
  srv_ = std::make_unique<server>(std::move(so), make_session_handler(svc_));
  svc_->set_stats(&srv_->stats());
  srv_->on_close([this](const connection& c, const close_report& r) {
    {
      std::lock_guard lock(mu_);
      by_port_.emplace(peer_port(c.peer()), r);
      all_.push_back(r);
    }
    cv_.notify_all();
  });
  srv_->start();
  endpoint_ = srv_->local_endpoints().front();
  port_ = parse_endpoint(endpoint_).port();
  std::packaged_task<void()> run([this] { srv_->run(); });
  stopped_ = run.get_future();
  thread_ = std::thread(std::move(run));
}

http_server::~http_server() {
  srv_->stop();
  if (thread_.joinable()) thread_.join();
  srv_.reset();  // its sessions go before the members its close observer uses
}

std::optional<close_report> http_server::take_report(std::uint16_t peer_port, std::chrono::milliseconds limit) {
  std::unique_lock lock(mu_);
  std::optional<close_report> out;
  cv_.wait_for(lock, limit, [&] {
    const auto it = by_port_.find(peer_port);
    if (it == by_port_.end()) return false;
    out = it->second;
    by_port_.erase(it);
    return true;
  });
  return out;
}

std::vector<close_report> http_server::reports() {
  std::lock_guard lock(mu_);
  return all_;
}

bool http_server::wait_stopped(std::chrono::milliseconds limit) {
  return stopped_.wait_for(limit) == std::future_status::ready;
}

}  // namespace closewise::reqresp
