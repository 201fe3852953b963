// Which per-operation timeout guards the read that follows a completed write:
// the shape of every request/response session (echo, HTTP keep-alive). The
// exchange is complete once the answer is written, so the next read waits
// for a *new* exchange and must be bounded by idle_timeout (stream.hpp:
// "A read waiting for a new exchange (no input unanswered, no write in
// flight)"). A silent peer, port 0, a bounded run_until.

#include <gtest/gtest.h>

#include <optional>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "../support/loopback.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;

namespace {

constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

struct read_outcome {
  bool done = false;
  error_code ec;
  std::chrono::steady_clock::time_point started{};
  std::chrono::steady_clock::time_point ended{};
};

// Answer, then wait for the next request: the read starts in the write's continuation.
asio::awaitable<void> answer_then_wait(tcp_stream& s, bool yield_first, read_outcome& out) {
  auto [wec, wn] = co_await asio::async_write(s, asio::buffer(std::string("answer")), use_tuple);
  if (wec) co_return;
  // The control case: one trip through the io_context before reading.
  if (yield_first) co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
  out.started = std::chrono::steady_clock::now();
  std::array<char, 64> buf;
  auto [ec, n] = co_await s.async_read_some(asio::buffer(buf), use_tuple);
  out.ec = ec;
  out.ended = std::chrono::steady_clock::now();
  out.done = true;
}

class idle_after_write : public ::testing::TestWithParam<bool> {};

TEST_P(idle_after_write, read_after_a_completed_write_is_bounded_by_idle_timeout) {
  asio::io_context ioc;
  loopback_pair_factory f(ioc);
  auto peer = f.connect();  // sends nothing, ever
  stream_options o;
  o.idle_timeout = 200ms;  // read_timeout and write_timeout stay 0: no limit
  auto s = f.accept(o);
  read_outcome out;
  asio::co_spawn(ioc, answer_then_wait(s, GetParam(), out), asio::detached);
  const bool ended = run_until(
      ioc, [&] { return out.done; }, 3s);
  ASSERT_TRUE(ended) << "the read after the write was never timed out (idle_timeout 200 ms, read_timeout 0)";
  EXPECT_EQ(out.ec, asio::error::timed_out) << out.ec.message();
  EXPECT_LT(out.ended - out.started, 2s);
  // Nor before its time. The stream may start the idle clock from a reading
  // taken as the write completed, a little before `started`: 50 ms of
  // allowance for that handler's turn on a loaded machine.
  EXPECT_GE(out.ended - out.started, 150ms);
  // The timeout that fired is the idle one, not the (unlimited) read timeout.
  std::optional<close_report> rep;
  s.async_close(close_policy::abortive, [&](close_report r) { rep = std::move(r); });
  ASSERT_TRUE(run_until(
      ioc, [&] { return rep.has_value(); }, 3s));
  EXPECT_EQ(rep->timeout, timeout_kind::idle) << rep->describe();
}

// false: the read starts inline, in the write's completion (what a coroutine
// session does); true: after one post (the control).
INSTANTIATE_TEST_SUITE_P(read_start, idle_after_write, ::testing::Values(false, true), [](const auto& info) {
  return info.param ? "after_a_post" : "inline_in_the_write_completion";
});

}  // namespace
