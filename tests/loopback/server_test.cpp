// closewise::server on loopback: sessions, limits, timeouts, accept errors,
// drain, statistics. Servers listen on 127.0.0.1:0 and run on their own
// threads; clients are raw blocking sockets.

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <csignal>
#include <future>
#include <thread>

#include "../support/loopback.hpp"
#include "closewise/server.hpp"
#include "closewise/sock_diag.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;

namespace {

constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

// Echo until the peer's FIN, then let the server close (graceful).
asio::awaitable<void> echo_session(connection& c) {
  std::array<char, 16 * 1024> buf;
  for (;;) {
    auto [ec, n] = co_await c.read_some(asio::buffer(buf));
    if (n > 0 && co_await c.write(asio::buffer(buf.data(), n))) co_return;
    if (ec) co_return;
  }
}

// A server running on its own threads for the length of a test.
class running_server {
 public:
  running_server(server_options o, session_handler h) : srv_(std::move(o), std::move(h)) {
    srv_.on_close([this](const connection&, const close_report& r) {
      std::lock_guard lock(mu_);
      reports_.push_back(r);
    });
    srv_.start();
    port_ = parse_endpoint(srv_.local_endpoints().front()).port();
    thread_ = std::thread([this] { srv_.run(); });
  }
  ~running_server() {
    srv_.stop();
    if (thread_.joinable()) thread_.join();
  }
  server& get() { return srv_; }
  std::uint16_t port() const { return port_; }
  std::vector<close_report> reports() {
    std::lock_guard lock(mu_);
    return reports_;
  }
  // Waits (bounded) until `n` connections were closed.
  bool wait_closed(std::uint64_t n, std::chrono::milliseconds limit = 10s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (srv_.stats().snapshot().closed < n) {
      if (std::chrono::steady_clock::now() > end) return false;
      std::this_thread::sleep_for(2ms);  // polling a counter owned by the server threads
    }
    return true;
  }
  // Joins run(): true if it returned within `limit`.
  bool wait_run_returned(std::chrono::milliseconds limit) {
    auto f = std::async(std::launch::async, [this] { thread_.join(); });
    return f.wait_for(limit) == std::future_status::ready;
  }

 private:
  server srv_;
  std::uint16_t port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::vector<close_report> reports_;
};

raw_peer connect_to(std::uint16_t port, int rcvbuf = 0) {
  raw_peer p(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (rcvbuf > 0) p.set_rcvbuf(rcvbuf);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  if (::connect(p.fd(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return raw_peer{};
  return p;
}

server_options local_options(unsigned threads = 1) {
  server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = threads;
  return o;
}

// No socket of the server's port left in CLOSE_WAIT or FIN_WAIT2 on the server's side.
void expect_no_half_closed_leftovers(std::uint16_t port) {
  std::error_code ec;
  for (const auto& s : list_tcp_sockets(port, ec)) {
    if (s.local_port != port) continue;
    EXPECT_NE(s.state, tcp_state::close_wait) << "server socket left in CLOSE_WAIT";
    EXPECT_NE(s.state, tcp_state::fin_wait2) << "server socket left in FIN_WAIT2";
  }
  EXPECT_FALSE(ec);
}

TEST(server, echo_session_across_half_close) {
  const auto fds = open_fd_count();
  {
    running_server s(local_options(), echo_session);
    auto peer = connect_to(s.port());
    const std::string data = pattern(3 << 20);
    auto reader = std::async(std::launch::async, [&] {
      std::string sink;
      auto d = peer.drain(&sink);
      return std::make_pair(d, sink);
    });
    ASSERT_EQ(peer.send_all(data.data(), data.size()), static_cast<long>(data.size()));
    peer.shutdown_write();
    auto [d, sink] = reader.get();
    EXPECT_TRUE(d.eof);
    EXPECT_TRUE(sink == data);
    peer.close();
    ASSERT_TRUE(s.wait_closed(1));
    const auto snap = s.get().stats().snapshot();
    EXPECT_EQ(snap.accepted, 1u);
    EXPECT_EQ(snap.open, 0u);
    EXPECT_EQ(snap.closed_by_cause[static_cast<std::size_t>(close_cause::peer_fin_then_ours)], 1u);
    EXPECT_EQ(snap.fin_first_peer, 1u);
    EXPECT_EQ(snap.bytes_in, data.size());
    EXPECT_EQ(snap.bytes_out, data.size());
    expect_no_half_closed_leftovers(s.port());
  }
  EXPECT_EQ(open_fd_count(), fds);
}

}  // namespace
