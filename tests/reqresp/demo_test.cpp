// Every closewise-demo scenario as a loopback test: the very code the demo
// runs, against an in-process closewise-reqresp, repeated to show it is not
// timing-lucky (CLOSEWISE_TEST_REPS overrides the count); then the same for
// the TLS scenarios (closewise-demo --tls).

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "closewise/server.hpp"
#include "demo/scenarios.hpp"
#include "reqresp/http_session.hpp"

using namespace closewise;
using namespace closewise::demo;

namespace {

int repetitions() {
  if (const char* env = std::getenv("CLOSEWISE_TEST_REPS")) return std::max(1, std::atoi(env));
  return 10;
}

// Runs scenario n `repetitions()` times; every run must match its
// expectation. Returns the last result for scenario-specific checks.
// The TLS rows: 10 times, fewer if CLOSEWISE_TEST_REPS says fewer (never
// more: the sanitizer presets' 100 would make row 8's one-second linger
// alone take minutes).
int tls_repetitions() { return std::min(10, repetitions()); }

scenario_result run_repeatedly(int n, const options& opts = {}) {
  scenario_result last;
  const int reps = opts.tls ? tls_repetitions() : repetitions();
  for (int i = 0; i < reps; ++i) {
    last = run_scenario(n, opts);
    EXPECT_TRUE(last.matches) << (opts.tls ? "TLS " : "") << "scenario " << n << ", run " << i << ": " << last.mismatch;
    if (!last.matches) break;
  }
  EXPECT_FALSE(last.skipped);
  return last;
}

TEST(demo, s1_client_resets_after_the_whole_response_is_safe) {
  const auto r = run_repeatedly(1);
  EXPECT_FALSE(r.data_lost);
  EXPECT_EQ(r.received_bytes, r.expected_bytes);
  EXPECT_EQ(r.expected_bytes, options{}.size);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::peer_reset_idle);
  EXPECT_EQ(r.time_wait, time_wait_holder::none);
}

TEST(demo, s2_client_closes_after_the_whole_response_and_keeps_time_wait) {
  const auto r = run_repeatedly(2);
  EXPECT_FALSE(r.data_lost);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::peer_fin_then_ours);
  EXPECT_EQ(r.time_wait, time_wait_holder::client);
}

TEST(demo, s3_client_reset_mid_response_fails_the_servers_write) {
  const auto r = run_repeatedly(3);
  EXPECT_TRUE(r.data_lost);
  EXPECT_LT(r.received_bytes, r.expected_bytes);
  EXPECT_EQ(r.expected_bytes, unbufferable_size(options{}.size));
  ASSERT_TRUE(r.server_report);
  EXPECT_TRUE(r.server_report->cause == close_cause::peer_reset_mid_exchange ||
              r.server_report->cause == close_cause::broken_pipe)
      << to_string(r.server_report->cause);
  EXPECT_LT(r.server_report->bytes_out, r.expected_bytes);
  EXPECT_EQ(r.time_wait, time_wait_holder::none);
}

TEST(demo, s4_fin_close_with_unread_pipelined_bytes_loses_data) {
  const auto r = run_repeatedly(4);
  EXPECT_TRUE(r.data_lost);
  EXPECT_EQ(r.expected_bytes, unbufferable_size(options{}.size));
  EXPECT_EQ(r.client_end, read_end::reset);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::local_fin_close);
  EXPECT_TRUE(r.server_report->kernel_reset());
  EXPECT_EQ(r.time_wait, time_wait_holder::none);
}

TEST(demo, s5_graceful_close_with_unread_pipelined_bytes_delivers_everything) {
  const auto r = run_repeatedly(5);
  EXPECT_FALSE(r.data_lost);
  EXPECT_EQ(r.received_bytes, r.expected_bytes);
  EXPECT_EQ(r.client_end, read_end::eof);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::ours_then_peer_fin);
  EXPECT_GT(r.server_report->bytes_discarded, 0u);
  EXPECT_EQ(r.time_wait, time_wait_holder::server);
}

TEST(demo, s6_abortive_close_after_the_response_loses_data) {
  const auto r = run_repeatedly(6);
  EXPECT_TRUE(r.data_lost);
  EXPECT_EQ(r.client_end, read_end::reset);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::local_abort);
  EXPECT_TRUE(r.server_report->rst_sent);
  EXPECT_EQ(r.time_wait, time_wait_holder::none);
}

TEST(demo, s7_rst_if_safe_resets_only_once_everything_is_acknowledged) {
  const auto r = run_repeatedly(7);
  EXPECT_FALSE(r.data_lost);
  EXPECT_EQ(r.received_bytes, r.expected_bytes);
  EXPECT_EQ(r.client_end, read_end::reset);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::safe_reset);
  EXPECT_EQ(r.server_report->unacked_at_close, 0u);
  EXPECT_EQ(r.time_wait, time_wait_holder::none);
}

TEST(demo, s8_half_closed_client_still_gets_the_whole_response) {
  const auto r = run_repeatedly(8);
  EXPECT_FALSE(r.data_lost);
  EXPECT_EQ(r.client_end, read_end::eof);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::peer_fin_then_ours);
  EXPECT_EQ(r.time_wait, time_wait_holder::client);
}

TEST(demo, s9_body_over_the_limit_reads_the_whole_413_then_eof) {
  const auto r = run_repeatedly(9);
  EXPECT_EQ(r.status, 413);
  EXPECT_FALSE(r.data_lost);
  EXPECT_EQ(r.client_end, read_end::eof);
  ASSERT_TRUE(r.server_report);
  EXPECT_FALSE(r.server_report->rst_sent);
  EXPECT_EQ(r.server_report->cause, close_cause::ours_then_peer_fin);
  EXPECT_EQ(r.time_wait, time_wait_holder::server);
}

// --target: our own server, addressed as if it were someone else's (nginx):
// the scenarios that need the server's teardown policy are skipped with a
// reason; the others hold from the client's side and the kernel's.
TEST(demo, target_mode_runs_what_does_not_need_the_servers_policy) {
  server_options so;
  so.listen = {"127.0.0.1:0"};
  so.threads = 1;
  reqresp::http_server target(so, {});
  options opts;
  opts.target = target.endpoint();
  for (const auto& r : run_all(opts)) {
    if (r.number == 4 || r.number == 6 || r.number == 7) {
      EXPECT_TRUE(r.skipped) << "scenario " << r.number;
      EXPECT_FALSE(r.skip_reason.empty());
      continue;
    }
    EXPECT_FALSE(r.skipped) << "scenario " << r.number;
    EXPECT_TRUE(r.matches) << "scenario " << r.number << ": " << r.mismatch;
    EXPECT_FALSE(r.server_report) << "an external server leaves no report";
  }
}

// ---- closewise-demo --tls -------------------------------------------------

options tls_options() {
  options o;
  o.tls = true;
  return o;
}

// The server's TLS facts of a TLS scenario's connection.
const tls_facts& server_tls(const scenario_result& r) {
  static const tls_facts none;
  return r.server_report && r.server_report->tls ? *r.server_report->tls : none;
}

TEST(demo_tls, t1_client_reset_after_the_whole_response_is_safe) {
  const auto r = run_repeatedly(1, tls_options());
  EXPECT_FALSE(r.data_lost);
  EXPECT_EQ(r.received_bytes, options{}.size);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::peer_reset_idle);
  EXPECT_EQ(server_tls(r).handshake, tls_handshake::ok);
  EXPECT_EQ(server_tls(r).peer_end, tls_ending::reset);
  EXPECT_FALSE(server_tls(r).close_notify_sent);
  EXPECT_EQ(r.time_wait, time_wait_holder::none);
}

TEST(demo_tls, t2_close_notify_then_fin_is_a_clean_end_both_ways) {
  const auto r = run_repeatedly(2, tls_options());
  EXPECT_FALSE(r.data_lost);
  EXPECT_EQ(r.client_end, read_end::close_notify);
  EXPECT_EQ(r.after_close_notify, read_end::eof);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::peer_fin_then_ours);
  EXPECT_EQ(server_tls(r).peer_end, tls_ending::close_notify);
  EXPECT_TRUE(server_tls(r).close_notify_sent);
  EXPECT_TRUE(server_tls(r).close_notify_received);
  EXPECT_EQ(r.time_wait, time_wait_holder::client);
}

TEST(demo_tls, t3_fin_without_close_notify_mid_body_is_truncated) {
  const auto r = run_repeatedly(3, tls_options());
  EXPECT_EQ(r.status, 0) << "a cut request is not answered";
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(server_tls(r).peer_end, tls_ending::truncated);
  EXPECT_FALSE(server_tls(r).close_notify_received);
  EXPECT_EQ(r.client_end, read_end::close_notify);
  EXPECT_EQ(r.time_wait, time_wait_holder::client);
}

TEST(demo_tls, t4_fin_close_with_an_unread_pipelined_record_loses_data) {
  const auto r = run_repeatedly(4, tls_options());
  EXPECT_TRUE(r.data_lost);
  EXPECT_EQ(r.client_end, read_end::reset);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::local_fin_close);
  EXPECT_TRUE(r.server_report->kernel_reset());
  EXPECT_TRUE(server_tls(r).close_notify_sent) << "sent, and destroyed by the kernel's RST";
}

TEST(demo_tls, t5_graceful_close_with_an_unread_pipelined_record_delivers_everything) {
  const auto r = run_repeatedly(5, tls_options());
  EXPECT_FALSE(r.data_lost);
  EXPECT_EQ(r.received_bytes, unbufferable_size(options{}.size));
  EXPECT_EQ(r.client_end, read_end::close_notify);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::ours_then_peer_fin);
  EXPECT_GT(server_tls(r).app_bytes_discarded, 0u);
  EXPECT_EQ(server_tls(r).peer_end, tls_ending::close_notify);
  EXPECT_EQ(r.time_wait, time_wait_holder::server);
}

TEST(demo_tls, t6_abortive_close_sends_no_close_notify_and_loses_data) {
  const auto r = run_repeatedly(6, tls_options());
  EXPECT_TRUE(r.data_lost);
  EXPECT_EQ(r.client_end, read_end::reset);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::local_abort);
  EXPECT_FALSE(server_tls(r).close_notify_sent);
  EXPECT_EQ(r.time_wait, time_wait_holder::none);
}

TEST(demo_tls, t7_rst_if_safe_resets_after_close_notify_once_everything_is_acknowledged) {
  const auto r = run_repeatedly(7, tls_options());
  EXPECT_FALSE(r.data_lost);
  EXPECT_EQ(r.client_end, read_end::close_notify);
  EXPECT_EQ(r.after_close_notify, read_end::reset);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::safe_reset);
  EXPECT_EQ(r.server_report->refusal, reset_refusal::none);
  EXPECT_TRUE(server_tls(r).close_notify_sent);
}

TEST(demo_tls, t8_a_peer_that_never_answers_close_notify_is_cut_at_the_linger_bound) {
  const auto r = run_repeatedly(8, tls_options());
  EXPECT_FALSE(r.data_lost);
  ASSERT_TRUE(r.server_report);
  EXPECT_EQ(r.server_report->cause, close_cause::linger_timeout);
  EXPECT_TRUE(r.server_report->rst_sent);
  // A lower bound only: the server waited its linger time, no less.
  EXPECT_GE(r.server_report->drain_time, silent_peer_linger);
  EXPECT_TRUE(server_tls(r).close_notify_sent);
  EXPECT_FALSE(server_tls(r).close_notify_received);
  EXPECT_EQ(r.time_wait, time_wait_holder::none);
}

TEST(demo_tls, run_all_runs_the_eight_tls_scenarios_in_order) {
  const auto rows = run_all(tls_options());
  ASSERT_EQ(rows.size(), static_cast<std::size_t>(tls_scenario_count));
  for (std::size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].number, static_cast<int>(i) + 1);
    EXPECT_TRUE(rows[i].matches) << "TLS scenario " << rows[i].number << ": " << rows[i].mismatch;
    EXPECT_FALSE(rows[i].skipped);
  }
}

}  // namespace
