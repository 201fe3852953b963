// How a closewise TLS server's handshake ends, against raw peers: each
// failure is classified (`tls().handshake`) and carried into the close
// report; a peer that trickles its ClientHello is cut at the handshake
// deadline while fresh clients shake hands meanwhile; and hundreds of
// connections of mixed endings leave no descriptor behind.

#include <gtest/gtest.h>

#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/steady_timer.hpp>

#include "tls_harness.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;

namespace {

class tls_handshake_test : public ::testing::TestWithParam<peer_version> {
 protected:
  // The server's handshake against `script` (run on the peer's thread);
  // then the peer's FIN and our graceful close. Returns the close report.
  std::optional<close_report> failed_handshake(tls_server_side& server, tls_peer& peer,
                                               const std::function<void()>& script, tls_handshake want) {
    stream_options o;
    o.linger_timeout = 2s;
    tls_stream s = server.accept(o);
    std::optional<error_code> hs;
    {
      peer_thread t(script);
      hs = server_handshake(ioc_, s);
    }
    EXPECT_TRUE(hs.has_value());
    if (!hs) return std::nullopt;
    EXPECT_TRUE(*hs) << "the handshake succeeded";
    EXPECT_EQ(s.tls().handshake, want) << to_string(s.tls().handshake) << ": " << hs->message();
    EXPECT_FALSE(s.tls().handshake_error.empty());
    peer.fin();
    auto r = close_and_wait(ioc_, s, close_policy::graceful);
    EXPECT_TRUE(r.has_value());
    if (!r) return r;
    EXPECT_TRUE(r->tls.has_value());
    if (!r->tls) return std::nullopt;
    const std::string d = r->describe();
    EXPECT_EQ(r->tls->handshake, want) << d;
    EXPECT_FALSE(r->tls->close_notify_sent) << d;  // no session, no close_notify
    EXPECT_NE(d.find(std::string("handshake=") + std::string(to_string(want))), std::string::npos) << d;
    return r;
  }

  asio::io_context ioc_;
};

// A client that verifies our certificate against an empty trust store
// rejects it with an alert: the server sees `alert_received`.
TEST_P(tls_handshake_test, a_client_that_rejects_our_certificate_is_alert_received) {
  tls_server_side server(ioc_, only(GetParam()));
  tls_peer peer;
  ASSERT_TRUE(peer.connect(server.port()));
  bool peer_ok = true;
  failed_handshake(
      server, peer, [&] { peer_ok = peer.handshake(GetParam(), /*verify=*/true); }, tls_handshake::alert_received);
  EXPECT_FALSE(peer_ok);
}

// Server TLS 1.2 only, client TLS 1.3 only: `wrong_version`.
TEST(tls_handshake, a_version_mismatch_is_wrong_version) {
  asio::io_context ioc;
  tls_server_side server(ioc, tls_versions::tls12_only);
  tls_peer peer;
  ASSERT_TRUE(peer.connect(server.port()));
  stream_options o;
  o.linger_timeout = 2s;
  tls_stream s = server.accept(o);
  bool peer_ok = true;
  std::optional<error_code> hs;
  {
    peer_thread t([&] { peer_ok = peer.handshake(peer_version::tls13); });
    hs = server_handshake(ioc, s);
  }
  ASSERT_TRUE(hs.has_value());
  EXPECT_FALSE(peer_ok);
  EXPECT_EQ(s.tls().handshake, tls_handshake::wrong_version) << hs->message();
  peer.fin();
  const auto r = close_and_wait(ioc, s, close_policy::graceful);
  ASSERT_TRUE(r && r->tls);
  EXPECT_EQ(r->tls->handshake, tls_handshake::wrong_version) << r->describe();
  EXPECT_FALSE(r->tls->close_notify_sent) << r->describe();
}

// Plain HTTP sent to the TLS port: `plaintext_http`.
TEST_P(tls_handshake_test, plain_http_to_the_tls_port_is_plaintext_http) {
  tls_server_side server(ioc_, only(GetParam()));
  tls_peer peer;
  ASSERT_TRUE(peer.connect(server.port()));
  failed_handshake(
      server, peer, [&] { peer.send_raw("GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n"); },
      tls_handshake::plaintext_http);
}

// The peer's FIN or RST before the handshake finished: after nothing, in
// the middle of its ClientHello, or after the whole of it (the server's
// answer then meets a peer that is gone): `peer_closed`, every time.
TEST_P(tls_handshake_test, the_peer_closing_mid_handshake_is_peer_closed) {
  tls_server_side server(ioc_, only(GetParam()));
  const std::string hello = tls_peer::client_hello(GetParam());
  ASSERT_GT(hello.size(), 10u);
  const int reps = std::min(tls_reps(20), 5);
  for (int rep = 0; rep < reps; ++rep) {
    for (const std::size_t sent : {std::size_t{0}, hello.size() / 2, hello.size()}) {
      for (const bool reset : {false, true}) {
        SCOPED_TRACE("sent " + std::to_string(sent) + (reset ? " then RST" : " then FIN"));
        tls_peer peer;
        ASSERT_TRUE(peer.connect(server.port()));
        stream_options o;
        o.linger_timeout = 2s;
        tls_stream s = server.accept(o);
        ASSERT_TRUE(peer.send_raw(hello.substr(0, sent)));
        if (reset) {
          peer.rst();
        } else {
          peer.fin();
        }
        const auto hs = server_handshake(ioc_, s);
        ASSERT_TRUE(hs.has_value());
        EXPECT_EQ(s.tls().handshake, tls_handshake::peer_closed) << hs->message();
        const auto r = close_and_wait(ioc_, s, close_policy::graceful);
        ASSERT_TRUE(r && r->tls);
        EXPECT_EQ(r->tls->handshake, tls_handshake::peer_closed) << r->describe();
        EXPECT_FALSE(r->tls->close_notify_sent) << r->describe();
        EXPECT_EQ(r->tls->peer_end, tls_ending::none) << r->describe();
        if (HasFailure()) return;
      }
    }
  }
}

// A TLS slowloris: a client that sends its ClientHello one byte every
// 100 ms is cut at the handshake deadline (timed_out, `timeout`, not
// before the deadline), and clients that start meanwhile shake hands
// before it is cut: one slow handshake holds nothing up.
TEST_P(tls_handshake_test, a_trickled_client_hello_is_cut_at_the_deadline_while_others_shake_hands) {
  tls_options topts;
  topts.handshake_timeout = 500ms;
  tls_server_side server(ioc_, only(GetParam()), topts);
  const std::string hello = tls_peer::client_hello(GetParam());
  ASSERT_GT(hello.size(), 20u);  // 100 ms a byte: the whole would take seconds
  constexpr int fresh_count = 3;

  // The server: every accepted connection shakes hands; completions are
  // numbered in the order they happen.
  std::list<tls_stream> streams;
  struct outcome {
    int order = -1;
    error_code ec;
    tls_handshake how = tls_handshake::none;
    std::chrono::nanoseconds took{0};
  };
  std::vector<outcome> outcomes;  // by accept order: [0] is the slowloris
  int completed = 0;
  std::function<void()> accept_next = [&] {
    server.acceptor().async_accept([&](error_code ec, tcp::socket sock) {
      if (ec) return;
      auto& s = streams.emplace_back(std::move(sock), server.context(), stream_options{}, topts);
      const std::size_t idx = outcomes.size();
      outcomes.emplace_back();
      s.async_handshake(asio::ssl::stream_base::server, [&, idx, sp = &s](error_code hec) {
        outcomes[idx] = {completed++, hec, sp->tls().handshake, sp->tls().handshake_time};
      });
      accept_next();
    });
  };
  accept_next();

  tls_peer slow;
  ASSERT_TRUE(slow.connect(server.port()));
  ASSERT_TRUE(run_until(ioc_, [&] { return outcomes.size() == 1; }));

  // The trickle: one byte every 100 ms; after its first byte, the fresh clients start.
  std::vector<std::unique_ptr<tls_peer>> fresh;
  std::vector<std::unique_ptr<peer_thread>> fresh_threads;
  std::vector<char> fresh_ok(fresh_count, 0);
  std::size_t trickled = 0;
  asio::steady_timer trickle(ioc_);
  std::function<void()> tick = [&] {
    if (trickled >= hello.size() || outcomes[0].order >= 0) return;
    slow.send_raw(hello.substr(trickled++, 1));
    if (trickled == 1) {
      for (int i = 0; i < fresh_count; ++i) {
        auto& p = *fresh.emplace_back(std::make_unique<tls_peer>());
        fresh_threads.push_back(std::make_unique<peer_thread>([&p, &fresh_ok, i, v = GetParam(), port = server.port()] {
          fresh_ok[i] = p.connect(port) && p.handshake(v);
        }));
      }
    }
    trickle.expires_after(100ms);
    trickle.async_wait([&](error_code ec) {
      if (!ec) tick();
    });
  };
  tick();

  const bool done = run_until(ioc_, [&] {
    if (outcomes.size() < 1 + fresh_count) return false;
    for (const auto& o : outcomes)
      if (o.order < 0) return false;
    return true;
  });
  trickle.cancel();
  fresh_threads.clear();  // joins: each handshake is bounded
  ASSERT_TRUE(done) << "accepted " << outcomes.size() << ", completed " << completed;

  const outcome& cut = outcomes[0];
  EXPECT_EQ(cut.ec, asio::error::timed_out) << cut.ec.message();
  EXPECT_EQ(cut.how, tls_handshake::timeout);
  EXPECT_GE(cut.took, topts.handshake_timeout);
  EXPECT_LT(trickled, hello.size());
  for (int i = 1; i <= fresh_count; ++i) {
    EXPECT_FALSE(outcomes[i].ec) << outcomes[i].ec.message();
    EXPECT_EQ(outcomes[i].how, tls_handshake::ok);
    EXPECT_LT(outcomes[i].order, cut.order) << "a fresh handshake waited for the slowloris to be cut";
    EXPECT_TRUE(fresh_ok[i - 1]);
  }

  slow.fin();
  stream_options o;
  o.linger_timeout = 2s;
  streams.front().tcp().set_options(o);
  const auto r = close_and_wait(ioc_, streams.front(), close_policy::graceful);
  ASSERT_TRUE(r && r->tls);
  EXPECT_EQ(r->tls->handshake, tls_handshake::timeout) << r->describe();
  EXPECT_FALSE(r->tls->close_notify_sent) << r->describe();
  for (auto it = std::next(streams.begin()); it != streams.end(); ++it) {
    std::optional<close_report> fr = close_and_wait(ioc_, *it, close_policy::abortive);
    EXPECT_TRUE(fr.has_value());
  }
  server.acceptor().close();
  run_until(
      ioc_, [] { return false; }, 50ms);  // the cancelled accept's handler runs
}

INSTANTIATE_TEST_SUITE_P(tls, tls_handshake_test, ::testing::Values(peer_version::tls12, peer_version::tls13),
                         [](const auto& info) { return std::string(name(info.param)); });

// Hundreds of connections, their endings mixed (handshake failures,
// truncations, resets, clean closes), each closed gracefully: as many
// descriptors open after as before. Bounded in count (CLOSEWISE_TEST_REPS
// scales it) and in time.
TEST(tls_handshake, descriptors_stay_flat_across_mixed_endings) {
  asio::io_context ioc;
  tls_server_side s12(ioc, tls_versions::tls12_only), s13(ioc, tls_versions::tls13_only);
  const std::string msg = "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n" + pattern(1000);
  const int count = 25 * tls_reps(20);
  const auto deadline = std::chrono::steady_clock::now() + 240s;
  std::size_t before = 0;
  int done = 0;
  for (int i = 0; i < count && std::chrono::steady_clock::now() < deadline; ++i) {
    // One-time lazy initialisation (OpenSSL, Asio) is over after the first few.
    if (i == 10) before = open_fd_count();
    const peer_version v = i % 2 == 0 ? peer_version::tls12 : peer_version::tls13;
    tls_server_side& server = v == peer_version::tls12 ? s12 : s13;
    const int kind = (i / 2) % 6;
    tls_peer peer;
    ASSERT_TRUE(peer.connect(server.port()));
    stream_options o;
    o.linger_timeout = 2s;
    tls_stream s = server.accept(o);
    {
      peer_thread script([&] {
        switch (kind) {
          case 0:  // plain HTTP
            peer.send_raw("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
            peer.fin();
            return;
          case 1:  // FIN mid-ClientHello
            peer.send_raw(tls_peer::client_hello(v).substr(0, 30));
            peer.fin();
            return;
          case 2:  // RST mid-ClientHello
            peer.send_raw(tls_peer::client_hello(v).substr(0, 30));
            peer.rst();
            return;
          default:
            break;
        }
        if (!peer.handshake(v)) return;
        if (kind == 3) {  // truncation: half the message, then FIN
          peer.write(msg.substr(0, msg.size() / 2));
          peer.fin();
        } else if (kind == 4) {  // clean: the message, close_notify, FIN
          peer.write(msg);
          peer.send_close_notify();
          peer.fin();
        } else {  // the message, then RST
          peer.write(msg);
          peer.rst();
        }
      });
      const auto hs = server_handshake(ioc, s);
      ASSERT_TRUE(hs.has_value());
      if (!*hs) {
        std::array<char, 4096> buf{};
        std::optional<error_code> end;
        std::function<void()> read = [&] {
          s.async_read_some(asio::buffer(buf), [&](error_code ec, std::size_t) {
            if (ec) {
              end = ec;
            } else {
              read();
            }
          });
        };
        read();
        ASSERT_TRUE(run_until(ioc, [&] { return end.has_value(); }));
      }
    }
    const auto r = close_and_wait(ioc, s, close_policy::graceful);
    ASSERT_TRUE(r.has_value());
    ++done;
  }
  EXPECT_EQ(done, count) << "the time bound cut the run";
  EXPECT_EQ(open_fd_count(), before);
}

}  // namespace
