// The server's accept loop reads a request's first bytes with a plain recv
// before it hands the descriptor to Asio (server_options::start_on_input).
// Whatever comes next must reach the stream: a FIN or a reset already queued
// when the socket was registered (epoll is edge-triggered), bytes that come
// later, the idle timeout, a graceful close's drain. Each test reads the first
// bytes that way, then registers the socket and wraps it in a stream.
#include <gtest/gtest.h>
#include <sys/socket.h>

#include <array>
#include <chrono>
#include <optional>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "../support/loopback.hpp"
#include "closewise/stream.hpp"

namespace closewise::test {
namespace {

using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

struct read_result {
  error_code ec;
  std::size_t n = 0;
  std::string bytes;
};

class read_before_registration : public ::testing::Test {
 protected:
  asio::io_context ioc;
  loopback_pair_factory factory{ioc};
  raw_peer peer;
  std::string first;  // what the pre-registration read took

  // Connects the peer, lets `before` act on it (send, half-close, reset),
  // accepts the connection outside Asio and reads what is there with one
  // blocking recv, then registers the socket and wraps it in a stream.
  template <class Before>
  tcp_stream accept_read_then_register(Before before, stream_options opts = {}) {
    peer = factory.connect();
    EXPECT_GE(peer.fd(), 0);
    before(peer);
    const int fd = ::accept4(factory.acceptor().native_handle(), nullptr, nullptr, SOCK_CLOEXEC);
    EXPECT_GE(fd, 0) << std::strerror(errno);
    std::array<char, 256> buf{};
    // Blocking: waits for the peer's first bytes, and returns what has
    // arrived (a short read: less than the buffer).
    const ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
    EXPECT_GT(n, 0) << std::strerror(errno);
    if (n > 0) first.assign(buf.data(), static_cast<std::size_t>(n));
    tcp::socket s(ioc);
    s.assign(tcp::v4(), fd);
    return tcp_stream(std::move(s), opts);
  }

  // One read of the stream, run to completion under a watchdog.
  std::optional<read_result> read_once(tcp_stream& io, std::chrono::milliseconds limit = 10s) {
    std::optional<read_result> out;
    auto buf = std::make_shared<std::array<char, 256>>();
    io.async_read_some(asio::buffer(*buf), [&out, buf](const error_code& ec, std::size_t n) {
      out = read_result{ec, n, std::string(buf->data(), n)};
    });
    run_until(
        ioc, [&] { return out.has_value(); }, limit);
    return out;
  }
};

TEST_F(read_before_registration, a_fin_queued_behind_the_first_bytes_is_seen) {
  auto io = accept_read_then_register([](raw_peer& p) {
    ASSERT_EQ(p.send(std::string("GET / HTTP/1.1\r\n\r\n")), 18);
    p.shutdown_write();
  });
  EXPECT_EQ(first, "GET / HTTP/1.1\r\n\r\n");
  const auto r = read_once(io);
  ASSERT_TRUE(r) << "the read missed the FIN that was queued when the socket was registered";
  EXPECT_EQ(r->ec, asio::error::eof) << r->ec.message();
  EXPECT_EQ(io.state().read(), read_state::peer_fin);
}

TEST_F(read_before_registration, bytes_that_come_after_registration_are_read) {
  auto io = accept_read_then_register([](raw_peer& p) { ASSERT_EQ(p.send(std::string("one")), 3); });
  EXPECT_EQ(first, "one");
  ASSERT_EQ(peer.send(std::string("two")), 3);
  const auto r = read_once(io);
  ASSERT_TRUE(r) << "the read missed bytes that came after the registration";
  EXPECT_FALSE(r->ec) << r->ec.message();
  EXPECT_EQ(r->bytes, "two");
  peer.shutdown_write();
  const auto end = read_once(io);
  ASSERT_TRUE(end);
  EXPECT_EQ(end->ec, asio::error::eof);
}

TEST_F(read_before_registration, a_reset_after_the_first_bytes_is_a_reset) {
  auto io = accept_read_then_register([](raw_peer& p) { ASSERT_EQ(p.send(std::string("x")), 1); });
  peer.reset();
  const auto r = read_once(io);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->ec, asio::error::connection_reset) << r->ec.message();
  EXPECT_TRUE(io.state().rst_received());
}

TEST_F(read_before_registration, the_idle_timeout_still_bounds_the_wait) {
  stream_options o;
  o.idle_timeout = 300ms;
  auto io = accept_read_then_register([](raw_peer& p) { ASSERT_EQ(p.send(std::string("x")), 1); }, o);
  io.mark_exchange_complete();  // the first bytes were answered: the next read waits for a new exchange
  const auto t0 = clock_type::now();
  const auto r = read_once(io);
  const auto took = clock_type::now() - t0;
  ASSERT_TRUE(r);
  EXPECT_EQ(r->ec, asio::error::timed_out) << r->ec.message();
  EXPECT_GE(took, 300ms) << "the read failed before its timeout";
}

TEST_F(read_before_registration, a_graceful_close_drains_to_the_peers_fin) {
  auto io = accept_read_then_register([](raw_peer& p) { ASSERT_EQ(p.send(std::string("request")), 7); });
  std::optional<close_report> report;
  io.async_close(close_policy::graceful, [&](close_report r) { report = std::move(r); });
  ioc.poll();
  // Our FIN reached the peer; its answer ends the drain.
  std::string got;
  const auto d = peer.drain(&got, 10s);
  EXPECT_TRUE(d.eof);
  peer.shutdown_write();
  ASSERT_TRUE(run_until(
      ioc, [&] { return report.has_value(); }, 10s))
      << "the drain missed the peer's FIN";
  EXPECT_EQ(report->cause, close_cause::ours_then_peer_fin) << report->describe();
  EXPECT_EQ(report->drain, drain_end::peer_fin);
}

}  // namespace
}  // namespace closewise::test
