// The echo session in-process, under closewise::server on 127.0.0.1:0 (and a
// Unix socket): half-close, many random connections, a peer that stops
// reading, every teardown policy. Peers are raw sockets driven by poll().
//
// CLOSEWISE_ECHO_SCALE (default 1) scales connection counts and sizes down
// for sanitizer builds.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <iostream>
#include <random>
#include <thread>

#include "closewise/server.hpp"
#include "echo/client.hpp"
#include "echo/sha256.hpp"
#include "echo_support.hpp"

using namespace closewise;
using namespace closewise::echo;
using namespace closewise::echo::test;
using namespace std::chrono_literals;

namespace {

// After every test: the descriptors this process had before it.
class echo_session_test : public ::testing::Test {
 protected:
  void SetUp() override { fds_ = fd_count(); }
  void TearDown() override { EXPECT_EQ(fd_count(), fds_) << "descriptors leaked"; }

 private:
  std::size_t fds_ = 0;
};

constexpr std::size_t cause_index(close_cause c) { return static_cast<std::size_t>(c); }

// muduo#366: a server that treats the peer's FIN as a full close loses the
// part of the echo still to be written.
TEST_F(echo_session_test, hundred_megabytes_then_shut_wr_come_back_whole_then_eof) {
  const std::uint64_t total = scaled(100'000'000, 16u << 20);
  running_echo_server s(local_options(1));
  const int fd = connect_tcp(s.port());
  ASSERT_GE(fd, 0);
  exchange_plan plan;
  plan.bytes = total;
  plan.seed = 366;
  const exchange_result r = run_exchange(fd, plan);
  ::close(fd);
  EXPECT_TRUE(r.sent_fin);
  EXPECT_EQ(r.sent, total);
  EXPECT_EQ(r.received, total);
  EXPECT_EQ(r.received_sha256, r.sent_sha256);
  EXPECT_TRUE(r.eof) << "error " << r.error;
  EXPECT_EQ(r.error, 0);

  ASSERT_TRUE(s.wait_closed(1));
  const close_report rep = s.reports().front();
  EXPECT_EQ(rep.cause, close_cause::peer_fin_then_ours) << rep.describe();
  EXPECT_EQ(rep.bytes_in, total);
  EXPECT_EQ(rep.bytes_out, total);
  EXPECT_EQ(rep.first_fin, side::peer);
  EXPECT_EQ(rep.time_wait, side::peer);
  EXPECT_FALSE(rep.rst_sent);
  EXPECT_FALSE(rep.kernel_reset());
  expect_no_half_closed_leftovers(s.port());
}

// Random sizes (log-uniform 1 KiB - 1 MiB, and three of 16-50 MiB), random
// chunks, random pauses, each half-closed after its last byte.
TEST_F(echo_session_test, thousand_random_connections_two_hundred_at_once_all_digests_match) {
  const std::size_t count = static_cast<std::size_t>(scaled(1000, 20));
  const std::size_t parallel = std::min<std::size_t>(200, count);
  std::mt19937_64 rng(20240404);
  const double lo = std::log(1024.0);
  const double hi = std::log(static_cast<double>(std::max<std::uint64_t>(scaled(1u << 20, 1u << 20 >> 4), 2048)));
  std::uniform_real_distribution<double> log_size(lo, hi);
  std::uniform_int_distribution<std::uint64_t> big_size(scaled(16u << 20, 1u << 20), scaled(50u << 20, 2u << 20));
  std::vector<std::uint64_t> sizes(count);
  for (auto& n : sizes) n = static_cast<std::uint64_t>(std::exp(log_size(rng)));
  // The big ones early, so that they overlap with the small ones.
  for (std::size_t i : {count / 10, count / 5, count * 3 / 10}) sizes[i] = big_size(rng);
  std::uint64_t total = 0;
  for (auto n : sizes) total += n;

  std::cout << "[ info     ] " << count << " connections, " << parallel << " at once, " << total
            << " bytes each way (CLOSEWISE_ECHO_SCALE " << scale() << ")\n";
  running_echo_server s(local_options(2));
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> mismatches{0};
  std::atomic<std::size_t> connect_failures{0};
  std::mutex mu;
  std::vector<std::string> failures;
  std::vector<std::thread> workers;
  for (std::size_t w = 0; w < parallel; ++w) {
    workers.emplace_back([&] {
      for (std::size_t i = next++; i < count; i = next++) {
        const int fd = connect_tcp(s.port());
        if (fd < 0) {
          ++connect_failures;
          continue;
        }
        exchange_plan plan;
        plan.bytes = sizes[i];
        plan.seed = i + 1;
        plan.rng_seed = i * 7919 + 3;
        plan.min_chunk = 1;
        plan.max_chunk = 128 * 1024;
        plan.pause_probability = 0.02;
        plan.max_pause = 2ms;
        const exchange_result r = run_exchange(fd, plan);
        ::close(fd);
        if (!r.matches() || r.sent != sizes[i]) {
          ++mismatches;
          std::lock_guard lock(mu);
          failures.push_back("connection " + std::to_string(i) + ": sent " + std::to_string(r.sent) + "/" +
                             std::to_string(sizes[i]) + " received " + std::to_string(r.received) +
                             " eof=" + std::to_string(r.eof) + " errno=" + std::to_string(r.error));
        }
      }
    });
  }
  for (auto& t : workers) t.join();
  EXPECT_EQ(connect_failures.load(), 0u);
  EXPECT_EQ(mismatches.load(), 0u);
  for (std::size_t i = 0; i < std::min<std::size_t>(failures.size(), 10); ++i) ADD_FAILURE() << failures[i];

  ASSERT_TRUE(s.wait_closed(count, 60s));
  const auto snap = s.get().stats().snapshot();
  EXPECT_EQ(snap.accepted, count);
  EXPECT_EQ(snap.open, 0u);
  EXPECT_EQ(snap.closed_by_cause[cause_index(close_cause::peer_fin_then_ours)], count);
  EXPECT_EQ(snap.bytes_in, total);
  EXPECT_EQ(snap.bytes_out, total);
  EXPECT_EQ(snap.rst_sent, 0u);
  EXPECT_EQ(snap.kernel_resets, 0u);
  expect_no_half_closed_leftovers(s.port());
}

// Envoy's "50 MiB through a paused reader": the peer keeps sending but stops
// reading (4 KiB receive buffer). The server must stop reading too instead of
// buffering the stream: it never holds more than one read (below the write
// high watermark), and every byte arrives once the peer reads again.
TEST_F(echo_session_test, peer_that_stops_reading_cannot_grow_server_memory_past_the_high_watermark) {
  // Bigger than every buffer on the way (both sockets' kernel buffers and the
  // session's), so that the sender cannot finish while nobody reads.
  const std::uint64_t total = scaled(50u << 20, 32u << 20);
  std::atomic<std::size_t> max_held{0};
  std::atomic<std::uint64_t> echoed{0};
  session_options so;
  so.on_held = [&max_held, &echoed](std::size_t held) {
    std::size_t seen = max_held.load();
    while (held > seen && !max_held.compare_exchange_weak(seen, held)) {
    }
    echoed += held;
  };
  const server_options o = local_options(1);
  const std::size_t high = o.write_high_watermark;
  ASSERT_LE(so.read_size, high);
  running_echo_server s(o, so);
  const std::uint64_t rss_before = rss_bytes();
  const int fd = connect_tcp(s.port(), 4096);
  ASSERT_GE(fd, 0);
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);

  // The sender: the plan's bytes in 64 KiB pieces, then SHUT_WR. It counts
  // the times the kernel refused its bytes for 50 ms (the window is shut).
  std::atomic<std::uint64_t> sent{0};
  std::atomic<std::uint64_t> stalls{0};
  std::atomic<bool> give_up{false};
  std::string sent_digest;
  std::thread sender([&] {
    seeded_bytes gen(50);
    sha256 h;
    std::vector<char> buf(64 * 1024);
    std::uint64_t left = total;
    const auto deadline = std::chrono::steady_clock::now() + 120s;
    while (left > 0 && !give_up && std::chrono::steady_clock::now() < deadline) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(left, buf.size()));
      gen.fill(buf.data(), n);
      h.update(buf.data(), n);
      std::size_t off = 0;
      while (off < n && !give_up && std::chrono::steady_clock::now() < deadline) {
        const ssize_t w = ::send(fd, buf.data() + off, n - off, MSG_NOSIGNAL);
        if (w > 0) {
          off += static_cast<std::size_t>(w);
          sent += static_cast<std::uint64_t>(w);
          continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EINTR) return;
        pollfd p{fd, POLLOUT, 0};
        if (::poll(&p, 1, 50) == 0) ++stalls;
      }
      left -= n;
    }
    sent_digest = to_hex(h.finish());
    ::shutdown(fd, SHUT_WR);
  });

  // Paused: wait (bounded) until the server echoed something and the sender
  // is held back by TCP flow control.
  const auto end = std::chrono::steady_clock::now() + 60s;
  while (!(echoed.load() > 0 && stalls.load() > 0) && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(5ms);  // polling conditions owned by the other threads, bounded
  }
  EXPECT_GT(echoed.load(), 0u) << "the server echoed nothing";
  EXPECT_GT(stalls.load(), 0u) << "the sender was never held back";
  EXPECT_LT(sent.load(), total) << "everything was sent although nobody read: the server buffered it all";
  EXPECT_LT(echoed.load(), total);
  EXPECT_LE(max_held.load(), so.read_size);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  // The sanitizers' allocators keep freed memory (ASan's quarantine), so RSS
  // says nothing there; elsewhere the server holds at most one read.
  EXPECT_LT(rss_bytes(), rss_before + (24u << 20)) << "RSS grew by " << ((rss_bytes() - rss_before) >> 20) << " MiB";
#else
  (void)rss_before;
#endif

  // Reading again: every byte arrives, then EOF.
  sha256 h;
  std::uint64_t received = 0;
  bool eof = false;
  int error = 0;
  std::vector<char> buf(256 * 1024);
  while (!eof && error == 0) {
    pollfd p{fd, POLLIN, 0};
    const int ready = ::poll(&p, 1, 30'000);
    if (ready == 0) error = ETIMEDOUT;
    if (ready <= 0) continue;
    const ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
    if (n > 0) {
      h.update(buf.data(), static_cast<std::size_t>(n));
      received += static_cast<std::uint64_t>(n);
    } else if (n == 0) {
      eof = true;
    } else if (errno != EAGAIN && errno != EINTR) {
      error = errno;
    }
  }
  give_up = true;
  sender.join();
  ::close(fd);
  EXPECT_EQ(sent.load(), total);
  EXPECT_EQ(received, total);
  EXPECT_EQ(to_hex(h.finish()), sent_digest);
  EXPECT_TRUE(eof) << "error " << error;
  EXPECT_LE(max_held.load(), so.read_size) << "the session held more than one read";
  EXPECT_EQ(echoed.load(), total);

  ASSERT_TRUE(s.wait_closed(1));
  const close_report rep = s.reports().front();
  EXPECT_EQ(rep.cause, close_cause::peer_fin_then_ours) << rep.describe();
  EXPECT_EQ(rep.bytes_out, total);
  expect_no_half_closed_leftovers(s.port());
}

// The same exchange over a Unix stream socket: shutdown(SHUT_WR) is a FIN there too.
TEST_F(echo_session_test, unix_socket_half_close_comes_back_whole) {
  temp_dir dir;
  server_options o = local_options(1);
  o.listen.clear();
  o.unix_paths = {dir.file("echo.sock")};
  running_echo_server s(o);
  const int fd = connect_unix(o.unix_paths.front());
  ASSERT_GE(fd, 0);
  exchange_plan plan;
  plan.bytes = scaled(16u << 20, 1u << 20);
  plan.min_chunk = 1;
  plan.max_chunk = 100'000;
  const exchange_result r = run_exchange(fd, plan);
  ::close(fd);
  EXPECT_TRUE(r.matches()) << "sent " << r.sent << " received " << r.received << " errno " << r.error;
  EXPECT_EQ(r.sent, plan.bytes);
  ASSERT_TRUE(s.wait_closed(1));
  EXPECT_EQ(s.reports().front().cause, close_cause::peer_fin_then_ours) << s.reports().front().describe();
}

// Abortive teardown reaches the client as RST: ECONNRESET, and no EOF before it.
TEST_F(echo_session_test, abortive_teardown_is_a_reset_at_the_client) {
  server_options o = local_options(1);
  o.policy = close_policy::abortive;
  running_echo_server s(o);
  const int fd = connect_tcp(s.port());
  ASSERT_GE(fd, 0);
  exchange_plan plan;
  plan.bytes = 256 * 1024;
  const exchange_result r = run_exchange(fd, plan);
  ::close(fd);
  EXPECT_FALSE(r.eof) << "EOF before the reset";
  EXPECT_EQ(r.error, ECONNRESET);
  ASSERT_TRUE(s.wait_closed(1));
  const close_report rep = s.reports().front();
  EXPECT_EQ(rep.cause, close_cause::local_abort) << rep.describe();
  EXPECT_TRUE(rep.rst_sent);
  EXPECT_EQ(rep.time_wait, side::none);
  expect_no_half_closed_leftovers(s.port());
}

// graceful and fin_close end with our FIN; rst_if_safe resets only because
// the session marked the exchange complete after echoing everything, so the
// client still gets every byte (Linux delivers queued bytes before ECONNRESET).
class echo_policy_test : public echo_session_test, public ::testing::WithParamInterface<close_policy> {};

TEST_P(echo_policy_test, every_byte_comes_back_then_the_policy_ends_it) {
  server_options o = local_options(1);
  o.policy = GetParam();
  running_echo_server s(o);
  const int fd = connect_tcp(s.port());
  ASSERT_GE(fd, 0);
  exchange_plan plan;
  plan.bytes = scaled(4u << 20, 1u << 20);
  const exchange_result r = run_exchange(fd, plan);
  ::close(fd);
  EXPECT_EQ(r.sent, plan.bytes);
  EXPECT_EQ(r.received, plan.bytes);
  EXPECT_EQ(r.received_sha256, r.sent_sha256);
  ASSERT_TRUE(s.wait_closed(1));
  const close_report rep = s.reports().front();
  if (GetParam() == close_policy::rst_if_safe) {
    EXPECT_NE(rep.refusal, reset_refusal::exchange_incomplete) << rep.describe();
    if (rep.refusal == reset_refusal::none) {
      EXPECT_EQ(rep.cause, close_cause::safe_reset) << rep.describe();
      EXPECT_EQ(r.error, ECONNRESET);
    } else {  // fell back to graceful (the client was slow to acknowledge): a FIN
      EXPECT_TRUE(r.eof) << rep.describe();
    }
  } else {
    EXPECT_TRUE(r.eof) << "error " << r.error;
    EXPECT_EQ(r.error, 0);
    EXPECT_FALSE(rep.rst_sent) << rep.describe();
    EXPECT_FALSE(rep.kernel_reset()) << rep.describe();
  }
  expect_no_half_closed_leftovers(s.port());
}

INSTANTIATE_TEST_SUITE_P(policies, echo_policy_test,
                         ::testing::Values(close_policy::graceful, close_policy::fin_close, close_policy::rst_if_safe),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
