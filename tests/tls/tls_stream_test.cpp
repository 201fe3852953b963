// basic_tls_stream end to end between two closewise TLS streams on loopback:
// the handshake's facts, close_notify each way, and the close policies.

#include <gtest/gtest.h>

#include <optional>
#include <string>

#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include "../support/loopback.hpp"
#include "closewise/tls.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;

namespace {

using tls_stream = basic_tls_stream<tcp::socket>;

// A connected pair of TLS streams after their handshake: `server` accepted, `client` connected.
struct tls_pair {
  asio::io_context& ioc;
  asio::ssl::context server_ctx;
  asio::ssl::context client_ctx;
  std::optional<tls_stream> server;
  std::optional<tls_stream> client;

  tls_pair(asio::io_context& io, const certificate_pem& pem, tls_versions v)
      : ioc(io),
        server_ctx(make_server_context(pem, {v, true})),
        client_ctx(make_client_context(pem.certificate, {v, true})) {
    tcp::acceptor acceptor(ioc, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
    tcp::socket c(ioc);
    c.connect(acceptor.local_endpoint());
    tcp::socket s(ioc);
    acceptor.accept(s);
    server.emplace(std::move(s), server_ctx);
    client.emplace(std::move(c), client_ctx);
    ::SSL_set_tlsext_host_name(client->native_handle(), "localhost");
    std::optional<error_code> se, ce;
    server->async_handshake(asio::ssl::stream_base::server, [&](error_code ec) { se = ec; });
    client->async_handshake(asio::ssl::stream_base::client, [&](error_code ec) { ce = ec; });
    EXPECT_TRUE(run_until(ioc, [&] { return se && ce; }));
    EXPECT_FALSE(se.value_or(asio::error::timed_out)) << se->message();
    EXPECT_FALSE(ce.value_or(asio::error::timed_out)) << ce->message();
  }
};

class tls_stream_test : public ::testing::TestWithParam<tls_versions> {
 protected:
  static const certificate_pem& pem() {
    static const certificate_pem p = make_self_signed_certificate("localhost");
    return p;
  }
  asio::io_context ioc_;
};

std::string expected_version(tls_versions v) { return v == tls_versions::tls12_only ? "TLSv1.2" : "TLSv1.3"; }

TEST_P(tls_stream_test, the_handshake_records_version_alpn_and_time) {
  tls_pair p(ioc_, pem(), GetParam());
  EXPECT_EQ(p.server->tls().handshake, tls_handshake::ok);
  EXPECT_EQ(p.server->tls().version, expected_version(GetParam()));
  EXPECT_EQ(p.server->tls().alpn, "http/1.1");
  EXPECT_GT(p.server->tls().handshake_time.count(), 0);
}

// Graceful on both sides, the client first: close_notify each way, then both
// FINs; the server's report says the peer ended with close_notify.
TEST_P(tls_stream_test, graceful_both_ways_is_close_notify_both_ways) {
  tls_pair p(ioc_, pem(), GetParam());
  const std::string msg = "hello over tls";
  std::optional<error_code> wrote;
  asio::async_write(*p.client, asio::buffer(msg), [&](error_code ec, std::size_t) { wrote = ec; });
  std::string got(msg.size(), '\0');
  std::optional<error_code> read;
  asio::async_read(*p.server, asio::buffer(got), [&](error_code ec, std::size_t) { read = ec; });
  ASSERT_TRUE(run_until(ioc_, [&] { return wrote && read; }));
  EXPECT_EQ(got, msg);
  p.server->mark_message_complete();
  p.server->mark_exchange_complete();

  std::optional<close_report> cr, sr;
  p.client->async_close(close_policy::graceful, [&](close_report r) { cr = std::move(r); });
  // The server meets the client's close_notify as EOF, then closes too.
  char b[16];
  std::optional<error_code> eof;
  p.server->async_read_some(asio::buffer(b), [&](error_code ec, std::size_t) { eof = ec; });
  ASSERT_TRUE(run_until(ioc_, [&] { return eof.has_value(); }));
  EXPECT_EQ(*eof, asio::error::eof) << eof->message();
  p.server->async_close(close_policy::graceful, [&](close_report r) { sr = std::move(r); });
  ASSERT_TRUE(run_until(ioc_, [&] { return cr && sr; }));
  ASSERT_TRUE(sr->tls && cr->tls);
  EXPECT_TRUE(sr->tls->close_notify_sent) << sr->describe();
  EXPECT_TRUE(sr->tls->close_notify_received) << sr->describe();
  EXPECT_EQ(sr->tls->peer_end, tls_ending::close_notify) << sr->describe();
  EXPECT_TRUE(cr->tls->close_notify_sent) << cr->describe();
  EXPECT_TRUE(cr->tls->close_notify_received) << cr->describe();
  EXPECT_EQ(cr->tls->peer_end, tls_ending::close_notify) << cr->describe();
  EXPECT_FALSE(sr->rst_sent);
  EXPECT_FALSE(cr->rst_sent);
  EXPECT_EQ(cr->cause, close_cause::ours_then_peer_fin) << cr->describe();
  EXPECT_EQ(sr->tls->app_bytes_in, msg.size());
}

// A peer that never answers close_notify (it neither reads nor closes):
// graceful still ends within its linger bound, with a RST.
TEST_P(tls_stream_test, graceful_against_a_silent_peer_ends_within_its_bound) {
  tls_pair p(ioc_, pem(), GetParam());
  stream_options o = p.server->tcp().options();
  o.linger_timeout = 300ms;
  o.linger_max = 1s;
  p.server->tcp().set_options(o);
  const auto t0 = std::chrono::steady_clock::now();
  std::optional<close_report> sr;
  p.server->async_close(close_policy::graceful, [&](close_report r) { sr = std::move(r); });
  ASSERT_TRUE(run_until(
      ioc_, [&] { return sr.has_value(); }, 10s));
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(took, 5s);
  EXPECT_GE(took, 250ms);
  EXPECT_EQ(sr->cause, close_cause::linger_timeout) << sr->describe();
  EXPECT_TRUE(sr->tls->close_notify_sent);
  EXPECT_FALSE(sr->tls->close_notify_received);
  EXPECT_EQ(sr->tls->peer_end, tls_ending::none) << sr->describe();
}

// Abortive: a RST, no close_notify; the peer reads a reset.
TEST_P(tls_stream_test, abortive_sends_no_close_notify) {
  tls_pair p(ioc_, pem(), GetParam());
  std::optional<close_report> sr;
  p.server->async_close(close_policy::abortive, [&](close_report r) { sr = std::move(r); });
  ASSERT_TRUE(run_until(ioc_, [&] { return sr.has_value(); }));
  EXPECT_TRUE(sr->rst_sent);
  EXPECT_FALSE(sr->tls->close_notify_sent);
  char b[16];
  std::optional<error_code> ec;
  p.client->async_read_some(asio::buffer(b), [&](error_code e, std::size_t) { ec = e; });
  ASSERT_TRUE(run_until(ioc_, [&] { return ec.has_value(); }));
  EXPECT_EQ(*ec, asio::error::connection_reset) << ec->message();
  EXPECT_EQ(p.client->tls().peer_end, tls_ending::reset);
}

// Resumption: by default the server sends stateless tickets and a client
// that offers one resumes; with session_tickets off it gets none, and its
// second handshake is full again.
TEST_P(tls_stream_test, session_tickets_resume_unless_turned_off) {
  for (const bool tickets : {true, false}) {
    tls_context_options so{GetParam(), true};
    so.session_tickets = tickets;
    asio::ssl::context server_ctx = make_server_context(pem(), so);
    asio::ssl::context client_ctx = make_client_context(pem().certificate, {GetParam(), true});
    SSL_SESSION* saved = nullptr;
    for (int round = 0; round < 2; ++round) {
      tcp::acceptor acceptor(ioc_, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
      tcp::socket c(ioc_);
      c.connect(acceptor.local_endpoint());
      tcp::socket s(ioc_);
      acceptor.accept(s);
      tls_stream server(std::move(s), server_ctx);
      tls_stream client(std::move(c), client_ctx);
      if (saved) {
        ASSERT_EQ(::SSL_set_session(client.native_handle(), saved), 1);
      }
      std::optional<error_code> se, ce;
      server.async_handshake(asio::ssl::stream_base::server, [&](error_code ec) { se = ec; });
      client.async_handshake(asio::ssl::stream_base::client, [&](error_code ec) { ce = ec; });
      ASSERT_TRUE(run_until(ioc_, [&] { return se && ce; }));
      ASSERT_FALSE(*se) << se->message();
      ASSERT_FALSE(*ce) << ce->message();
      // One byte from the server: a TLS 1.3 client meets the tickets on the way to it.
      std::optional<error_code> wrote, read;
      char byte = 0;
      asio::async_write(server, asio::buffer("x", 1), [&](error_code ec, std::size_t) { wrote = ec; });
      asio::async_read(client, asio::buffer(&byte, 1), [&](error_code ec, std::size_t) { read = ec; });
      ASSERT_TRUE(run_until(ioc_, [&] { return wrote && read; }));
      ASSERT_FALSE(*read) << read->message();
      EXPECT_EQ(byte, 'x');
      if (round == 0) {
        saved = ::SSL_get1_session(client.native_handle());
        ASSERT_NE(saved, nullptr);
        EXPECT_EQ(::SSL_SESSION_is_resumable(saved) == 1, tickets) << "tickets " << tickets;
      } else {
        EXPECT_EQ(::SSL_session_reused(client.native_handle()) == 1, tickets) << "tickets " << tickets;
        EXPECT_EQ(::SSL_session_reused(server.native_handle()) == 1, tickets) << "tickets " << tickets;
      }
      // Graceful: OpenSSL takes a session that ended without close_notify for a bad one.
      std::optional<close_report> sr, cr;
      server.async_close(close_policy::graceful, [&](close_report r) { sr = std::move(r); });
      client.async_close(close_policy::graceful, [&](close_report r) { cr = std::move(r); });
      ASSERT_TRUE(run_until(ioc_, [&] { return sr && cr; }));
    }
    ::SSL_SESSION_free(saved);
  }
}

INSTANTIATE_TEST_SUITE_P(tls, tls_stream_test, ::testing::Values(tls_versions::tls12_only, tls_versions::tls13_only),
                         [](const auto& info) {
                           return std::string(info.param == tls_versions::tls12_only ? "tls12" : "tls13");
                         });

}  // namespace
