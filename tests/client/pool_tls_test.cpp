// closewise::client_pool and closewise::http_client over TLS ("tls:HOST:PORT"
// targets): the idle race sweep against closewise-reqresp serving TLS
// in-process, POSTs never executed twice, and a raw OpenSSL server (blocking,
// a thread per connection) that does one thing while the client's connection
// waits idle: sends a TLS 1.3 NewSessionTicket, close_notify and FIN, a bare
// FIN, or application data. The client verifies the server's throwaway
// certificate (its IP entry 127.0.0.1).

#include <gtest/gtest.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "../support/descriptors.hpp"
#include "../support/loopback.hpp"
#include "closewise/client_pool.hpp"
#include "closewise/http_client.hpp"
#include "closewise/tls.hpp"
#include "pool_support.hpp"
#include "poolsweep/sweep.hpp"
#include "reqresp/http_session.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;
namespace rr = closewise::reqresp;
namespace ps = closewise::poolsweep;

namespace {

// Reuses of the TLS sweep: 2,000; 400 under a sanitizer or when
// CLOSEWISE_TEST_REPS says the build is slow; CLOSEWISE_POOL_REUSES (the
// TCP sweep's count) sets it to 10 % of that count. Fewer than over TCP, by
// 50 users instead of 300: a handshake per fresh connection costs the
// client's one thread enough that, on a busy machine, a client with more
// users lags between connect and first request. The server's
// first_input_timeout covers the wait for the ClientHello, but the wait for
// the first request after the handshake is the session's, under the 200 ms
// idle timeout: a lag past it closes a fresh connection (a failure, not the
// keep-alive race under test).
std::uint64_t tls_sweep_reuses() {
  if (const auto n = pool_reuses_from_env()) return std::max<std::uint64_t>(100, *n / 10);
  return slow_build() ? 400 : 2000;
}

constexpr unsigned sweep_users = 50;

// The certificate every server of this file uses, and the trust of every client.
const certificate_pem& test_certificate() {
  static const certificate_pem pem = make_self_signed_certificate("localhost");
  return pem;
}

// NewSessionTicket messages the clients of `verifying_client` received.
std::atomic<int> tickets_received{0};

int count_ticket(SSL*, SSL_SESSION*) {
  ++tickets_received;
  return 0;  // not kept: OpenSSL frees the session
}

// A client context that verifies the test certificate and counts the
// session tickets it receives.
std::shared_ptr<asio::ssl::context> verifying_client() {
  auto ctx = std::make_shared<asio::ssl::context>(make_client_context(test_certificate().certificate));
  ::SSL_CTX_set_session_cache_mode(ctx->native_handle(), SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  ::SSL_CTX_sess_set_new_cb(ctx->native_handle(), count_ticket);
  return ctx;
}

pool_options tls_pool_options() {
  pool_options o;
  o.tls.context = verifying_client();
  return o;
}

server_options tls_server(std::chrono::milliseconds idle, tls_versions v = tls_versions::tls12_and_13,
                          bool session_tickets = true) {
  server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = 1;
  o.stream.idle_timeout = idle;
  // A new connection's ClientHello may wait longer than the idle timeout
  // between requests (pool_test.cpp's idle_200ms_server says why).
  o.first_input_timeout = 10s;
  tls_context_options co;
  co.versions = v;
  co.session_tickets = session_tickets;
  o.tls = std::make_shared<asio::ssl::context>(make_server_context(test_certificate(), co));
  return o;
}

// Runs `ioc` for `d` (the client's connection waits idle meanwhile).
void idle_for(asio::io_context& ioc, std::chrono::milliseconds d) {
  const auto end = clock_type::now() + d;
  static_cast<void>(run_until(
      ioc, [&] { return clock_type::now() >= end; }, d + 5s));
}

// ---- the sweeps ------------------------------------------------------------

ps::sweep_result tls_sweep(const std::string& endpoint, http::verb method, unsigned users, std::uint64_t reuses) {
  ps::sweep_config c;
  c.target = "tls:" + endpoint;
  c.method = method;
  c.path = method == http::verb::get ? "/bytes/64" : "/count";
  c.users = users;
  c.reuses = reuses;
  c.pool = tls_pool_options();
  c.pool.idle_timeout = 30s;  // the server closes first: the race is the pool's to survive
  c.limit = std::chrono::milliseconds(60000 + reuses * 40);
  const ps::sweep_result r = ps::run_pool_sweep(c);
  std::printf("pool: TLS %s %s\n", method == http::verb::get ? "GET" : "POST", r.line().c_str());
  std::printf("pool: TLS %s\n", r.stats.describe().c_str());
  std::fflush(stdout);
  EXPECT_TRUE(r.finished);
  return r;
}

// The race sweep over TLS: 50 users reuse connections to closewise-reqresp
// serving TLS with a 200 ms idle timeout, with gaps of 200 +- 20 ms. No GET
// failure reaches a caller; the server's idle closes (close_notify, FIN)
// are seen while idle; session tickets are never taken for bytes.
TEST(client_pool_tls, race_sweep_get_no_failures) {
  const std::size_t sockets_before = sockets_open();
  {
    rr::http_server srv(tls_server(200ms), {});
    const auto s = tls_sweep(srv.endpoint(), http::verb::get, sweep_users, tls_sweep_reuses());
    const pool_stats& st = s.stats;
    EXPECT_EQ(s.failures, 0u) << s.describe_errors();
    EXPECT_GE(st.reuses, tls_sweep_reuses());
    EXPECT_GT(st.fins_seen_idle, 0u);
    EXPECT_EQ(st.bytes_seen_idle, 0u);
    EXPECT_EQ(st.connect_failures, 0u);
    EXPECT_EQ(st.failed_connection + st.failed_protocol + st.failed_timeout + st.failed_stale_reuse_not_retried, 0u);
  }
  EXPECT_EQ(sockets_open(), sockets_before);
}

// POSTs over TLS across the server's idle close: none is executed twice, and
// every failure that reaches a caller is stale_reuse_not_retried.
TEST(client_pool_tls, race_sweep_post_never_twice) {
  const std::size_t sockets_before = sockets_open();
  {
    counting_server srv(tls_server(200ms));
    const auto s =
        tls_sweep(srv.endpoint(), http::verb::post, sweep_users, std::max<std::uint64_t>(100, tls_sweep_reuses() / 4));
    const pool_stats& st = s.stats;
    EXPECT_EQ(srv.counter().duplicates(), 0u);
    EXPECT_EQ(s.other_failures, 0u) << s.describe_errors();
    EXPECT_EQ(s.stale, st.failed_stale_reuse_not_retried);
    EXPECT_EQ(st.retries, 0u);
    EXPECT_GT(st.fins_seen_idle, 0u);
    EXPECT_GE(srv.counter().executed(), s.requests - s.failures);
    EXPECT_LE(srv.counter().executed(), s.requests);
  }
  EXPECT_EQ(sockets_open(), sockets_before);
}

// ---- against closewise-reqresp: TLS 1.3 tickets, the pool's own close -----

// A TLS 1.3 server sends its session tickets after the handshake: they are
// not application data, and the connection idle after its first exchange is
// reused. At its idle limit the pool closes it with close_notify.
TEST(client_pool_tls, tls13_session_tickets_do_not_discard_an_idle_connection) {
  const std::size_t sockets_before = sockets_open();
  {
    rr::http_server srv(tls_server(5s, tls_versions::tls13_only), {});
    const std::string target = "tls:" + srv.endpoint();
    asio::io_context ioc;
    {
      pool_options o = tls_pool_options();
      o.idle_timeout = 600ms;
      client_pool pool(ioc.get_executor(), o);
      std::vector<close_report> reports;
      pool.on_close([&](const std::string&, const close_report& r) { reports.push_back(r); });
      http_client client(pool);
      const int tickets_before = tickets_received.load();
      const http_result first = run_request(ioc, client, target, make_request(http::verb::get, "/bytes/5"));
      ASSERT_FALSE(first.ec) << first.ec.message();
      EXPECT_EQ(first.response.body(), pattern(5));
      idle_for(ioc, 300ms);
      EXPECT_GT(tickets_received.load(), tickets_before);
      EXPECT_EQ(pool.idle(target), 1u);
      const http_result second = run_request(ioc, client, target, make_request(http::verb::get, "/bytes/6"));
      ASSERT_FALSE(second.ec) << second.ec.message();
      EXPECT_TRUE(second.reused);
      EXPECT_EQ(second.response.body(), pattern(6));
      ASSERT_TRUE(run_until(
          ioc, [&] { return reports.size() == 1; }, 20s));
      const pool_stats st = pool.stats();
      EXPECT_EQ(st.connects, 1u);
      EXPECT_EQ(st.reuses, 1u);
      EXPECT_EQ(st.bytes_seen_idle, 0u);
      EXPECT_EQ(st.idle_expired, 1u);
      ASSERT_TRUE(reports[0].tls.has_value());
      EXPECT_EQ(reports[0].tls->version, "TLSv1.3");
      EXPECT_TRUE(reports[0].tls->close_notify_sent);
      EXPECT_EQ(reports[0].first_fin, side::local);
    }
    settle(ioc);
  }
  EXPECT_EQ(sockets_open(), sockets_before);
}

// The handshake counts within the connect timeout: a server that accepts
// TCP and never answers the ClientHello fails the connect with timed_out.
TEST(client_pool_tls, handshake_counts_within_the_connect_timeout) {
  const std::size_t sockets_before = sockets_open();
  {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    ASSERT_EQ(::listen(fd, 4), 0);  // the kernel completes the TCP handshake; nobody speaks TLS
    socklen_t len = sizeof(a);
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    const std::string target = "tls:127.0.0.1:" + std::to_string(ntohs(a.sin_port));
    asio::io_context ioc;
    {
      client_pool pool(ioc.get_executor(), tls_pool_options());
      http_client client(pool);
      request_timeouts t;
      t.connect = 300ms;  // the request's connect bound, which the handshake falls within
      const auto start = clock_type::now();
      const http_result r = run_request(ioc, client, target, make_request(http::verb::get, "/"), t);
      const auto elapsed = clock_type::now() - start;
      EXPECT_EQ(r.ec, asio::error::timed_out) << r.ec.message();
      EXPECT_GE(elapsed, 250ms);  // (the handshake gets what is left, in whole milliseconds)
      EXPECT_LT(elapsed, 4s);     // the bound, loosely: a busy machine may be slow to wake us
      EXPECT_EQ(pool.stats().connect_failures, 1u);
      EXPECT_EQ(pool.stats().failed_connect, 1u);
      EXPECT_EQ(pool.open(target), 0u);
    }
    settle(ioc);
    ::close(fd);
  }
  EXPECT_EQ(sockets_open(), sockets_before);
}

// ---- session resumption ----------------------------------------------------

struct resumption_case {
  const char* name;
  tls_versions versions;
  bool server_tickets;  // the server issues tickets
  bool resume;          // pool_tls_options::resume_sessions
  bool resumes;         // what must happen
};

void PrintTo(const resumption_case& c, std::ostream* os) { *os << c.name; }

class client_pool_tls_resumption : public ::testing::TestWithParam<resumption_case> {};

// Four requests, each on a new connection (the previous one expired idle):
// the first handshake is full; each later one resumes the session the
// previous connection left with its target when it was given back, over
// TLS 1.3 (a ticket) and TLS 1.2 (an RFC 5077 ticket), and its report says
// so. Then two connections opened at once: one session, offered once, so
// exactly one resumes. With resumption off at either end every handshake is
// full, and nothing fails either way.
TEST_P(client_pool_tls_resumption, new_connections_resume_the_targets_last_session) {
  const resumption_case& c = GetParam();
  const std::size_t sockets_before = sockets_open();
  {
    rr::http_server srv(tls_server(5s, c.versions, c.server_tickets), {});
    const std::string target = "tls:" + srv.endpoint();
    asio::io_context ioc;
    {
      pool_options o = tls_pool_options();
      o.tls.resume_sessions = c.resume;
      o.idle_timeout = 50ms;  // each request finds the previous connection gone
      client_pool pool(ioc.get_executor(), o);
      std::vector<close_report> reports;
      pool.on_close([&](const std::string&, const close_report& r) { reports.push_back(r); });
      http_client client(pool);
      for (std::size_t i = 0; i < 4; ++i) {
        const http_result r = run_request(ioc, client, target, make_request(http::verb::get, "/bytes/7"));
        ASSERT_FALSE(r.ec) << "request " << i << ": " << r.ec.message();
        EXPECT_EQ(r.response.body(), pattern(7));
        EXPECT_FALSE(r.reused) << "request " << i;
        ASSERT_TRUE(run_until(
            ioc, [&] { return reports.size() == i + 1; }, 20s));
        const close_report& rep = reports.back();
        ASSERT_TRUE(rep.tls.has_value()) << "request " << i;
        EXPECT_EQ(rep.tls->session_resumed, c.resumes && i > 0) << "request " << i << ": " << rep.describe();
        EXPECT_EQ(rep.tls->version, c.versions == tls_versions::tls12_only ? "TLSv1.2" : "TLSv1.3");
      }
      EXPECT_EQ(pool.stats().connects, 4u);
      EXPECT_EQ(pool.stats().tls_resumed, c.resumes ? 3u : 0u) << pool.stats().describe();
      auto ms = [&](std::size_t i) {
        return std::chrono::duration<double, std::milli>(reports[i].tls->handshake_time).count();
      };
      std::printf("pool: TLS resumption %s: handshakes %.2f, %.2f, %.2f, %.2f ms, %llu resumed\n", c.name, ms(0), ms(1),
                  ms(2), ms(3), static_cast<unsigned long long>(pool.stats().tls_resumed));

      // Two at once: the last connection's session goes to one of them only.
      const std::uint64_t resumed_before = pool.stats().tls_resumed;
      std::vector<pool_lease> leases;
      int done = 0;
      for (int i = 0; i < 2; ++i) {
        asio::co_spawn(ioc, pool.acquire(target, clock_type::now() + 10s, true),
                       [&](std::exception_ptr e, std::pair<error_code, pool_lease> r) {
                         ++done;
                         EXPECT_FALSE(e);
                         EXPECT_FALSE(r.first) << r.first.message();
                         leases.push_back(std::move(r.second));
                       });
      }
      ASSERT_TRUE(run_until(
          ioc, [&] { return done == 2; }, 20s));
      EXPECT_EQ(pool.stats().tls_resumed - resumed_before, c.resumes ? 1u : 0u) << pool.stats().describe();
      int closed = 0;
      for (auto& l : leases) {
        asio::co_spawn(ioc, pool.close(std::move(l), close_policy::graceful),
                       [&](std::exception_ptr e, const close_report&) {
                         EXPECT_FALSE(e);
                         ++closed;
                       });
      }
      ASSERT_TRUE(run_until(
          ioc, [&] { return closed == 2; }, 20s));
      EXPECT_EQ(pool.stats().failed_connect + pool.stats().failed_connection + pool.stats().failed_protocol, 0u);
    }
    settle(ioc);
  }
  EXPECT_EQ(sockets_open(), sockets_before);
}

INSTANTIATE_TEST_SUITE_P(
    cases, client_pool_tls_resumption,
    ::testing::Values(resumption_case{"tls13", tls_versions::tls13_only, true, true, true},
                      resumption_case{"tls12", tls_versions::tls12_only, true, true, true},
                      resumption_case{"tls13_pool_resumption_off", tls_versions::tls13_only, true, false, false},
                      resumption_case{"tls13_server_without_tickets", tls_versions::tls13_only, false, true, false}),
    [](const ::testing::TestParamInfo<resumption_case>& i) { return std::string(i.param.name); });

// ---- a raw OpenSSL server that acts while the client idles ---------------

enum class idle_act { ticket, close_notify_and_fin, bare_fin, data };

// TLS 1.3 only, no ticket after the handshake (SSL_set_num_tickets 0): the
// only ticket the client gets is the one `idle_act::ticket` sends while it
// idles. Each connection: answer one request, wait 100 ms, act, then answer
// requests until the client ends the connection.
class idle_act_server {
 public:
  explicit idle_act_server(idle_act act)
      : act_(act), ctx_(make_server_context(test_certificate(), [] {
          tls_context_options o;
          o.versions = tls_versions::tls13_only;
          return o;
        }())) {}
  std::string target() const { return "tls:127.0.0.1:" + std::to_string(acceptor_.port()); }
  int acted() const { return acted_.load(); }

 private:
  // Reads one request header (no body); false on the client's end, an error or 10 s.
  static bool read_request(SSL* ssl, std::string& pending) {
    char buf[4096];
    while (pending.find("\r\n\r\n") == std::string::npos) {
      const int n = ::SSL_read(ssl, buf, sizeof(buf));
      if (n <= 0) return false;
      pending.append(buf, static_cast<std::size_t>(n));
    }
    pending.erase(0, pending.find("\r\n\r\n") + 4);
    return true;
  }

  // Waits (within the receive timeout) for the client's close_notify, FIN or RST.
  static void wait_for_client_end(int fd) {
    char buf[4096];
    while (::recv(fd, buf, sizeof(buf), 0) > 0) {
    }
  }

  void serve(int fd) {
    const timeval tv{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    SSL* ssl = ::SSL_new(ctx_.native_handle());
    ::SSL_set_num_tickets(ssl, 0);
    ::SSL_set_fd(ssl, fd);
    std::string pending;
    if (::SSL_accept(ssl) == 1 && read_request(ssl, pending) &&
        ::SSL_write(ssl, ok_response.data(), static_cast<int>(ok_response.size())) > 0) {
      std::this_thread::sleep_for(100ms);
      ++acted_;
      switch (act_) {
        case idle_act::ticket:
          ::SSL_new_session_ticket(ssl);
          ::SSL_do_handshake(ssl);  // sends it now
          while (read_request(ssl, pending)) {
            ::SSL_write(ssl, ok_response.data(), static_cast<int>(ok_response.size()));
          }
          break;
        case idle_act::close_notify_and_fin:
          ::SSL_shutdown(ssl);
          ::shutdown(fd, SHUT_WR);
          wait_for_client_end(fd);
          break;
        case idle_act::bare_fin:
          ::shutdown(fd, SHUT_WR);
          wait_for_client_end(fd);
          break;
        case idle_act::data:
          ::SSL_write(ssl, "surprise", 8);
          wait_for_client_end(fd);
          break;
      }
    }
    ::SSL_free(ssl);
    ::close(fd);
  }

  idle_act act_;
  asio::ssl::context ctx_;
  std::atomic<int> acted_{0};
  threaded_acceptor acceptor_{[this](int fd, int) { serve(fd); }, false};
};

struct idle_outcome {
  pool_stats stats;
  std::size_t idle_after = 0;
  int tickets = 0;  // received while idle
  std::vector<close_report> reports;
  http_result second;
};

// One request, 400 ms idle (the server acts at 100 ms), then a second
// request; afterwards the process holds as many sockets as before.
idle_outcome idle_through(idle_act act) {
  const std::size_t sockets_before = sockets_open();
  idle_outcome out;
  {
    idle_act_server srv(act);
    asio::io_context ioc;
    {
      client_pool pool(ioc.get_executor(), tls_pool_options());
      pool.on_close([&](const std::string&, const close_report& r) { out.reports.push_back(r); });
      http_client client(pool);
      const http_result first = run_request(ioc, client, srv.target(), make_request(http::verb::get, "/"));
      EXPECT_FALSE(first.ec) << first.ec.message();
      const int tickets_before = tickets_received.load();
      idle_for(ioc, 400ms);
      EXPECT_EQ(srv.acted(), 1);
      out.tickets = tickets_received.load() - tickets_before;
      out.idle_after = pool.idle(srv.target());
      out.stats = pool.stats();
      out.second = run_request(ioc, client, srv.target(), make_request(http::verb::get, "/"));
    }
    settle(ioc);
  }
  EXPECT_EQ(sockets_open(), sockets_before);
  return out;
}

// What the three acts that end the connection share: it left the pool while
// idle, and the second request succeeded on a fresh connection.
void expect_dropped_then_reconnected(const idle_outcome& out) {
  EXPECT_EQ(out.idle_after, 0u);
  EXPECT_FALSE(out.second.ec) << out.second.ec.message();
  EXPECT_FALSE(out.second.reused);
}

// The server's close while idle (close_notify and FIN, or a bare FIN): one
// FIN seen while idle, and the close report's TLS ending is `how`.
void expect_servers_close(const idle_outcome& out, tls_ending how) {
  expect_dropped_then_reconnected(out);
  EXPECT_EQ(out.stats.fins_seen_idle, 1u);
  ASSERT_FALSE(out.reports.empty());
  ASSERT_TRUE(out.reports[0].tls.has_value());
  EXPECT_EQ(out.reports[0].tls->peer_end, how);
}

// A ticket sent while the connection idles is consumed by OpenSSL: the
// connection stays in the pool and is reused.
TEST(client_pool_tls, ticket_while_idle_keeps_the_connection) {
  const auto out = idle_through(idle_act::ticket);
  EXPECT_EQ(out.tickets, 1);
  EXPECT_EQ(out.idle_after, 1u);
  EXPECT_EQ(out.stats.bytes_seen_idle + out.stats.fins_seen_idle + out.stats.resets_seen_idle, 0u);
  EXPECT_FALSE(out.second.ec) << out.second.ec.message();
  EXPECT_TRUE(out.second.reused);
}

// close_notify then FIN while idle: the server's close, seen at once.
TEST(client_pool_tls, close_notify_while_idle_is_the_servers_close) {
  const auto out = idle_through(idle_act::close_notify_and_fin);
  ASSERT_NO_FATAL_FAILURE(expect_servers_close(out, tls_ending::close_notify));
  EXPECT_EQ(out.stats.bytes_seen_idle, 0u);
  EXPECT_TRUE(out.reports[0].tls->close_notify_sent);  // (which FIN was first depends on timing)
}

// A FIN without close_notify while idle: the server's close too (after a
// complete response: not a truncation).
TEST(client_pool_tls, bare_fin_while_idle_is_the_servers_close) {
  const auto out = idle_through(idle_act::bare_fin);
  expect_servers_close(out, tls_ending::peer_fin_no_close_notify);
}

// Application data nobody asked for while idle: the connection is discarded.
TEST(client_pool_tls, application_data_while_idle_discards_the_connection) {
  const auto out = idle_through(idle_act::data);
  expect_dropped_then_reconnected(out);
  EXPECT_EQ(out.stats.bytes_seen_idle, 1u);
  EXPECT_EQ(out.stats.fins_seen_idle, 0u);
}

}  // namespace
