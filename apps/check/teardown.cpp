// closewise-check's teardown checks over TCP (or TLS with --tls): pipelined
// requests behind a close, half-close, readable errors, slow and idle
// clients, client resets, slowloris, and the server's sockets as the kernel
// lists them (TIME_WAIT, CLOSE_WAIT).

#include <algorithm>
#include <atomic>
#include <cctype>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "check/checks.hpp"
#include "closewise/probe.hpp"
#include "demo/scenarios.hpp"

namespace closewise::check {

namespace {

using clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using demo::read_end;
using demo::response_read;

std::string small_path() { return "/"; }

bool checks_pattern(const options& opts) { return opts.large_path.starts_with("/bytes/"); }

// The verdict of a large response read to its end: every byte, intact, then
// a clean end; nothing after the response.
row& grade_whole(row& out, const response_read& r, std::string_view rst_cause) {
  out.observed = describe(r);
  add_read_facts(out, r);
  if (!r.head_complete) return fail(out, "no response head");
  if (r.end == read_end::reset) {
    return fail(out,
                fmt::format("ECONNRESET after {}: {}", r.complete() ? "the whole response" : "part of it", rst_cause));
  }
  if (!r.complete()) return fail(out, fmt::format("the response ended short ({})", describe(r)));
  if (!r.intact()) return fail(out, "the body differs from the expected pattern");
  if (r.extra_bytes > 0) {
    return fail(out, fmt::format("{} B after the response: a request sent after Connection: close was answered",
                                 r.extra_bytes));
  }
  if (r.end == read_end::timeout) return fail(out, "no EOF after the response within the wait limit");
  if (!clean_end(r)) return fail(out, fmt::format("the stream ended with {}", end_fact(r.end)));
  return pass(out);
}

// Sends `request` on a fresh connection and reads the head (and what came
// with it). nullopt with `out` failed or skipped when that does not work or
// the response is not a usable large one.
std::optional<connection> large_exchange(row& out, const options& opts, int rcvbuf, const std::string& request,
                                         response_read& r) {
  auto c = open_with_request(out, opts, rcvbuf, request);
  if (!c) return std::nullopt;
  r.check_pattern = checks_pattern(opts);
  c->read(r, 0, opts.wait_limit);
  if (!r.head_complete) {
    out.observed = describe(r);
    add_read_facts(out, r);
    fail(out, "no response head");
    return std::nullopt;
  }
  if (auto why = large_unusable(opts, r); !why.empty()) {
    // Asked alone, does the path answer? Then it is this check's way of
    // asking that the server refused (Node answers 400 to a request with
    // another pipelined behind its Connection: close): the client lost its
    // response, which is the failure the check is about.
    response_read alone;
    row scratch;  // a probe that cannot connect says nothing about this check
    if (auto probe = open_with_request(scratch, opts, 0, get_request(opts, large_path(opts, opts.large_size), true))) {
      probe->read(alone, 0, opts.wait_limit);
      if (large_unusable(opts, alone).empty()) {
        out.observed = describe(r);
        add_read_facts(out, r);
        fail(out, fmt::format("answered {} here, while the same GET alone answers {}: the response was lost", r.status,
                              alone.status));
        return std::nullopt;
      }
    }
    skip(out, why);
    return std::nullopt;
  }
  return c;
}

constexpr std::string_view pipelined_rst =
    "the server closed with the pipelined request unread, and the kernel turned its close into a RST";

}  // namespace

row check_pipelined_close(const options& opts) {
  row out = titled("pipelined-close", "Connection: close, a request pipelined behind it",
                   "every byte of the response, then EOF; the pipelined request is drained, not answered");
  const std::string request =
      get_request(opts, large_path(opts, opts.large_size), true) + get_request(opts, small_path(), false);
  response_read r;
  auto c = large_exchange(out, opts, 0, request, r);
  if (!c) return out;
  const auto start = clock::now();
  c->read(r, demo::until_end, opts.wait_limit);
  out.facts["ms"] = ms_since(start);
  return grade_whole(out, r, pipelined_rst);
}

row check_late_pipelined(const options& opts) {
  row out = titled("late-pipelined", "a request pipelined after the server read the first",
                   "every byte of the Connection: close response, then EOF, though a request arrived behind it");
  const std::uint64_t size = demo::unbufferable_size(opts.large_size);
  response_read r;
  // The small receive buffer keeps the response in the server's queues: the
  // server cannot finish writing before it sees the pipelined bytes.
  auto c = large_exchange(out, opts, small_rcvbuf, get_request(opts, large_path(opts, size), true), r);
  if (!c) return out;
  if (const int e = c->send(get_request(opts, small_path(), false), opts.wait_limit)) {
    return fail(out, "sending the pipelined request: " + demo::errno_name(e));
  }
  (void)demo::wait_acknowledged(c->raw, opts.wait_limit);
  const std::uint64_t total = r.content_length.value_or(size);
  const std::uint64_t reserve = std::min<std::uint64_t>(std::uint64_t{1} << 20, total / 2);
  c->read(r, total - reserve, opts.wait_limit);
  // Give the server the moment it closes in: the kernel says when (local
  // targets), a second's pause otherwise.
  if (is_local_target(opts.target)) {
    const auto left = demo::wait_server_left_established(target_port(opts), c->port, opts.wait_limit);
    out.facts["server_closed_first"] = left.has_value();
  } else {
    std::this_thread::sleep_for(1s);
  }
  c->read(r, demo::until_end, opts.wait_limit);
  return grade_whole(out, r, pipelined_rst);
}

row check_half_close(const options& opts) {
  row out = titled("half-close", "request, then the client's FIN at once",
                   "the whole response after the client's shutdown(SHUT_WR), then EOF");
  auto c = open_with_request(out, opts, 0, get_request(opts, large_path(opts, opts.large_size), false));
  if (!c) return out;
  // The FIN right behind the request: a server that takes it for the end
  // never answers. Over TLS the half-close is close_notify with the FIN.
  if (c->tls) {
    (void)c->tls->send_close_notify_and_fin(opts.wait_limit);
  } else {
    c->raw.shutdown_write();
  }
  response_read r;
  r.check_pattern = checks_pattern(opts);
  c->read(r, demo::until_end, opts.wait_limit);
  if (r.head_complete) {
    if (auto why = large_unusable(opts, r); !why.empty()) return skip(out, why);
  }
  if (!r.head_complete && r.end != read_end::timeout) {
    out.observed = describe(r);
    add_read_facts(out, r);
    return fail(out, fmt::format("the server ended the connection ({}) without answering: it took the client's "
                                 "FIN for the end of the exchange",
                                 end_fact(r.end)));
  }
  if (r.head_complete && !r.complete() && r.end == read_end::eof) {
    out.observed = describe(r);
    add_read_facts(out, r);
    return fail(out,
                "the server stopped writing and closed once it saw the client's FIN: it took the half-close "
                "for the end of the exchange");
  }
  return grade_whole(out, r, "the server reset the connection after the client's FIN");
}

namespace {

struct error_case {
  std::string_view name;
  std::string_view what;
  std::string bytes;
};

std::vector<error_case> error_cases(const options& opts) {
  const std::string host = fmt::format("Host: {}\r\n", opts.host);
  std::string big_header = "GET / HTTP/1.1\r\n" + host + "X-Oversized: ";
  big_header.append(64 * 1024, 'a').append("\r\n\r\n");
  std::string big_body = "POST / HTTP/1.1\r\n" + host + "Content-Length: 1099511627776\r\n\r\n";
  big_body.append(64 * 1024, 'b');
  std::string bad_line = "NOT AN HTTP REQUEST LINE\r\n" + host + "\r\n";
  bad_line.append(get_request(opts, small_path(), false));
  return {{"oversized-header", "a 64 KiB header line", std::move(big_header)},
          {"oversized-body",
           "Content-Length 1 TiB (past any body limit; Apache allows 1 GiB), 64 KiB of it sent, the rest pending",
           std::move(big_body)},
          {"bad-request-line", "a request line that is not HTTP, a valid request behind it", std::move(bad_line)}};
}

row error_case_row(const options& opts, const error_case& ec) {
  row out = titled(ec.name, std::string(ec.what), "a 4xx status and its whole body, then EOF (no RST)");
  std::string error;
  auto c = connection::open(opts, 0, error);
  if (!c) return fail(out, "connect: " + error);
  const int sent = c->send(ec.bytes, opts.wait_limit);
  if (sent != 0) out.facts["send_error"] = demo::errno_name(sent);
  response_read r;
  c->read(r, demo::whole_body, opts.wait_limit);
  const bool whole = r.head_complete && (r.complete() || (!r.content_length && r.end == read_end::eof));
  if (r.end == read_end::none) c->read(r, demo::until_end, opts.wait_limit);
  out.observed = describe(r);
  add_read_facts(out, r);
  if (!r.head_complete) {
    return fail(out, r.end == read_end::reset ? "ECONNRESET before any status: the error was destroyed"
                                              : "no status line before " + end_fact(r.end));
  }
  if (r.status < 400 || r.status > 499) return fail(out, fmt::format("status {} (expected a 4xx)", r.status));
  if (!whole) return fail(out, "the error body ended short: " + describe(r));
  if (r.end == read_end::reset) {
    return fail(out, "RST after the error response: a client that had not read it yet loses it");
  }
  if (r.end == read_end::timeout) return pass(out, "the server kept the connection open after the error");
  return pass(out);
}

}  // namespace

row check_error_readable(const options& opts) {
  row out = titled("error-readable", "oversized and malformed requests",
                   "each refused with a 4xx the client reads whole, then EOF, no RST");
  std::vector<std::string> failed;
  std::vector<std::string> seen;
  for (const auto& ec : error_cases(opts)) {
    row c = error_case_row(opts, ec);
    seen.push_back(fmt::format("{}: {}", c.name, c.observed.empty() ? c.reason : c.observed));
    if (c.result == verdict::fail) failed.push_back(fmt::format("{}: {}", c.name, c.reason));
    out.cases.push_back(std::move(c));
  }
  out.observed = fmt::format("{}", fmt::join(seen, "; "));
  out.facts["cases"] = out.cases.size();
  if (!failed.empty()) return fail(out, fmt::format("{}", fmt::join(failed, "; ")));
  return pass(out);
}

row check_slow_reader(const options& opts) {
  row out = titled("slow-reader", "a client that never reads",
                   fmt::format("the server ends the connection within {} s (write timeout)",
                               std::chrono::duration<double>(opts.slow_limit).count()));
  const std::uint64_t size = demo::unbufferable_size(opts.large_size);
  response_read r;
  auto c = large_exchange(out, opts, small_rcvbuf, get_request(opts, large_path(opts, size), false), r);
  if (!c) return out;
  const bool local = is_local_target(opts.target);
  const std::uint16_t server_port = target_port(opts);
  const auto start = clock::now();
  std::string how;    // "rst", "fin" or "gone", for the facts
  std::string words;  // the same for the table
  while (how.empty() && clock::now() - start < opts.slow_limit) {
    // Our own socket shows a RST at once (CLOSE); a FIN waits behind the
    // unsent bytes, so only the server's socket shows it (local targets).
    if (probe(c->raw.fd(), probe_state).state == tcp_state::close) {
      how = "rst";
      words = "RST";
      break;
    }
    if (local) {
      const auto v = demo::look(server_port, c->port);
      if (!v.error && v.server_side != tcp_state::established) {
        how = v.server_side ? "fin" : "gone";
        words = v.server_side
                    ? fmt::format("FIN, queued behind the unsent bytes (server socket {})", to_string(*v.server_side))
                    : std::string("server socket gone");
        break;
      }
    }
    std::this_thread::sleep_for(50ms);  // polling kernel state, not synchronising threads
  }
  const auto ms = ms_since(start);
  out.facts["ms"] = ms;
  if (how.empty()) {
    out.observed = fmt::format("still open after {:.1f} s of not reading, {} of {} received", ms / 1000.0,
                               demo::human_bytes(r.body_bytes), demo::human_bytes(r.content_length.value_or(0)));
    out.facts["ended"] = false;
    return fail(out, fmt::format("not ended within --slow-limit ({:.0f} s): a client that does not read holds the "
                                 "connection (no write timeout, or a longer one)",
                                 std::chrono::duration<double>(opts.slow_limit).count()));
  }
  c->read(r, demo::until_end, opts.wait_limit);
  out.facts["ended"] = true;
  out.facts["how"] = how;
  add_read_facts(out, r);
  out.observed = fmt::format("{} after {:.1f} s; reading on: {}", words, ms / 1000.0, describe(r));
  return pass(out);
}

row check_idle_keepalive(const options& opts) {
  row out = titled("idle-keepalive", "an idle kept-alive connection",
                   fmt::format("closed with FIN (not RST) within {} s; Keep-Alive: timeout= advertised (optional)",
                               std::chrono::duration<double>(opts.idle_limit).count()));
  auto c = open_with_request(out, opts, 0, get_request(opts, small_path(), false));
  if (!c) return out;
  response_read r;
  std::string head;
  c->read(r, demo::whole_body, opts.wait_limit, &head);
  if (!r.complete()) {
    out.observed = describe(r);
    return fail(out, "the first response did not arrive whole");
  }
  if (r.connection_close) return skip(out, "the server answered Connection: close: it keeps nothing alive");
  std::string advertised;
  {
    std::string lower = head.substr(0, r.head_bytes);
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
    if (const auto at = lower.find("\r\nkeep-alive:"); at != std::string::npos) {
      const auto eol = lower.find("\r\n", at + 2);
      advertised = head.substr(at + 13, eol - at - 13);
      advertised.erase(0, advertised.find_first_not_of(' '));
    }
  }
  out.facts["keep_alive_header"] = advertised;
  const auto start = clock::now();
  char buf[4096];
  const demo::read_step s = c->read_some(buf, sizeof buf, opts.idle_limit);
  const auto ms = ms_since(start);
  out.facts["ms"] = ms;
  out.facts["end"] = s.n > 0 ? "bytes" : end_fact(s.end);
  const std::string adv =
      advertised.empty() ? std::string("no Keep-Alive header") : fmt::format("Keep-Alive: {}", advertised);
  if (s.n > 0) {
    out.observed = fmt::format("{}; {} B arrived unasked after {} ms", adv, s.n, ms);
    return fail(out, "the server sent bytes on an idle connection without a request");
  }
  out.observed = fmt::format("{}; {} after {:.1f} s idle", adv, demo::to_string(s.end), ms / 1000.0);
  switch (s.end) {
    case read_end::eof:
    case read_end::close_notify:
      return pass(out);
    case read_end::reset:
      return fail(out, "the idle connection was closed with RST: a request sent at that moment is lost unseen");
    case read_end::timeout:
      return fail(out, "no idle timeout: the connection is still open");
    default:
      return fail(out, "the idle connection ended with " + demo::errno_name(s.error));
  }
}

namespace {

// One fresh request on its own connection: milliseconds to the whole
// response, or nullopt (with `why`) when it did not come.
std::optional<std::int64_t> timed_request(const options& opts, std::string& why) {
  const auto start = clock::now();
  auto c = connection::open(opts, 0, why);
  if (!c) return std::nullopt;
  if (const int e = c->send(get_request(opts, small_path(), true), opts.wait_limit)) {
    why = "sending: " + demo::errno_name(e);
    return std::nullopt;
  }
  response_read r;
  c->read(r, demo::whole_body, opts.wait_limit);
  if (!r.complete()) {
    why = describe(r);
    return std::nullopt;
  }
  return ms_since(start);
}

constexpr std::int64_t fast_ms = 1000;  // a fresh client's request on a healthy server

}  // namespace

// How long, and how often, fresh clients are served after the RST.
constexpr std::chrono::milliseconds client_rst_window{1500};
constexpr std::chrono::milliseconds client_rst_spacing{100};

row check_client_rst(const options& opts) {
  row out = titled("client-rst", "a client resets mid-response",
                   "the server survives; the next client is served at once (< 1 s)");
  const std::uint64_t size = demo::unbufferable_size(opts.large_size);
  response_read r;
  auto c = large_exchange(out, opts, small_rcvbuf, get_request(opts, large_path(opts, size), false), r);
  if (!c) return out;
  c->raw.reset();
  // Fresh clients for a while after the RST, not just at once: the server
  // learns of the reset when its write fails, which on a busy machine may
  // come after a first request already went through.
  std::vector<std::int64_t> latencies;
  const auto reset_at = clock::now();
  while (latencies.empty() || clock::now() - reset_at < client_rst_window) {
    std::string why;
    const auto ms = timed_request(opts, why);
    if (!ms) {
      out.observed = fmt::format("after our RST, request {} failed: {}", latencies.size() + 1, why);
      return fail(out, "the server did not serve the next client");
    }
    latencies.push_back(*ms);
    std::this_thread::sleep_for(client_rst_spacing);
  }
  out.facts["next_ms"] = latencies;
  const auto worst = *std::max_element(latencies.begin(), latencies.end());
  out.observed = fmt::format("RST after {} of {}; the next {} requests over {} s took {} ms at most",
                             demo::human_bytes(r.body_bytes), demo::human_bytes(r.content_length.value_or(0)),
                             latencies.size(), std::chrono::duration<double>(client_rst_window).count(), worst);
  if (worst > fast_ms) return fail(out, fmt::format("the next client waited {} ms", worst));
  return pass(out);
}

namespace {

struct trickle_result {
  bool cut = false;
  std::int64_t ms = 0;
  std::string how;
  std::size_t bytes_sent = 0;
};

// The slow client: a header that never ends, a byte a second, until the
// server ends it or `limit` passes.
trickle_result trickle(const options& opts, std::atomic<bool>& done) {
  trickle_result out;
  const auto start = clock::now();
  std::string error;
  auto c = connection::open(opts, 0, error);
  if (!c) {
    out.cut = true;
    out.how = "connect failed: " + error;
    done = true;
    return out;
  }
  const std::string prefix = fmt::format("GET / HTTP/1.1\r\nHost: {}\r\nX-Slow: ", opts.host);
  int e = c->send(prefix, opts.wait_limit);
  out.bytes_sent = prefix.size();
  char buf[4096];
  while (e == 0 && clock::now() - start < opts.slow_limit) {
    const demo::read_step s = c->read_some(buf, sizeof buf, 1s);
    if (s.n > 0) {
      out.cut = true;
      out.how = fmt::format("answered ({:.12s})", std::string(buf, s.n));
      break;
    }
    if (s.end != read_end::timeout) {
      out.cut = true;
      out.how = s.end == read_end::reset ? "RST" : s.end == read_end::eof ? "FIN" : end_fact(s.end);
      break;
    }
    e = c->send("a", opts.wait_limit);
    out.bytes_sent += 1;
  }
  if (e != 0) {
    out.cut = true;
    out.how = "send failed: " + demo::errno_name(e);
  }
  out.ms = ms_since(start);
  done = true;
  return out;
}

}  // namespace

row check_slowloris(const options& opts) {
  row out = titled("slowloris", "a header trickled a byte a second",
                   fmt::format("the slow client is cut within {} s; a fresh client's requests keep p99 < 1 s",
                               std::chrono::duration<double>(opts.slow_limit).count()));
  std::atomic<bool> done{false};
  trickle_result slow;
  std::thread t([&] { slow = trickle(opts, done); });
  std::vector<std::int64_t> latencies;
  std::string failure;
  // At least 5 requests, then until the slow client is done; at most 40.
  while (latencies.size() < 40 && (latencies.size() < 5 || !done)) {
    std::string why;
    const auto ms = timed_request(opts, why);
    if (!ms) {
      failure = "a fresh client's request failed: " + why;
      break;
    }
    latencies.push_back(*ms);
    std::this_thread::sleep_for(250ms);  // pacing the fresh client, not synchronising
  }
  t.join();
  std::sort(latencies.begin(), latencies.end());
  const std::int64_t p99 =
      latencies.empty() ? 0 : latencies[std::min(latencies.size() - 1, (latencies.size() * 99 + 99) / 100 - 1)];
  out.facts["slow_cut"] = slow.cut;
  out.facts["slow_ms"] = slow.ms;
  out.facts["slow_how"] = slow.how;
  out.facts["slow_bytes_sent"] = slow.bytes_sent;
  out.facts["requests"] = latencies.size();
  out.facts["p99_ms"] = p99;
  out.observed = fmt::format("slow client {} after {:.1f} s ({} B sent); {} fresh requests, p99 {} ms",
                             slow.cut ? "cut: " + slow.how : std::string("not cut"), slow.ms / 1000.0, slow.bytes_sent,
                             latencies.size(), p99);
  if (!failure.empty()) return fail(out, failure);
  if (!slow.cut) {
    return fail(out, fmt::format("the slow client was not cut within --slow-limit ({:.0f} s): no deadline for a "
                                 "request's header, or a longer one",
                                 std::chrono::duration<double>(opts.slow_limit).count()));
  }
  if (p99 > fast_ms) return fail(out, fmt::format("fresh requests' p99 {} ms while the slow client was on", p99));
  return pass(out);
}

namespace {

constexpr std::string_view remote_skip = "needs the server's sockets in this machine's kernel: a local target";

}  // namespace

row check_time_wait(const options& opts) {
  row out = titled("time-wait", "who keeps TIME_WAIT when the server closes",
                   "reported: the side that closes first keeps TIME_WAIT (the server, after Connection: close)");
  if (!is_local_target(opts.target)) return skip(out, std::string(remote_skip));
  auto c = open_with_request(out, opts, 0, get_request(opts, small_path(), true));
  if (!c) return out;
  response_read r;
  c->read(r, demo::until_end, opts.wait_limit);
  if (c->tls && r.end == read_end::close_notify) (void)c->tls->send_close_notify(opts.wait_limit);
  c->raw.close();
  const auto tw = demo::observe_time_wait(target_port(opts), c->port, true, opts.wait_limit);
  out.facts["time_wait"] = std::string(demo::to_string(tw.holder));
  add_read_facts(out, r);
  out.observed = fmt::format("{}; TIME_WAIT: {}", describe(r), tw.detail);
  return pass(out, "reported, not graded");
}

row check_close_wait(const options& opts) {
  row out = titled("close-wait", "clients half-close without a request",
                   fmt::format("the server closes its side at once (no socket left in CLOSE_WAIT) within {} s",
                               std::chrono::duration<double>(opts.idle_limit).count()));
  if (!is_local_target(opts.target)) return skip(out, std::string(remote_skip));
  constexpr int clients = 3;
  std::vector<connection> conns;
  for (int i = 0; i < clients; ++i) {
    std::string error;
    auto c = connection::open(opts, 0, error);
    if (!c) return fail(out, "connect: " + error);
    c->raw.shutdown_write();
    conns.push_back(std::move(*c));
  }
  const std::uint16_t server_port = target_port(opts);
  const auto start = clock::now();
  std::size_t waiting = clients;
  for (;;) {
    waiting = 0;
    for (const auto& c : conns) {
      const auto v = demo::look(server_port, c.port);
      if (v.error || v.server_side == tcp_state::close_wait || v.server_side == tcp_state::established) ++waiting;
    }
    if (waiting == 0 || clock::now() - start >= opts.idle_limit) break;
    std::this_thread::sleep_for(50ms);  // polling kernel state, not synchronising threads
  }
  const auto ms = ms_since(start);
  out.facts["clients"] = clients;
  out.facts["left_in_close_wait"] = waiting;
  out.facts["ms"] = ms;
  if (waiting > 0) {
    out.observed =
        fmt::format("{} of {} server sockets still in CLOSE_WAIT after {:.1f} s", waiting, clients, ms / 1000.0);
    return fail(out, "the server does not close connections whose client half-closed");
  }
  out.observed = fmt::format("all {} closed by the server after {} ms", clients, ms);
  return pass(out);
}

}  // namespace closewise::check
