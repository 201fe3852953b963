// closewise-check's registry, card and shared helpers.

#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <stdexcept>

#include <fmt/format.h>
#include <boost/asio/ip/address.hpp>

#include "check/checks.hpp"
#include "check/framing.hpp"
#include "closewise/server.hpp"
#include "demo/scenarios.hpp"

namespace closewise::check {

std::string_view to_string(verdict v) noexcept {
  switch (v) {
    case verdict::pass:
      return "pass";
    case verdict::fail:
      return "fail";
    case verdict::skip:
      return "skip";
  }
  return "?";
}

const std::vector<check_info>& all_checks() {
  static const std::vector<check_info> checks{
      {"pipelined-close", "a large Connection: close response with a request pipelined behind it: every byte, then EOF",
       check_pipelined_close},
      {"late-pipelined",
       "the same, the pipelined request sent once the server read the first: no RST destroys the tail",
       check_late_pipelined},
      {"half-close", "request, then the client's FIN (shutdown(SHUT_WR)): the whole response still arrives",
       check_half_close},
      {"error-readable", "oversized header, oversized body, malformed request line: the error is read whole, no RST",
       check_error_readable},
      {"slow-reader", "a client that never reads a large response is ended within --slow-limit", check_slow_reader},
      {"idle-keepalive", "an idle kept-alive connection is closed with FIN within --idle-limit", check_idle_keepalive},
      {"client-rst", "a client's RST mid-response: the next client is served at once", check_client_rst},
      {"slowloris", "a header trickled a byte a second is cut within --slow-limit; other clients stay fast",
       check_slowloris},
      {"framing", "ambiguous or invalid framings (RFC 9112): none may make the server run bytes of a body",
       check_framing},
      {"time-wait", "who holds TIME_WAIT when the server closes (local targets; reported)", check_time_wait},
      {"close-wait", "half-closed idle clients leave no server socket in CLOSE_WAIT (local targets)", check_close_wait},
      {"tls-close-notify", "with --tls: close_notify before the FIN of a Connection: close response",
       check_tls_close_notify},
      {"tls-truncation", "with --tls: a client that drops without close_notify is ended, bounded (reported)",
       check_tls_truncation},
      {"tls-plain-to-tls", "with --tls: plain HTTP to the TLS port gets an alert or a close, no hang",
       check_tls_plain_to_tls},
  };
  return checks;
}

std::vector<row> run_card(const options& opts) {
  const auto& checks = all_checks();
  for (const auto& name : opts.only) {
    if (std::none_of(checks.begin(), checks.end(), [&](const check_info& c) { return c.name == name; })) {
      throw std::invalid_argument("unknown check: " + name);
    }
  }
  std::vector<row> card;
  for (const auto& c : checks) {
    if (!opts.only.empty() && std::find(opts.only.begin(), opts.only.end(), c.name) == opts.only.end()) continue;
    card.push_back(c.run(opts));
  }
  return card;
}

namespace {

nlohmann::ordered_json row_json(const row& r) {
  nlohmann::ordered_json j{{"name", r.name},
                           {"title", r.title},
                           {"expected", r.expected},
                           {"observed", r.observed},
                           {"verdict", std::string(to_string(r.result))},
                           {"reason", r.reason},
                           {"facts", r.facts}};
  if (!r.cases.empty()) {
    j["cases"] = nlohmann::ordered_json::array();
    for (const auto& c : r.cases) j["cases"].push_back(row_json(c));
  }
  return j;
}

}  // namespace

nlohmann::ordered_json to_json(const std::vector<row>& card, const options& opts) {
  nlohmann::ordered_json out;
  out["target"] = opts.target;
  out["tls"] = opts.tls;
  out["large_path"] = opts.large_path;
  out["limits_ms"] = {
      {"wait", opts.wait_limit.count()}, {"idle", opts.idle_limit.count()}, {"slow", opts.slow_limit.count()}};
  out["checks"] = nlohmann::ordered_json::array();
  std::size_t passed = 0, failed = 0, skipped = 0;
  for (const auto& r : card) {
    out["checks"].push_back(row_json(r));
    passed += r.result == verdict::pass ? 1 : 0;
    failed += r.result == verdict::fail ? 1 : 0;
    skipped += r.result == verdict::skip ? 1 : 0;
  }
  out["summary"] = {{"checks", card.size()}, {"passed", passed}, {"failed", failed}, {"skipped", skipped}};
  return out;
}

bool is_local_target(const std::string& target) {
  asio::ip::address addr;
  try {
    addr = parse_endpoint(target).address();
  } catch (const std::exception&) {
    return false;
  }
  if (addr.is_loopback() || addr.is_unspecified()) return true;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return false;
  bool found = false;
  for (ifaddrs* i = list; i != nullptr && !found; i = i->ifa_next) {
    if (i->ifa_addr == nullptr) continue;
    if (i->ifa_addr->sa_family == AF_INET && addr.is_v4()) {
      const auto* in = reinterpret_cast<const sockaddr_in*>(i->ifa_addr);
      found = asio::ip::address_v4(ntohl(in->sin_addr.s_addr)) == addr.to_v4();
    } else if (i->ifa_addr->sa_family == AF_INET6 && addr.is_v6()) {
      const auto* in6 = reinterpret_cast<const sockaddr_in6*>(i->ifa_addr);
      asio::ip::address_v6::bytes_type b;
      std::copy(std::begin(in6->sin6_addr.s6_addr), std::end(in6->sin6_addr.s6_addr), b.begin());
      found = asio::ip::address_v6(b) == addr.to_v6();
    }
  }
  ::freeifaddrs(list);
  return found;
}

// ---- shared helpers ---------------------------------------------------------

std::optional<connection> connection::open(const options& opts, int rcvbuf, std::string& error) {
  auto c = demo::raw_client::connect(opts.target, rcvbuf, opts.wait_limit, error);
  if (!c) return std::nullopt;
  std::optional<connection> out{connection{std::move(*c), nullptr, 0}};
  out->port = out->raw.local_port();
  if (opts.tls) {
    out->tls = std::make_unique<demo::tls_client>(out->raw);
    if (!out->tls->handshake(opts.wait_limit, error)) {
      error = "TLS handshake: " + error;
      return std::nullopt;
    }
  }
  return out;
}

int connection::send(std::string_view bytes, std::chrono::milliseconds limit) {
  return tls ? tls->send_all(bytes, limit) : raw.send_all(bytes, limit);
}

demo::read_step connection::read_some(char* data, std::size_t n, std::chrono::milliseconds limit) {
  if (tls) return tls->read_some(data, n, limit);
  const long got = raw.recv_some(data, n, limit);
  if (got > 0) return {static_cast<std::size_t>(got), demo::read_end::none, 0};
  if (got == 0) return {0, demo::read_end::eof, 0};
  if (got == -ETIMEDOUT) return {0, demo::read_end::timeout, 0};
  if (got == -ECONNRESET) return {0, demo::read_end::reset, ECONNRESET};
  return {0, demo::read_end::error, static_cast<int>(-got)};
}

void connection::read(demo::response_read& r, std::uint64_t body_goal, std::chrono::milliseconds limit,
                      std::string* head) {
  demo::byte_source src = [this, head](char* data, std::size_t n, std::chrono::milliseconds l) {
    demo::read_step s = read_some(data, n, l);
    if (head != nullptr && head->size() < 64 * 1024) head->append(data, s.n);
    return s;
  };
  demo::read_response(src, r, body_goal, limit);
  if (tls && r.end == demo::read_end::close_notify && !r.after_close_notify)
    r.after_close_notify = tls->tcp_end(limit).end;
}

std::string large_path(const options& opts, std::uint64_t size) {
  std::string p = opts.large_path;
  if (const auto at = p.find("{size}"); at != std::string::npos) p.replace(at, 6, std::to_string(size));
  return p;
}

std::string get_request(const options& opts, const std::string& path, bool close) {
  return fmt::format("GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: closewise-check\r\n{}\r\n", path, opts.host,
                     close ? "Connection: close\r\n" : "");
}

std::uint16_t target_port(const options& opts) {
  try {
    return parse_endpoint(opts.target).port();
  } catch (const std::exception&) {
    return 0;
  }
}

std::int64_t ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
}

namespace {

std::string end_words(const demo::response_read& r) {
  switch (r.end) {
    case demo::read_end::reset:
      return "ECONNRESET";
    case demo::read_end::eof:
      return "EOF";
    case demo::read_end::error:
      return demo::errno_name(r.error);
    case demo::read_end::close_notify:
      return r.after_close_notify
                 ? fmt::format("close_notify + {}", r.after_close_notify == demo::read_end::eof     ? "EOF"
                                                    : r.after_close_notify == demo::read_end::reset ? "ECONNRESET"
                                                                                                    : "timeout")
                 : "close_notify";
    default:
      return std::string(demo::to_string(r.end));
  }
}

}  // namespace

std::string end_fact(demo::read_end e) {
  switch (e) {
    case demo::read_end::eof:
      return "eof";
    case demo::read_end::reset:
      return "reset";
    case demo::read_end::none:
      return "stopped";
    default:
      return std::string(demo::to_string(e));
  }
}

bool clean_end(const demo::response_read& r) {
  return r.end == demo::read_end::eof ||
         (r.end == demo::read_end::close_notify && r.after_close_notify != demo::read_end::reset);
}

std::string describe(const demo::response_read& r) {
  if (!r.head_complete) return fmt::format("no response head, then {}", end_words(r));
  const std::string bytes =
      r.content_length ? fmt::format("{} of {}", demo::human_bytes(r.body_bytes), demo::human_bytes(*r.content_length))
      : r.chunked      ? fmt::format("{} chunked ({})", demo::human_bytes(r.body_bytes),
                                r.chunked_done ? "the last chunk arrived" : "no last chunk")
                       : fmt::format("{} (no Content-Length)", demo::human_bytes(r.body_bytes));
  std::string s = fmt::format("{} {}", r.status, bytes);
  if (!r.intact()) s.append(" (CORRUPT)");
  if (r.end != demo::read_end::none) s.append(", then ").append(end_words(r));
  return s;
}

std::string large_unusable(const options& opts, const demo::response_read& r) {
  if (r.head_complete && r.status == 200 && r.content_length && *r.content_length >= opts.large_size) return {};
  std::string got = !r.head_complete   ? "no response head"
                    : r.status != 200  ? fmt::format("status {}", r.status)
                    : r.content_length ? fmt::format("{} B", *r.content_length)
                                       : std::string("no Content-Length");
  return fmt::format("GET {} answered {}; the check needs 200 with at least {} (--large-path)",
                     large_path(opts, opts.large_size), got, demo::human_bytes(opts.large_size));
}

void add_read_facts(row& out, const demo::response_read& r, std::string_view prefix) {
  const std::string p(prefix);
  out.facts[p + "status"] = r.status;
  out.facts[p + "bytes"] = r.body_bytes;
  if (r.content_length) out.facts[p + "expected_bytes"] = *r.content_length;
  out.facts[p + "end"] = end_fact(r.end);
  if (r.after_close_notify) out.facts[p + "after_close_notify"] = end_fact(*r.after_close_notify);
  if (!r.intact()) out.facts[p + "corrupt"] = true;
}

row titled(std::string_view name, std::string title, std::string expected) {
  row r;
  r.name = std::string(name);
  r.title = std::move(title);
  r.expected = std::move(expected);
  return r;
}

std::optional<connection> open_with_request(row& out, const options& opts, int rcvbuf, std::string_view request) {
  std::string error;
  auto c = connection::open(opts, rcvbuf, error);
  if (!c) {
    fail(out, "connect: " + error);
    return std::nullopt;
  }
  if (const int e = c->send(request, opts.wait_limit)) {
    fail(out, "sending the request: " + demo::errno_name(e));
    return std::nullopt;
  }
  return c;
}

row& pass(row& r, std::string note) {
  r.result = verdict::pass;
  r.reason = std::move(note);
  return r;
}
row& fail(row& r, std::string reason) {
  r.result = verdict::fail;
  r.reason = std::move(reason);
  return r;
}
row& skip(row& r, std::string reason) {
  r.result = verdict::skip;
  r.reason = std::move(reason);
  return r;
}

}  // namespace closewise::check
