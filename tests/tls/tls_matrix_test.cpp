// The TLS proof matrix: how a closewise TLS server reads the end of an
// HTTP/1.1 message and reports how the peer ended, for every body framing
// (Content-Length, chunked, the end of the connection) x every peer ending
// (close_notify + FIN, a FIN at a record boundary, a FIN mid-record, a RST)
// x TLS 1.2 and 1.3, each with the message complete and cut mid-body, many
// times over. The peer is a raw OpenSSL client over memory BIOs, so every
// byte on the wire is the test's choice.
//
// The oracles, per connection: a truncation (a bare FIN while a message was
// incomplete or framed by the end of the connection, or any FIN mid-record)
// is `truncated` and the read ends with stream_truncated, never eof, never
// a complete message; a complete message then a bare FIN is complete and
// `peer_fin_no_close_notify`; close_notify is eof and `close_notify` (and
// what completes a body framed by the end of the connection); a RST is
// `reset`; then the graceful close completes and its report agrees.

#include <gtest/gtest.h>

#include <array>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <vector>

#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include "tls_harness.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;
namespace http = boost::beast::http;

namespace {

enum class framing { content_length, chunked, until_close };
enum class ending { close_notify_fin, fin_at_boundary, fin_mid_record, rst };
enum class variant { complete, cut_mid_body };

const char* name(framing f) {
  return f == framing::content_length ? "content_length" : f == framing::chunked ? "chunked" : "until_close";
}
const char* name(ending e) {
  switch (e) {
    case ending::close_notify_fin:
      return "close_notify_fin";
    case ending::fin_at_boundary:
      return "fin_at_boundary";
    case ending::fin_mid_record:
      return "fin_mid_record";
    case ending::rst:
      return "rst";
  }
  return "?";
}

// A request as it goes on the wire, and where its header ends.
struct wire_message {
  std::string bytes;
  std::size_t header = 0;
  std::string body;
};

wire_message make_message(framing f, std::size_t body_size) {
  wire_message m;
  m.body = pattern(body_size);
  std::string head = "POST /upload HTTP/1.1\r\nHost: localhost\r\n";
  if (f == framing::content_length) head += "Content-Length: " + std::to_string(body_size) + "\r\n";
  if (f == framing::chunked) head += "Transfer-Encoding: chunked\r\n";
  // No length: the body ends with the connection (the framing of an
  // HTTP/1.0-style body, carried here by the request).
  if (f == framing::until_close) head += "Connection: close\r\n";
  head += "\r\n";
  m.header = head.size();
  m.bytes = head;
  if (f == framing::chunked) {
    // Three chunks of uneven sizes, then the last chunk.
    const std::size_t a = body_size / 3, b = body_size / 2;
    for (auto [from, to] : {std::pair{std::size_t{0}, a}, std::pair{a, a + b}, std::pair{a + b, body_size}}) {
      if (to == from) continue;
      char size[32];
      std::snprintf(size, sizeof(size), "%zx\r\n", to - from);
      m.bytes += size + m.body.substr(from, to - from) + "\r\n";
    }
    m.bytes += "0\r\n\r\n";
  } else {
    m.bytes += m.body;
  }
  return m;
}

// The server's reader: async_read_some on the TLS stream into Beast's
// request parser, as an HTTP server reads. A message framed by its length
// or chunks is marked complete when the parser says so; one without length
// is marked as framed by the end of the connection once its header is in.
struct server_reader {
  tls_stream& s;
  http::request_parser<http::string_body> parser;
  std::string pending;     // bytes the parser has not taken
  std::string until_body;  // the body of a message framed by the end of the connection
  bool until_close = false;
  bool complete = false;
  std::string parse_error;
  std::optional<error_code> end;
  std::array<char, 4096> buf{};

  explicit server_reader(tls_stream& st) : s(st) {
    parser.eager(true);
    parser.body_limit(1u << 20);
  }

  void start() {
    s.async_read_some(asio::buffer(buf), [this](error_code ec, std::size_t n) {
      if (n > 0) feed(std::string_view(buf.data(), n));
      if (!ec) return start();
      if (until_close && ec == asio::error::eof) complete = true;  // close_notify ends the body
      end = ec;
    });
  }

  void feed(std::string_view bytes) {
    if (until_close) {
      until_body.append(bytes);
      return;
    }
    if (complete) return;  // a next message: not this test's
    pending.append(bytes);
    while (!pending.empty() && !complete && !until_close) {
      boost::system::error_code ec;
      const std::size_t used = parser.put(asio::buffer(pending), ec);
      pending.erase(0, used);
      if (ec == http::error::need_more) return;
      if (ec) {
        parse_error = ec.message();
        return;
      }
      if (parser.is_header_done() && !parser.chunked() && !parser.content_length()) {
        until_close = true;
        s.mark_message_until_close();
        until_body = std::exchange(pending, {});
      } else if (parser.is_done()) {
        complete = true;
        s.mark_message_complete();
      } else if (used == 0) {
        return;
      }
    }
  }

  std::string body() const { return until_close ? until_body : parser.get().body(); }
};

struct cell {
  framing f;
  ending e;
  peer_version v;
};

class tls_matrix_test : public ::testing::TestWithParam<cell> {
 protected:
  asio::io_context ioc_;
};

// The expected ending of one connection of the matrix.
tls_ending expected_end(framing f, ending e, variant var) {
  switch (e) {
    case ending::close_notify_fin:
      return tls_ending::close_notify;
    case ending::fin_at_boundary:
      return var == variant::complete && f != framing::until_close ? tls_ending::peer_fin_no_close_notify
                                                                   : tls_ending::truncated;
    case ending::fin_mid_record:
      return tls_ending::truncated;
    case ending::rst:
      return tls_ending::reset;
  }
  return tls_ending::none;
}

bool expected_complete(framing f, ending e, variant var) {
  if (e == ending::close_notify_fin) return var == variant::complete || f == framing::until_close;
  if (e == ending::fin_at_boundary) return var == variant::complete && f != framing::until_close;
  return false;
}

// The peer's script for one connection: the handshake, `sent` in one to
// three records (and, mid-record, its tail in a record cut short), then the ending.
// The ending waits for the server's session to be up (`up`): in TLS 1.3
// the server's handshake ends after the client's, with its session
// tickets, and a RST before then would end the handshake, not the session.
void peer_script(tls_peer& peer, peer_version v, const std::string& sent, ending e, int rep,
                 const std::shared_future<void>& up, std::string& failure) {
  if (!peer.handshake(v)) {
    failure = "peer handshake: " + peer.error();
    return;
  }
  std::string body = sent;
  std::string tail;
  if (e == ending::fin_mid_record) {
    // The last 20 bytes (or all) go after the cut. substr + erase, not a
    // resize: g++ 12 -O2 (the TSan build) sees a resize's growth path and
    // reports a memset beyond any object (-Wstringop-overflow).
    const std::size_t keep = body.size() > 20 ? body.size() - 20 : 0;
    tail = body.substr(keep);
    body.erase(keep);
  }
  // Record boundaries inside the message vary with the repetition.
  const std::size_t pieces = 1 + static_cast<std::size_t>(rep % 3);
  for (std::size_t i = 0, from = 0; i < pieces; ++i) {
    const std::size_t to = i + 1 == pieces ? body.size() : body.size() * (i + 1) / pieces;
    if (to > from && !peer.write(body.substr(from, to - from))) {
      failure = "peer write: " + peer.error();
      return;
    }
    from = to;
  }
  if (up.wait_for(10s) != std::future_status::ready) {
    failure = "the server's handshake did not end";
    return;
  }
  switch (e) {
    case ending::close_notify_fin:
      if (!peer.send_close_notify()) failure = "close_notify: " + peer.error();
      peer.fin();
      return;
    case ending::fin_at_boundary:
      peer.fin();
      return;
    case ending::fin_mid_record: {
      // Withheld: 1 byte (the tag's last), 16, or 30 (into the ciphertext).
      static constexpr std::size_t keep[] = {1, 16, 30};
      if (peer.write_partial_record(tail, keep[rep % 3]) == 0) failure = "partial record: " + peer.error();
      peer.fin();
      return;
    }
    case ending::rst:
      peer.rst();
      return;
  }
}

TEST_P(tls_matrix_test, every_ending_is_reported_as_what_it_was) {
  const auto [f, e, v] = GetParam();
  tls_server_side server(ioc_, only(v));
  const int reps = tls_reps(20);
  for (const variant var : {variant::complete, variant::cut_mid_body}) {
    for (int rep = 0; rep < reps; ++rep) {
      SCOPED_TRACE(std::string(var == variant::complete ? "complete" : "cut_mid_body") + " rep " + std::to_string(rep));
      const wire_message m = make_message(f, rep % 4 == 3 ? 40000 : 40 + 331 * static_cast<std::size_t>(rep));
      const std::size_t cut = m.header + (m.bytes.size() - m.header) / 2;
      const std::string sent = var == variant::complete ? m.bytes : m.bytes.substr(0, cut);
      // What a complete read yields: the whole body, or (framed by the end
      // of the connection) whatever of it came before close_notify.
      const std::string want_body = f == framing::until_close ? sent.substr(m.header) : m.body;

      tls_peer peer;
      ASSERT_TRUE(peer.connect(server.port()));
      stream_options o;
      o.linger_timeout = 2s;
      o.linger_max = 5s;
      tls_stream s = server.accept(o);
      std::string failure;
      std::promise<void> up;
      peer_thread script([&, up_f = up.get_future().share()] { peer_script(peer, v, sent, e, rep, up_f, failure); });

      const auto hs = server_handshake(ioc_, s);
      up.set_value();
      ASSERT_TRUE(hs.has_value());
      ASSERT_FALSE(*hs) << hs->message();
      server_reader reader(s);
      reader.start();
      ASSERT_TRUE(run_until(ioc_, [&] { return reader.end.has_value(); }));
      script.join();
      ASSERT_EQ(failure, "");
      ASSERT_EQ(reader.parse_error, "");

      const tls_ending want = expected_end(f, e, var);
      const error_code& ec = *reader.end;
      const error_code want_ec = e == ending::close_notify_fin ? error_code(asio::error::eof)
                                 : e == ending::rst            ? error_code(asio::error::connection_reset)
                                                               : error_code(asio::ssl::error::stream_truncated);
      EXPECT_EQ(ec, want_ec) << ec.message();
      if (e != ending::rst) {
        EXPECT_EQ(reader.complete, expected_complete(f, e, var));
        if (reader.complete) {
          EXPECT_EQ(reader.body(), want_body);
        }
      }
      EXPECT_EQ(s.tls().peer_end, want) << to_string(s.tls().peer_end);
      EXPECT_EQ(s.tls().close_notify_received, e == ending::close_notify_fin);

      const auto r = close_and_wait(ioc_, s, close_policy::graceful);
      ASSERT_TRUE(r.has_value());
      ASSERT_TRUE(r->tls.has_value());
      const std::string d = r->describe();
      EXPECT_EQ(r->tls->handshake, tls_handshake::ok) << d;
      EXPECT_EQ(r->tls->peer_end, want) << d;
      EXPECT_EQ(r->tls->close_notify_received, e == ending::close_notify_fin) << d;
      // close_notify goes whenever the session is up and our side can still write.
      EXPECT_EQ(r->tls->close_notify_sent, e != ending::rst) << d;
      EXPECT_NE(d.find(std::string("peer_end=") + std::string(to_string(want))), std::string::npos) << d;
      if (e == ending::rst) {
        EXPECT_TRUE(r->rst_received) << d;
        EXPECT_TRUE(r->cause == close_cause::peer_reset_idle || r->cause == close_cause::peer_reset_mid_exchange) << d;
      } else {
        EXPECT_FALSE(r->rst_sent) << d;
        EXPECT_FALSE(r->rst_received) << d;
        EXPECT_TRUE(r->cause == close_cause::peer_fin_then_ours || r->cause == close_cause::ours_then_peer_fin) << d;
        EXPECT_EQ(r->time_wait, r->first_fin) << d;
      }
      if (HasFailure()) return;
    }
  }
}

std::vector<cell> all_cells() {
  std::vector<cell> out;
  for (auto v : {peer_version::tls12, peer_version::tls13})
    for (auto f : {framing::content_length, framing::chunked, framing::until_close})
      for (auto e : {ending::close_notify_fin, ending::fin_at_boundary, ending::fin_mid_record, ending::rst})
        out.push_back({f, e, v});
  return out;
}

INSTANTIATE_TEST_SUITE_P(tls, tls_matrix_test, ::testing::ValuesIn(all_cells()), [](const auto& info) {
  return std::string(name(info.param.v)) + "_" + name(info.param.f) + "_" + name(info.param.e);
});

// ---- Around the matrix: the close against a silent peer, and what its drain records ----

class tls_close_test : public ::testing::TestWithParam<peer_version> {
 protected:
  asio::io_context ioc_;
};

// A peer that keeps the connection open and sends nothing: the graceful
// close sends close_notify and its FIN, then its drain ends at
// linger_timeout (not before), with a RST, well within a generous bound.
TEST_P(tls_close_test, graceful_against_a_silent_peer_ends_within_its_bound) {
  tls_server_side server(ioc_, only(GetParam()));
  for (int rep = 0; rep < std::min(tls_reps(20), 5); ++rep) {
    tls_peer peer;
    ASSERT_TRUE(peer.connect(server.port()));
    stream_options o;
    o.linger_timeout = 200ms;
    o.linger_max = 1s;
    tls_stream s = server.accept(o);
    std::string failure;
    peer_thread script([&] {
      if (!peer.handshake(GetParam())) failure = peer.error();
    });
    const auto hs = server_handshake(ioc_, s);
    script.join();
    ASSERT_TRUE(hs && !*hs);
    ASSERT_EQ(failure, "");

    const auto t0 = std::chrono::steady_clock::now();
    const auto r = close_and_wait(ioc_, s, close_policy::graceful, 10s);
    const auto took = std::chrono::steady_clock::now() - t0;
    ASSERT_TRUE(r.has_value());
    EXPECT_LT(took, 5s);
    EXPECT_GE(took, o.linger_timeout);
    EXPECT_EQ(r->cause, close_cause::linger_timeout) << r->describe();
    EXPECT_TRUE(r->rst_sent) << r->describe();
    EXPECT_TRUE(r->tls->close_notify_sent) << r->describe();
    EXPECT_FALSE(r->tls->close_notify_received) << r->describe();
    EXPECT_EQ(r->tls->peer_end, tls_ending::none) << r->describe();
  }
}

// Our graceful close against a peer that reads until our close_notify,
// then runs `answer`: the close's report, or nullopt (with a failure).
std::optional<close_report> close_answered_by(asio::io_context& ioc, tls_server_side& server, peer_version v,
                                              const std::function<void(tls_peer&)>& answer) {
  tls_peer peer;
  EXPECT_TRUE(peer.connect(server.port()));
  stream_options o;
  o.linger_timeout = 5s;
  tls_stream s = server.accept(o);
  std::string failure;
  tls_peer::read_result seen;
  std::optional<close_report> r;
  {
    peer_thread script([&] {
      if (!peer.handshake(v)) {
        failure = peer.error();
        return;
      }
      seen = peer.read_all_plain(10s);
      if (seen.end == peer_end::close_notify) answer(peer);
    });
    const auto hs = server_handshake(ioc, s);
    EXPECT_TRUE(hs && !*hs);
    if (hs && !*hs) r = close_and_wait(ioc, s, close_policy::graceful);
  }
  EXPECT_EQ(failure, "");
  EXPECT_EQ(seen.end, peer_end::close_notify) << to_string(seen.end);
  EXPECT_TRUE(r && r->tls);
  return r && r->tls ? r : std::nullopt;
}

// The peer answers our close_notify with its own (after some data of its
// own, which the drain discards and counts), then its FIN: the drain
// records the close_notify, and the close ends without a RST.
TEST_P(tls_close_test, the_drain_records_the_peers_close_notify) {
  tls_server_side server(ioc_, only(GetParam()));
  for (int rep = 0; rep < std::min(tls_reps(20), 10); ++rep) {
    const std::string late = rep % 2 == 0 ? std::string() : pattern(100 + 500 * static_cast<std::size_t>(rep));
    const auto r = close_answered_by(ioc_, server, GetParam(), [&](tls_peer& peer) {
      if (!late.empty()) peer.write(late);
      peer.send_close_notify();
      peer.fin();
    });
    ASSERT_TRUE(r.has_value());
    const std::string d = r->describe();
    EXPECT_TRUE(r->tls->close_notify_sent) << d;
    EXPECT_TRUE(r->tls->close_notify_received) << d;
    EXPECT_EQ(r->tls->peer_end, tls_ending::close_notify) << d;
    EXPECT_EQ(r->cause, close_cause::ours_then_peer_fin) << d;
    EXPECT_FALSE(r->rst_sent) << d;
    EXPECT_FALSE(r->rst_received) << d;
    EXPECT_EQ(r->tls->app_bytes_discarded, late.size()) << d;
  }
}

// The peer answers our close_notify with a bare FIN: the drain records it
// as the end of a complete exchange without close_notify (no message was
// in progress), not as close_notify.
TEST_P(tls_close_test, the_drain_records_a_bare_fin_as_no_close_notify) {
  tls_server_side server(ioc_, only(GetParam()));
  for (int rep = 0; rep < std::min(tls_reps(20), 10); ++rep) {
    const auto r = close_answered_by(ioc_, server, GetParam(), [](tls_peer& peer) { peer.fin(); });
    ASSERT_TRUE(r.has_value());
    const std::string d = r->describe();
    EXPECT_TRUE(r->tls->close_notify_sent) << d;
    EXPECT_FALSE(r->tls->close_notify_received) << d;
    EXPECT_EQ(r->tls->peer_end, tls_ending::peer_fin_no_close_notify) << d;
    EXPECT_FALSE(r->rst_sent) << d;
  }
}

// A complete Content-Length message, then the first bytes of a record (the
// start of whatever came next) and a FIN: the peer's byte stream was cut
// mid-record, so the end is `truncated`, not the clean end of a complete
// message, even though no byte of the cut record reached the application.
TEST_P(tls_close_test, a_record_cut_after_a_complete_message_is_truncated) {
  tls_server_side server(ioc_, only(GetParam()));
  const wire_message m = make_message(framing::content_length, 500);
  for (int rep = 0; rep < std::min(tls_reps(20), 10); ++rep) {
    tls_peer peer;
    ASSERT_TRUE(peer.connect(server.port()));
    stream_options o;
    o.linger_timeout = 2s;
    tls_stream s = server.accept(o);
    std::string failure;
    std::promise<void> up;
    peer_thread script([&, up_f = up.get_future().share()] {
      if (!peer.handshake(GetParam()) || !peer.write(m.bytes)) {
        failure = peer.error();
        return;
      }
      static constexpr std::size_t keep[] = {1, 16, 30};
      if (up_f.wait_for(10s) != std::future_status::ready ||
          peer.write_partial_record("GET /next HTTP/1.1\r\nHost: localhost\r\n\r\n", keep[rep % 3]) == 0)
        failure = "partial record: " + peer.error();
      peer.fin();
    });
    const auto hs = server_handshake(ioc_, s);
    up.set_value();
    ASSERT_TRUE(hs && !*hs);
    server_reader reader(s);
    reader.start();
    ASSERT_TRUE(run_until(ioc_, [&] { return reader.end.has_value(); }));
    script.join();
    ASSERT_EQ(failure, "");
    EXPECT_TRUE(reader.complete);
    EXPECT_EQ(*reader.end, asio::ssl::error::stream_truncated) << reader.end->message();
    EXPECT_EQ(s.tls().peer_end, tls_ending::truncated) << to_string(s.tls().peer_end);
    const auto r = close_and_wait(ioc_, s, close_policy::graceful);
    ASSERT_TRUE(r && r->tls);
    EXPECT_EQ(r->tls->peer_end, tls_ending::truncated) << r->describe();
    if (HasFailure()) return;
  }
}

// A read into a sequence of several buffers (a std::vector, which a move
// empties) delivers the peer's bytes into them, then close_notify's eof.
TEST_P(tls_close_test, a_read_into_a_buffer_vector_delivers_its_bytes) {
  tls_server_side server(ioc_, only(GetParam()));
  tls_peer peer;
  ASSERT_TRUE(peer.connect(server.port()));
  tls_stream s = server.accept();
  const std::string msg = pattern(300);
  std::string failure;
  {
    peer_thread script([&] {
      if (!peer.handshake(GetParam()) || !peer.write(msg) || !peer.send_close_notify()) failure = peer.error();
    });
    const auto hs = server_handshake(ioc_, s);
    ASSERT_TRUE(hs && !*hs);
  }
  ASSERT_EQ(failure, "");
  std::string a(7, '\0'), b(1000, '\0');
  std::string got;
  std::optional<error_code> end;
  std::function<void()> read = [&] {
    std::vector<asio::mutable_buffer> bufs{asio::buffer(a), asio::buffer(b)};
    s.async_read_some(bufs, [&](error_code ec, std::size_t n) {
      const std::string both = a + b;
      got += both.substr(0, n);
      if (ec || n == 0 || got.size() > msg.size()) {
        end = ec;
      } else {
        read();
      }
    });
  };
  read();
  ASSERT_TRUE(run_until(ioc_, [&] { return end.has_value(); }));
  EXPECT_EQ(got, msg);
  EXPECT_EQ(*end, asio::error::eof) << end->message();
  peer.fin();
  const auto r = close_and_wait(ioc_, s, close_policy::graceful);
  ASSERT_TRUE(r && r->tls);
  EXPECT_EQ(r->tls->peer_end, tls_ending::close_notify) << r->describe();
}

INSTANTIATE_TEST_SUITE_P(tls, tls_close_test, ::testing::Values(peer_version::tls12, peer_version::tls13),
                         [](const auto& info) { return std::string(name(info.param)); });

}  // namespace
