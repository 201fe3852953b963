#include "demo/scenarios.hpp"

#include <algorithm>
#include <fstream>
#include <functional>
#include <memory>
#include <thread>

#include <fmt/format.h>
#include <boost/asio/ip/address.hpp>

#include "closewise/probe.hpp"
#include "closewise/server.hpp"
#include "closewise/sock_diag.hpp"
#include "reqresp/http_rules.hpp"
#include "reqresp/http_session.hpp"

namespace closewise::demo {

namespace {

using clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// The client's receive buffer in the scenarios that stop reading: fixed, so
// receive autotuning cannot grow it into megabytes that would swallow the
// rest of the response (then nothing would be left to lose).
constexpr int small_rcvbuf = 64 * 1024;
// A request pipelined behind the first one, sent after the server read that one.
constexpr std::string_view pipelined = "GET / HTTP/1.1\r\nHost: demo\r\n\r\n";

}  // namespace

// ---- the kernel's view of one connection -----------------------------------

pair_view look(std::uint16_t server_port, std::uint16_t client_port) {
  pair_view v;
  closewise::error_code ec;
  for (const auto& s : list_tcp_sockets(client_port, ec)) {
    if (s.local_port == server_port && s.remote_port == client_port) v.server_side = s.state;
    if (s.local_port == client_port && s.remote_port == server_port) v.client_side = s.state;
  }
  v.error = static_cast<bool>(ec);
  return v;
}

// Waits until the server's socket of this connection left ESTABLISHED: it
// sent its FIN (graceful: FIN_WAIT1 behind the unsent data) or is gone
// (closed with RST). nullopt at the limit; tcp_state::unknown when gone.
std::optional<tcp_state> wait_server_left_established(std::uint16_t server_port, std::uint16_t client_port,
                                                      std::chrono::milliseconds limit) {
  const auto end = clock::now() + limit;
  for (;;) {
    const pair_view v = look(server_port, client_port);
    if (!v.error) {
      if (!v.server_side) return tcp_state::unknown;
      if (*v.server_side != tcp_state::established) return v.server_side;
    }
    if (clock::now() >= end) return std::nullopt;
    std::this_thread::sleep_for(1ms);  // polling kernel state, not synchronising threads
  }
}

// Waits until the peer's kernel acknowledged everything we sent (our
// SIOCOUTQ is 0): the bytes are in its receive queue.
bool wait_acknowledged(const raw_client& c, std::chrono::milliseconds limit) {
  const auto end = clock::now() + limit;
  for (;;) {
    const auto unacked = probe(c.fd()).unacked;
    if (unacked && *unacked == 0) return true;
    if (clock::now() >= end) return false;
    std::this_thread::sleep_for(1ms);  // polling kernel state, not synchronising threads
  }
}

// Once both ends are closed: waits until every socket of the connection is in
// TIME_WAIT or gone, then says whose TIME_WAIT it is.
time_wait_view observe_time_wait(std::uint16_t server_port, std::uint16_t client_port, bool server_visible,
                                 std::chrono::milliseconds limit) {
  const auto end = clock::now() + limit;
  time_wait_view out;
  for (;;) {
    const pair_view v = look(server_port, client_port);
    const auto final_state = [](std::optional<tcp_state> s) {
      return !s || *s == tcp_state::time_wait || *s == tcp_state::close;
    };
    const bool server_tw = v.server_side == tcp_state::time_wait;
    const bool client_tw = v.client_side == tcp_state::time_wait;
    out.settled = !v.error && final_state(v.server_side) && final_state(v.client_side);
    if (out.settled || clock::now() >= end) {
      if (v.error) {
        out.detail = "sock_diag failed";
        return out;
      }
      out.holder = server_tw && client_tw ? time_wait_holder::both
                   : server_tw            ? time_wait_holder::server
                   : client_tw            ? time_wait_holder::client
                                          : time_wait_holder::none;
      if (!server_visible && !server_tw) {
        out.holder = client_tw ? time_wait_holder::client : time_wait_holder::unknown;
        out.detail = std::string(to_string(out.holder)) + " (server side not visible)";
      } else {
        out.detail = std::string(to_string(out.holder));
      }
      if (!out.settled) {
        out.detail +=
            fmt::format(" (unsettled: server {}, client {})", v.server_side ? to_string(*v.server_side) : "gone",
                        v.client_side ? to_string(*v.client_side) : "gone");
      }
      return out;
    }
    std::this_thread::sleep_for(1ms);  // polling kernel state, not synchronising threads
  }
}

namespace {

// ---- one scenario's setting ---------------------------------------------

struct context {
  const options& opts;
  std::unique_ptr<reqresp::http_server> server;  // in-process only
  std::string endpoint;
  std::uint16_t server_port = 0;
  bool server_visible = true;  // the server's sockets are in our kernel (sock_diag sees them)

  bool in_process() const noexcept { return server != nullptr; }
  std::string path(std::uint64_t size) const {
    if (in_process()) return "/bytes/" + std::to_string(size);
    std::string p = opts.target_path;
    if (const auto at = p.find("{size}"); at != std::string::npos) p.replace(at, 6, std::to_string(size));
    return p;
  }
  bool checks_pattern() const { return in_process() || opts.target_path.starts_with("/bytes/"); }
};

// The in-process server's TLS context: a throwaway self-signed certificate,
// made once, on the first TLS scenario.
std::shared_ptr<asio::ssl::context> server_tls() {
  static const auto ctx = std::make_shared<asio::ssl::context>(make_server_context(make_self_signed_certificate()));
  return ctx;
}

// `linger_timeout` > 0: the server's drain gives up (RST) after that long without progress.
std::unique_ptr<context> make_context(const options& opts, close_policy policy, std::string& error,
                                      std::chrono::milliseconds linger_timeout = {}) {
  auto ctx = std::make_unique<context>(context{opts, nullptr, {}, 0, true});
  try {
    if (opts.target) {
      ctx->endpoint = *opts.target;
      const auto ep = parse_endpoint(*opts.target);
      ctx->server_port = ep.port();
      ctx->server_visible = ep.address().is_loopback();
    } else {
      server_options so;
      so.listen = {"127.0.0.1:0"};
      so.threads = 1;
      so.policy = policy;
      if (opts.tls) so.tls = server_tls();
      if (linger_timeout.count() > 0) so.stream.linger_timeout = linger_timeout;
      ctx->server = std::make_unique<reqresp::http_server>(so, reqresp::http_options{});
      ctx->endpoint = ctx->server->endpoint();
      ctx->server_port = ctx->server->port();
    }
  } catch (const std::exception& e) {
    error = e.what();
    return nullptr;
  }
  return ctx;
}

std::string get_request(const std::string& path, bool close) {
  return fmt::format("GET {} HTTP/1.1\r\nHost: demo\r\nUser-Agent: closewise-demo\r\n{}\r\n", path,
                     close ? "Connection: close\r\n" : "");
}

// Accumulates the deviations from the expectation.
void expect(scenario_result& res, bool ok, const std::string& what) {
  if (ok) return;
  if (!res.mismatch.empty()) res.mismatch += "; ";
  res.mismatch += what;
}

std::string describe_client(const response_read& r, std::string_view our_action) {
  std::string s;
  if (!r.head_complete) {
    s = "no response head";
  } else if (r.status != 200) {
    s = fmt::format("{} ({} of {})", r.status, human_bytes(r.body_bytes), human_bytes(r.content_length.value_or(0)));
  } else if (r.complete()) {
    s = fmt::format("all {}{}", human_bytes(r.body_bytes), r.intact() ? "" : " (CORRUPT)");
  } else {
    s = fmt::format("{} of {}", human_bytes(r.body_bytes), human_bytes(r.content_length.value_or(0)));
  }
  if (!our_action.empty()) return s + ", then " + std::string(our_action);
  if (r.end == read_end::error) return s + ", then " + errno_name(r.error);
  if (r.after_close_notify) return fmt::format("{}, then close_notify + {}", s, to_string(*r.after_close_notify));
  return s + ", then " + std::string(to_string(r.end));
}

double seconds(std::chrono::nanoseconds d) { return std::chrono::duration<double>(d).count(); }

std::string describe_server(const close_report& r) {
  std::string s(to_string(r.cause));
  std::vector<std::string> notes;
  if (r.rst_received) notes.push_back(fmt::format("RST received after {} sent", human_bytes(r.bytes_out)));
  if (r.cause == close_cause::broken_pipe)
    notes.push_back(fmt::format("EPIPE after {} sent", human_bytes(r.bytes_out)));
  if (r.kernel_reset()) notes.push_back(fmt::format("kernel sent RST: {} B unread", r.unread_at_close));
  if (r.cause == close_cause::local_abort) {
    notes.push_back(fmt::format("RST, {} unacked dropped", human_bytes(r.unacked_at_close)));
  }
  if (r.cause == close_cause::safe_reset) notes.push_back(fmt::format("RST at SIOCOUTQ {}", r.unacked_at_close));
  if (r.bytes_discarded > 0) notes.push_back(fmt::format("drained {} B", r.bytes_discarded));
  if (r.refusal != reset_refusal::none) notes.push_back(fmt::format("no RST: {}", to_string(r.refusal)));
  if (r.cause == close_cause::linger_timeout || r.cause == close_cause::linger_limit)
    notes.push_back(fmt::format("RST after {:.2f} s lingering", seconds(r.drain_time)));
  if (r.tls) {
    if (r.tls->app_bytes_discarded > 0) notes.push_back(fmt::format("drained {} B in TLS", r.tls->app_bytes_discarded));
    notes.push_back(fmt::format("TLS: peer {}, our close_notify {}", to_string(r.tls->peer_end),
                                r.tls->close_notify_sent ? "sent" : "not sent"));
  }
  for (std::size_t i = 0; i < notes.size(); ++i) s += (i == 0 ? " (" : "; ") + notes[i];
  return notes.empty() ? s : s + ")";
}

// What a scenario expects of the client, the server and TIME_WAIT.
struct expectation {
  bool data_lost = false;
  std::vector<read_end> client_end;       // any of these
  std::vector<close_cause> server_cause;  // any of these (in-process)
  time_wait_holder time_wait = time_wait_holder::none;
  bool response = true;  // a response head arrives
  // Over TLS:
  std::optional<read_end> after_close_notify =
      std::nullopt;  // how the TCP connection ended after the server's close_notify
  std::optional<tls_ending> tls_peer_end = std::nullopt;  // how the server saw the client end TLS
  std::optional<bool> close_notify_sent = std::nullopt;   // whether the server sent close_notify
};

scenario_result skipped(scenario_result res, std::string why) {
  res.skipped = true;
  res.matches = true;
  res.skip_reason = std::move(why);
  return res;
}

scenario_result failed(scenario_result res, std::string why) {
  res.matches = false;
  res.mismatch = std::move(why);
  return res;
}

// One scenario's connection: its setting, its client (and TLS over it with
// options::tls), the client's port, and the response as far as it was read.
struct exchange {
  std::unique_ptr<context> ctx;
  raw_client client;
  std::uint16_t port = 0;
  response_read r;
  std::unique_ptr<tls_client> tls;
};

// The exchange's reads and writes, through TLS when the client speaks it.
void read(exchange& x, std::uint64_t body_goal, const options& opts) {
  if (x.tls) {
    read_response(x.tls->source(), x.r, body_goal, opts.wait_limit);
  } else {
    read_response(x.client, x.r, body_goal, opts.wait_limit);
  }
}
int send(exchange& x, std::string_view bytes, const options& opts) {
  return x.tls ? x.tls->send_all(bytes, opts.wait_limit) : x.client.send_all(bytes, opts.wait_limit);
}
// Over TLS, once the server's close_notify arrived: how the TCP connection under it ends.
void read_tcp_end(exchange& x, const options& opts) {
  if (x.tls && x.r.end == read_end::close_notify) x.r.after_close_notify = x.tls->tcp_end(opts.wait_limit).end;
}

// What every scenario does first: a fresh setting with `policy`, a connection
// (with SO_RCVBUF `rcvbuf`, 0: the default) that sent `request(ctx)`, and the
// response reader set to check the pattern where it can. nullopt when that
// fails, with `res` failed (or skipped, when `needs_server_state` and the
// server's sockets are not in our kernel): the scenario returns `res`.
std::optional<exchange> start(scenario_result& res, const options& opts, close_policy policy, int rcvbuf,
                              const std::function<std::string(const context&)>& request,
                              bool needs_server_state = false, std::chrono::milliseconds linger_timeout = {}) {
  std::string error;
  auto ctx = make_context(opts, policy, error, linger_timeout);
  if (!ctx) {
    res = failed(res, error);
    return std::nullopt;
  }
  if (needs_server_state && !ctx->server_visible) {
    res = skipped(res, "needs the server's TCP state: a loopback target");
    return std::nullopt;
  }
  auto c = raw_client::connect(ctx->endpoint, rcvbuf, opts.wait_limit, error);
  if (!c) {
    res = failed(res, error);
    return std::nullopt;
  }
  const auto port = c->local_port();
  std::optional<exchange> x{exchange{std::move(ctx), std::move(*c), port, {}, nullptr}};
  if (opts.tls) {
    x->tls = std::make_unique<tls_client>(x->client);
    if (!x->tls->handshake(opts.wait_limit, error)) {
      res = failed(res, error);
      return std::nullopt;
    }
  }
  if (const int e = send(*x, request(*x->ctx), opts)) {
    res = failed(res, "sending the request: " + errno_name(e));
    return std::nullopt;
  }
  x->r.check_pattern = x->ctx->checks_pattern();
  return x;
}

// What every scenario records once the client is done: what the client saw
// (`our_action`: how we ended it, if we did), the server's report, TIME_WAIT,
// the verdict, and the comparison with the expectation. The scenario may add
// its own checks with expect() before it returns done(res).
void finish(scenario_result& res, exchange& x, std::string_view our_action, const expectation& want) {
  const response_read& r = x.r;
  context& ctx = *x.ctx;
  const std::uint16_t client_port = x.port;
  res.client_saw = describe_client(r, our_action);
  res.expected_bytes = r.content_length.value_or(0);
  res.received_bytes = r.body_bytes;
  res.status = r.status;
  res.intact = r.intact();
  res.client_end = r.end;
  res.after_close_notify = r.after_close_notify;
  res.data_lost = !(r.complete() && r.intact());

  if (ctx.in_process()) {
    res.server_report = ctx.server->take_report(client_port, ctx.opts.wait_limit);
    res.server_saw = res.server_report ? describe_server(*res.server_report) : "no close report";
  } else {
    res.server_saw = "n/a (external server)";
  }
  const time_wait_view tw = observe_time_wait(ctx.server_port, client_port, ctx.server_visible, ctx.opts.wait_limit);
  res.time_wait = tw.holder;
  res.time_wait_detail = tw.detail;

  std::string causes;
  for (auto c : want.server_cause) causes += (causes.empty() ? "" : " or ") + std::string(to_string(c));
  std::string ends;
  for (auto e : want.client_end) ends += (ends.empty() ? "" : " or ") + std::string(to_string(e));
  res.expected = fmt::format("{}; client ends with {}; server {}; TIME_WAIT {}", want.data_lost ? "data lost" : "safe",
                             ends, ctx.in_process() ? causes : "n/a", to_string(want.time_wait));
  if (want.after_close_notify) res.expected += fmt::format(" (then {})", to_string(*want.after_close_notify));
  if (want.tls_peer_end) res.expected += fmt::format("; TLS peer end {}", to_string(*want.tls_peer_end));
  if (want.close_notify_sent) {
    res.expected += fmt::format("; server close_notify {}", *want.close_notify_sent ? "sent" : "not sent");
  }

  expect(res, r.head_complete == want.response, want.response ? "no response head" : "a response arrived");
  if (want.after_close_notify) {
    expect(res, r.after_close_notify == want.after_close_notify,
           fmt::format("after close_notify the TCP connection ended with {} (expected {})",
                       r.after_close_notify ? to_string(*r.after_close_notify) : "nothing",
                       to_string(*want.after_close_notify)));
  }
  expect(res, res.data_lost == want.data_lost,
         fmt::format("verdict {} (expected {})", res.verdict(), want.data_lost ? "data lost" : "safe"));
  expect(res, std::find(want.client_end.begin(), want.client_end.end(), r.end) != want.client_end.end(),
         fmt::format("client read ended with {} (expected {})",
                     r.end == read_end::error ? errno_name(r.error) : std::string(to_string(r.end)), ends));
  expect(res, r.intact(), "response bytes differ from the pattern");
  if (ctx.in_process()) {
    expect(res, res.server_report.has_value(), "the server reported no close");
    if (res.server_report) {
      expect(res,
             std::find(want.server_cause.begin(), want.server_cause.end(), res.server_report->cause) !=
                 want.server_cause.end(),
             fmt::format("server close_cause {} (expected {})", to_string(res.server_report->cause), causes));
      const auto& t = res.server_report->tls;
      if (want.tls_peer_end || want.close_notify_sent) expect(res, t.has_value(), "the report has no TLS facts");
      if (t && want.tls_peer_end) {
        expect(res, t->peer_end == *want.tls_peer_end,
               fmt::format("server saw the TLS end as {} (expected {})", to_string(t->peer_end),
                           to_string(*want.tls_peer_end)));
      }
      if (t && want.close_notify_sent) {
        expect(res, t->close_notify_sent == *want.close_notify_sent,
               fmt::format("server close_notify {} (expected {})", t->close_notify_sent ? "sent" : "not sent",
                           *want.close_notify_sent ? "sent" : "not sent"));
      }
    }
  }
  if (tw.holder != time_wait_holder::unknown || ctx.server_visible) {
    expect(res, tw.settled, "the connection did not settle: " + tw.detail);
    expect(res, tw.holder == want.time_wait,
           fmt::format("TIME_WAIT held by {} (expected {})", to_string(tw.holder), to_string(want.time_wait)));
  }
}

// A scenario's result before it runs: its number, what happens, who closes how.
scenario_result titled(int number, std::string title, std::string closer) {
  scenario_result res;
  res.number = number;
  res.title = std::move(title);
  res.closer = std::move(closer);
  return res;
}

// The scenario's outcome: it matches when nothing deviated.
scenario_result done(scenario_result res) {
  res.matches = res.mismatch.empty();
  return res;
}

// Reads the rest of the response, until the stream ends, then closes (FIN).
// Over TLS, a server's close_notify is answered with ours first.
void read_to_end_then_close(exchange& x, const options& opts) {
  read(x, until_end, opts);
  read_tcp_end(x, opts);
  if (x.tls && x.r.end == read_end::close_notify) (void)x.tls->send_close_notify(opts.wait_limit);
  x.client.close();
}

// The request of `start` for a GET of `size` response bytes (on --target, at
// the path --target-path names).
std::function<std::string(const context&)> request_bytes(std::uint64_t size, bool close) {
  return [size, close](const context& ctx) { return get_request(ctx.path(size), close); };
}

// ---- the scenarios ---------------------------------------------------------

// 1 and 2: the client has everything, then ends the connection itself.
scenario_result client_closes_after_full_response(const options& opts, bool with_rst) {
  scenario_result res =
      titled(with_rst ? 1 : 2,
             with_rst ? "client reads the whole response, then resets" : "client reads the whole response, then closes",
             !with_rst  ? "client: close() (FIN) after the last byte"
             : opts.tls ? "client: RST (SO_LINGER 0), no close_notify, after the last byte"
                        : "client: RST (SO_LINGER 0) after the last byte");
  auto x = start(res, opts, close_policy::graceful, 0, request_bytes(opts.size, false));
  if (!x) return res;
  read(*x, whole_body, opts);
  with_rst ? x->client.reset() : x->client.close();
  x->r.end = read_end::none;
  expectation want = with_rst ? expectation{.client_end = {read_end::none},
                                            .server_cause = {close_cause::peer_reset_idle},
                                            .time_wait = time_wait_holder::none}
                              : expectation{.client_end = {read_end::none},
                                            .server_cause = {close_cause::peer_fin_then_ours},
                                            .time_wait = time_wait_holder::client};
  if (opts.tls) {
    want.tls_peer_end = tls_ending::reset;
    want.close_notify_sent = false;
  }
  finish(res, *x, with_rst ? "we sent RST" : "we sent FIN", want);
  if (with_rst && x->ctx->in_process()) {
    const auto idle_resets = x->ctx->server->get().stats().snapshot().closed_by_cause[static_cast<std::size_t>(
        close_cause::peer_reset_idle)];
    expect(res, idle_resets == 1, fmt::format("server counted {} idle resets (expected 1)", idle_resets));
  }
  return done(res);
}

// 3: the client resets while the server is still writing.
scenario_result client_resets_mid_response(const options& opts) {
  scenario_result res = titled(3, "client resets after the response head", "client: RST while the server still writes");
  auto x = start(res, opts, close_policy::graceful, small_rcvbuf, request_bytes(unbufferable_size(opts.size), false));
  if (!x) return res;
  read_response(x->client, x->r, 0, opts.wait_limit);  // the head (and whatever body came with it)
  x->client.reset();
  x->r.end = read_end::none;
  // The write in flight fails: ECONNRESET, or EPIPE when the RST was processed before the write.
  finish(res, *x, "we sent RST",
         {.data_lost = true,
          .client_end = {read_end::none},
          .server_cause = {close_cause::peer_reset_mid_exchange, close_cause::broken_pipe},
          .time_wait = time_wait_holder::none});
  return done(res);
}

// 4, 5, 6: the server closes right after writing a large Connection: close
// response, with the client's pipelined request unread (4, 5) or not (6).
scenario_result server_closes_after_large_response(const options& opts, int number) {
  scenario_result res = titled(number,
                               number == 4   ? "server closes at once with a pipelined request unread"
                               : number == 5 ? "the same, with the graceful close"
                                             : "server resets right after writing the response",
                               !opts.tls     ? (number == 4   ? "server: fin_close (FIN + close) after Connection: close"
                                                : number == 5 ? "server: graceful (FIN, drain, peer FIN, close)"
                                                              : "server: abortive (SO_LINGER 0 + close)")
                               : number == 4 ? "server: fin_close (close_notify, FIN, close)"
                               : number == 5 ? "server: graceful (close_notify, FIN, drain through TLS, close)"
                                             : "server: abortive (RST, no close_notify)");
  const close_policy policy = number == 4   ? close_policy::fin_close
                              : number == 5 ? close_policy::graceful
                                            : close_policy::abortive;
  const bool with_pipelined = number != 6;
  if (opts.target && number != 5) return skipped(res, "needs the server's teardown policy: in-process only");
  const std::uint64_t size = unbufferable_size(opts.size);
  auto x = start(res, opts, policy, small_rcvbuf, request_bytes(size, true), true);
  if (!x) return res;
  response_read& r = x->r;
  // The head proves the server read the request: what we send now stays
  // unread in its kernel queue (the session is writing, and its write cannot
  // complete until we read on). Over TLS, it is one record that OpenSSL on
  // the server has not read either.
  read(*x, 0, opts);
  if (with_pipelined) {
    if (const int e = send(*x, pipelined, opts)) return failed(res, "pipelining: " + errno_name(e));
    if (!wait_acknowledged(x->client, opts.wait_limit))
      return failed(res, "the pipelined bytes were never acknowledged");
  }
  // Stop `reserve` bytes short: the server's write completes (the rest fits
  // in its send queue) while most of it is still unsent when it closes.
  const std::uint64_t total = r.content_length.value_or(size);
  const std::uint64_t reserve = std::min<std::uint64_t>(std::uint64_t{1} << 20, total / 2);
  read(*x, total - reserve, opts);
  const auto left = wait_server_left_established(x->ctx->server_port, x->port, opts.wait_limit);
  if (!left) return failed(res, "the server never closed (its write did not complete)");
  read_to_end_then_close(*x, opts);
  expectation want =
      number == 5 ? expectation{.client_end = {read_end::eof},
                                .server_cause = {close_cause::ours_then_peer_fin},
                                .time_wait = time_wait_holder::server}
                  : expectation{.data_lost = true,
                                .client_end = {read_end::reset},
                                .server_cause = {number == 4 ? close_cause::local_fin_close : close_cause::local_abort},
                                .time_wait = time_wait_holder::none};
  if (opts.tls) {
    // 5: the server's close_notify, its FIN, our close_notify (the drain's
    // end). 4: the close_notify went out but the kernel's RST destroyed it
    // with the rest. 6: no close_notify.
    if (number == 5) {
      want.client_end = {read_end::close_notify};
      want.after_close_notify = read_end::eof;
      want.tls_peer_end = tls_ending::close_notify;
    }
    want.close_notify_sent = number != 6;
  }
  finish(res, *x, "", want);
  if (res.server_report && number == 4) {
    expect(res, res.server_report->kernel_reset(), "the report does not say the kernel turned the close into a RST");
  }
  if (res.server_report && number == 5 && opts.tls) {
    const std::uint64_t drained = res.server_report->tls ? res.server_report->tls->app_bytes_discarded : 0;
    expect(res, drained == pipelined.size(),
           fmt::format("server drained {} B in TLS (expected the {} B pipelined)", drained, pipelined.size()));
  } else if (res.server_report && number == 5) {
    expect(res, res.server_report->bytes_discarded == pipelined.size(),
           fmt::format("server drained {} B (expected the {} B pipelined)", res.server_report->bytes_discarded,
                       pipelined.size()));
  }
  return done(res);
}

// 7: rst_if_safe after the response: RST once SIOCOUTQ is 0.
scenario_result server_resets_when_safe(const options& opts) {
  scenario_result res = titled(7, "server resets once everything is acknowledged",
                               opts.tls ? "server: rst_if_safe (close_notify, then RST when SIOCOUTQ = 0)"
                                        : "server: rst_if_safe (RST when SIOCOUTQ = 0)");
  if (opts.target) return skipped(res, "needs the server's teardown policy: in-process only");
  auto x = start(res, opts, close_policy::rst_if_safe, 0, request_bytes(opts.size, true));
  if (!x) return res;
  read_to_end_then_close(*x, opts);  // in-process: the pattern is checked
  expectation want{
      .client_end = {read_end::reset}, .server_cause = {close_cause::safe_reset}, .time_wait = time_wait_holder::none};
  if (opts.tls) {
    // Every byte and the close_notify behind them, then the RST.
    want.client_end = {read_end::close_notify};
    want.after_close_notify = read_end::reset;
    want.tls_peer_end = tls_ending::none;
    want.close_notify_sent = true;
  }
  finish(res, *x, "", want);
  if (res.server_report) {
    expect(res, res.server_report->unacked_at_close == 0,
           fmt::format("reset with SIOCOUTQ {} (expected 0)", res.server_report->unacked_at_close));
  }
  return done(res);
}

// 8: request, then SHUT_WR: the server still answers in full.
scenario_result client_half_closes(const options& opts) {
  scenario_result res = titled(8, "client half-closes after its request",
                               "client: SHUT_WR after its request; server closes after the response");
  auto x = start(res, opts, close_policy::graceful, 0, request_bytes(opts.size, false));
  if (!x) return res;
  x->client.shutdown_write();
  read_to_end_then_close(*x, opts);
  finish(res, *x, "",
         {.client_end = {read_end::eof},
          .server_cause = {close_cause::peer_fin_then_ours},
          .time_wait = time_wait_holder::client});
  return done(res);
}

// 9: a body over the limit: 413, then a graceful close that drains the body.
scenario_result body_over_limit(const options& opts) {
  scenario_result res = titled(9, "client POSTs a body over the limit", "server: 413 + Connection: close, graceful");
  const std::uint64_t limit = reqresp::http_options{}.max_body_bytes;
  const std::uint64_t body_size = std::max<std::uint64_t>(std::uint64_t{2} << 20, 2 * limit);
  std::string request = fmt::format(
      "POST /echo HTTP/1.1\r\nHost: demo\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
      body_size);
  request += reqresp::pattern(static_cast<std::size_t>(body_size));
  auto x = start(res, opts, close_policy::graceful, 0, [&](const context&) { return request; });
  if (!x) return res;
  x->r.check_pattern = false;  // the 413's body is not the pattern
  read_to_end_then_close(*x, opts);
  finish(res, *x, "",
         {.client_end = {read_end::eof},
          .server_cause = {close_cause::ours_then_peer_fin},
          .time_wait = time_wait_holder::server});
  expect(res, x->r.status == 413, fmt::format("status {} (expected 413)", x->r.status));
  return done(res);
}

// ---- the scenarios over TLS (1, 4, 5, 6 and 7 are the plain ones) ----------

// TLS 2: the clean end: the client reads everything, sends close_notify and
// its FIN; the server answers with its own close_notify and FIN.
scenario_result tls_client_sends_close_notify(const options& opts) {
  scenario_result res = titled(2, "client reads the whole response, then ends TLS",
                               "client: close_notify, then FIN, after the last byte");
  auto x = start(res, opts, close_policy::graceful, 0, request_bytes(opts.size, false));
  if (!x) return res;
  read(*x, whole_body, opts);
  if (const int e = x->tls->send_close_notify_and_fin(opts.wait_limit)) {
    return failed(res, "close_notify: " + errno_name(e));
  }
  read_to_end_then_close(*x, opts);  // the server's close_notify, then its FIN
  finish(res, *x, "",
         {.client_end = {read_end::close_notify},
          .server_cause = {close_cause::peer_fin_then_ours},
          .time_wait = time_wait_holder::client,
          .after_close_notify = read_end::eof,
          .tls_peer_end = tls_ending::close_notify,
          .close_notify_sent = true});
  if (res.server_report && res.server_report->tls) {
    expect(res, res.server_report->tls->close_notify_received, "the server did not record the client's close_notify");
  }
  return done(res);
}

// TLS 3: a FIN without close_notify in the middle of a request body: the
// server must not take it for the end of the request (or of the stream): its
// report and its stats say `truncated`, and nothing is answered.
scenario_result tls_client_stops_mid_body(const options& opts) {
  scenario_result res = titled(3, "client stops halfway through its request body",
                               "client: FIN, no close_notify, mid-body; server closes after");
  constexpr std::uint64_t body_size = 64 * 1024;
  std::string request = fmt::format(
      "POST /echo HTTP/1.1\r\nHost: demo\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
      body_size);
  request += reqresp::pattern(static_cast<std::size_t>(body_size / 2));
  auto x = start(res, opts, close_policy::graceful, 0, [&](const context&) { return request; });
  if (!x) return res;
  x->client.shutdown_write();
  read_to_end_then_close(*x, opts);
  finish(res, *x, "",
         {.data_lost = true,
          .client_end = {read_end::close_notify},
          .server_cause = {close_cause::peer_fin_then_ours},
          .time_wait = time_wait_holder::client,
          .response = false,
          .after_close_notify = read_end::eof,
          .tls_peer_end = tls_ending::truncated,
          .close_notify_sent = true});
  res.client_saw = fmt::format("sent {} of {} B, no answer, then close_notify + {}", body_size / 2, body_size,
                               x->r.after_close_notify ? to_string(*x->r.after_close_notify) : "nothing");
  if (x->ctx->in_process()) {
    auto& server = *x->ctx->server;
    const auto truncated =
        server.get().stats().snapshot().tls_peer_end[static_cast<std::size_t>(tls_ending::truncated)];
    expect(res, truncated == 1, fmt::format("server stats count {} truncated endings (expected 1)", truncated));
    const auto requests = server.service().counters().requests.load();
    expect(res, requests == 0, fmt::format("the server accepted {} requests (expected none)", requests));
  }
  return done(res);
}

// TLS 8: the client reads everything and the server's close_notify and FIN,
// then never answers: no close_notify, no FIN, the socket left open. The
// server's graceful close waits for it only as long as its linger bound.
scenario_result tls_client_never_answers(const options& opts) {
  scenario_result res = titled(
      8, "client never answers the server's close_notify",
      fmt::format("server: graceful, linger {:.0f} s; client: silent, socket open", seconds(silent_peer_linger)));
  auto x = start(res, opts, close_policy::graceful, 0, request_bytes(opts.size, true), false, silent_peer_linger);
  if (!x) return res;
  read(*x, until_end, opts);
  read_tcp_end(*x, opts);
  // Nothing more from us: the server's report arrives (finish waits for it)
  // with our socket still open.
  finish(res, *x, "",
         {.client_end = {read_end::close_notify},
          .server_cause = {close_cause::linger_timeout},
          .time_wait = time_wait_holder::none,
          .after_close_notify = read_end::eof,
          .tls_peer_end = tls_ending::none,
          .close_notify_sent = true});
  x->client.close();
  res.client_saw += ", never answered";
  if (res.server_report) {
    expect(res, res.server_report->drain_time >= silent_peer_linger,
           fmt::format("the server gave up after {:.3f} s (its bound is {:.0f} s)",
                       seconds(res.server_report->drain_time), seconds(silent_peer_linger)));
  }
  return done(res);
}

std::uint64_t tcp_wmem_max() {
  std::ifstream in("/proc/sys/net/ipv4/tcp_wmem");
  std::uint64_t lo = 0, def = 0, hi = 0;
  if (in >> lo >> def >> hi && hi > 0) return hi;
  return std::uint64_t{4} << 20;  // Linux's default
}

}  // namespace

std::string_view to_string(time_wait_holder h) noexcept {
  switch (h) {
    case time_wait_holder::none:
      return "none";
    case time_wait_holder::client:
      return "client";
    case time_wait_holder::server:
      return "server";
    case time_wait_holder::both:
      return "both";
    case time_wait_holder::unknown:
      return "unknown";
  }
  return "?";
}

std::string human_bytes(std::uint64_t n) {
  if (n >= (1u << 20) && n % (1u << 20) == 0) return fmt::format("{} MiB", n >> 20);
  if (n >= 10000) return fmt::format("{:.2f} MB", static_cast<double>(n) / 1e6);
  return fmt::format("{} B", n);
}

std::uint64_t unbufferable_size(std::uint64_t size) {
  return std::max<std::uint64_t>(size, 2 * tcp_wmem_max() + (std::uint64_t{2} << 20));
}

scenario_result run_scenario(int n, const options& opts) {
  scenario_result res;
  res.number = n;
  if (opts.tls && opts.target) return failed(res, "the TLS scenarios run against the in-process server only");
  // Over TLS, 2, 3 and 8 are scenarios of their own; the others carry over.
  switch (n) {
    case 1:
      return client_closes_after_full_response(opts, true);
    case 2:
      return opts.tls ? tls_client_sends_close_notify(opts) : client_closes_after_full_response(opts, false);
    case 3:
      return opts.tls ? tls_client_stops_mid_body(opts) : client_resets_mid_response(opts);
    case 4:
    case 5:
    case 6:
      return server_closes_after_large_response(opts, n);
    case 7:
      return server_resets_when_safe(opts);
    case 8:
      return opts.tls ? tls_client_never_answers(opts) : client_half_closes(opts);
    case 9:
      if (!opts.tls) return body_over_limit(opts);
      break;
    default:
      break;
  }
  return failed(res, "no such scenario");
}

std::vector<scenario_result> run_all(const options& opts) {
  std::vector<scenario_result> out;
  for (int n = 1; n <= scenarios_in(opts); ++n) out.push_back(run_scenario(n, opts));
  return out;
}

}  // namespace closewise::demo
