// Faults injected by the kernel, in a private network namespace: RSTs forged
// by nftables, a socket killed with `ss -K`, packet loss with a rate limit,
// and a peer that vanishes (every packet dropped). Each test re-executes
// itself under `unshare --net` (tests/support/netns.hpp), so no rule, qdisc
// or MTU change ever reaches the machine's own loopback; it is skipped, with
// the reason, where namespaces or nft are unavailable.
//
// The server is closewise::server on 127.0.0.1:0 inside the namespace; the
// clients are closewise streams (so both sides explain their close) or raw
// sockets where the peer must do nothing at all.

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <array>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <mutex>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "../support/loopback.hpp"
#include "../support/netns.hpp"
#include "../support/running_server.hpp"
#include "../support/sessions.hpp"
#include "closewise/server.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;
using namespace boost::asio::experimental::awaitable_operators;

namespace {

constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
using clock_type = std::chrono::steady_clock;

bool is_peer_reset(close_cause c) {
  return c == close_cause::peer_reset_idle || c == close_cause::peer_reset_mid_exchange;
}

std::string ms(clock_type::duration d) {
  return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()) + " ms";
}

// The load tests (soak.*) prefer a private namespace but, where there is
// none, run on this machine's own loopback with a printed note
// (CLOSEWISE_IN_PRIVATE_NETNS_IF_POSSIBLE). This test makes that visible to
// ctest: it is skipped, with the reason, exactly where they fell back.
TEST(netns, a_private_namespace_is_available_for_the_load_tests) {
  CLOSEWISE_IN_PRIVATE_NETNS(60s);
  // In the child: a namespace that is not the parent's (checked by the
  // macro), with a loopback that carries a connection.
  server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = 1;
  running_server s(o, echo_session);
  auto p = connect_to(s.port());
  ASSERT_GE(p.fd(), 0) << "no connection on the namespace's loopback";
  ASSERT_EQ(p.send(std::string("ping")), 4);
  p.shutdown_write();
  std::string got;
  EXPECT_TRUE(p.drain(&got, 10s).eof);
  EXPECT_EQ(got, "ping");
}

// Creates the table and output chain the tests add rules to; on loopback
// every packet, whichever way it goes, passes the output hook once.
std::optional<std::string> nft_unavailable() {
  if (!have_tool("nft")) return "nft not installed (Debian package nftables; scripts/deps.sh test)";
  const auto r = run_command({"nft", "add table inet closewise"});
  if (!r.ok()) return "nftables unusable in this namespace: " + r.output;
  nft("add chain inet closewise out { type filter hook output priority 0; }");
  return std::nullopt;
}

// The packet counts of the chain's rules that carry a `counter`, in order.
std::vector<std::uint64_t> nft_counters() {
  const std::string listing = nft("list chain inet closewise out");
  const std::string key = "counter packets ";
  std::vector<std::uint64_t> out;
  for (auto at = listing.find(key); at != std::string::npos; at = listing.find(key, at + key.size()))
    out.push_back(std::strtoull(listing.c_str() + at + key.size(), nullptr, 10));
  return out;
}

// ---- closewise clients ------------------------------------------------------

// One client connection and the close report it produced.
struct client {
  std::optional<closewise::stream> s;
  std::uint16_t port = 0;
  error_code connect_error;
  int reports = 0;
  std::optional<close_report> report;
  clock_type::time_point reported_at{};
};

std::uint16_t local_port_of(int fd) {
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0 || a.ss_family != AF_INET) return 0;
  return ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
}

asio::awaitable<void> connect_client(std::string target, stream_options opts, client& c) {
  auto [ec, s] = co_await closewise::connect(co_await asio::this_coro::executor, target, 2s, opts);
  c.connect_error = ec;
  if (ec) co_return;
  c.s.emplace(std::move(*s));
  c.port = local_port_of(c.s->next_layer().native_handle());
  c.s->on_close([&c](const close_report& r) {
    ++c.reports;
    c.report = r;
    c.reported_at = clock_type::now();
  });
}

struct echo_result {
  bool sent = false;  // the whole request was handed to the kernel
  bool done = false;
  error_code write_error;
  error_code read_error;
  bool intact = false;
};

asio::awaitable<void> write_all(closewise::stream& s, const std::string& data, echo_result& r) {
  auto [ec, n] = co_await asio::async_write(s, asio::buffer(data), use_tuple);
  r.write_error = ec;
  r.sent = !ec;
}

asio::awaitable<void> read_exact(closewise::stream& s, std::string& into, echo_result& r) {
  auto [ec, n] = co_await asio::async_read(s, asio::buffer(into), use_tuple);
  r.read_error = ec;
}

// Sends n pattern bytes and reads the echo at the same time (a large echo
// would otherwise fill every buffer on the way and stall both ends).
asio::awaitable<void> echo_round(closewise::stream& s, std::size_t n, echo_result& r) {
  const std::string msg = pattern(n);
  std::string back(n, '\0');
  co_await (write_all(s, msg, r) && read_exact(s, back, r));
  r.intact = !r.write_error && !r.read_error && back == msg;
  // The client has its whole answer: what follows is idle time, not an exchange.
  if (r.intact) s.mark_exchange_complete();
  r.done = true;
}

struct read_result {
  bool started = false;
  bool done = false;
  error_code ec;
};

// An idle client waiting for input: the read that sees whatever ends the connection.
asio::awaitable<void> wait_for_input(closewise::stream& s, read_result& r) {
  std::array<char, 64> buf;
  r.started = true;
  auto [ec, n] = co_await s.async_read_some(asio::buffer(buf), use_tuple);
  r.ec = ec;
  r.done = true;
}

asio::awaitable<void> close_client(client& c, close_policy p) { co_await c.s->async_close(p, use_tuple); }

// ---- RST injection and a killed socket ---------------------------------------

TEST(netns, injected_rst_and_killed_socket_end_only_their_connection) {
  CLOSEWISE_IN_PRIVATE_NETNS(60s);
  if (const auto why = nft_unavailable()) GTEST_SKIP() << *why;
  if (!have_tool("ss")) GTEST_SKIP() << "ss (iproute2) not installed";

  server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = 1;
  running_server srv(o, echo_session);
  asio::io_context ioc;
  // a: gets a forged RST; b: its server socket is killed; c, d: bystanders.
  std::array<client, 4> clients;
  for (auto& c : clients) asio::co_spawn(ioc, connect_client(srv.endpoint(), {}, c), asio::detached);
  ASSERT_TRUE(run_until(
      ioc,
      [&] {
        return std::all_of(clients.begin(), clients.end(), [](const client& c) { return c.s || c.connect_error; });
      },
      5s));
  for (const auto& c : clients) ASSERT_TRUE(c.s && c.port != 0) << c.connect_error.message();
  std::array<echo_result, 4> warmup{};
  for (std::size_t i = 0; i < clients.size(); ++i)
    asio::co_spawn(ioc, echo_round(*clients[i].s, 1024, warmup[i]), asio::detached);
  ASSERT_TRUE(run_until(
      ioc, [&] { return std::all_of(warmup.begin(), warmup.end(), [](const echo_result& r) { return r.done; }); }, 5s));
  for (const auto& r : warmup) ASSERT_TRUE(r.intact);

  // a: every data segment towards a's client port is answered by a RST to
  // the server (nft's reject), and never arrives: the client stays
  // ESTABLISHED, a half-open connection.
  client& a = clients[0];
  nft("add rule inet closewise out tcp dport " + std::to_string(a.port) +
      " tcp flags & psh == psh counter reject with tcp reset");
  echo_result a_round;
  const auto rst_injected = clock_type::now();  // the request that draws the forged RST leaves now
  asio::co_spawn(ioc, echo_round(*a.s, 1024, a_round), asio::detached);
  ASSERT_TRUE(run_until(
      ioc, [&] { return a_round.sent; }, 2s));
  const auto a_server = srv.wait_report(a.port, 1s);
  ASSERT_TRUE(a_server) << "the server's side of a did not end within 1 s of the forged RST";
  EXPECT_LE(a_server->at - rst_injected, 1s);
  EXPECT_TRUE(is_peer_reset(a_server->report.cause)) << a_server->report.describe();
  EXPECT_TRUE(a_server->report.rst_received) << a_server->report.describe();
  EXPECT_GE(nft_counters().at(0), 1u) << "the reject rule never matched";
  EXPECT_FALSE(a_round.done) << "a's client got its echo although every data segment to it was rejected";
  EXPECT_EQ(a.reports, 0) << "a's client saw nothing; it must still be open";
  std::printf("forged RST: server side of a ended in %s as %s\n", ms(a_server->at - rst_injected).c_str(),
              std::string(to_string(a_server->report.cause)).c_str());

  // b: `ss -K` destroys the server's socket (the one whose peer is b's
  // port); the kernel sends b's client a RST, which its pending read sees.
  client& b = clients[1];
  read_result b_read;
  asio::co_spawn(ioc, wait_for_input(*b.s, b_read), asio::detached);
  ASSERT_TRUE(run_until(
      ioc, [&] { return b_read.started; }, 2s));
  const auto killed = clock_type::now();
  must_run({"ss", "-K", "dst", "127.0.0.1:" + std::to_string(b.port)});
  ASSERT_TRUE(run_until(
      ioc, [&] { return b.reports > 0; }, 1s))
      << "b's client did not end within 1 s";
  EXPECT_LE(b.reported_at - killed, 1s);
  EXPECT_TRUE(is_peer_reset(b.report->cause)) << b.report->describe();
  EXPECT_TRUE(b.report->rst_received) << b.report->describe();
  EXPECT_EQ(b_read.ec, asio::error::connection_reset) << b_read.ec.message();
  const auto b_server = srv.wait_report(b.port, 1s);
  ASSERT_TRUE(b_server) << "the killed server socket of b was never reported";
  // Killed locally (ECONNABORTED): an error on the server's own side, not a peer's doing.
  EXPECT_EQ(b_server->report.cause, close_cause::local_error) << b_server->report.describe();
  EXPECT_FALSE(b_server->report.rst_received) << b_server->report.describe();
  std::printf("ss -K: client b ended in %s as %s; server side %s (%s)\n", ms(b.reported_at - killed).c_str(),
              std::string(to_string(b.report->cause)).c_str(), std::string(to_string(b_server->report.cause)).c_str(),
              b_server->report.error.c_str());

  // c, d: untouched. A large echo on both is intact, and both close gracefully.
  std::array<echo_result, 2> big{};
  asio::co_spawn(ioc, echo_round(*clients[2].s, 1 << 20, big[0]), asio::detached);
  asio::co_spawn(ioc, echo_round(*clients[3].s, 1 << 20, big[1]), asio::detached);
  ASSERT_TRUE(run_until(
      ioc, [&] { return big[0].done && big[1].done; }, 10s));
  EXPECT_TRUE(big[0].intact && big[1].intact);
  for (auto& c : clients) asio::co_spawn(ioc, close_client(c, close_policy::graceful), asio::detached);
  ASSERT_TRUE(run_until(
      ioc, [&] { return std::all_of(clients.begin(), clients.end(), [](const client& c) { return c.reports > 0; }); },
      10s));
  for (std::size_t i = 2; i < 4; ++i) {
    EXPECT_EQ(clients[i].report->cause, close_cause::ours_then_peer_fin) << clients[i].report->describe();
    const auto r = srv.wait_report(clients[i].port, 2s);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->report.cause, close_cause::peer_fin_then_ours) << r->report.describe();
  }
  // a's client closes into a connection its server already forgot: the
  // kernel answers its FIN with a RST.
  EXPECT_TRUE(is_peer_reset(a.report->cause)) << a.report->describe();
  ASSERT_TRUE(srv.wait_reports(4, 2s));
  for (const auto& c : clients) EXPECT_EQ(c.reports, 1);
  EXPECT_EQ(srv.reports().size(), 4u);
  EXPECT_EQ(srv.get().stats().snapshot().open, 0u);
}

// ---- loss and a rate limit ---------------------------------------------------

struct transfer_result {
  bool done = false;
  error_code write_error, shutdown_error, read_error;
  std::string received;
  std::optional<close_report> report;
};

asio::awaitable<void> send_then_fin(closewise::stream& s, const std::string& data, transfer_result& r) {
  auto [ec, n] = co_await asio::async_write(s, asio::buffer(data), use_tuple);
  r.write_error = ec;
  if (ec) co_return;
  auto [sec] = co_await s.async_shutdown_write(use_tuple);
  r.shutdown_error = sec;
}

asio::awaitable<void> read_to_eof(closewise::stream& s, transfer_result& r) {
  std::array<char, 64 * 1024> buf;
  for (;;) {
    auto [ec, n] = co_await s.async_read_some(asio::buffer(buf), use_tuple);
    r.received.append(buf.data(), n);
    if (ec) {
      if (ec != asio::error::eof) r.read_error = ec;
      co_return;
    }
  }
}

// Echo: everything out, our FIN, everything back until the server's FIN; then close.
asio::awaitable<void> echo_across_half_close(closewise::stream& s, const std::string& data, transfer_result& r) {
  co_await (send_then_fin(s, data, r) && read_to_eof(s, r));
  auto [rep] = co_await s.async_close(close_policy::graceful, use_tuple);
  r.report = rep;
  r.done = true;
}

TEST(netns, echo_of_8_mib_survives_loss_and_a_rate_limit_without_timeouts) {
  CLOSEWISE_IN_PRIVATE_NETNS(240s);
  if (const auto why = nft_unavailable()) GTEST_SKIP() << *why;
  if (!have_tool("tc")) GTEST_SKIP() << "tc (iproute2) not installed";
  must_run({"ip", "link", "set", "lo", "mtu", "1500"});
  const auto tbf = run_command(
      {"tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "20mbit", "burst", "64kb", "latency", "100ms"});
  if (!tbf.ok()) GTEST_SKIP() << "no tbf qdisc here: " << tbf.output;

  // Timeouts of a few seconds: loss and queueing delay segments by
  // retransmission timeouts (200 ms and up), never by seconds.
  stream_options timeouts;
  timeouts.idle_timeout = 5s;
  timeouts.read_timeout = 5s;
  timeouts.write_timeout = 5s;
  timeouts.linger_timeout = 5s;
  server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = 1;
  o.stream = timeouts;
  running_server srv(o, echo_session);
  // 5% of the segments each way, data and ACKs alike.
  const std::string port = std::to_string(srv.port());
  nft("add rule inet closewise out tcp dport " + port + " numgen random mod 100 < 5 counter drop");
  nft("add rule inet closewise out tcp sport " + port + " numgen random mod 100 < 5 counter drop");

  asio::io_context ioc;
  client c;
  asio::co_spawn(ioc, connect_client(srv.endpoint(), timeouts, c), asio::detached);
  // A SYN may be dropped too: the retransmitted one comes after 1 s.
  ASSERT_TRUE(run_until(
      ioc, [&] { return c.s || c.connect_error; }, 10s));
  if (!c.s) {
    // connect() itself gives up after 2 s, i.e. after losing the SYN or the SYN-ACK twice.
    GTEST_SKIP() << "connect lost to the injected loss twice: " << c.connect_error.message();
  }
  const std::string data = pattern(8u << 20);
  transfer_result r;
  const auto start = clock_type::now();
  asio::co_spawn(ioc, echo_across_half_close(*c.s, data, r), asio::detached);
  ASSERT_TRUE(run_until(
      ioc, [&] { return r.done; }, 180s))
      << "received " << r.received.size() << " bytes";
  const auto took = clock_type::now() - start;

  EXPECT_FALSE(r.write_error || r.shutdown_error || r.read_error)
      << r.write_error.message() << " / " << r.shutdown_error.message() << " / " << r.read_error.message();
  EXPECT_EQ(r.received.size(), data.size());
  EXPECT_TRUE(r.received == data) << "the echo came back corrupted";
  EXPECT_EQ(r.report->cause, close_cause::ours_then_peer_fin) << r.report->describe();
  EXPECT_EQ(r.report->timeout, timeout_kind::none) << r.report->describe();
  const auto s = srv.wait_report(c.port, 10s);
  ASSERT_TRUE(s);
  EXPECT_EQ(s->report.cause, close_cause::peer_fin_then_ours) << s->report.describe();
  const auto snap = srv.get().stats().snapshot();
  for (std::size_t k = 0; k < snap.timeouts.size(); ++k)
    EXPECT_EQ(snap.timeouts[k], 0u) << to_string(static_cast<timeout_kind>(k)) << " timeouts";
  EXPECT_EQ(snap.linger_timeouts, 0u);
  EXPECT_EQ(snap.rst_sent + snap.rst_received, 0u);
  // The faults really happened.
  const auto dropped = nft_counters();
  ASSERT_EQ(dropped.size(), 2u);
  EXPECT_GT(dropped[0], 0u) << "no segment towards the server was dropped";
  EXPECT_GT(dropped[1], 0u) << "no segment from the server was dropped";
  std::printf("8 MiB echo through 5%% loss each way and 20 Mbit/s: %s, dropped %llu to / %llu from the server\n",
              ms(took).c_str(), static_cast<unsigned long long>(dropped[0]),
              static_cast<unsigned long long>(dropped[1]));
}

// ---- a black-holed peer ----------------------------------------------------

// What each black-hole connection's session was doing when its peer vanished.
class session_marks {
 public:
  void mark(char mode) {
    {
      std::lock_guard lock(mu_);
      marks_[mode] = true;
    }
    cv_.notify_all();
  }
  bool wait(char mode, std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return marks_[mode]; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<char, bool> marks_;
};

// The first byte chooses: 'i' echo it and wait for more (idle), 'w' write
// far more than any buffer holds (mid-write), 'd' close at once (the
// graceful close's drain is what waits).
asio::awaitable<void> black_hole_session(connection& c, session_marks* marks) {
  std::array<char, 1> mode{};
  auto [ec, n] = co_await c.read_some(asio::buffer(mode));
  if (ec || n == 0) co_return;
  // Built before the mark: the write must start the moment the test is told.
  // 16 MiB: four times the largest send buffer Linux grows to (tcp_wmem's
  // 4 MiB) against a 4 KiB receive window. Under TSan every write_some's
  // interceptor walks the whole buffer, on the thread whose timers the other
  // cases wait on, so it is no larger than it must be.
  const std::string flood = mode[0] == 'w' ? std::string(16u << 20, 'w') : std::string();
  marks->mark(mode[0]);
  if (mode[0] == 'i') {
    if (co_await c.write(asio::buffer(mode))) co_return;
    std::array<char, 64> buf;
    for (;;) {
      auto [rec, rn] = co_await c.read_some(asio::buffer(buf));
      if (rec) co_return;
    }
  }
  if (mode[0] == 'w') co_await c.write(asio::buffer(flood));
}

TEST(netns, black_holed_peers_end_within_their_timeouts) {
  CLOSEWISE_IN_PRIVATE_NETNS(60s);
  if (const auto why = nft_unavailable()) GTEST_SKIP() << *why;

  server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = 1;
  o.stream.idle_timeout = 600ms;
  o.stream.write_timeout = 500ms;
  o.stream.linger_timeout = 300ms;
  o.stream.linger_max = 2s;
  session_marks marks;
  running_server srv(o, [&marks](connection& c) { return black_hole_session(c, &marks); });
  // Timers fire on a loaded 2-core machine late by tens of milliseconds, not
  // by half a second; under a sanitizer the one server thread that runs all
  // three cases is several times slower (a TSan run once ended the idle case
  // 576 ms past its bound), and a timeout that never fired would still be far
  // outside the wider margin.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  constexpr auto margin = 1500ms;
#else
  constexpr auto margin = 500ms;
#endif

  struct black_hole_case {
    char mode;
    std::chrono::milliseconds bound;  // from the black hole to the end of the connection
    timeout_kind timeout;             // the per-operation timeout that fires first, if any
  };
  // Whatever ends the session, the graceful close that follows cannot
  // complete against a black hole: it adds its linger timeout, then RST.
  const std::array<black_hole_case, 3> cases{{
      {'i', o.stream.idle_timeout + o.stream.linger_timeout, timeout_kind::idle},
      {'w', o.stream.write_timeout + o.stream.linger_timeout, timeout_kind::write},
      {'d', o.stream.linger_timeout, timeout_kind::none},
  }};
  std::vector<raw_peer> peers;
  std::vector<clock_type::time_point> holed;
  for (const auto& bc : cases) {
    auto p = connect_to(srv.port(), 4096);  // mid-write: the server's write stalls on a closed window early
    ASSERT_GE(p.fd(), 0);
    ASSERT_EQ(p.send(std::string(1, bc.mode)), 1);
    ASSERT_TRUE(marks.wait(bc.mode, 2s)) << "the session never read '" << bc.mode << "'";
    // The peer vanishes: every packet of its connection, either way, is dropped.
    const std::string port = std::to_string(p.local_port());
    nft("add rule inet closewise out tcp sport " + port + " counter drop");
    nft("add rule inet closewise out tcp dport " + port + " counter drop");
    holed.push_back(clock_type::now());
    peers.push_back(std::move(p));
  }
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const auto& bc = cases[i];
    SCOPED_TRACE(std::string("mode ") + bc.mode);
    const auto r = srv.wait_report(peers[i].local_port(), bc.bound + margin + 2s);
    if (!r) {
      // Keep going: each case is judged on its own.
      ADD_FAILURE() << "never ended (" << ms(bc.bound + margin + 2s) << " waited)";
      continue;
    }
    const auto took = r->at - holed[i];
    EXPECT_LE(took, bc.bound + margin) << "ended after " << ms(took) << ": " << r->report.describe();
    EXPECT_EQ(r->report.timeout, bc.timeout) << r->report.describe();
    // The drain gave up at its linger timeout and reset the connection.
    EXPECT_EQ(r->report.cause, close_cause::linger_timeout) << r->report.describe();
    EXPECT_EQ(r->report.drain, drain_end::timeout) << r->report.describe();
    EXPECT_GE(r->report.drain_time, o.stream.linger_timeout) << r->report.describe();
    EXPECT_TRUE(r->report.rst_sent);
    std::printf("black hole '%c': ended %s after the peer vanished (bound %lld ms + margin)\n", bc.mode,
                ms(took).c_str(), static_cast<long long>(bc.bound.count()));
  }
  const auto snap = srv.get().stats().snapshot();
  EXPECT_EQ(snap.timeouts[static_cast<std::size_t>(timeout_kind::idle)], 1u);
  EXPECT_EQ(snap.timeouts[static_cast<std::size_t>(timeout_kind::write)], 1u);
  EXPECT_EQ(snap.linger_timeouts, 3u);
  // Rules in pairs (from the peer, to the peer); the peer itself stays
  // silent, but the server's FIN, data or final RST must have hit the hole.
  const auto dropped = nft_counters();
  ASSERT_EQ(dropped.size(), 2 * cases.size());
  for (std::size_t i = 1; i < dropped.size(); i += 2) EXPECT_GT(dropped[i], 0u) << "nothing fell into hole " << i / 2;
}

}  // namespace
