// closewise-reqresp on loopback: routes, keep-alive and pipelining, limits
// with answers, malformed requests, the whole-request deadline, drain, and a
// client nobody here wrote (curl). Servers listen on 127.0.0.1:0 and run on
// their own thread; clients are raw blocking sockets.

#include <gtest/gtest.h>
#include <poll.h>

#include <thread>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <boost/beast/core/string.hpp>

#include "../support/loopback.hpp"
#include "reqresp/http_rules.hpp"
#include "reqresp/http_session.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;
namespace rr = closewise::reqresp;

namespace {

// ---- a tiny HTTP/1.1 response reader for checking what came back ----------

struct ci_less {
  bool operator()(const std::string& a, const std::string& b) const { return boost::beast::iless{}(a, b); }
};

struct response {
  int status = 0;
  std::map<std::string, std::string, ci_less> headers;
  std::string body;
  std::string wire;  // the exact bytes of this response

  std::string header(const std::string& name) const {
    const auto it = headers.find(name);
    return it == headers.end() ? std::string{} : it->second;
  }
};

// Splits `bytes` into the responses it holds (every response carries
// Content-Length; 1xx and the answers to HEAD, listed in `heads` by index,
// have no body); the bytes after the last complete one go to `rest`.
std::vector<response> parse_responses(std::string_view bytes, std::string* rest = nullptr,
                                      const std::vector<std::size_t>& heads = {}) {
  std::vector<response> out;
  for (;;) {
    const auto end = bytes.find("\r\n\r\n");
    if (end == std::string_view::npos) break;
    response r;
    const std::string_view head = bytes.substr(0, end + 2);
    if (head.size() < 12 || !head.starts_with("HTTP/1.")) break;
    r.status = std::atoi(std::string(head.substr(9, 3)).c_str());
    std::string_view lines = head.substr(head.find("\r\n") + 2);
    while (!lines.empty()) {
      const auto eol = lines.find("\r\n");
      const std::string_view line = lines.substr(0, eol);
      lines.remove_prefix(eol + 2);
      const auto colon = line.find(':');
      if (colon == std::string_view::npos) continue;
      std::string_view value = line.substr(colon + 1);
      while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
      r.headers[std::string(line.substr(0, colon))] = std::string(value);
    }
    const bool bodiless = r.status < 200 || std::find(heads.begin(), heads.end(), out.size()) != heads.end();
    const std::string length_text = r.header("Content-Length");
    const std::size_t length = bodiless || length_text.empty() ? 0 : std::stoull(length_text);
    if (bytes.size() < end + 4 + length) break;
    r.body = std::string(bytes.substr(end + 4, length));
    r.wire = std::string(bytes.substr(0, end + 4 + length));
    bytes.remove_prefix(end + 4 + length);
    out.push_back(std::move(r));
  }
  if (rest) *rest = std::string(bytes);
  return out;
}

server_options local_options(close_policy policy = close_policy::graceful) {
  server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = 1;
  o.policy = policy;
  return o;
}

// Reads until `n` complete responses arrived (or the stream ended / `limit` passed).
std::vector<response> read_responses(raw_peer& p, std::size_t n, std::string& sink,
                                     std::chrono::milliseconds limit = 5s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  std::vector<char> buf(64 * 1024);
  for (;;) {
    auto got = parse_responses(sink);
    if (got.size() >= n) return got;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
    if (left <= 0ms) return got;
    pollfd pfd{p.fd(), POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) return got;
    const long r = p.recv_some(buf.data(), buf.size());
    if (r <= 0) return parse_responses(sink);
    sink.append(buf.data(), static_cast<std::size_t>(r));
  }
}

// ---- routes, keep-alive --------------------------------------------------

TEST(reqresp_server, routes_on_one_keep_alive_connection) {
  rr::http_server s(local_options(), {});
  auto p = connect_to(s.port());
  ASSERT_GT(
      p.send(std::string("GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                         "GET /bytes/100000 HTTP/1.1\r\nHost: x\r\n\r\n"
                         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/x-test\r\nContent-Length: 5\r\n\r\nhello"
                         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         "3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nTrailer: t\r\n\r\n"
                         "HEAD /bytes/77 HTTP/1.1\r\nHost: x\r\n\r\n"
                         "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                         "DELETE /echo HTTP/1.1\r\nHost: x\r\n\r\n"
                         "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n"
                         "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")),
      0);
  std::string sink;
  const auto d = p.drain(&sink);
  EXPECT_TRUE(d.eof);
  std::string rest;
  const auto got = parse_responses(sink, &rest, {4});  // the fifth answers HEAD
  ASSERT_EQ(got.size(), 9u);
  EXPECT_TRUE(rest.empty());
  EXPECT_EQ(got[0].status, 200);
  EXPECT_NE(got[0].body.find("closewise-reqresp"), std::string::npos);
  EXPECT_EQ(got[1].body, pattern(100000));
  EXPECT_EQ(got[1].header("Content-Type"), "application/octet-stream");
  EXPECT_EQ(got[2].body, "hello");
  EXPECT_EQ(got[2].header("Content-Type"), "text/x-test");
  EXPECT_EQ(got[3].body, "abcdefg");
  EXPECT_EQ(got[4].status, 200);
  EXPECT_EQ(got[4].header("Content-Length"), "77");
  EXPECT_EQ(got[5].status, 404);
  EXPECT_EQ(got[6].status, 405);
  EXPECT_EQ(got[6].header("Allow"), "POST");
  EXPECT_EQ(got[7].status, 200);
  EXPECT_EQ(got[7].header("Content-Type"), "application/json");
  EXPECT_NE(got[7].body.find("\"connections_accepted\":1"), std::string::npos) << got[7].body;
  EXPECT_EQ(got[8].status, 200);
  EXPECT_EQ(got[8].header("Connection"), "close");
  EXPECT_NE(got[8].body.find("closewise_"), std::string::npos);
  EXPECT_EQ(s.service().counters().routed.load(), 7u);  // 404 and 405 ran no route
}

TEST(reqresp_server, http10_keep_alive_and_close) {
  rr::http_server s(local_options(), {});
  auto p = connect_to(s.port());
  ASSERT_GT(p.send(std::string("GET /bytes/3 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")), 0);
  std::string sink;
  auto got = read_responses(p, 1, sink);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].wire.substr(0, 8), "HTTP/1.0");
  EXPECT_EQ(got[0].header("Connection"), "keep-alive");
  ASSERT_GT(p.send(std::string("GET /bytes/3 HTTP/1.0\r\n\r\n")), 0);
  sink.clear();
  const auto d = p.drain(&sink);
  EXPECT_TRUE(d.eof);  // HTTP/1.0 without keep-alive: the server closes after the response
  EXPECT_EQ(parse_responses(sink).size(), 1u);
}

// Kept-alive responses carry the idle timeout as a hint in whole seconds,
// rounded down; a response that closes, and a timeout under a second, none.
TEST(reqresp_server, keep_alive_timeout_hint) {
  auto o = local_options();
  o.stream.idle_timeout = 2500ms;
  rr::http_server s(o, {});
  auto p = connect_to(s.port());
  ASSERT_GT(p.send(std::string("GET /bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n")), 0);
  std::string sink;
  auto got = read_responses(p, 1, sink);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header("Keep-Alive"), "timeout=2");
  ASSERT_GT(p.send(std::string("GET /bytes/3 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")), 0);
  sink.clear();
  got = read_responses(p, 1, sink);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header("Keep-Alive"), "timeout=2");
  ASSERT_GT(p.send(std::string("GET /bytes/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")), 0);
  sink.clear();
  EXPECT_TRUE(p.drain(&sink).eof);
  got = parse_responses(sink);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header("Keep-Alive"), "");

  o.stream.idle_timeout = 200ms;
  rr::http_server short_idle(o, {});
  auto q = connect_to(short_idle.port());
  ASSERT_GT(q.send(std::string("GET /bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n")), 0);
  sink.clear();
  got = read_responses(q, 1, sink);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].status, 200);
  EXPECT_EQ(got[0].header("Keep-Alive"), "");  // 0 would say "do not reuse"
}

TEST(reqresp_server, expect_100_continue) {
  rr::http_server s(local_options(), {});
  auto p = connect_to(s.port());
  ASSERT_GT(p.send(std::string("POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")),
            0);
  std::string sink;
  auto got = read_responses(p, 1, sink);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].status, 100);
  ASSERT_EQ(p.send(std::string("ping")), 4);
  got = read_responses(p, 2, sink);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[1].status, 200);
  EXPECT_EQ(got[1].body, "ping");
}

// ---- malformed requests ----------------------------------------------------

struct malformed_case {
  const char* name;
  std::string bytes;
  unsigned status;
};

std::string chunks(std::size_t count, std::size_t size) {
  std::string out;
  char line[32];
  std::snprintf(line, sizeof(line), "%zx\r\n", size);
  for (std::size_t i = 0; i < count; ++i) out += line + std::string(size, 'c') + "\r\n";
  return out;
}

std::vector<malformed_case> malformed_table() {
  const std::string post_chunked = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
  std::string fields = "GET / HTTP/1.1\r\nHost: x\r\n";
  for (int i = 0; i < 200; ++i) fields += "X-Filler-" + std::to_string(i) + ": " + std::string(40, 'f') + "\r\n";
  return {
      {"runaway_chunks_past_the_body_limit", post_chunked + chunks(17, 64 * 1024), 413},
      {"one_chunk_over_the_body_limit", post_chunked + "200000\r\n" + std::string(4096, 'c'), 413},
      {"chunk_data_running_past_its_size", post_chunked + "5\r\nhelloEXTRA\r\n0\r\n\r\n", 400},
      {"chunk_extension_that_never_ends", post_chunked + "5;" + std::string(100 * 1024, 'e'), 400},
      {"chunk_size_overflow", post_chunked + "fffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400},
      {"chunk_size_not_hex", post_chunked + "xyz\r\nabc\r\n0\r\n\r\n", 400},
      {"transfer_encoding_with_content_length",
       "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400},
      {"content_length_with_transfer_encoding",
       "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
      {"gzip_coding_with_content_length",
       "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", 400},
      {"chunked_twice_in_one_field", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
       400},
      {"chunked_in_two_fields",
       "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
      {"unknown_coding", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x-custom\r\n\r\n", 501},
      {"gzip_then_chunked", post_chunked.substr(0, 30) + "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501},
      {"chunked_not_last", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 501},
      {"duplicate_content_length",
       "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400},
      {"content_length_list", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc", 400},
      {"conflicting_content_length",
       "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400},
      {"content_length_not_a_number", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc", 400},
      {"body_over_the_limit", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413},
      {"control_character_in_a_value", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01z\r\n\r\n", 400},
      {"nul_in_a_value", std::string("GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0z\r\n\r\n", 36), 400},
      {"del_in_a_value", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fz\r\n\r\n", 400},
      {"control_character_in_a_name",
       "GET / HTTP/1.1\r\nHost: x\r\nX\x02"
       "A: z\r\n\r\n",
       400},
      {"control_character_in_the_target", "GET /a\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400},
      {"bare_lf_everywhere", "GET / HTTP/1.1\nHost: x\n\n", 400},
      {"bare_lf_in_a_field", "GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400},
      {"bare_cr_in_a_field", "GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", 400},
      {"missing_host_in_http11", "GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400},
      {"two_hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
      {"huge_method", std::string(10000, 'M') + " / HTTP/1.1\r\nHost: x\r\n\r\n", 501},
      {"long_unknown_method", std::string(100, 'M') + " / HTTP/1.1\r\nHost: x\r\n\r\n", 501},
      {"huge_request_line", "GET /" + std::string(10000, 'a') + " HTTP/1.1\r\nHost: x\r\n\r\n", 414},
      {"huge_header_block", fields + "\r\n", 431},
      {"bad_version", "GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400},
      {"space_in_the_target", "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400},
      {"target_not_origin_form", "GET nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 400},
      {"unsupported_expectation", "GET / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", 417},
  };
}

// Test names and failure messages show the case's name, not its bytes.
void PrintTo(const malformed_case& c, std::ostream* os) { *os << c.name; }

class malformed : public ::testing::TestWithParam<malformed_case> {};

// Each bad request is followed, in the same write, by a valid one. The client
// gets exactly one response, the expected status with Connection: close, then
// EOF (never a RST); no route runs, and the valid request is never executed.
TEST_P(malformed, gets_its_status_and_nothing_behind_it_runs) {
  const auto& c = GetParam();
  rr::http_server s(local_options(), {});
  auto p = connect_to(s.port());
  const std::string valid = "GET /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n";
  auto reader = std::async(std::launch::async, [&] {
    std::string sink;
    const auto d = p.drain(&sink);
    return std::make_pair(d, sink);
  });
  const std::string both = c.bytes + valid;
  EXPECT_EQ(p.send_all(both.data(), both.size()), static_cast<long>(both.size())) << c.name;
  const auto [d, sink] = reader.get();
  std::string rest;
  const auto got = parse_responses(sink, &rest);
  ASSERT_EQ(got.size(), 1u) << c.name << ": " << sink.substr(0, 300);
  EXPECT_EQ(got[0].status, static_cast<int>(c.status)) << c.name << ": " << got[0].body;
  EXPECT_EQ(got[0].header("Connection"), "close") << c.name;
  EXPECT_TRUE(rest.empty()) << c.name << ": bytes after the answer";
  EXPECT_TRUE(d.eof) << c.name << ": the answer must end with our FIN, got errno " << d.error;
  p.close();
  const auto& n = s.service().counters();
  EXPECT_EQ(n.routed.load(), 0u) << c.name << ": a route ran";
  EXPECT_EQ(n.requests.load(), 0u) << c.name << ": a request was accepted";
  EXPECT_EQ(n.refused.load(), 1u) << c.name;
}

INSTANTIATE_TEST_SUITE_P(table, malformed, ::testing::ValuesIn(malformed_table()),
                         [](const auto& info) { return std::string(info.param.name); });

// ---- pipelining ----------------------------------------------------------

// 100 requests of several kinds; the last one asks to close.
std::string hundred_requests() {
  std::string out;
  for (int i = 0; i < 100; ++i) {
    const bool last = i == 99;
    const std::string close = last ? "Connection: close\r\n" : "";
    switch (i % 4) {
      case 0:
        out += "GET /bytes/" + std::to_string(i * 397 % 20000) + " HTTP/1.1\r\nHost: x\r\n" + close + "\r\n";
        break;
      case 1: {
        const std::string body = "echo #" + std::to_string(i);
        out += "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" + close +
               "\r\n" + body;
        break;
      }
      case 2:
        out += "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + close + "\r\n" + "2\r\n#" +
               std::to_string(i % 10) + "\r\n0\r\n\r\n";
        break;
      default:
        out += "GET / HTTP/1.1\r\nHost: x\r\n" + close + "\r\n";
        break;
    }
  }
  return out;
}

void check_hundred(const std::vector<response>& got) {
  // Appended, not `"echo #" + std::to_string(i)`: g++ 12 at -O3 warns on that
  // operator+ (-Wstringop-overflow, a false positive in libstdc++'s insert).
  const auto numbered = [](std::string prefix, int n) {
    prefix += std::to_string(n);
    return prefix;
  };
  ASSERT_EQ(got.size(), 100u);
  for (int i = 0; i < 100; ++i) {
    const auto& r = got[static_cast<std::size_t>(i)];
    ASSERT_EQ(r.status, 200) << "response " << i;
    switch (i % 4) {
      case 0:
        ASSERT_EQ(r.body, pattern(static_cast<std::size_t>(i * 397 % 20000))) << "response " << i;
        break;
      case 1:
        ASSERT_EQ(r.body, numbered("echo #", i)) << "response " << i;
        break;
      case 2:
        ASSERT_EQ(r.body, numbered("#", i % 10)) << "response " << i;
        break;
      default:
        ASSERT_NE(r.body.find("closewise-reqresp"), std::string::npos) << "response " << i;
        break;
    }
  }
  EXPECT_EQ(got.back().header("Connection"), "close");
}

// Sends `requests` (in one write, or one byte per segment) and returns every byte that came back.
std::string exchange(std::uint16_t port, const std::string& requests, bool byte_by_byte) {
  auto p = connect_to(port);
  const int one = 1;
  ::setsockopt(p.fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // one segment per send
  auto reader = std::async(std::launch::async, [&] {
    std::string sink;
    const auto d = p.drain(&sink);
    EXPECT_TRUE(d.eof) << "errno " << d.error;
    return sink;
  });
  if (byte_by_byte) {
    for (char c : requests) EXPECT_EQ(p.send(&c, 1), 1);
  } else {
    EXPECT_EQ(p.send_all(requests.data(), requests.size()), static_cast<long>(requests.size()));
  }
  return reader.get();
}

TEST(reqresp_server, hundred_pipelined_requests_in_one_write_and_one_byte_per_segment) {
  rr::http_server s(local_options(), {});
  const std::string requests = hundred_requests();
  const std::string together = exchange(s.port(), requests, false);
  const std::string trickled = exchange(s.port(), requests, true);
  std::string rest;
  check_hundred(parse_responses(together, &rest));
  EXPECT_TRUE(rest.empty());
  check_hundred(parse_responses(trickled, &rest));
  EXPECT_TRUE(rest.empty());
  // Byte-exact: the same requests, however segmented, give the same bytes back.
  EXPECT_TRUE(together == trickled);
  EXPECT_EQ(s.service().counters().routed.load(), 200u);
}

// ---- the whole-request deadline --------------------------------------------

TEST(reqresp_server, request_deadline_is_not_moved_by_a_trickle) {
  rr::http_options h;
  h.request_timeout = 300ms;
  rr::http_server s(local_options(), h);
  auto p = connect_to(s.port());
  const auto start = std::chrono::steady_clock::now();
  ASSERT_GT(p.send(std::string("GET / HTTP/1.1\r\nHost: x\r\n")), 0);
  // A header line every 50 ms: each one would re-arm a per-read timeout.
  bool answered = false;
  for (int i = 0; i < 100 && !answered; ++i) {
    pollfd pfd{p.fd(), POLLIN, 0};
    answered = ::poll(&pfd, 1, 50) > 0;  // the pacing of the trickle, and the wait for the answer
    if (!answered) p.send(std::string("X-Slow-" + std::to_string(i) + ": 1\r\n"));
  }
  ASSERT_TRUE(answered);
  std::string sink;
  const auto d = p.drain(&sink);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  const auto got = parse_responses(sink);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].status, 408);
  EXPECT_EQ(got[0].header("Connection"), "close");
  EXPECT_TRUE(d.eof);
  EXPECT_GE(elapsed, 300ms);
  EXPECT_LT(elapsed, 3s);
  EXPECT_EQ(s.service().counters().timeouts.load(), 1u);
  EXPECT_EQ(s.service().counters().routed.load(), 0u);
}

// The deadline starts at a request's first byte: an idle keep-alive
// connection is the idle timeout's business, not a 408.
TEST(reqresp_server, request_deadline_starts_at_the_first_byte) {
  rr::http_options h;
  h.request_timeout = 200ms;
  rr::http_server s(local_options(), h);
  auto p = connect_to(s.port());
  pollfd pfd{p.fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&pfd, 1, 500), 0) << "the server said something to an idle connection";
  ASSERT_GT(p.send(std::string("GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")), 0);
  std::string sink;
  const auto got = read_responses(p, 1, sink);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].status, 200);
}

// Until its header is complete a connection is parked (server_options::
// input_ready): the bytes wait in the kernel, unread. Whatever way the header
// is cut, the request is answered once its end arrives; a FIN or a RST
// behind half a header ends the connection with no answer and one report.
TEST(reqresp_server, half_a_header_waits_parked_and_is_answered_when_the_rest_arrives) {
  rr::http_server s(local_options(), {});
  const std::string request = "GET /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n";
  std::vector<raw_peer> peers;
  for (std::size_t cut = 1; cut < request.size(); cut += 3) {
    peers.push_back(connect_to(s.port()));
    ASSERT_EQ(peers.back().send(request.substr(0, cut)), static_cast<long>(cut));
  }
  auto fin_after_half = connect_to(s.port());
  auto rst_after_half = connect_to(s.port());
  ASSERT_GT(fin_after_half.send(request.substr(0, 20)), 0);
  ASSERT_GT(rst_after_half.send(request.substr(0, 20)), 0);
  for (auto& p : peers) {
    pollfd pfd{p.fd(), POLLIN, 0};
    EXPECT_EQ(::poll(&pfd, 1, 0), 0) << "answered before the header was complete";
  }
  std::size_t cut = 1;
  for (auto& p : peers) {
    ASSERT_GT(p.send(request.substr(cut)), 0);
    std::string sink;
    const auto got = read_responses(p, 1, sink);
    ASSERT_EQ(got.size(), 1u) << "cut at " << cut;
    EXPECT_EQ(got[0].status, 200);
    EXPECT_EQ(got[0].body, pattern(100));
    cut += 3;
  }
  fin_after_half.shutdown_write();
  std::string sink;
  EXPECT_TRUE(fin_after_half.drain(&sink).eof);
  EXPECT_TRUE(sink.empty());
  rst_after_half.reset();
  for (auto& p : peers) p.close();
  fin_after_half.close();
  const std::size_t total = peers.size() + 2;
  for (int i = 0; i < 5000 && s.get().stats().snapshot().closed < total; ++i) std::this_thread::sleep_for(1ms);
  const auto snap = s.get().stats().snapshot();
  EXPECT_EQ(snap.closed, total);
  EXPECT_EQ(snap.open, 0u);
  EXPECT_EQ(s.service().counters().responses.load(), peers.size());
  EXPECT_EQ(snap.closed_by_cause[static_cast<std::size_t>(close_cause::peer_reset_mid_exchange)] +
                snap.closed_by_cause[static_cast<std::size_t>(close_cause::peer_reset_idle)],
            1u);
}

// The header limit counts every byte of the header, however it arrives:
// Beast 1.81 applies it to what one parse call sees and consumes fields as
// they come, so a header cut into pieces (or trickled a field at a time)
// once went through at any size.
TEST(reqresp_server, a_header_over_the_limit_is_refused_however_it_is_cut) {
  rr::http_options h;
  h.max_header_bytes = 512;
  rr::http_server s(local_options(), h);
  const std::string start = "GET / HTTP/1.1\r\nHost: x\r\n";
  std::string fields;
  for (int i = 0; fields.size() < 600; ++i) fields += "X-F" + std::to_string(i) + ": " + std::string(20, 'a') + "\r\n";
  const std::string request = start + fields + "\r\n";
  for (const std::size_t piece : {request.size(), std::size_t{300}, std::size_t{29}}) {
    auto p = connect_to(s.port());
    for (std::size_t at = 0; at < request.size(); at += piece) {
      if (p.send(request.substr(at, piece)) <= 0) break;             // refused and closed before the end: fine
      if (piece < request.size()) std::this_thread::sleep_for(2ms);  // client behaviour: separate segments
    }
    std::string sink;
    p.drain(&sink);
    const auto got = parse_responses(sink);
    ASSERT_EQ(got.size(), 1u) << "pieces of " << piece;
    EXPECT_EQ(got[0].status, 431) << "pieces of " << piece;
  }
  // Just under the limit, in pieces, it is served.
  const std::string fits = start + "X-Fill: " + std::string(512 - start.size() - 12, 'b') + "\r\n\r\n";
  ASSERT_LE(fits.size(), 512u);
  auto p = connect_to(s.port());
  for (std::size_t at = 0; at < fits.size(); at += 29) {
    ASSERT_GT(p.send(fits.substr(at, 29)), 0);
    std::this_thread::sleep_for(2ms);
  }
  std::string sink;
  const auto got = read_responses(p, 1, sink);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].status, 200);
}

// ---- drain -----------------------------------------------------------------

// A drain lets the response in flight finish, answers the request already
// waiting behind it with Connection: close, closes the idle keep-alive
// connection, refuses newcomers, and then run() returns.
TEST(reqresp_server, drain_finishes_requests_in_progress_and_closes_idle_connections) {
  rr::http_server s(local_options(), {});
  auto idle = connect_to(s.port());
  ASSERT_GT(idle.send(std::string("GET / HTTP/1.1\r\nHost: x\r\n\r\n")), 0);
  std::string idle_sink;
  ASSERT_EQ(read_responses(idle, 1, idle_sink).size(), 1u);

  // Two requests in one segment: the second waits in the session's buffer
  // while the first one's 8 MiB response cannot finish (a small window, and
  // nobody reads): the write is in flight when the drain starts.
  auto busy = connect_to(s.port(), 64 * 1024);
  const std::size_t big = 8u << 20;
  const std::string two = "GET /bytes/" + std::to_string(big) + " HTTP/1.1\r\nHost: x\r\n\r\n" +
                          "GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(busy.send(two), static_cast<long>(two.size()));
  pollfd pfd{busy.fd(), POLLIN, 0};
  ASSERT_EQ(::poll(&pfd, 1, 5000), 1);  // the response began: the server read both requests

  s.drain();
  // The idle connection is closed between requests: EOF, no response.
  idle_sink.clear();
  const auto idle_end = idle.drain(&idle_sink);
  EXPECT_TRUE(idle_end.eof);
  EXPECT_TRUE(idle_sink.empty());
  EXPECT_LT(connect_to(s.port()).fd(), 0) << "the listener still accepts during the drain";

  std::string busy_sink;
  const auto busy_end = busy.drain(&busy_sink);
  EXPECT_TRUE(busy_end.eof);
  std::string rest;
  const auto got = parse_responses(busy_sink, &rest);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_TRUE(rest.empty());
  EXPECT_EQ(got[0].body.size(), big);
  EXPECT_TRUE(got[0].body == pattern(big));
  EXPECT_EQ(got[0].header("Connection"), "");  // begun before the drain, as keep-alive
  EXPECT_EQ(got[1].body, pattern(10));
  EXPECT_EQ(got[1].header("Connection"), "close");
  idle.close();
  busy.close();
  EXPECT_TRUE(s.wait_stopped(10s));
  const auto snap = s.get().stats().snapshot();
  EXPECT_EQ(snap.drain_closed, 1u);
  EXPECT_EQ(snap.drain_forced, 0u);
}

// With drain_idle_grace, a connection that has just finished an exchange is
// not closed by the drain: a proxy would send its next request on exactly
// this connection, and our FIN would cross it. The next request is answered
// with Connection: close instead, and the server closes after it.
TEST(reqresp_server, drain_idle_grace_answers_the_next_request_with_connection_close) {
  auto o = local_options();
  o.drain_idle_grace = 5s;  // far longer than this test needs between its two requests
  rr::http_server s(o, {});
  auto p = connect_to(s.port());
  ASSERT_GT(p.send(std::string("GET / HTTP/1.1\r\nHost: x\r\n\r\n")), 0);
  std::string sink;
  ASSERT_EQ(read_responses(p, 1, sink).size(), 1u);

  s.drain();
  ASSERT_GT(p.send(std::string("GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")), 0);
  sink.clear();
  const auto end = p.drain(&sink);
  EXPECT_TRUE(end.eof);
  std::string rest;
  const auto got = parse_responses(sink, &rest);
  ASSERT_EQ(got.size(), 1u) << sink;
  EXPECT_EQ(got[0].status, 200);
  EXPECT_EQ(got[0].header("Connection"), "close");
  EXPECT_EQ(got[0].body, pattern(10));
  p.close();
  EXPECT_TRUE(s.wait_stopped(10s));
  const auto snap = s.get().stats().snapshot();
  EXPECT_EQ(snap.drain_closed, 0u) << "the drain closed the connection instead of letting it answer";
  EXPECT_EQ(snap.drain_forced, 0u);
}

// ---- a real client -----------------------------------------------------------

std::string curl_path() {
  for (const char* dir : {"/usr/bin/", "/usr/local/bin/", "/bin/"}) {
    const std::string p = std::string(dir) + "curl";
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return {};
}

// Runs curl, returns its stdout and exit status.
std::pair<std::string, int> run_curl(const std::string& curl, const std::string& args) {
  const std::string cmd = curl + " --silent --show-error --max-time 30 " + args;
  FILE* f = ::popen(cmd.c_str(), "r");
  if (!f) return {{}, -1};
  std::string out;
  std::vector<char> buf(64 * 1024);
  for (std::size_t n; (n = std::fread(buf.data(), 1, buf.size(), f)) > 0;) out.append(buf.data(), n);
  return {out, ::pclose(f)};
}

TEST(reqresp_server, curl_fetches_bytes_intact_with_and_without_connection_close) {
  const std::string curl = curl_path();
  if (curl.empty()) GTEST_SKIP() << "curl is not installed (scripts/deps.sh test installs it)";
  rr::http_server s(local_options(), {});
  const std::size_t n = 3 * 1024 * 1024 + 17;
  const std::string url = "http://" + s.endpoint() + "/bytes/" + std::to_string(n);
  const std::string expected = pattern(n);
  {
    const auto [out, status] = run_curl(curl, "'" + url + "'");
    EXPECT_EQ(status, 0);
    EXPECT_EQ(out.size(), n);
    EXPECT_TRUE(out == expected);
  }
  {
    const auto [out, status] = run_curl(curl, "-H 'Connection: close' '" + url + "'");
    EXPECT_EQ(status, 0);
    EXPECT_EQ(out.size(), n);
    EXPECT_TRUE(out == expected);
  }
  {
    // Two URLs on one connection (curl reuses it: keep-alive).
    const auto [out, status] = run_curl(curl, "'" + url + "' '" + url + "'");
    EXPECT_EQ(status, 0);
    EXPECT_TRUE(out == expected + expected);
  }
  EXPECT_EQ(s.service().counters().routed.load(), 4u);
}

}  // namespace
