// closewise-check's checks against two servers: closewise-reqresp in-process
// (short timeouts, so the idle and slow checks end fast), where every check
// passes, and a deliberately broken server (broken_server.hpp), where each
// check fails against the one bug it is about. Then the closewise-check
// binary: --only, --json, exit statuses.
//
// Bounds are generous (a server whose timeouts are 1 s must act within 10 s);
// the failing cases need no wait to be long, since the bug never acts at all.

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../support/child_process.hpp"
#include "broken_server.hpp"
#include "check/check.hpp"
#include "closewise/server.hpp"
#include "closewise/tls.hpp"
#include "demo/client.hpp"
#include "reqresp/http_session.hpp"

using namespace closewise;
using namespace closewise::check;
using namespace std::chrono_literals;
using closewise::test::broken_knobs;
using closewise::test::broken_server;
namespace demo = closewise::demo;

namespace {

std::unique_ptr<reqresp::http_server> start_reqresp(bool tls = false, close_policy policy = close_policy::graceful) {
  server_options so;
  so.listen = {"127.0.0.1:0"};
  so.threads = 1;
  so.policy = policy;
  so.stream.idle_timeout = 1s;
  so.stream.read_timeout = 1s;
  so.stream.write_timeout = 1s;
  if (tls) {
    static const auto ctx = std::make_shared<asio::ssl::context>(make_server_context(make_self_signed_certificate()));
    so.tls = ctx;
  }
  reqresp::http_options ho;
  ho.request_timeout = 1s;
  return std::make_unique<reqresp::http_server>(so, ho);
}

// Limits for a server that acts within about a second: generous.
options generous(const std::string& endpoint) {
  options o;
  o.target = endpoint;
  o.wait_limit = 10s;
  o.idle_limit = 10s;
  o.slow_limit = 10s;
  return o;
}

// Limits for a server that never acts: any bound shows it, a short one is cheaper.
options short_limits(const std::string& endpoint) {
  options o = generous(endpoint);
  o.idle_limit = 3s;
  o.slow_limit = 3s;
  return o;
}

row run_one(options o, const std::string& name) {
  o.only = {name};
  auto card = run_card(o);
  EXPECT_EQ(card.size(), 1u);
  return card.empty() ? row{} : card.front();
}

std::string explain(const row& r) {
  std::string s = r.name + ": " + std::string(to_string(r.result)) + " (" + r.reason + "); observed: " + r.observed;
  for (const auto& c : r.cases) s += "\n  " + explain(c);
  return s;
}

// The checks that need neither TLS nor the framing battery.
const std::vector<std::string> plain_checks{"pipelined-close", "late-pipelined", "half-close", "error-readable",
                                            "slow-reader",     "idle-keepalive", "client-rst", "slowloris",
                                            "time-wait",       "close-wait"};

}  // namespace

// ---- every check passes against closewise-reqresp -------------------------

class passes_against_reqresp : public ::testing::TestWithParam<std::string> {};

TEST_P(passes_against_reqresp, plain) {
  const auto srv = start_reqresp();
  const row r = run_one(generous(srv->endpoint()), GetParam());
  EXPECT_EQ(r.result, verdict::pass) << explain(r);
}

INSTANTIATE_TEST_SUITE_P(check, passes_against_reqresp, ::testing::ValuesIn(plain_checks), [](const auto& info) {
  std::string n = info.param;
  for (auto& ch : n) ch = ch == '-' ? '_' : ch;
  return n;
});

TEST(check, tls_checks_pass_against_reqresp_over_tls) {
  const auto srv = start_reqresp(true);
  options o = generous(srv->endpoint());
  o.tls = true;
  o.only = {"tls-close-notify", "tls-truncation", "tls-plain-to-tls", "half-close"};
  for (const auto& r : run_card(o)) EXPECT_EQ(r.result, verdict::pass) << explain(r);
}

TEST(check, tls_checks_skip_without_tls_and_sock_diag_checks_count_loopback_as_local) {
  const auto srv = start_reqresp();
  options o = generous(srv->endpoint());
  o.only = {"tls-close-notify", "tls-truncation", "tls-plain-to-tls"};
  for (const auto& r : run_card(o)) EXPECT_EQ(r.result, verdict::skip) << explain(r);
  EXPECT_TRUE(is_local_target("127.0.0.1:80"));
  EXPECT_TRUE(is_local_target("[::1]:80"));
  EXPECT_FALSE(is_local_target("192.0.2.1:80"));  // TEST-NET-1: never on this machine
  EXPECT_FALSE(is_local_target("not an endpoint"));
}

TEST(check, the_time_wait_check_reports_the_server_as_holder_after_connection_close) {
  const auto srv = start_reqresp();
  const row r = run_one(generous(srv->endpoint()), "time-wait");
  EXPECT_EQ(r.result, verdict::pass) << explain(r);
  EXPECT_EQ(r.facts.value("time_wait", ""), "server") << explain(r);
}

TEST(check, large_checks_skip_with_the_reason_when_the_large_path_is_small) {
  const auto srv = start_reqresp();
  options o = generous(srv->endpoint());
  o.large_path = "/bytes/1000";
  o.only = {"pipelined-close", "late-pipelined", "half-close", "slow-reader", "client-rst"};
  for (const auto& r : run_card(o)) {
    EXPECT_EQ(r.result, verdict::skip) << explain(r);
    EXPECT_NE(r.reason.find("--large-path"), std::string::npos) << explain(r);
  }
}

TEST(check, unknown_names_throw_and_the_json_counts_verdicts) {
  options o = generous("127.0.0.1:1");
  o.only = {"no-such-check"};
  EXPECT_THROW(run_card(o), std::invalid_argument);
  row a, b;
  a.name = "a";
  a.result = verdict::pass;
  b.name = "b";
  b.result = verdict::fail;
  b.cases.push_back(a);
  const auto j = to_json({a, b}, o);
  EXPECT_EQ(j["summary"]["passed"], 1);
  EXPECT_EQ(j["summary"]["failed"], 1);
  EXPECT_EQ(j["checks"][1]["cases"][0]["name"], "a");
}

// ---- each check fails against its bug -------------------------------------

namespace {

row against(const broken_knobs& k, const std::string& name, bool short_bounds = false) {
  broken_server srv(k);
  return run_one(short_bounds ? short_limits(srv.endpoint()) : generous(srv.endpoint()), name);
}

}  // namespace

TEST(check, the_broken_server_without_knobs_passes) {
  broken_server srv(broken_knobs{});
  options o = generous(srv.endpoint());
  o.only = plain_checks;
  for (const auto& r : run_card(o)) EXPECT_EQ(r.result, verdict::pass) << explain(r);
}

TEST(check, pipelined_close_fails_when_the_server_closes_with_unread_input) {
  const row r = against({.close_with_unread_input = true}, "pipelined-close");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_EQ(r.facts.value("end", ""), "reset") << explain(r);
}

// A 400 for the pair where the path alone answers 200 is a lost response,
// not a path the check cannot use.
TEST(check, pipelined_close_fails_when_the_server_refuses_the_pipelined_pair) {
  const row r = against({.refuse_pipelined_after_close = true}, "pipelined-close");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_NE(r.reason.find("alone answers 200"), std::string::npos) << explain(r);
}

TEST(check, late_pipelined_fails_when_the_server_closes_with_unread_input) {
  const row r = against({.close_with_unread_input = true}, "late-pipelined");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_EQ(r.facts.value("end", ""), "reset") << explain(r);
}

TEST(check, half_close_fails_when_the_server_takes_the_fin_for_the_end) {
  const row r = against({.half_close_is_end = true}, "half-close");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
}

TEST(check, error_readable_fails_when_the_server_resets_after_the_error) {
  const row r = against({.rst_after_error = true}, "error-readable");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  ASSERT_EQ(r.cases.size(), 3u);
  for (const auto& c : r.cases) EXPECT_EQ(c.result, verdict::fail) << explain(c);
}

TEST(check, slow_reader_fails_without_a_write_timeout) {
  const row r = against({.no_timeouts = true}, "slow-reader", true);
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
}

TEST(check, idle_keepalive_fails_without_an_idle_timeout) {
  const row r = against({.no_timeouts = true}, "idle-keepalive", true);
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_EQ(r.facts.value("end", ""), "timeout") << explain(r);
}

TEST(check, idle_keepalive_fails_when_the_idle_close_is_a_reset) {
  const row r = against({.idle_close_by_rst = true}, "idle-keepalive");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_EQ(r.facts.value("end", ""), "reset") << explain(r);
}

TEST(check, client_rst_fails_when_a_reset_stalls_the_server) {
  const row r = against({.stall_after_reset = true}, "client-rst");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
}

TEST(check, slowloris_fails_without_a_header_timeout) {
  const row r = against({.no_timeouts = true}, "slowloris", true);
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_FALSE(r.facts.value("slow_cut", true)) << explain(r);
}

TEST(check, close_wait_fails_when_the_server_ignores_a_clients_fin) {
  const row r = against({.leak_on_eof = true}, "close-wait", true);
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_EQ(r.facts.value("left_in_close_wait", 0), 3) << explain(r);
}

// The same traps in closewise-reqresp itself, with a teardown policy that
// falls into them: fin_close closes with the pipelined request unread (the
// kernel's RST), abortive sends no close_notify.
TEST(check, late_pipelined_fails_against_reqresp_with_fin_close) {
  const auto srv = start_reqresp(false, close_policy::fin_close);
  const row r = run_one(generous(srv->endpoint()), "late-pipelined");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_EQ(r.facts.value("end", ""), "reset") << explain(r);
}

TEST(check, tls_close_notify_fails_against_reqresp_with_abortive_close) {
  const auto srv = start_reqresp(true, close_policy::abortive);
  options o = generous(srv->endpoint());
  o.tls = true;
  const row r = run_one(o, "tls-close-notify");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_EQ(r.facts.value("end", ""), "reset") << explain(r);
}

// A "TLS port" that answers plain HTTP and then keeps the connection open
// forever: the check must call it a hang, within its bound.
TEST(check, tls_plain_to_tls_fails_against_a_port_that_never_ends_the_connection) {
  broken_server srv({.no_timeouts = true});
  options o = short_limits(srv.endpoint());
  o.tls = true;
  o.wait_limit = 3s;
  const row r = run_one(o, "tls-plain-to-tls");
  EXPECT_EQ(r.result, verdict::fail) << explain(r);
  EXPECT_EQ(r.facts.value("end", ""), "timeout") << explain(r);
}

// ---- the binary ------------------------------------------------------------

TEST(check_binary, only_and_json_exit_0_on_a_pass_1_on_a_fail_2_on_usage) {
  const auto srv = start_reqresp();
  const std::string json_file = ::testing::TempDir() + "closewise-check-card.json";
  {
    test::child c({CLOSEWISE_CHECK_BINARY, "--target", srv->endpoint(), "--only", "pipelined-close", "--only",
                   "error-readable", "--json", json_file});
    ASSERT_TRUE(c.started());
    EXPECT_EQ(c.wait(60s), 0) << c.out() << c.err();
    EXPECT_NE(c.out().find("pipelined-close"), std::string::npos) << c.out();
    std::ifstream f(json_file);
    const auto j = nlohmann::json::parse(f, nullptr, false);
    ASSERT_FALSE(j.is_discarded());
    EXPECT_EQ(j["summary"]["checks"], 2);
    EXPECT_EQ(j["summary"]["passed"], 2);
    EXPECT_EQ(j["checks"][0]["name"], "pipelined-close");
  }
  {
    broken_server bad({.half_close_is_end = true});
    test::child c({CLOSEWISE_CHECK_BINARY, "--target", bad.endpoint(), "--only", "half-close", "--json", "-"});
    ASSERT_TRUE(c.started());
    EXPECT_EQ(c.wait(60s), 1) << c.out() << c.err();
    const auto j = nlohmann::json::parse(c.out(), nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << c.out();
    EXPECT_EQ(j["checks"][0]["verdict"], "fail");
  }
  for (const char* bad : {"--only=no-such-check", "--wait-limit=-1", "--bogus"}) {
    test::child c({CLOSEWISE_CHECK_BINARY, "--target", "127.0.0.1:1", bad});
    ASSERT_TRUE(c.started());
    EXPECT_EQ(c.wait(10s), 2) << bad << ": " << c.err();
  }
  test::child v({CLOSEWISE_CHECK_BINARY, "--version"});
  EXPECT_EQ(v.wait(10s), 0);
  EXPECT_EQ(v.out().rfind("closewise-check ", 0), 0u) << v.out();
}

// The response reader under every check: a chunked body (Node's http module
// and many applications send one for small answers) is decoded across reads
// cut anywhere, its trailer included, and ends at its last chunk; a size
// line that is not hex leaves it incomplete instead of guessing.
namespace {

demo::response_read read_in_pieces(const std::string& bytes, std::size_t piece) {
  std::size_t at = 0;
  const demo::byte_source src = [&](char* data, std::size_t n, std::chrono::milliseconds) {
    if (at == bytes.size()) return demo::read_step{0, demo::read_end::eof, 0};
    const std::size_t k = std::min({n, piece, bytes.size() - at});
    std::copy_n(bytes.data() + at, k, data);
    at += k;
    return demo::read_step{k, demo::read_end::none, 0};
  };
  demo::response_read r;
  demo::read_response(src, r, demo::whole_body, 1s);
  return r;
}

}  // namespace

TEST(check, chunked_responses_are_decoded_across_reads) {
  const std::string response =
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n"
      "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
  for (const std::size_t piece : {std::size_t{1}, std::size_t{3}, std::size_t{7}, response.size()}) {
    const auto r = read_in_pieces(response, piece);
    EXPECT_TRUE(r.chunked) << piece;
    EXPECT_FALSE(r.content_length) << "Transfer-Encoding overrides Content-Length";
    EXPECT_TRUE(r.complete()) << "pieces of " << piece;
    EXPECT_EQ(r.body_prefix, "hello world") << piece;
    EXPECT_EQ(r.body_bytes, 11u) << piece;
    EXPECT_EQ(r.extra_bytes, 0u) << piece;
    EXPECT_EQ(r.end, demo::read_end::none) << "it stops at the last chunk, not at EOF";
  }
  const auto bad = read_in_pieces("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 4);
  EXPECT_FALSE(bad.complete());
  EXPECT_EQ(bad.end, demo::read_end::eof);
}
