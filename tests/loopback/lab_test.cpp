// The eight kernel experiments (docs/design.md, "the eight kernel experiments"
// table), through the very functions closewise-lab runs.
//
// Each test asserts the row's verdict and, separately, the concrete
// observations behind it (errno names, byte counts, TCP states, close
// reports), so a verdict computed from the wrong facts cannot pass. The TCP
// rows run over IPv4 and IPv6 (skipped where ::1 is unavailable).

#include <gtest/gtest.h>

#include <string>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../support/loopback.hpp"
#include "lab/experiments.hpp"

namespace {

namespace lab = closewise::lab;
using closewise::test::ipv6_available;

// Prints the whole row when an assertion fails: what was seen says why.
std::string dump(const lab::row& r) {
  std::string out = "row " + std::to_string(r.number) + " (" + r.name + ")\n";
  for (const auto* list : {&r.observed, &r.states}) {
    for (const auto& o : *list) out += "  " + std::string(lab::to_string(o.by)) + " " + o.key + " = " + o.value + "\n";
  }
  out += "  mismatch: " + r.mismatch;
  return out;
}

void expect_row(const lab::row& r, int number) {
  EXPECT_EQ(r.number, number);
  EXPECT_FALSE(r.name.empty());
  EXPECT_FALSE(r.done.empty());
  EXPECT_FALSE(r.expected.empty());
  EXPECT_TRUE(r.matches) << dump(r);
  EXPECT_TRUE(r.mismatch.empty()) << dump(r);
}

TEST(lab_raw, row1_socketpair_send_gets_epipe_at_once) {
  const lab::row r = lab::socketpair_closed_reader({});
  expect_row(r, 1);
  EXPECT_EQ(r.value("reader"), "closed") << dump(r);
  EXPECT_EQ(r.value("send"), "EPIPE") << dump(r);
  EXPECT_TRUE(r.states.empty()) << dump(r);
}

TEST(lab_raw, row2_pipe_write_gets_epipe_at_once) {
  const lab::row r = lab::pipe_closed_reader({});
  expect_row(r, 2);
  EXPECT_EQ(r.value("sigpipe"), "ignored") << dump(r);
  EXPECT_EQ(r.value("write"), "EPIPE") << dump(r);
}

class lab_tcp : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam() && !ipv6_available()) GTEST_SKIP() << "no IPv6 loopback on this machine";
    opts_.ipv6 = GetParam();
  }
  lab::options opts_;
};

TEST_P(lab_tcp, row3_peer_close_first_send_ok_second_epipe) {
  const lab::row r = lab::peer_close_then_send_twice(opts_);
  expect_row(r, 3);
  EXPECT_EQ(r.value("ours_before"), "CLOSE_WAIT") << dump(r);
  EXPECT_EQ(r.value("peer_before"), "FIN_WAIT2") << dump(r);
  EXPECT_EQ(r.count("send_1"), 6u) << dump(r);
  EXPECT_EQ(r.value("answer"), "RST") << dump(r);
  EXPECT_EQ(r.value("ours_after_rst"), "CLOSE") << dump(r);
  EXPECT_EQ(r.value("peer_after_rst"), "gone") << dump(r);
  EXPECT_EQ(r.value("send_2"), "EPIPE") << dump(r);
  EXPECT_EQ(r.value("report_cause"), "broken_pipe") << dump(r);
  EXPECT_EQ(r.value("final_state"), "CLOSE") << dump(r);
}

TEST_P(lab_tcp, row4_peer_shutdown_read_eof_then_send_reaches_peer) {
  const lab::row r = lab::peer_shutdown_then_read_and_send(opts_);
  expect_row(r, 4);
  EXPECT_EQ(r.count("sent"), 8u) << dump(r);
  EXPECT_EQ(r.count("read_bytes"), 8u) << dump(r);
  EXPECT_EQ(r.value("read_end"), "EOF") << dump(r);
  EXPECT_EQ(r.value("read_state"), "peer_fin") << dump(r);
  EXPECT_EQ(r.value("phase"), "remote_half_closed") << dump(r);
  EXPECT_EQ(r.count("send"), 9u) << dump(r);
  EXPECT_EQ(r.count("received"), 9u) << dump(r);
  for (const char* key : {"ours_before", "ours_after"}) EXPECT_EQ(r.value(key), "CLOSE_WAIT") << key << dump(r);
  for (const char* key : {"peer_before", "peer_after"}) EXPECT_EQ(r.value(key), "FIN_WAIT2") << key << dump(r);
  EXPECT_EQ(r.value("report_cause"), "peer_fin_then_ours") << dump(r);
}

TEST_P(lab_tcp, row5_our_shutdown_then_send_gets_epipe) {
  const lab::row r = lab::our_shutdown_then_send(opts_);
  expect_row(r, 5);
  EXPECT_EQ(r.value("shutdown"), "ok") << dump(r);
  EXPECT_EQ(r.value("send"), "EPIPE") << dump(r);
  EXPECT_EQ(r.value("recv"), "0") << dump(r);
  EXPECT_EQ(r.value("ours"), "FIN_WAIT2") << dump(r);
  EXPECT_EQ(r.value("peer"), "CLOSE_WAIT") << dump(r);
}

TEST_P(lab_tcp, row6_peer_abort_send_gets_econnreset_and_no_time_wait) {
  const lab::row r = lab::peer_abortive_close(opts_);
  expect_row(r, 6);
  EXPECT_EQ(r.value("a_close"), "RST") << dump(r);
  EXPECT_EQ(r.value("a_ours"), "CLOSE") << dump(r);
  EXPECT_EQ(r.value("a_peer"), "gone") << dump(r);
  EXPECT_EQ(r.value("a_send"), "ECONNRESET") << dump(r);
  EXPECT_EQ(r.value("a_send_again"), "EPIPE") << dump(r);
  // The write that met the RST was output in flight: a mid-exchange reset.
  EXPECT_EQ(r.value("a_cause"), "peer_reset_mid_exchange") << dump(r);
  EXPECT_EQ(r.value("b_read"), "ECONNRESET") << dump(r);
  EXPECT_EQ(r.value("b_send"), "EPIPE") << dump(r);
  // Nothing of either connection is left in the kernel: not even TIME_WAIT.
  EXPECT_EQ(r.value("a_sockets"), "none") << dump(r);
  EXPECT_EQ(r.value("b_sockets"), "none") << dump(r);
}

TEST_P(lab_tcp, row7_close_with_unread_input_resets_unless_lingering) {
  const lab::row r = lab::close_with_unread_input(opts_);
  expect_row(r, 7);
  const std::uint64_t body = opts_.response_bytes;
  const std::uint64_t next_request = std::string("GET /next HTTP/1.1\r\nHost: lab\r\n\r\n").size();
  for (const std::string v : {"plain", "fin_close"}) {
    SCOPED_TRACE(v);
    EXPECT_EQ(r.count(v + "_unread"), next_request) << dump(r);
    EXPECT_EQ(r.count(v + "_unread_at_close"), next_request) << dump(r);
    EXPECT_EQ(r.value(v + "_kernel_reset"), "yes") << dump(r);
    ASSERT_TRUE(r.count(v + "_client_bytes").has_value()) << dump(r);
    EXPECT_LT(*r.count(v + "_client_bytes"), body) << dump(r);
    EXPECT_EQ(r.value(v + "_client_end"), "ECONNRESET") << dump(r);
    EXPECT_EQ(r.value(v + "_client_after"), "CLOSE") << dump(r);
  }
  EXPECT_EQ(r.value("plain_cause"), "local_error") << dump(r);
  EXPECT_EQ(r.value("plain_server_at_close"), "ESTABLISHED") << dump(r);
  // fin_close is shutdown(SHUT_WR) + close(): the FIN queued behind the body
  // (FIN_WAIT1) does not stop the kernel from answering the close with RST.
  EXPECT_EQ(r.value("fin_close_cause"), "local_fin_close") << dump(r);
  EXPECT_EQ(r.value("fin_close_server_at_close"), "FIN_WAIT1") << dump(r);
  // Lingering close: the unread request is drained, nothing of the body is lost.
  EXPECT_EQ(r.value("graceful_cause"), "ours_then_peer_fin") << dump(r);
  EXPECT_EQ(r.count("graceful_discarded"), next_request) << dump(r);
  EXPECT_EQ(r.count("graceful_unread_at_close"), 0u) << dump(r);
  EXPECT_EQ(r.value("graceful_kernel_reset"), "no") << dump(r);
  EXPECT_EQ(r.count("graceful_client_bytes"), body) << dump(r);
  EXPECT_EQ(r.value("graceful_client_end"), "EOF") << dump(r);
  EXPECT_EQ(r.value("graceful_server_after"), "TIME_WAIT") << dump(r);
}

TEST_P(lab_tcp, row8_reset_after_unread_data_bytes_then_reset_never_fin) {
  const lab::row r = lab::reset_after_unread_data(opts_);
  expect_row(r, 8);
  EXPECT_EQ(r.count("a_sent"), 1000u) << dump(r);
  EXPECT_EQ(r.value("a_ours"), "CLOSE") << dump(r);
  EXPECT_EQ(r.count("a_queued"), 1000u) << dump(r);
  EXPECT_EQ(r.count("a_read_bytes"), 1000u) << dump(r);
  EXPECT_EQ(r.value("a_read_end"), "ECONNRESET") << dump(r);
  EXPECT_EQ(r.value("a_read_again"), "ECONNRESET") << dump(r);
  EXPECT_EQ(r.value("a_read_state"), "reset") << dump(r);
  // 1000 bytes arrived that nothing answered: the reset came mid-exchange.
  EXPECT_EQ(r.value("a_classify_eof"), "peer_reset_mid_exchange") << dump(r);
  EXPECT_EQ(r.value("a_cause"), "peer_reset_mid_exchange") << dump(r);
  EXPECT_EQ(r.value("a_fin"), "never") << dump(r);
  EXPECT_EQ(r.value("b_ours"), "CLOSE") << dump(r);
  EXPECT_EQ(r.count("b_recv_1"), 1000u) << dump(r);
  EXPECT_EQ(r.value("b_recv_2"), "ECONNRESET") << dump(r);
  EXPECT_EQ(r.value("b_recv_3"), "0") << dump(r);
}

INSTANTIATE_TEST_SUITE_P(family, lab_tcp, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "ipv6" : "ipv4"; });

TEST(lab_all, run_all_yields_eight_matching_rows_in_order) {
  const auto rows = lab::run_all({});
  ASSERT_EQ(rows.size(), static_cast<std::size_t>(lab::row_count));
  for (int n = 1; n <= lab::row_count; ++n) {
    EXPECT_EQ(rows[static_cast<std::size_t>(n - 1)].number, n);
    EXPECT_TRUE(rows[static_cast<std::size_t>(n - 1)].matches) << dump(rows[static_cast<std::size_t>(n - 1)]);
  }
}

TEST(lab_all, unknown_row_is_a_mismatch_not_a_crash) {
  const lab::row r = lab::run_one(9, {});
  EXPECT_FALSE(r.matches);
  EXPECT_NE(r.mismatch.find("no experiment 9"), std::string::npos) << r.mismatch;
}

// The verdict comes from what was observed, not from the row's number: a
// response small enough to sit whole in the client's receive queue before the
// RST is not truncated, and row 7 must then say it does not match, and why.
TEST(lab_all, row7_with_a_response_that_fits_the_client_window_does_not_match) {
  lab::options opts;
  opts.response_bytes = 16 * 1024;
  const lab::row r = lab::close_with_unread_input(opts);
  EXPECT_FALSE(r.matches) << dump(r);
  EXPECT_NE(r.mismatch.find("got the whole body (16384 B)"), std::string::npos) << dump(r);
  EXPECT_EQ(r.count("plain_client_bytes"), 16384u) << dump(r);
  EXPECT_EQ(r.value("plain_client_end"), "ECONNRESET") << dump(r);  // the RST still came
  EXPECT_EQ(r.value("plain_kernel_reset"), "yes") << dump(r);
  // With shutdown(SHUT_WR) first and nothing left unsent, the FIN reaches the
  // client before the close's RST, and Linux reports the FIN first: EOF.
  // Only a FIN still queued behind unsent bytes dies with them (the 4 MiB case).
  EXPECT_EQ(r.count("fin_close_client_bytes"), 16384u) << dump(r);
  EXPECT_EQ(r.value("fin_close_client_end"), "EOF") << dump(r);
  EXPECT_EQ(r.value("fin_close_kernel_reset"), "yes") << dump(r);
}

TEST(lab_all, row_lookups) {
  lab::row r;
  r.observed.push_back({lab::party::ours, "n", "n", "42 B"});
  r.observed.push_back({lab::party::ours, "bare", "bare", "0"});
  r.states.push_back({lab::party::peer, "s", "s", "CLOSE"});
  EXPECT_EQ(r.count("n"), 42u);
  EXPECT_EQ(r.count("bare"), 0u);
  EXPECT_EQ(r.count("s"), std::nullopt);
  EXPECT_EQ(r.count("missing"), std::nullopt);
  EXPECT_EQ(r.value("s"), "CLOSE");
  EXPECT_EQ(r.value("missing"), "");
  EXPECT_EQ(lab::errno_name(EPIPE), "EPIPE");
  EXPECT_EQ(lab::errno_name(ECONNRESET), "ECONNRESET");
}

}  // namespace
