// Replays every input of fuzz/corpus/ and fuzz/regressions/ for fuzz_http and
// fuzz_replay through the same harness as the libFuzzer targets
// (tests/support/http_fuzz_input.hpp, replay_fuzz_input.hpp), against the
// real HTTP and echo sessions on loopback, in the everyday gcc build. Then
// the same harness against deliberately broken sessions, so that a passing
// replay means something.

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <filesystem>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "../support/fuzz_inputs.hpp"
#include "../support/http_fuzz_input.hpp"
#include "../support/replay_fuzz_input.hpp"

namespace closewise::test {
namespace {

namespace fs = std::filesystem;

const fs::path fuzz_dir{CLOSEWISE_FUZZ_DIR};

std::vector<fs::path> inputs_of(const std::string& target) {
  const auto all = inputs_by_target(fuzz_dir);
  const auto it = all.find(target);
  return it == all.end() ? std::vector<fs::path>{} : it->second;
}

// Runs every input of `name` through a fresh `Target`; the inputs run.
template <class Target>
std::size_t replay_all(const std::string& name) {
  const auto files = inputs_of(name);
  Target target;
  for (const auto& file : files) {
    const auto bytes = read_bytes(file);
    const auto failure = target.run(bytes.data(), bytes.size());
    EXPECT_FALSE(failure.has_value()) << file << ": " << failure.value_or("");
  }
  return files.size();
}

TEST(http_fuzz_replay, every_corpus_and_regression_input_keeps_every_promise) {
  EXPECT_GE(replay_all<http_fuzz_target>("fuzz_http"), 8u) << "the seeds of fuzz/corpus/fuzz_http are missing";
}

// The oracle above accepts any documented status. Each seed of
// fuzz/corpus/fuzz_http was written for a purpose its name says; this table
// says which final statuses, in order, the seed must get, so that a seed that
// silently stopped reaching its case fails. A seed added without a row
// fails too. Timing-dependent seeds say so and accept their fast outcome.
struct seed_expectation {
  const char* seed;
  std::vector<unsigned> statuses;              // final responses, in order
  std::vector<std::vector<unsigned>> or_else;  // the other outcomes a timing-dependent seed may get
};

TEST(http_fuzz_replay, each_corpus_seed_gets_the_statuses_it_was_written_for) {
  const std::vector<seed_expectation> table = {
      {"body_over_limit_413", {413}, {}},
      {"chunked_post_in_three_pieces", {200}, {}},
      {"connection_close_then_more", {200}, {}},  // nothing answered behind Connection: close
      {"expect_continue_then_body", {200}, {}},   // the interim 100 is not a final response
      {"head_with_unsupported_expect_417", {417}, {}},
      {"http10_and_missing_host", {200}, {}},  // HTTP/1.0 needs no Host
      {"long_request_line_414", {414}, {}},
      {"not_found_and_not_allowed", {404, 405, 400, 200}, {}},
      {"oversized_header_431", {431}, {}},
      {"pipelined_after_refusal", {400}, {}},  // the request behind the refusal is not answered
      {"pipelined_get_bytes_head", {200, 200, 200}, {}},
      // Reads until the server is quiet for 2 ms, then resets: a loaded
      // machine may be quiet for 2 ms before the second response or the first.
      {"read_then_reset_keepalive", {200, 200}, {{200}, {}}},
      {"reset_mid_response", {}, {}},  // resets right after sending: reads nothing
      // A 25 ms pause against the 20 ms request timeout: a server thread kept
      // off the CPU past the pause sees the whole request first.
      {"slow_header_408", {408}, {{200}}},
      {"unknown_method_501", {501}, {}},
      {"valid_get", {200}, {}},
  };
  const auto files = inputs_of("fuzz_http");
  http_fuzz_target target;
  std::size_t seeds = 0;
  for (const auto& file : files) {
    if (file.parent_path().parent_path().filename() != "corpus") continue;  // regressions have no row
    ++seeds;
    const auto name = file.filename().string();
    const auto bytes = read_bytes(file);
    const auto failure = target.run(bytes.data(), bytes.size());
    EXPECT_FALSE(failure.has_value()) << name << ": " << failure.value_or("");
    const auto& got = target.last_statuses();
    const auto row = std::find_if(table.begin(), table.end(), [&](const auto& e) { return name == e.seed; });
    if (row == table.end()) {
      ADD_FAILURE() << name << ": a seed without a row in this table; it got " << ::testing::PrintToString(got);
      continue;
    }
    EXPECT_TRUE(got == row->statuses || std::find(row->or_else.begin(), row->or_else.end(), got) != row->or_else.end())
        << name << ": got " << ::testing::PrintToString(got) << ", written for "
        << ::testing::PrintToString(row->statuses);
  }
  EXPECT_EQ(seeds, table.size()) << "rows for seeds that are gone";
}

TEST(replay_fuzz_replay, every_corpus_and_regression_input_keeps_every_promise) {
  EXPECT_GE(replay_all<replay_fuzz_target>("fuzz_replay"), 6u) << "the seeds of fuzz/corpus/fuzz_replay are missing";
}

// Every byte string is a valid input; the decoders keep to their bounds.
TEST(http_fuzz_replay, decoder_is_total_and_bounded) {
  const auto empty = decode_http_input(nullptr, 0);
  EXPECT_TRUE(empty.payload.empty());
  EXPECT_TRUE(empty.splits.empty());
  // Nine splits asked for (9 % 9 == 0): none; eight: all pauses capped in total.
  std::vector<std::uint8_t> in{1, 8};
  for (int i = 0; i < 8; ++i) in.insert(in.end(), {0, static_cast<std::uint8_t>(i), 255});
  in.insert(in.end(), 20, 'x');
  const auto p = decode_http_input(in.data(), in.size());
  ASSERT_EQ(p.splits.size(), 8u);
  std::chrono::microseconds total{0};
  for (std::size_t i = 0; i < p.splits.size(); ++i) {
    EXPECT_LE(p.splits[i].at, p.payload.size());
    if (i > 0) {
      EXPECT_LE(p.splits[i - 1].at, p.splits[i].at);
    }
    total += p.splits[i].pause;
  }
  EXPECT_EQ(total, max_http_fuzz_pause);
  EXPECT_EQ(p.payload, std::string(20, 'x'));
  const std::vector<std::uint8_t> huge(max_replay_steps * 4, 1);
  EXPECT_EQ(decode_replay_input(huge.data(), huge.size()).size(), max_replay_steps);
}

// The response checker: what it must accept, and what it must not.
TEST(http_fuzz_replay, response_checker_tells_framed_responses_from_the_rest) {
  const std::string ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
  const auto two = parse_responses(ok + "HTTP/1.1 100 Continue\r\n\r\n" + ok, {});
  EXPECT_FALSE(two.error);
  EXPECT_EQ(two.responses.size(), 3u);
  EXPECT_EQ(two.final_count, 2u);
  EXPECT_EQ(two.leftover, 0u);
  // HEAD: the length announces a body that is not there.
  const auto head = parse_responses("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n" + ok, {true, false});
  EXPECT_FALSE(head.error);
  EXPECT_EQ(head.final_count, 2u);
  EXPECT_EQ(parse_responses(ok.substr(0, ok.size() - 1), {}).leftover, ok.size() - 1);
  EXPECT_TRUE(parse_responses("HTTP/1.1 200 OK\r\n\r\nbody until EOF", {}).error);
  EXPECT_TRUE(parse_responses("garbage\r\n\r\n", {}).error);
}

// ---- the oracles fail on broken servers -------------------------------------

// A session that refuses the first request (400, Connection: close) and then
// answers a pipelined one anyway: what a server that keeps parsing after a
// refusal does.
asio::awaitable<void> answers_after_refusing(connection& c) {
  std::array<char, 4096> buf;
  auto [ec, n] = co_await c.read_some(asio::buffer(buf));
  if (n == 0) co_return;
  constexpr std::string_view answers =
      "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
      "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
  co_await c.write(asio::buffer(answers));
}

// Mode 0 (half-close), no splits, then a request.
std::vector<std::uint8_t> http_input(std::string_view request) {
  // Sized first, then copied: g++ 12 at -O3 warns on inserting into the
  // two-byte vector (-Warray-bounds, a false positive).
  std::vector<std::uint8_t> in(2 + request.size(), 0);
  std::copy(request.begin(), request.end(), in.begin() + 2);
  return in;
}

TEST(http_fuzz_replay, oracle_catches_an_answer_after_a_refusal) {
  http_fuzz_target target(answers_after_refusing);
  const auto in = http_input("GET / HTTP/1.1\r\nHost: f\r\n\r\nGET / HTTP/1.1\r\nHost: f\r\n\r\n");
  const auto failure = target.run(in.data(), in.size());
  ASSERT_TRUE(failure.has_value());
  EXPECT_NE(failure->find("after a response that closed the connection"), std::string::npos) << *failure;
}

// A session that cuts the body of its answer short: the response is incomplete at EOF.
asio::awaitable<void> truncates_its_answer(connection& c) {
  std::array<char, 4096> buf;
  auto [ec, n] = co_await c.read_some(asio::buffer(buf));
  if (n == 0) co_return;
  constexpr std::string_view answer = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf";
  co_await c.write(asio::buffer(answer));
}

TEST(http_fuzz_replay, oracle_catches_a_truncated_response) {
  http_fuzz_target target(truncates_its_answer);
  const auto in = http_input("GET / HTTP/1.1\r\nHost: f\r\n\r\n");
  const auto failure = target.run(in.data(), in.size());
  ASSERT_TRUE(failure.has_value());
  EXPECT_NE(failure->find("incomplete response"), std::string::npos) << *failure;
}

// A session that says Connection: close and then keeps the connection open
// until the client gives up.
asio::awaitable<void> closes_only_when_the_client_does(connection& c) {
  std::array<char, 4096> buf;
  auto [ec, n] = co_await c.read_some(asio::buffer(buf));
  if (n == 0) co_return;
  constexpr std::string_view answer = "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
  if (co_await c.write(asio::buffer(answer))) co_return;
  while (!ec) std::tie(ec, n) = co_await c.read_some(asio::buffer(buf));
}

TEST(http_fuzz_replay, oracle_catches_a_closing_response_without_a_fin) {
  http_fuzz_target target(closes_only_when_the_client_does);
  const std::string request = "GET / HTTP/1.1\r\nHost: f\r\n\r\n";
  // Read until quiet, then RST: the client never sends its FIN. One split at
  // the end with the longest pause (25 ms, reading): the response is in
  // before the 2 ms of quiet are judged, however loaded the machine.
  std::vector<std::uint8_t> in{2, 1, 0, static_cast<std::uint8_t>(request.size()), 255};
  in.insert(in.end(), request.begin(), request.end());
  const auto failure = target.run(in.data(), in.size());
  ASSERT_TRUE(failure.has_value());
  EXPECT_NE(failure->find("no FIN"), std::string::npos) << *failure;
}

// An echo that drops the last byte of every piece it reads.
asio::awaitable<void> lossy_echo(connection& c) {
  std::array<char, 4096> buf;
  for (;;) {
    auto [ec, n] = co_await c.read_some(asio::buffer(buf));
    if (n > 1 && co_await c.write(asio::buffer(buf.data(), n - 1))) co_return;
    if (ec) co_return;
  }
}

// An echo that never ends the connection after the peer's FIN (the CLOSE_WAIT
// leak of Beast's awaitable example, without its 30 s timer).
asio::awaitable<void> never_closes(connection& c) {
  std::array<char, 4096> buf;
  for (;;) {
    auto [ec, n] = co_await c.read_some(asio::buffer(buf));
    if (n > 0 && co_await c.write(asio::buffer(buf.data(), n))) co_return;
    if (ec) break;
  }
  asio::steady_timer forever(c.io().get_executor(), std::chrono::hours(1));
  co_await forever.async_wait(asio::use_awaitable);
}

// open echo (slot 0), send 100 bytes, finish.
constexpr std::array<std::uint8_t, 5> echo_100_then_finish{0, 0, 1, 100, 8};

asio::awaitable<void> unused_http(connection&) { co_return; }

TEST(replay_fuzz_replay, oracle_catches_an_echo_that_loses_bytes) {
  replay_fuzz_target target(lossy_echo, unused_http);
  const auto failure = target.run(echo_100_then_finish.data(), echo_100_then_finish.size());
  ASSERT_TRUE(failure.has_value());
  EXPECT_NE(failure->find("echo"), std::string::npos) << *failure;
}

TEST(replay_fuzz_replay, oracle_catches_a_server_that_never_closes_after_the_peer_fin) {
  replay_fuzz_target target(never_closes, unused_http);
  const auto failure = target.run(echo_100_then_finish.data(), echo_100_then_finish.size());
  ASSERT_TRUE(failure.has_value());
  EXPECT_NE(failure->find("did not end the connection"), std::string::npos) << *failure;
}

}  // namespace
}  // namespace closewise::test
