// closewise-reqresp's HTTPS server in-process under thousands of TLS
// connections of mixed endings, each ending counted by the server exactly as
// the clients ended them; descriptors back to the baseline, and memory flat
// after a warm-up.

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../support/loopback.hpp"
#include "reqresp/http_session.hpp"
#include "tls_peer.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;

namespace {

namespace rr = closewise::reqresp;

// 10,000 connections; 1,000 under the sanitizers (each is a full handshake).
int connection_count() {
#if defined(CLOSEWISE_SANITIZED)
  return 1000;
#else
  return 10000;
#endif
}

std::size_t rss_bytes() {
  std::ifstream in("/proc/self/statm");
  std::size_t pages = 0, resident = 0;
  in >> pages >> resident;
  return resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

// How a client ends its connection.
enum class kind : int {
  close_notify,  // a whole exchange, then close_notify and FIN
  bare_fin,      // a whole exchange, then FIN without close_notify
  truncated,     // half a POST body, then FIN without close_notify
  reset,         // a whole exchange, then RST
  no_handshake,  // a piece of a ClientHello, then FIN
  count
};
constexpr int kinds = static_cast<int>(kind::count);

constexpr std::size_t body_bytes = 2000;

// Whether `got` holds a whole response to GET /bytes/N (N = body_bytes).
bool whole_response(const std::string& got) {
  const auto head_end = got.find("\r\n\r\n");
  return head_end != std::string::npos && got.size() >= head_end + 4 + body_bytes;
}

struct tally {
  std::atomic<int> by_kind[kinds]{};
  std::atomic<int> failures{0};
  std::mutex m;
  std::vector<std::string> examples;
  void fail(const std::string& what) {
    failures.fetch_add(1);
    std::lock_guard l(m);
    if (examples.size() < 5) examples.push_back(what);
  }
};

// One client connection of kind `k`; records what went wrong.
void run_client(std::uint16_t port, int i, kind k, tally& t) {
  const peer_version v = i % 2 == 0 ? peer_version::tls12 : peer_version::tls13;
  tls_peer p;
  if (!p.connect(port)) return t.fail("connect: " + p.error());
  if (k == kind::no_handshake) {
    p.send_raw(tls_peer::client_hello(v).substr(0, 40));
    p.fin();
    const auto r = p.read_all_plain(20s);
    if (r.end == peer_end::timeout) t.fail("no_handshake: the server never closed");
    t.by_kind[static_cast<int>(k)].fetch_add(1);
    return;
  }
  if (!p.handshake(v)) return t.fail("handshake: " + p.error());
  if (k == kind::truncated) {
    const std::string body = pattern(body_bytes);
    p.write("POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: " + std::to_string(body_bytes) + "\r\n\r\n" +
            body.substr(0, body_bytes / 2));
    p.fin();
    const auto r = p.read_all_plain(20s);
    if (r.end == peer_end::timeout) t.fail("truncated: the server never closed");
    if (!r.plain.empty()) t.fail("truncated: the server answered a request cut short");
    t.by_kind[static_cast<int>(k)].fetch_add(1);
    return;
  }
  p.write("GET /bytes/" + std::to_string(body_bytes) + " HTTP/1.1\r\nHost: localhost\r\n\r\n");
  const auto r = p.read_plain_until(whole_response, 20s);
  if (!whole_response(r.plain)) return t.fail("no whole response (" + std::to_string(r.plain.size()) + " bytes)");
  if (r.plain.substr(r.plain.size() - body_bytes) != pattern(body_bytes)) return t.fail("response body differs");
  if (k == kind::reset) {
    p.rst();
  } else {
    if (k == kind::close_notify) p.send_close_notify();
    p.fin();
    const auto end = p.read_all_plain(20s);
    if (end.end != peer_end::close_notify && end.end != peer_end::eof)
      t.fail("after our end the server did not close cleanly");
  }
  t.by_kind[static_cast<int>(k)].fetch_add(1);
}

struct soak_result {
  std::size_t rss_warm = 0;
  std::size_t rss_end = 0;
  int connections = 0;
};

// The soak: every client's ending against the server's counters, and the
// descriptors. Returns the RSS samples for the memory test.
soak_result run_soak() {
  const int total = connection_count();
  static const certificate_pem pem = make_self_signed_certificate("localhost");
  server_options so;
  so.listen = {"127.0.0.1:0"};
  so.threads = 2;
  so.stream.linger_timeout = 2s;
  rr::http_options ho;
  rr::configure_server(so, ho);
  so.tls = std::make_shared<asio::ssl::context>(make_server_context(pem));

  const auto fds = open_fd_count();
  soak_result out;
  tally t;
  {
    auto svc = std::make_shared<rr::http_service>(ho);
    server srv(so, rr::make_session_handler(svc));
    svc->set_stats(&srv.stats());
    srv.start();
    const auto port = parse_endpoint(srv.local_endpoints().front()).port();
    std::thread io([&] { srv.run(); });

    // Two clients at a time, each its own share of the connections; bounded in time as in count.
    const auto deadline = std::chrono::steady_clock::now() + 600s;
    std::atomic<int> next{0};
    const auto client = [&] {
      for (int i = next.fetch_add(1); i < total && std::chrono::steady_clock::now() < deadline; i = next.fetch_add(1)) {
        run_client(port, i, static_cast<kind>(i % kinds), t);
        if (i == total / 5) out.rss_warm = rss_bytes();
      }
    };
    std::thread c1(client), c2(client);
    c1.join();
    c2.join();
    // Every connection's close report is counted before the server stops.
    for (int i = 0; i < 2000 && srv.stats().snapshot().closed < srv.stats().snapshot().accepted; ++i)
      std::this_thread::sleep_for(10ms);
    out.rss_end = rss_bytes();
    const auto s = srv.stats().snapshot();
    srv.stop();
    io.join();

    for (const auto& e : t.examples) ADD_FAILURE() << e;
    EXPECT_EQ(t.failures.load(), 0);
    int done = 0;
    for (const auto& n : t.by_kind) done += n.load();
    out.connections = done;
    EXPECT_EQ(done, total) << "connections not finished within the time bound";
    const auto n = [&](kind k) { return static_cast<std::uint64_t>(t.by_kind[static_cast<int>(k)].load()); };
    const auto ending = [&](tls_ending e) { return s.tls_peer_end[static_cast<std::size_t>(e)]; };
    EXPECT_EQ(s.accepted, static_cast<std::uint64_t>(done));
    EXPECT_EQ(s.closed, s.accepted);
    EXPECT_EQ(s.open, 0u);
    EXPECT_EQ(ending(tls_ending::close_notify), n(kind::close_notify));
    EXPECT_EQ(ending(tls_ending::peer_fin_no_close_notify), n(kind::bare_fin));
    EXPECT_EQ(ending(tls_ending::truncated), n(kind::truncated));
    EXPECT_EQ(ending(tls_ending::reset), n(kind::reset));
    EXPECT_EQ(s.tls_handshakes[static_cast<std::size_t>(tls_handshake::peer_closed)], n(kind::no_handshake));
    EXPECT_EQ(s.tls_handshakes[static_cast<std::size_t>(tls_handshake::ok)],
              n(kind::close_notify) + n(kind::bare_fin) + n(kind::truncated) + n(kind::reset));
    EXPECT_EQ(s.tls_v12 + s.tls_v13, s.tls_handshakes[static_cast<std::size_t>(tls_handshake::ok)]);
    // Every session got our close_notify, except those the client reset first.
    EXPECT_GE(s.tls_close_notify_sent, n(kind::close_notify) + n(kind::bare_fin) + n(kind::truncated));
    std::printf(
        "tls soak: %d connections (%llu TLS 1.2, %llu TLS 1.3): close_notify %llu, bare FIN %llu, truncated %llu, "
        "reset %llu, no handshake %llu; RSS %.1f MiB after %d, %.1f MiB at the end\n",
        done, static_cast<unsigned long long>(s.tls_v12), static_cast<unsigned long long>(s.tls_v13),
        static_cast<unsigned long long>(ending(tls_ending::close_notify)),
        static_cast<unsigned long long>(ending(tls_ending::peer_fin_no_close_notify)),
        static_cast<unsigned long long>(ending(tls_ending::truncated)),
        static_cast<unsigned long long>(ending(tls_ending::reset)),
        static_cast<unsigned long long>(n(kind::no_handshake)), static_cast<double>(out.rss_warm) / (1 << 20),
        total / 5, static_cast<double>(out.rss_end) / (1 << 20));
  }
  EXPECT_EQ(open_fd_count(), fds) << "descriptors not back to the baseline";
  return out;
}

TEST(tls_soak, mixed_endings_are_counted_exactly_and_descriptors_come_back) { static_cast<void>(run_soak()); }

// The same soak, for its memory: the RSS may not grow by more than 4 MiB
// from a fifth of the way in to the end (a leak of 1 KiB per connection
// would add about 8 MiB). Meaningless under the sanitizers' allocators.
TEST(tls_soak, memory_stays_flat_across_the_connections) {
#if defined(CLOSEWISE_SANITIZED)
  GTEST_SKIP() << "the sanitizers' allocators and shadow memory make RSS meaningless";
#endif
  const soak_result r = run_soak();
  EXPECT_LE(r.rss_end, r.rss_warm + (4u << 20)) << "memory grew over " << r.connections << " connections";
}

}  // namespace
