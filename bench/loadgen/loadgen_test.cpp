// closewise-bench's own tests: the response parser (a short response is a
// failure, never a success), the latency histogram, and the engine against
// raw loopback servers that answer well, truncate, reset, or refuse; the
// TLS engine against an in-process closewise TLS server.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include "closewise/probe.hpp"
#include "closewise/sock_diag.hpp"
#include "closewise/tls.hpp"
#include "engine.hpp"
#include "histogram.hpp"
#include "hold.hpp"
#include "response_parser.hpp"

namespace {

using closewise::bench::error_class;
using closewise::bench::histogram;
using closewise::bench::load_config;
using closewise::bench::mode;
using closewise::bench::response_parser;
using status = response_parser::status;

response_parser::result feed(response_parser& p, std::string_view s) { return p.feed(s.data(), s.size()); }

// ---- parser ------------------------------------------------------------------

TEST(ResponseParser, ContentLengthInOneRead) {
  response_parser p;
  const std::string r = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
  const auto res = feed(p, r);
  EXPECT_EQ(res.st, status::complete);
  EXPECT_EQ(res.consumed, r.size());
  EXPECT_EQ(p.status_code(), 200);
  EXPECT_TRUE(p.keep_alive());
  EXPECT_EQ(p.body_bytes(), 5u);
}

TEST(ResponseParser, ByteByByte) {
  const std::string r = "HTTP/1.1 200 OK\r\ncontent-LENGTH:  3 \r\nConnection: close\r\n\r\nabc";
  response_parser p;
  for (std::size_t i = 0; i < r.size(); ++i) {
    const auto res = p.feed(r.data() + i, 1);
    ASSERT_EQ(res.consumed, 1u);
    EXPECT_EQ(res.st, i + 1 == r.size() ? status::complete : status::need_more) << i;
  }
  EXPECT_FALSE(p.keep_alive());
}

TEST(ResponseParser, ShorterThanContentLengthIsTruncated) {
  response_parser p;
  EXPECT_EQ(feed(p, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello").st, status::need_more);
  EXPECT_EQ(p.on_eof(), status::need_more);
  EXPECT_TRUE(p.truncated());
}

TEST(ResponseParser, FinBeforeAnyByteIsNotAResponse) {
  response_parser p;
  EXPECT_EQ(p.on_eof(), status::need_more);
  EXPECT_TRUE(p.truncated());
  EXPECT_FALSE(p.started());
}

TEST(ResponseParser, FinInsideTheHeaderIsTruncated) {
  response_parser p;
  EXPECT_EQ(feed(p, "HTTP/1.1 200 OK\r\nContent-Len").st, status::need_more);
  EXPECT_EQ(p.on_eof(), status::need_more);
  EXPECT_TRUE(p.truncated());
}

TEST(ResponseParser, CloseDelimitedBodyEndsAtFin) {
  response_parser p;
  EXPECT_EQ(feed(p, "HTTP/1.1 200 OK\r\n\r\nsome").st, status::need_more);
  EXPECT_EQ(feed(p, " more").st, status::need_more);
  EXPECT_FALSE(p.keep_alive());
  EXPECT_EQ(p.on_eof(), status::complete);
  EXPECT_EQ(p.body_bytes(), 9u);
}

TEST(ResponseParser, Chunked) {
  response_parser p;
  const std::string r =
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
  const auto res = feed(p, r);
  EXPECT_EQ(res.st, status::complete);
  EXPECT_EQ(res.consumed, r.size());
  EXPECT_EQ(p.body_bytes(), 11u);
  EXPECT_EQ(p.content_length(), -1);
}

TEST(ResponseParser, ChunkedSplitEverywhere) {
  const std::string r = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n";
  for (std::size_t cut = 1; cut < r.size(); ++cut) {
    response_parser p;
    const auto a = p.feed(r.data(), cut);
    ASSERT_EQ(a.st, status::need_more) << cut;
    const auto b = p.feed(r.data() + cut, r.size() - cut);
    EXPECT_EQ(b.st, status::complete) << cut;
    EXPECT_EQ(a.consumed + b.consumed, r.size()) << cut;
  }
}

TEST(ResponseParser, ChunkedWithoutLastChunkIsTruncated) {
  response_parser p;
  EXPECT_EQ(feed(p, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").st, status::need_more);
  EXPECT_EQ(p.on_eof(), status::need_more);
  EXPECT_TRUE(p.truncated());
}

TEST(ResponseParser, InterimResponseThenFinal) {
  response_parser p;
  const std::string r = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
  const auto res = feed(p, r);
  EXPECT_EQ(res.st, status::complete);
  EXPECT_EQ(res.consumed, r.size());
  EXPECT_EQ(p.status_code(), 201);
}

TEST(ResponseParser, NoBodyStatuses) {
  response_parser p;
  EXPECT_EQ(feed(p, "HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n").st, status::complete);
  p.reset();
  EXPECT_EQ(feed(p, "HTTP/1.1 304 Not Modified\r\n\r\n").st, status::complete);
}

TEST(ResponseParser, StopsAtTheEndOfAResponse) {
  response_parser p;
  const std::string first = "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx";
  const auto res = feed(p, first + "HTTP/1.1 200 OK\r\n");
  EXPECT_EQ(res.st, status::complete);
  EXPECT_EQ(res.consumed, first.size());
}

TEST(ResponseParser, Http10ClosesByDefault) {
  response_parser p;
  EXPECT_EQ(feed(p, "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").st, status::complete);
  EXPECT_FALSE(p.keep_alive());
  p.reset();
  EXPECT_EQ(feed(p, "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n").st, status::complete);
  EXPECT_TRUE(p.keep_alive());
}

TEST(ResponseParser, Garbage) {
  response_parser p;
  EXPECT_EQ(feed(p, "HTTX/1.1 200 OK\r\n\r\n").st, status::error);
  p.reset();
  EXPECT_EQ(feed(p, "HTTP/1.1 2x0 OK\r\n\r\n").st, status::error);
  p.reset();
  EXPECT_EQ(feed(p, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").st, status::error);
  p.reset();
  EXPECT_EQ(feed(p, "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").st, status::error);
  p.reset();
  EXPECT_EQ(feed(p, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").st, status::error);
}

// ---- histogram ---------------------------------------------------------------

TEST(Histogram, QuantilesWithinBucketError) {
  histogram h;
  for (std::uint64_t v = 1; v <= 100000; ++v) h.record(v * 1000);  // 1 us .. 100 ms
  EXPECT_EQ(h.count(), 100000u);
  EXPECT_EQ(h.max(), 100'000'000u);
  auto near = [](std::uint64_t got, double want) { return std::abs(static_cast<double>(got) - want) / want < 0.02; };
  EXPECT_TRUE(near(h.quantile(0.5), 50'000'000)) << h.quantile(0.5);
  EXPECT_TRUE(near(h.quantile(0.9), 90'000'000)) << h.quantile(0.9);
  EXPECT_TRUE(near(h.quantile(0.99), 99'000'000)) << h.quantile(0.99);
  EXPECT_LE(h.quantile(1.0), h.max());
  histogram other;
  other.record(5);
  other.merge(h);
  EXPECT_EQ(other.count(), 100001u);
}

// ---- engine against raw loopback servers --------------------------------------

// 20 counted cycles on two connections of one thread, against `addr`.
load_config config_for(const void* addr, std::size_t len, mode m, std::chrono::nanoseconds timeout) {
  load_config c;
  std::memcpy(&c.target, addr, len);
  c.target_len = static_cast<socklen_t>(len);
  c.run_mode = m;
  c.request =
      std::string("GET / HTTP/1.1\r\nHost: t\r\n") + (m == mode::server_close ? "Connection: close\r\n" : "") + "\r\n";
  c.threads = 1;
  c.connections = 2;
  c.warmup = std::chrono::nanoseconds(0);
  c.count = 20;
  c.timeout = timeout;
  return c;
}

// A blocking loopback server on port 0: for each connection, reads one
// request and calls `serve(fd)`, which answers and decides how it ends.
class raw_server {
 public:
  explicit raw_server(std::function<void(int)> serve) : serve_(std::move(serve)) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(::listen(fd_, 128), 0);
    socklen_t len = sizeof(a);
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    addr_ = a;
    thread_ = std::thread([this] { loop(); });
  }
  ~raw_server() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
  }
  std::uint16_t port() const { return ntohs(addr_.sin_port); }
  load_config config(mode m) const { return config_for(&addr_, sizeof(addr_), m, std::chrono::seconds(2)); }

 private:
  void loop() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      timeval tv{1, 0};
      ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
      std::string req;
      char buf[4096];
      while (req.find("\r\n\r\n") == std::string::npos) {
        const ssize_t n = ::recv(c, buf, sizeof(buf), 0);
        if (n <= 0) break;
        req.append(buf, static_cast<std::size_t>(n));
      }
      if (req.find("\r\n\r\n") == std::string::npos) {
        ::close(c);
        continue;
      }
      serve_(c);
    }
  }

  std::function<void(int)> serve_;
  int fd_ = -1;
  sockaddr_in addr_{};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

void send_all(int fd, std::string_view s) { ::send(fd, s.data(), s.size(), MSG_NOSIGNAL); }

// Reads until the peer's FIN (or an error), then closes: the server side of a client-initiated close.
void close_after_peer(int fd) {
  char buf[256];
  while (::recv(fd, buf, sizeof(buf), 0) > 0) {
  }
  ::close(fd);
}

TEST(Engine, WholeResponsesAreSuccesses) {
  raw_server srv([](int fd) {
    send_all(fd, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
    close_after_peer(fd);
  });
  const auto r = closewise::bench::run_load(srv.config(mode::client_fin), nullptr);
  EXPECT_EQ(r.completed, 20u);
  EXPECT_EQ(r.errors_total(), 0u);
  EXPECT_EQ(r.latency.count(), 20u);
}

TEST(Engine, ShortBodyIsTruncatedNeverSuccess) {
  raw_server srv([](int fd) {
    send_all(fd, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly fifty bytes? no: far fewer");
    ::shutdown(fd, SHUT_WR);
    close_after_peer(fd);
  });
  const auto r = closewise::bench::run_load(srv.config(mode::client_fin), nullptr);
  EXPECT_EQ(r.completed, 0u);
  EXPECT_EQ(r.errors[static_cast<std::size_t>(error_class::truncated)], 20u);
}

TEST(Engine, ResetMidBodyIsReset) {
  raw_server srv([](int fd) {
    send_all(fd, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc");
    const linger l{1, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    ::close(fd);
  });
  const auto r = closewise::bench::run_load(srv.config(mode::client_rst), nullptr);
  EXPECT_EQ(r.completed, 0u);
  EXPECT_EQ(r.errors[static_cast<std::size_t>(error_class::reset)], 20u);
}

TEST(Engine, ServerCloseWaitsForTheServersFin) {
  raw_server srv([](int fd) {
    send_all(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
    ::shutdown(fd, SHUT_WR);
    close_after_peer(fd);
  });
  const auto r = closewise::bench::run_load(srv.config(mode::server_close), nullptr);
  EXPECT_EQ(r.completed, 20u);
  EXPECT_EQ(r.errors_total(), 0u);
  // The server's FIN went first: the TIME_WAIT is on the server's side.
  closewise::error_code ec;
  const auto tw = closewise::count_tcp_state(srv.port(), closewise::tcp_state::time_wait, ec);
  if (!ec) {
    EXPECT_GE(tw.local_side, 20u);
    EXPECT_EQ(tw.remote_side, 0u);
  }
}

TEST(Engine, Non2xxIsBadStatus) {
  raw_server srv([](int fd) {
    send_all(fd, "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n");
    close_after_peer(fd);
  });
  const auto r = closewise::bench::run_load(srv.config(mode::client_fin), nullptr);
  EXPECT_EQ(r.completed, 0u);
  EXPECT_EQ(r.errors[static_cast<std::size_t>(error_class::bad_status)], 20u);
}

TEST(Engine, KeepaliveCountsRequestsAndHonoursConnectionClose) {
  // Two responses per connection, the second says Connection: close.
  raw_server srv([](int fd) {
    send_all(fd, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na");
    char buf[512];
    if (::recv(fd, buf, sizeof(buf), 0) > 0)
      send_all(fd, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nb");
    ::shutdown(fd, SHUT_WR);
    close_after_peer(fd);
  });
  auto cfg = srv.config(mode::keepalive);
  cfg.connections = 1;
  const auto r = closewise::bench::run_load(cfg, nullptr);
  EXPECT_EQ(r.completed, 20u);
  EXPECT_EQ(r.errors_total(), 0u);
  EXPECT_GE(r.connections_opened, 10u);
}

TEST(Engine, RefusedIsRefused) {
  // A port with no listener: bind one, learn its number, close it.
  const int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  socklen_t len = sizeof(a);
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(s);
  load_config c;
  std::memcpy(&c.target, &a, sizeof(a));
  c.target_len = sizeof(a);
  c.request = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
  c.connections = 1;
  c.warmup = std::chrono::nanoseconds(0);
  c.count = 5;
  const auto r = closewise::bench::run_load(c, nullptr);
  EXPECT_EQ(r.completed, 0u);
  EXPECT_EQ(r.errors[static_cast<std::size_t>(error_class::refused)], 5u);
}

// A TLS server on loopback port 0, on its own thread: each connection
// shakes hands, answers every request with 200 and five bytes, and ends
// with closewise's graceful close (close_notify, FIN, the client's end)
// after a request with "Connection: close" or at the client's end.
class tls_server {
 public:
  using tcp = boost::asio::ip::tcp;
  using stream = closewise::basic_tls_stream<tcp::socket>;

  tls_server()
      : ctx_(closewise::make_server_context(closewise::make_self_signed_certificate())),
        acceptor_(ioc_, tcp::endpoint(boost::asio::ip::address_v4::loopback(), 0)) {
    accept();
    thread_ = std::thread([this] { ioc_.run(); });
  }
  ~tls_server() {
    boost::asio::post(ioc_, [this] { ioc_.stop(); });
    thread_.join();
  }
  closewise::bench::hold_config hold(bool half_request) const {
    const auto ep = acceptor_.local_endpoint();
    closewise::bench::hold_config h;
    std::memcpy(&h.target, ep.data(), ep.size());
    h.target_len = static_cast<socklen_t>(ep.size());
    h.port = ep.port();
    h.tls = true;
    h.half_request = half_request;
    h.full_request = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    h.partial_request = "GET / HTTP/1.1\r\nHost: t\r\n";
    h.connections = 20;
    h.warmup_requests = 5;
    return h;
  }
  load_config config(mode m) const {
    const auto ep = acceptor_.local_endpoint();
    load_config c = config_for(ep.data(), ep.size(), m, std::chrono::seconds(5));
    c.tls = true;
    return c;
  }

 private:
  struct session {
    explicit session(stream&& s) : tls(std::move(s)) {}
    stream tls;
    std::string in;
    char buf[4096];
  };

  void accept() {
    acceptor_.async_accept([this](const closewise::error_code& ec, tcp::socket sock) {
      if (ec) return;
      accept();
      auto s = std::make_shared<session>(stream(std::move(sock), ctx_));
      s->tls.async_handshake(boost::asio::ssl::stream_base::server, [this, s](const closewise::error_code& e) {
        if (e) return end(s);
        read(s);
      });
    });
  }
  void read(const std::shared_ptr<session>& s) {
    s->tls.async_read_some(boost::asio::buffer(s->buf), [this, s](const closewise::error_code& ec, std::size_t n) {
      if (ec) return end(s);
      s->in.append(s->buf, n);
      const auto at = s->in.find("\r\n\r\n");
      if (at == std::string::npos) return read(s);
      const bool close = s->in.find("Connection: close") < at;
      s->in.erase(0, at + 4);
      s->tls.mark_message_complete();
      static const std::string response = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
      boost::asio::async_write(s->tls, boost::asio::buffer(response),
                               [this, s, close](const closewise::error_code& e, std::size_t) {
                                 if (e || close) return end(s);
                                 read(s);
                               });
    });
  }
  static void end(const std::shared_ptr<session>& s) {
    s->tls.async_close(closewise::close_policy::graceful, [s](const closewise::close_report&) {});
  }

  boost::asio::io_context ioc_;
  boost::asio::ssl::context ctx_;
  tcp::acceptor acceptor_;
  std::thread thread_;
};

std::uint64_t count_of(const closewise::bench::load_result& r, error_class e) {
  return r.errors[static_cast<std::size_t>(e)];
}

class TlsEngine : public ::testing::TestWithParam<mode> {};

// Every cycle mode: whole responses, a full handshake for each connection
// and never a resumed session, and TLS ended as the mode says.
TEST_P(TlsEngine, EveryCycleIsAFullHandshakeAndAWholeResponse) {
  tls_server srv;
  auto cfg = srv.config(GetParam());
  if (GetParam() == mode::keepalive) cfg.requests_per_conn = 4;
  const auto r = closewise::bench::run_load(cfg, nullptr);
  EXPECT_EQ(r.completed, 20u);
  EXPECT_EQ(r.errors_total(), 0u);
  EXPECT_EQ(r.tls.resumed, 0u);
  EXPECT_EQ(r.tls.tls13, r.tls.handshakes);
  if (GetParam() == mode::keepalive) {
    // 20 requests, 4 per connection: about 5 connections, fewer counted
    // when one was opened in the warm-up before its requests counted.
    EXPECT_GE(r.tls.handshakes, 3u);
    EXPECT_LE(r.tls.handshakes, 7u);
  } else {
    EXPECT_EQ(r.tls.handshakes, 20u);
  }
  switch (GetParam()) {
    case mode::client_fin:
      EXPECT_EQ(r.tls.close_notify_sent, 20u);
      break;
    case mode::client_rst:
      EXPECT_EQ(r.tls.close_notify_sent, 0u);
      break;
    case mode::server_close:
      EXPECT_EQ(r.tls.peer_close_notify, 20u);
      EXPECT_EQ(r.tls.close_notify_sent, 0u);
      break;
    case mode::keepalive:
      break;
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, TlsEngine,
                         ::testing::Values(mode::client_fin, mode::client_rst, mode::server_close, mode::keepalive),
                         [](const auto& info) {
                           std::string n(closewise::bench::to_string(info.param));
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

TEST(TlsEngineVersions, TwelveOnlyNegotiatesTwelve) {
  tls_server srv;
  auto cfg = srv.config(mode::client_fin);
  cfg.tls_versions = closewise::bench::tls_version_choice::tls12;
  const auto r = closewise::bench::run_load(cfg, nullptr);
  EXPECT_EQ(r.completed, 20u);
  EXPECT_EQ(r.tls.tls12, 20u);
  EXPECT_EQ(r.tls.resumed, 0u);
}

// The memory modes over TLS: every connection held has completed a full
// handshake, the warm-up exchanges are whole TLS exchanges, and the server
// (which waits for a request, or for the rest of one) closes none.
TEST(TlsHold, HeldConnectionsHaveCompletedTheirHandshake) {
  for (const bool half_request : {false, true}) {
    tls_server srv;
    const auto r = closewise::bench::run_hold(srv.hold(half_request), nullptr);
    EXPECT_EQ(r.opened, 20u) << "half_request " << half_request;
    EXPECT_EQ(r.failed, 0u);
    EXPECT_EQ(r.handshake_failed, 0u);
    EXPECT_EQ(r.warmup_failed, 0u);
    EXPECT_EQ(r.tls13, 20u);
    EXPECT_EQ(r.closed_by_server, 0u);
  }
}

// A plain HTTP server on the TLS client's port: every handshake fails, and
// says how; none is a success.
TEST(TlsEngineErrors, PlainServerIsAHandshakeFailureByClass) {
  raw_server srv([](int fd) {
    send_all(fd, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    ::close(fd);
  });
  auto cfg = srv.config(mode::client_fin);
  cfg.tls = true;
  cfg.connections = 1;
  cfg.count = 5;
  const auto r = closewise::bench::run_load(cfg, nullptr);
  EXPECT_EQ(r.completed, 0u);
  EXPECT_EQ(count_of(r, error_class::tls_handshake), 5u);
  std::uint64_t failures = 0;
  for (auto n : r.tls.handshake_failures) failures += n;
  EXPECT_EQ(failures, 5u);
}

}  // namespace
