// The key/value example in-process: its session under closewise::server on
// 127.0.0.1:0, raw blocking sockets as clients (pipelining, half-closing,
// resetting, sending garbage), and its protocol without sockets.

#include <gtest/gtest.h>
#include <poll.h>

#include <algorithm>
#include <future>
#include <mutex>
#include <thread>

#include "../support/loopback.hpp"
#include "closewise/server.hpp"
#include "closewise/sock_diag.hpp"
#include "kv/kv.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;

namespace {

constexpr std::size_t cause_index(close_cause c) { return static_cast<std::size_t>(c); }

// A kv server on its own I/O thread for the length of a test, keeping every
// close report its observer saw.
class kv_server {
 public:
  explicit kv_server(kv::session_options so = {}) : srv_(options(), kv::make_session(db_, so)) {
    srv_.on_close([this](const connection&, const close_report& r) {
      std::lock_guard lock(mu_);
      reports_.push_back(r);
    });
    srv_.start();
    port_ = parse_endpoint(srv_.local_endpoints().front()).port();
    thread_ = std::thread([this] { srv_.run(); });
  }
  ~kv_server() {
    srv_.stop();
    thread_.join();
  }
  std::uint16_t port() const { return port_; }
  stats_snapshot stats() const { return srv_.stats().snapshot(); }
  kv::store& db() { return *db_; }
  // Waits (bounded) for `n` close reports and returns them.
  std::vector<close_report> reports(std::size_t n) {
    const auto end = std::chrono::steady_clock::now() + 10s;
    for (;;) {
      {
        std::lock_guard lock(mu_);
        if (reports_.size() >= n || std::chrono::steady_clock::now() > end) return reports_;
      }
      std::this_thread::sleep_for(2ms);  // polling state owned by the server thread
    }
  }

 private:
  static server_options options() {
    server_options o;
    o.listen = {"127.0.0.1:0"};
    o.threads = 1;
    o.stream.linger_timeout = 2s;
    return o;
  }

  std::shared_ptr<kv::store> db_ = std::make_shared<kv::store>();
  server srv_;
  std::uint16_t port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::vector<close_report> reports_;
};

// Reads until `n` newlines arrived (or EOF, an error, or 5 s of silence).
std::string read_lines(raw_peer& p, std::size_t n) {
  std::string got;
  char buf[4096];
  while (static_cast<std::size_t>(std::count(got.begin(), got.end(), '\n')) < n) {
    pollfd pfd{p.fd(), POLLIN, 0};
    if (::poll(&pfd, 1, 5000) <= 0) break;
    const long r = p.recv_some(buf, sizeof(buf));
    if (r <= 0) break;
    got.append(buf, static_cast<std::size_t>(r));
  }
  return got;
}

// Sends `request`, half-closes, and reads everything until EOF concurrently
// (the replies may not fit the socket buffers while we still send).
std::pair<raw_peer::drained, std::string> send_and_half_close(raw_peer& p, const std::string& request) {
  auto reader = std::async(std::launch::async, [&] {
    std::string sink;
    auto d = p.drain(&sink);
    return std::make_pair(d, sink);
  });
  EXPECT_EQ(p.send_all(request.data(), request.size()), static_cast<long>(request.size()));
  p.shutdown_write();
  return reader.get();
}

// Thousands of commands in one go, then SHUT_WR: every reply, in order, then
// the server's FIN; the client sent the first FIN, so it keeps TIME_WAIT.
TEST(kv_example, pipelined_commands_then_half_close_get_every_reply_then_eof) {
  kv_server s;
  auto peer = connect_to(s.port());
  std::string request, expected;
  for (int i = 0; i < 5000; ++i) {
    const std::string k = "key" + std::to_string(i), v = "value " + std::to_string(i * 7);
    request += "SET " + k + " " + v + "\nGET " + k + "\nDEL " + k + "\nGET " + k + "\n";
    expected += "OK\nVALUE " + v + "\nDELETED\nNOT_FOUND\n";
  }
  request += "SET last one\r\nGET last";  // CRLF is accepted; a last command may lack its newline
  expected += "OK\nVALUE one\n";
  const auto [d, replies] = send_and_half_close(peer, request);
  EXPECT_TRUE(d.eof) << "ended by errno " << d.error;
  EXPECT_EQ(replies.size(), expected.size());
  EXPECT_TRUE(replies == expected);
  peer.close();
  const auto reports = s.reports(1);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_EQ(reports[0].cause, close_cause::peer_fin_then_ours) << reports[0].describe();
  EXPECT_EQ(reports[0].first_fin, side::peer);
  EXPECT_EQ(reports[0].time_wait, side::peer);
  EXPECT_FALSE(reports[0].rst_sent);
  EXPECT_FALSE(reports[0].kernel_reset());
  EXPECT_EQ(reports[0].bytes_in, request.size());
  EXPECT_EQ(reports[0].bytes_out, expected.size());
  EXPECT_EQ(s.stats().closed_by_cause[cause_index(close_cause::peer_fin_then_ours)], 1u);
}

// The store belongs to the server: what one connection sets, the next reads.
TEST(kv_example, store_is_shared_by_the_connections_of_one_server) {
  kv_server s;
  auto a = connect_to(s.port());
  EXPECT_EQ(send_and_half_close(a, "SET shared yes\n").second, "OK\n");
  auto b = connect_to(s.port());
  EXPECT_EQ(send_and_half_close(b, "GET shared\n").second, "VALUE yes\n");
  EXPECT_EQ(s.db().size(), 1u);
}

// A client that resets after a command is counted as a peer reset, never as a FIN.
TEST(kv_example, client_that_resets_after_a_command_is_counted_as_a_peer_reset) {
  kv_server s;
  auto peer = connect_to(s.port());
  ASSERT_EQ(peer.send(std::string("SET a 1\n")), 8);
  ASSERT_EQ(read_lines(peer, 1), "OK\n");  // the server accepted and serves us
  ASSERT_EQ(peer.send(std::string("GET a\n")), 6);
  peer.reset();
  const auto reports = s.reports(1);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_TRUE(reports[0].cause == close_cause::peer_reset_mid_exchange ||
              reports[0].cause == close_cause::peer_reset_idle)
      << reports[0].describe();
  EXPECT_TRUE(reports[0].rst_received);
  EXPECT_EQ(reports[0].time_wait, side::none);
  const auto snap = s.stats();
  EXPECT_EQ(snap.rst_received, 1u);
  EXPECT_EQ(snap.closed_by_cause[cause_index(close_cause::peer_reset_mid_exchange)] +
                snap.closed_by_cause[cause_index(close_cause::peer_reset_idle)],
            1u);
}

// Garbage gets an error line each, and the connection keeps serving.
TEST(kv_example, malformed_lines_get_an_error_reply_not_a_crash) {
  kv_server s;
  auto peer = connect_to(s.port());
  // Empty, unknown, missing or extra arguments, wrong case, stray spaces,
  // binary bytes, tabs instead of spaces.
  const std::string bad[] = {"",        "BOGUS",  "SET",     "SET k",  "SET  v",   "GET",
                             "GET a b", "DEL",    "del a",   " GET a", "QUIT now", std::string("\0\xff\x01", 3),
                             "\r",      "GET\ta", "SET\tk v"};
  std::string request;
  for (const auto& line : bad) request += line + "\n";
  request += "SET k v\n";
  const auto [d, replies] = send_and_half_close(peer, request);
  EXPECT_TRUE(d.eof);
  std::vector<std::string> lines;
  for (std::size_t at = 0, nl; (nl = replies.find('\n', at)) != std::string::npos; at = nl + 1)
    lines.push_back(replies.substr(at, nl - at));
  ASSERT_EQ(lines.size(), std::size(bad) + 1) << replies;
  for (std::size_t i = 0; i < std::size(bad); ++i) EXPECT_EQ(lines[i].rfind("ERR ", 0), 0u) << "line " << i;
  EXPECT_EQ(lines.back(), "OK");
  peer.close();
  ASSERT_EQ(s.reports(1).size(), 1u);
  EXPECT_EQ(s.reports(1)[0].cause, close_cause::peer_fin_then_ours);
}

// More than 4 KiB without a newline: an error reply, our FIN, the rest of the
// input drained and discarded (not reset), and the client keeps nothing unread.
TEST(kv_example, over_long_line_is_answered_with_an_error_and_closed_gracefully) {
  kv_server s;
  auto peer = connect_to(s.port());
  const std::string flood(256 * 1024, 'x');
  auto reader = std::async(std::launch::async, [&] {
    std::string sink;
    auto d = peer.drain(&sink);
    return std::make_pair(d, sink);
  });
  // The server stops parsing but keeps reading (draining): the whole send completes.
  EXPECT_EQ(peer.send_all(flood.data(), flood.size()), static_cast<long>(flood.size()));
  peer.shutdown_write();
  const auto [d, replies] = reader.get();
  EXPECT_TRUE(d.eof) << "ended by errno " << d.error;
  EXPECT_EQ(replies, "ERR line too long\n");
  peer.close();
  const auto reports = s.reports(1);
  ASSERT_EQ(reports.size(), 1u);
  const auto& r = reports[0];
  EXPECT_EQ(r.policy, close_policy::graceful) << r.describe();
  EXPECT_FALSE(r.rst_sent) << r.describe();
  EXPECT_FALSE(r.kernel_reset()) << r.describe();
  EXPECT_EQ(r.drain, drain_end::peer_fin) << r.describe();
  EXPECT_EQ(r.cause, close_cause::ours_then_peer_fin) << r.describe();
  EXPECT_EQ(r.bytes_in + r.bytes_discarded, flood.size());
  EXPECT_GT(r.bytes_discarded, 0u);
}

// QUIT! picks the abortive policy for this connection only: a RST, no TIME_WAIT.
TEST(kv_example, quit_bang_resets_the_connection_and_leaves_no_time_wait) {
  kv_server s;
  auto peer = connect_to(s.port());
  const auto peer_port = peer.local_port();
  ASSERT_EQ(peer.send(std::string("SET a 1\n")), 8);
  ASSERT_EQ(read_lines(peer, 1), "OK\n");
  ASSERT_EQ(peer.send(std::string("QUIT!\n")), 6);
  char c;
  pollfd pfd{peer.fd(), POLLIN, 0};
  ASSERT_EQ(::poll(&pfd, 1, 5000), 1);
  EXPECT_EQ(peer.recv_some(&c, 1), -ECONNRESET);
  const auto reports = s.reports(1);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_EQ(reports[0].cause, close_cause::local_abort) << reports[0].describe();
  EXPECT_TRUE(reports[0].rst_sent);
  EXPECT_EQ(reports[0].time_wait, side::none);
  peer.close();
  closewise::error_code ec;
  std::size_t time_wait = 0;
  for (const auto& d : list_tcp_sockets(s.port(), ec))
    time_wait += d.state == tcp_state::time_wait && (d.local_port == peer_port || d.remote_port == peer_port);
  EXPECT_EQ(time_wait, 0u);
}

// QUIT: "BYE", then the server's FIN first (it keeps TIME_WAIT).
TEST(kv_example, quit_says_bye_and_the_server_closes_first) {
  kv_server s;
  auto peer = connect_to(s.port());
  ASSERT_EQ(peer.send(std::string("GET nothing\nQUIT\nGET ignored\n")), 29);
  std::string sink;
  EXPECT_TRUE(peer.drain(&sink).eof);
  EXPECT_EQ(sink, "NOT_FOUND\nBYE\n");
  peer.close();
  const auto reports = s.reports(1);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_EQ(reports[0].cause, close_cause::ours_then_peer_fin) << reports[0].describe();
  EXPECT_EQ(reports[0].time_wait, side::local);
  EXPECT_FALSE(reports[0].rst_sent);
}

// The protocol alone, no sockets.
TEST(kv_protocol, commands_and_replies) {
  kv::store db;
  std::string out;
  EXPECT_EQ(kv::execute("SET greeting hello world", db, out), kv::outcome::next);
  EXPECT_EQ(kv::execute("GET greeting", db, out), kv::outcome::next);
  EXPECT_EQ(kv::execute("SET empty ", db, out), kv::outcome::next);
  EXPECT_EQ(kv::execute("GET empty", db, out), kv::outcome::next);
  EXPECT_EQ(kv::execute("DEL greeting", db, out), kv::outcome::next);
  EXPECT_EQ(kv::execute("DEL greeting", db, out), kv::outcome::next);
  EXPECT_EQ(out, "OK\nVALUE hello world\nOK\nVALUE \nDELETED\nNOT_FOUND\n");
  out.clear();
  EXPECT_EQ(kv::execute("QUIT", db, out), kv::outcome::quit);
  EXPECT_EQ(out, "BYE\n");
  out.clear();
  EXPECT_EQ(kv::execute("QUIT!", db, out), kv::outcome::abort);
  EXPECT_EQ(out, "");
}

}  // namespace
