#include "reqresp/http_session.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cstddef>
#include <iterator>
#include <memory_resource>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/read_size.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/status.hpp>
#include <boost/beast/http/string_body.hpp>

#include "closewise/log.hpp"
#include "closewise/version.hpp"
#include "reqresp/http_rules.hpp"

namespace closewise::reqresp {

namespace {

namespace beast = boost::beast;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
// What the first read of a request asks for at least: the usual request in
// one read, while a larger one grows the buffer as its bytes arrive (Beast
// reads at least 512 bytes more, doubling). A connection that sent half a
// request holds about this much, not the 16 KiB a fixed read size would
// allocate before the first byte.
constexpr std::size_t idle_read_bytes = 512;
// Room in the connection's buffer beyond the header limit: Beast reads up to
// 64 KiB at a time, and a chunk-size line longer than this is refused (400)
// instead of growing the buffer without bound.
constexpr std::size_t buffer_slack = 64 * 1024;

// Each request's target and header fields come from the session's arena
// (request_fields, http_rules.hpp): a request whose fields fit in
// `request_arena_bytes` makes no heap allocation for them, and a larger one
// continues on the heap, released with the rest before the next request.
// 512 bytes hold the target and the few fields of a usual client (curl's
// three, a load balancer's health check) with Beast's ~80 bytes per field.
using request_parser = http::request_parser<http::string_body, field_allocator>;
using request = http::request<http::string_body, request_fields>;
constexpr std::size_t request_arena_bytes = 512;

const std::string& server_header() {
  static const std::string name = std::string("closewise-reqresp/") + closewise::version_string;
  return name;
}

// The whole-request deadline: from a request's first byte to its last, never
// moved by bytes arriving (the stream's read timeout re-arms on every read,
// so a client sending a byte every few seconds would keep a request open
// forever). On expiry it cancels the read in progress through `signal`
// (bound to every read of the request).
//
// One timer per session, armed lazily: only when a request must wait for
// more bytes (most arrive whole and are parsed from the buffer: no timer at
// all), and a request that ends in time leaves it as it is; when it fires
// for a request long over it re-waits for the deadline of the request in
// progress (deadlines only grow). A kept-alive connection costs at most one
// timer wait per request_timeout, not an allocation, a wait and a
// cancellation per request. The state is shared with the timer's handler,
// which may run after the session ended.
struct request_clock {
  using clock = std::chrono::steady_clock;
  explicit request_clock(const asio::any_io_executor& ex) : timer(ex) {}
  asio::steady_timer timer;
  asio::cancellation_signal signal;
  clock::time_point deadline = clock::time_point::max();  // of the request in progress; max: none
  bool armed = false;
  bool expired = false;
};

class request_deadline {
  using clock = request_clock::clock;

 public:
  request_deadline(asio::any_io_executor ex, std::chrono::milliseconds limit) : ex_(std::move(ex)), limit_(limit) {}
  ~request_deadline() {
    if (!d_) return;
    d_->deadline = clock::time_point::max();
    d_->timer.cancel();
  }
  request_deadline(const request_deadline&) = delete;
  request_deadline& operator=(const request_deadline&) = delete;

  /// A request's first byte arrived at `since`.
  void start(clock::time_point since) {
    if (d_) d_->expired = false;
    if (limit_.count() > 0) deadline_ = since + limit_;
  }
  /// The request is complete (or refused): its deadline no longer applies.
  void stop() noexcept {
    deadline_ = clock::time_point::max();
    if (d_) d_->deadline = deadline_;
  }
  bool expired() const noexcept { return d_ && d_->expired; }
  /// The completion token of a read of the request: the deadline now runs.
  /// The timer and its state are made by the first request that needs them.
  auto token() {
    if (!d_) d_ = std::make_shared<request_clock>(ex_);
    d_->deadline = deadline_;
    if (deadline_ != clock::time_point::max()) arm(d_);
    return asio::bind_cancellation_slot(d_->signal.slot(), use_tuple);
  }

 private:
  static void arm(const std::shared_ptr<request_clock>& d) {
    if (d->armed) return;  // it fires at an earlier deadline and re-arms then
    d->armed = true;
    d->timer.expires_at(d->deadline);
    d->timer.async_wait([d](const error_code& ec) {
      d->armed = false;
      if (ec || d->deadline == clock::time_point::max()) return;
      if (clock::now() < d->deadline) return arm(d);
      d->expired = true;
      d->signal.emit(asio::cancellation_type::terminal);
    });
  }

  asio::any_io_executor ex_;
  std::chrono::milliseconds limit_;
  clock::time_point deadline_ = clock::time_point::max();  // of the request in progress; max: none
  std::shared_ptr<request_clock> d_;
};

// What a response says before its body, written by hand into the session's
// one reusable buffer: Beast's serializer walks a sequence of a dozen buffers
// on every write and allocates each field, which together cost a kept-alive
// request more than everything else the server does for it. Every response
// here has a Content-Length, so nothing of Beast's chunked machinery is lost.
struct response_head {
  http::status status = http::status::ok;
  unsigned version = 11;
  std::string_view type = "text/plain; charset=utf-8";
  std::uint64_t length = 0;
  bool keep_alive = true;
  std::string_view allow;  // 405
  // Kept-alive responses say how long the connection may wait for the next
  // request (Keep-Alive: timeout=N), so that a client that honours the hint
  // closes an idle connection before we do. 0: no hint.
  std::uint64_t keep_alive_seconds = 0;
};

// The Keep-Alive hint for an idle timeout: whole seconds, rounded down, so a
// client that waits up to N seconds never meets our close (RFC 9112 has no
// field for this; the timeout parameter is the one Node, undici, Apache and
// nginx's keepalive_timeout header send). Under one second (e.g. 0.2 s) the
// only honest whole number is 0, which clients read as "do not reuse", while
// the connection is in fact kept: no hint is sent then, nor without an idle
// timeout.
std::uint64_t keep_alive_hint(std::chrono::milliseconds idle) noexcept {
  return idle.count() > 0 ? static_cast<std::uint64_t>(idle.count() / 1000) : 0;
}

void append_number(std::string& out, std::uint64_t v) {
  char digits[24];
  const auto [end, ec] = std::to_chars(std::begin(digits), std::end(digits), v);
  out.append(digits, end);
}

void format_head(std::string& out, const response_head& h) {
  out.clear();
  out += h.version == 10 ? "HTTP/1.0 " : "HTTP/1.1 ";
  append_number(out, static_cast<unsigned>(h.status));
  out += ' ';
  const auto reason = http::obsolete_reason(h.status);
  out.append(reason.data(), reason.size());
  out += "\r\nServer: ";
  out += server_header();
  out += "\r\nContent-Type: ";
  out += h.type;
  out += "\r\nContent-Length: ";
  append_number(out, h.length);
  if (!h.allow.empty()) {
    out += "\r\nAllow: ";
    out += h.allow;
  }
  // As beast's keep_alive(): 1.1 says when it closes, 1.0 when it stays.
  if (h.version >= 11 && !h.keep_alive) out += "\r\nConnection: close";
  if (h.version == 10 && h.keep_alive) out += "\r\nConnection: keep-alive";
  if (h.keep_alive && h.keep_alive_seconds > 0) {
    out += "\r\nKeep-Alive: timeout=";
    append_number(out, h.keep_alive_seconds);
  }
  out += "\r\n\r\n";
}

// What one response is, decided without I/O: the session writes it with one
// awaited write (no coroutine of its own, which would cost a frame per
// request), or, for GET /bytes/N, with write_pattern. Filled in place: `body`
// may point into `owned`, which a move would invalidate.
struct response_plan {
  response_head head;
  std::string_view body;  // into `owned`, the request's body, or static text
  std::string owned;
  bool head_only = false;  // HEAD: the same head, no body
  bool pattern = false;    // GET /bytes/N: head.length bytes of the pattern
  response_plan() = default;
  response_plan(const response_plan&) = delete;
  response_plan& operator=(const response_plan&) = delete;
};

void set_owned_body(response_plan& p, std::string text) {
  p.owned = std::move(text);
  p.body = p.owned;
}

// GET /bytes/N: N bytes of the pattern, straight from its immutable table
// (no allocation per response, any N up to --max-bytes), the first piece in
// the same write as the head. Takes references: it is awaited at once by the
// session, whose frame owns the referenced objects.
template <class Stream>
asio::awaitable<error_code> write_pattern(Stream& io, std::string& head_buffer, const response_head& h,
                                          bool head_only) {
  format_head(head_buffer, h);
  std::uint64_t offset = head_only ? h.length : 0;
  auto piece = [&] { return static_cast<std::size_t>(std::min<std::uint64_t>(pattern_span, h.length - offset)); };
  const std::size_t first = piece();
  const std::array<asio::const_buffer, 2> parts{asio::buffer(head_buffer), asio::buffer(pattern_at(0), first)};
  auto [ec, n] = co_await asio::async_write(io, parts, use_tuple);
  offset += first;
  while (!ec && offset < h.length) {
    const std::size_t len = piece();
    std::tie(ec, n) = co_await asio::async_write(io, asio::buffer(pattern_at(offset), len), use_tuple);
    offset += len;
  }
  co_return ec;
}

// The answer to a refused request, which ends the session with a graceful
// close. A refused HEAD gets the header alone: a body there would be read by
// the client as the start of the next response (RFC 9110 section 9.3.2).
void plan_refusal(response_plan& p, connection& c, http_service& svc, const rejection& r, bool head) {
  svc.counters().refused.fetch_add(1, std::memory_order_relaxed);
  if (r.status == http::status::request_timeout) svc.counters().timeouts.fetch_add(1, std::memory_order_relaxed);
  closewise::logger()->info("[conn {}] refused: {} {}", c.id(), static_cast<unsigned>(r.status), r.reason);
  // Whatever --teardown says: a fin_close or abortive close here would let the
  // unread rest of the request turn into a RST that destroys this answer.
  c.set_close_policy(close_policy::graceful);
  p.head.status = r.status;
  p.head.keep_alive = false;
  p.head_only = head;
  std::string body;
  body.reserve(r.reason.size() + 1);
  body.append(r.reason).push_back('\n');
  set_owned_body(p, std::move(body));
}

std::string stats_text(const http_service& svc, route which) {
  const stats_snapshot snap = svc.stats() ? svc.stats()->snapshot() : stats_snapshot{};
  return which == route::stats ? to_json(snap) + "\n" : to_prometheus(snap);
}

// Runs the route for an accepted request: what to answer. `ready`: what GET
// /ready answers (connection::ready).
void plan_response(response_plan& p, http_service& svc, request& req, bool keep_alive, bool ready,
                   std::uint64_t keep_alive_seconds) {
  p.head_only = req.method() == http::verb::head;
  const route_match m = match_route(req.method(), std::string_view(req.target().data(), req.target().size()),
                                    svc.options().max_response_bytes);
  response_head& h = p.head;
  h.version = req.version();
  h.keep_alive = keep_alive;
  h.keep_alive_seconds = keep_alive_seconds;
  if (!m.which) {
    // 404 / 405 / a bad N: the request was well formed, the connection may live on.
    h.status = m.refusal->status;
    h.allow = m.allow;
    std::string body;
    body.reserve(m.refusal->reason.size() + 1);
    body.append(m.refusal->reason).push_back('\n');
    set_owned_body(p, std::move(body));
    return;
  }
  svc.counters().routed.fetch_add(1, std::memory_order_relaxed);
  switch (*m.which) {
    case route::bytes:
      h.type = "application/octet-stream";
      h.length = m.bytes;
      p.pattern = true;
      return;
    case route::echo: {
      const auto type = req[http::field::content_type];
      h.type = type.empty() ? std::string_view("application/octet-stream") : std::string_view(type.data(), type.size());
      p.body = req.body();
      p.head_only = false;
      return;
    }
    case route::stats:
    case route::metrics:
      h.type = *m.which == route::stats ? "application/json" : "text/plain; version=0.0.4";
      set_owned_body(p, stats_text(svc, *m.which));
      return;
    case route::ready:
      // 503 from the signal on, while everything else is still served
      // (--drain-delay): the load balancer's probe takes us out of rotation
      // before the drain closes anything. In a drain keep_alive is false:
      // Connection: close, as on every answer then.
      if (!ready) h.status = http::status::service_unavailable;
      p.body = ready ? "ready\n" : "not ready: shutting down\n";
      return;
    case route::root:
      break;
  }
  p.body =
      "closewise-reqresp: TCP teardown done right.\n"
      "GET /bytes/N, POST /echo, GET /stats, GET /metrics\n";
}

std::string_view unparsed(const beast::flat_buffer& b) {
  return {static_cast<const char*>(b.data().data()), b.data().size()};
}

// Where a request's parse stands: the header's bytes counted across reads.
// Beast 1.81 applies header_limit to what one put() sees, and consumes
// complete fields as they arrive, so a header that comes in pieces would
// have no limit at all (a client could send megabytes of fields, a line at
// a time, within the request deadline).
struct header_budget {
  std::size_t limit = 0;
  std::size_t used = 0;  // header bytes the parser consumed so far
};

// Parses what the buffer already holds, without I/O: the header, or (whole)
// the whole message. need_more: the rest must be read first. Most requests
// arrive whole in one read, and then this is all the parsing they get.
error_code parse_buffered(request_parser& p, beast::flat_buffer& b, bool whole, header_budget& header) {
  p.eager(whole);
  error_code ec;
  while (!(whole ? p.is_done() : p.is_header_done())) {
    const bool in_header = !p.is_header_done();
    if (b.size() == 0) return http::error::need_more;
    const std::size_t used = p.put(b.data(), ec);
    b.consume(used);
    if (in_header) {
      // Header and body are parsed in separate calls (eager only once the
      // header is done): `used` is all header.
      header.used += used;
      const bool over = p.is_header_done() ? header.used > header.limit : header.used + b.size() >= header.limit;
      if (over) return http::error::header_limit;
    }
    if (ec) return ec;  // need_more included: Beast's reads treat it alike
    if (used == 0) return http::error::need_more;
  }
  return ec;
}

// Reads into the buffer until the header (or, whole, the whole message) is
// parsed, as Beast's read operations do, but with the header counted across
// reads (header_budget) and the deadline's cancellation bound to each read.
template <class Stream>
asio::awaitable<error_code> read_request(Stream& io, beast::flat_buffer& b, request_parser& p,
                                         request_deadline& deadline, header_budget& header, bool whole) {
  for (;;) {
    const error_code ec = parse_buffered(p, b, whole, header);
    if (ec != http::error::need_more) co_return ec;
    const std::size_t size = beast::read_size(b, 65536);
    if (size == 0) co_return http::error::buffer_overflow;
    auto [rec, n] = co_await io.async_read_some(b.prepare(size), deadline.token());
    b.commit(n);
    if (rec == asio::error::eof || rec == asio::ssl::error::stream_truncated) {
      // As Beast: a message cut by the FIN is partial; none at all, the end of
      // the stream. Over TLS: the peer's close_notify, or a FIN without it
      // (the TLS layer reports which; a request is never framed by the end
      // of the connection, so either way a partial one is not answered).
      if (!p.got_some()) co_return http::error::end_of_stream;
      error_code eof_ec;
      p.put_eof(eof_ec);
      co_return eof_ec;
    }
    if (rec) co_return rec;
  }
}

bool wants_continue(const request_parser& p) {
  const auto& h = p.get();
  return h.version() >= 11 && h.count(http::field::expect) > 0 && !p.is_done();
}

}  // namespace

// The session's one coroutine: its frame keeps `c` and `svc` (copies), and
// with them `io`, which belongs to the connection.
template <class Stream>
asio::awaitable<void> http_session_on(connection c, Stream& io, std::shared_ptr<http_service> svc) {
  const http_options& o = svc->options();
  // Kept across requests: bytes of the next (pipelined) request stay here.
  beast::flat_buffer buffer(o.max_header_bytes + buffer_slack);
  // Declared before the parser, which must go first (its fields live here).
  std::array<std::byte, request_arena_bytes> arena_bytes;
  std::pmr::monotonic_buffer_resource arena(arena_bytes.data(), arena_bytes.size());
  std::optional<request_parser> parser;
  request_deadline deadline(io.get_executor(), o.request_timeout);
  bool first_request = true;
  // The connection's own idle timeout (the server's stream options).
  const std::uint64_t keep_alive_seconds = keep_alive_hint(c.io().options().idle_timeout);
  std::string head_buffer;  // every response's head, reused: one allocation, not one per doubling
  head_buffer.reserve(256);
  std::optional<response_plan> plan;  // the current response; its body may be the request's
  for (;;) {
    if (buffer.size() == 0) {
      // Between requests: the only place a drain may close the connection.
      // Even when draining we wait here instead of returning: the server
      // closes the connection once it has been idle for drain_idle_grace, and
      // a request that arrives first is answered with Connection: close. A
      // proxy sends its next request on the connection it used last, so
      // returning now would put our FIN on the wire just as that request comes.
      // The capacity earlier requests grew is reused as it is.
      const std::size_t room = std::max(idle_read_bytes, buffer.capacity());
      auto [ec, n] = co_await io.async_read_some(buffer.prepare(room), use_tuple);
      buffer.commit(n);
      // FIN, RST, idle timeout, or a drain's close between requests: nothing to answer.
      if (n == 0) co_return;
    }

    // The request's first byte is here: its deadline starts now, or, for the
    // first request, when the server saw its first byte while the header
    // was still incomplete (server_options::input_ready).
    deadline.start(first_request ? c.input_since() : std::chrono::steady_clock::now());
    first_request = false;
    // The last request's fields, and the response that may point into
    // them, go before the arena's memory is handed out again.
    plan.reset();
    parser.reset();
    arena.release();
    parser.emplace(std::piecewise_construct, std::make_tuple(), std::make_tuple(field_allocator(&arena)));
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
    header_budget header{o.max_header_bytes, 0};
    error_code hec = parse_buffered(*parser, buffer, false, header);
    if (hec == http::error::need_more) hec = co_await read_request(io, buffer, *parser, deadline, header, false);
    if (hec || deadline.expired()) {
      refusal = failed(hec);
      answerable = refusal.has_value();
    } else {
      refusal = check_header(parser->get().base());
    }
    if (!refusal && answerable && !parser->is_done()) {
      if (wants_continue(*parser)) {
        static constexpr std::string_view go_on = "HTTP/1.1 100 Continue\r\n\r\n";
        if (auto [ec, n] = co_await asio::async_write(io, asio::buffer(go_on), use_tuple); ec) co_return;
        c.mark_exchange_open();  // the 100 answered nothing: a drain must wait for the final response
      }
      error_code bec = parse_buffered(*parser, buffer, true, header);
      if (bec == http::error::need_more) bec = co_await read_request(io, buffer, *parser, deadline, header, true);
      if (bec || deadline.expired()) {
        refusal = failed(bec);
        answerable = refusal.has_value();
      }
    }
    deadline.stop();
    // Over TLS: the request is complete by its framing, so a FIN without
    // close_notify from now on is the peer's end, not a truncation.
    if constexpr (requires { io.mark_message_complete(); }) {
      if (answerable && parser->is_done()) io.mark_message_complete();
    }
    if (!answerable) co_return;  // the peer ended the stream mid-request or the connection failed
    // Served in place: a moved-out message would be one more object in
    // every connection's coroutine frame.
    request& req = parser->get();
    // A drain answers the request in progress and says the connection ends.
    const bool keep_alive = !refusal && req.keep_alive() && !c.draining();
    plan.emplace();
    if (refusal) {
      // The method is known once the request line was parsed (verb::unknown before).
      plan_refusal(*plan, c, *svc, *refusal, req.method() == http::verb::head);
    } else {
      svc->counters().requests.fetch_add(1, std::memory_order_relaxed);
      closewise::logger()->debug("[conn {}] {} {}", c.id(), std::string_view(req.method_string()),
                                 std::string_view(req.target()));
      plan_response(*plan, *svc, req, keep_alive, c.ready(), keep_alive_seconds);
    }
    error_code wec;
    if (plan->pattern) {
      wec = co_await write_pattern(io, head_buffer, plan->head, plan->head_only);
    } else {
      plan->head.length = plan->body.size();
      format_head(head_buffer, plan->head);
      const std::array<asio::const_buffer, 2> parts{
          asio::buffer(head_buffer), asio::buffer(plan->body.data(), plan->head_only ? 0 : plan->body.size())};
      std::tie(wec, std::ignore) = co_await asio::async_write(io, parts, use_tuple);
    }
    if (wec) co_return;
    svc->counters().responses.fetch_add(1, std::memory_order_relaxed);
    if (refusal) co_return;  // a graceful close; nothing pipelined behind a refused request runs
    // The requester has everything it asked for, unless a pipelined request
    // already waits in our buffer: then rst_if_safe must not call it complete.
    if (buffer.size() == 0) c.mark_exchange_complete();
    if (!keep_alive) co_return;  // the server closes with --teardown
  }
}

// Not a coroutine: it picks the stream and returns that coroutine's
// awaitable, one frame per connection instead of two.
asio::awaitable<void> http_session(connection c, std::shared_ptr<http_service> svc) {
  if (tls_stream* t = c.tls()) return http_session_on(c, *t, std::move(svc));
  stream& io = c.io();
  return http_session_on(std::move(c), io, std::move(svc));
}

bool header_complete(std::string_view waiting) noexcept {
  // Beast wants CRLF line ends; a bare-LF client waits out ready_timeout
  // instead, and its session then answers whatever the parser makes of it.
  return waiting.find("\r\n\r\n") != std::string_view::npos;
}

void configure_server(server_options& so, const http_options& ho) {
  // The client speaks first, and nothing can be answered before its whole
  // header arrived: until then a connection is a parked socket.
  so.start_on_input = true;
  // With TLS: plain HTTP sent to the TLS port gets an answer it can read, as
  // nginx gives it, then a graceful close.
  static constexpr std::string_view plain_body = "The plain HTTP request was sent to the HTTPS port\n";
  so.plaintext_reply =
      "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: " + std::to_string(plain_body.size()) +
      "\r\nConnection: close\r\n\r\n" + std::string(plain_body);
  if (ho.request_timeout.count() > 0) {
    so.input_ready = header_complete;
    so.ready_timeout = ho.request_timeout;
    // A header over the limit is the session's to refuse (431).
    so.input_limit = ho.max_header_bytes + 1;
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
  configure_server(so, svc_->options());
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
