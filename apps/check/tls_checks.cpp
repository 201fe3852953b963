// closewise-check's TLS checks (with --tls): close_notify before the FIN, a
// client that drops without close_notify, plain HTTP on the TLS port.

#include <fmt/format.h>

#include "check/checks.hpp"

namespace closewise::check {

namespace {

using clock = std::chrono::steady_clock;
using demo::read_end;
using demo::response_read;

constexpr std::string_view needs_tls = "needs --tls (a TLS target)";

}  // namespace

row check_tls_close_notify(const options& opts) {
  row out = titled("tls-close-notify", "close_notify on a Connection: close response",
                   "the response, then the server's close_notify, then its FIN (not a bare FIN, not RST)");
  if (!opts.tls) return skip(out, std::string(needs_tls));
  auto c = open_with_request(out, opts, 0, get_request(opts, "/", true));
  if (!c) return out;
  response_read r;
  c->read(r, demo::until_end, opts.wait_limit);
  (void)c->tls->send_close_notify(opts.wait_limit);
  out.observed = describe(r) + fmt::format(" ({})", c->tls->version());
  add_read_facts(out, r);
  if (!r.head_complete) return fail(out, "no response head");
  switch (r.end) {
    case read_end::close_notify:
      if (r.after_close_notify == read_end::reset) return fail(out, "RST after close_notify");
      return pass(out);
    case read_end::eof:
      return fail(out, "FIN without close_notify: the client cannot tell the end from a truncation");
    case read_end::reset:
      return fail(out, "ECONNRESET instead of close_notify");
    case read_end::timeout:
      return fail(out, "the server did not close after Connection: close");
    default:
      return fail(out, "the stream ended with " + demo::errno_name(r.error));
  }
}

row check_tls_truncation(const options& opts) {
  row out = titled("tls-truncation", "a client drops without close_notify mid-request",
                   "the server ends the connection (reported: FIN, close_notify or RST), bounded");
  if (!opts.tls) return skip(out, std::string(needs_tls));
  auto c = open_with_request(out, opts, 0, fmt::format("GET / HTTP/1.1\r\nHost: {}\r\nX-Cut: ", opts.host));
  if (!c) return out;
  c->raw.shutdown_write();  // a FIN without close_notify: a truncated request
  const auto start = clock::now();
  response_read r;
  c->read(r, demo::until_end, opts.wait_limit);
  const auto ms = ms_since(start);
  out.facts["ms"] = ms;
  add_read_facts(out, r);
  out.observed = fmt::format("{} after {} ms", r.head_complete ? describe(r) : end_fact(r.end), ms);
  if (r.end == read_end::timeout) return fail(out, "the server never ended the truncated connection");
  return pass(out, "reported, not graded");
}

row check_tls_plain_to_tls(const options& opts) {
  row out = titled("tls-plain-to-tls", "plain HTTP to the TLS port",
                   "a TLS alert (or an HTTP 400) and a close, promptly; no hang");
  if (!opts.tls) return skip(out, std::string(needs_tls));
  std::string error;
  auto c = demo::raw_client::connect(opts.target, 0, opts.wait_limit, error);
  if (!c) return fail(out, "connect: " + error);
  if (const int e = c->send_all(get_request(opts, "/", false), opts.wait_limit)) {
    return fail(out, "sending: " + demo::errno_name(e));
  }
  const auto start = clock::now();
  std::string got;
  char buf[4096];
  long n = 0;
  while ((n = c->recv_some(buf, sizeof buf, opts.wait_limit)) > 0 && got.size() < 64 * 1024) got.append(buf, n);
  const auto ms = ms_since(start);
  const std::string end = n == 0 ? "eof" : n == -ETIMEDOUT ? "timeout" : n == -ECONNRESET ? "reset" : "error";
  const bool alert = !got.empty() && got[0] == 0x15;
  const bool http = got.starts_with("HTTP/1.");
  out.facts["bytes"] = got.size();
  out.facts["alert"] = alert;
  out.facts["end"] = end;
  out.facts["ms"] = ms;
  out.observed = fmt::format("{} B ({}), then {} after {} ms", got.size(),
                             alert  ? "a TLS alert"
                             : http ? got.substr(0, got.find('\r'))
                                    : "no alert",
                             end, ms);
  if (n == -ETIMEDOUT) return fail(out, "the server neither answered nor closed: a hang");
  if (n == -ECONNRESET) return pass(out, "ended with RST rather than a clean close");
  return pass(out);
}

}  // namespace closewise::check
