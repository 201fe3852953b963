// closewise-reqresp's request rules without sockets: what Beast 1.81 lets
// through and check_header refuses, how parse errors map to statuses, the
// routes and the response pattern.

#include <gtest/gtest.h>

#include <string>
#include <string_view>

#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include "../support/loopback.hpp"
#include "reqresp/http_rules.hpp"

using namespace closewise::reqresp;

namespace {

struct parsed {
  boost::system::error_code ec;
  bool header_done = false;
  bool start_line_done = false;
  std::string unparsed;
  std::optional<request_header> header;
};

// Feeds `text` to a fresh Beast request parser, header only, with the default limits.
parsed parse_header(std::string_view text) {
  http::request_parser<http::string_body, field_allocator> p;
  p.eager(false);
  parsed out;
  std::size_t used = 0;
  while (used < text.size() && !p.is_header_done()) {
    const std::size_t n = p.put(boost::asio::buffer(text.data() + used, text.size() - used), out.ec);
    used += n;
    if (out.ec == http::error::need_more) {
      out.ec = {};
      break;
    }
    if (out.ec) break;
  }
  out.header_done = p.is_header_done();
  out.start_line_done = !p.get().method_string().empty();
  out.unparsed = std::string(text.substr(used));
  if (out.header_done) out.header = p.get().base();
  return out;
}

// The status the server answers `text` with before any route, 0 when accepted.
unsigned verdict(std::string_view text) {
  const parsed p = parse_header(text);
  if (p.ec) {
    const auto r = classify_parse_error(p.ec, p.start_line_done, p.header_done, p.unparsed);
    return r ? static_cast<unsigned>(r->status) : 1;  // 1: closed without an answer
  }
  if (!p.header) return 2;  // incomplete: Beast wants more
  const auto r = check_header(*p.header);
  return r ? static_cast<unsigned>(r->status) : 0;
}

TEST(http_rules, accepts_ordinary_requests) {
  EXPECT_EQ(verdict("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 0u);
  EXPECT_EQ(verdict("GET / HTTP/1.0\r\n\r\n"), 0u);  // HTTP/1.0 needs no Host
  EXPECT_EQ(verdict("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"), 0u);
  EXPECT_EQ(verdict("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"), 0u);
  EXPECT_EQ(verdict("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  Chunked \r\n\r\n"), 0u);
  EXPECT_EQ(verdict("GET http://x/bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n"), 0u);
  EXPECT_EQ(verdict("POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"), 0u);
}

// Where Beast 1.81 is lenient, check_header is not.
TEST(http_rules, refuses_what_beast_lets_through) {
  // Beast accepts a repeated equal Content-Length, as a list or as two fields.
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"), 400u);
  // Beast reads no body when chunked is not the last coding: the body would be the next request.
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"), 501u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), 501u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x-unknown\r\n\r\n"), 501u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ,\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400u);
  // Beast does not look at Host.
  EXPECT_EQ(verdict("GET / HTTP/1.1\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("GET nowhere HTTP/1.1\r\nHost: x\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("GET / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n"), 417u);
  EXPECT_EQ(verdict("FROBNICATE / HTTP/1.1\r\nHost: x\r\n\r\n"), 501u);
}

// What Beast itself refuses, and the status it becomes.
TEST(http_rules, maps_parse_errors_to_statuses) {
  EXPECT_EQ(verdict("GET / HTTP/1.1\nHost: x\n\n"), 400u);              // bare LF after the request line
  EXPECT_EQ(verdict("GET / HTTP/1.1\r\nHost: x\nA: b\r\n\r\n"), 400u);  // bare LF in a field
  EXPECT_EQ(verdict("GET / HTTP/1.1\r\nHost: x\rA: b\r\n\r\n"), 400u);  // bare CR
  EXPECT_EQ(verdict("GET / HTTP/1.1\r\nHost: x\r\nA: b\x01\r\n\r\n"), 400u);
  EXPECT_EQ(verdict(std::string_view("GET / HTTP/1.1\r\nHost: x\r\nA: b\0c\r\n\r\n", 36)), 400u);
  EXPECT_EQ(verdict("GET / HTTP/1.1\r\nHost: x\r\nA\x01: b\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("GET / HTTP/1.1\r\nHost: x\r\nA: b\x7f\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("GET / HTTP/2.0\r\nHost: x\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"), 400u);
  EXPECT_EQ(verdict("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"), 413u);
}

TEST(http_rules, tells_a_huge_method_from_a_huge_target_from_huge_fields) {
  // Appended, not `std::string(n, c) + "..."`: g++ 12 at -O3 takes the
  // moved result for a short string and warns (-Warray-bounds, a false positive).
  std::string method(9000, 'A');
  EXPECT_EQ(verdict(method.append(" / HTTP/1.1\r\nHost: x\r\n\r\n")), 501u);
  std::string target = "GET /";
  EXPECT_EQ(verdict(target.append(9000, 'a').append(" HTTP/1.1\r\nHost: x\r\n\r\n")), 414u);
  std::string fields = "GET / HTTP/1.1\r\nHost: x\r\n";
  for (int i = 0; i < 200; ++i) fields += "X-Filler-" + std::to_string(i) + ": " + std::string(40, 'f') + "\r\n";
  EXPECT_EQ(verdict(fields + "\r\n"), 431u);
  // A method under the limit but unknown: parsed, then refused.
  std::string unknown(100, 'A');
  EXPECT_EQ(verdict(unknown.append(" / HTTP/1.1\r\nHost: x\r\n\r\n")), 501u);
}

TEST(http_rules, no_answer_when_the_peer_is_gone) {
  EXPECT_FALSE(classify_parse_error(http::error::end_of_stream, false, false, ""));
  EXPECT_FALSE(classify_parse_error(http::error::partial_message, true, false, ""));
  EXPECT_FALSE(classify_parse_error(boost::asio::error::connection_reset, false, false, ""));
  EXPECT_FALSE(classify_parse_error(boost::asio::error::operation_aborted, false, false, ""));
  EXPECT_EQ(classify_parse_error(http::error::body_limit, true, true, "")->status, http::status::payload_too_large);
  EXPECT_EQ(classify_parse_error(http::error::bad_chunk, true, true, "")->status, http::status::bad_request);
  EXPECT_EQ(classify_parse_error(http::error::buffer_overflow, true, true, "")->status, http::status::bad_request);
}

TEST(http_rules, routes) {
  auto m = match_route(http::verb::get, "/bytes/123?x=1", 1000);
  ASSERT_TRUE(m.which);
  EXPECT_EQ(*m.which, route::bytes);
  EXPECT_EQ(m.bytes, 123u);
  EXPECT_EQ(*match_route(http::verb::head, "/", 10).which, route::root);
  EXPECT_EQ(*match_route(http::verb::post, "/echo", 10).which, route::echo);
  EXPECT_EQ(*match_route(http::verb::get, "/stats", 10).which, route::stats);
  EXPECT_EQ(*match_route(http::verb::get, "http://h:1/metrics", 10).which, route::metrics);
  EXPECT_EQ(match_route(http::verb::get, "/bytes/1001", 1000).refusal->status, http::status::bad_request);
  EXPECT_EQ(match_route(http::verb::get, "/bytes/", 1000).refusal->status, http::status::bad_request);
  EXPECT_EQ(match_route(http::verb::get, "/bytes/+5", 1000).refusal->status, http::status::bad_request);
  EXPECT_EQ(match_route(http::verb::get, "/bytes/99999999999999999999999", 1000).refusal->status,
            http::status::bad_request);
  EXPECT_EQ(match_route(http::verb::get, "/nope", 10).refusal->status, http::status::not_found);
  const auto wrong = match_route(http::verb::get, "/echo", 10);
  EXPECT_EQ(wrong.refusal->status, http::status::method_not_allowed);
  EXPECT_EQ(wrong.allow, "POST");
  EXPECT_EQ(match_route(http::verb::delete_, "/", 10).refusal->status, http::status::method_not_allowed);
}

TEST(http_rules, pattern_matches_the_test_support_pattern) {
  const std::string ours = pattern(200000);
  EXPECT_EQ(ours, closewise::test::pattern(200000));
  EXPECT_FALSE(pattern_mismatch(std::string_view(ours).substr(777), 777));
  std::string bad = ours.substr(1000, 5000);
  bad[1234] ^= 1;
  EXPECT_EQ(pattern_mismatch(bad, 1000), 1234u);
  for (std::uint64_t off : {0ull, 6525ull, 6526ull, 1234567ull}) {
    EXPECT_EQ(std::string_view(pattern_at(off), 100),
              std::string_view(closewise::test::pattern(off + 100)).substr(off));
  }
}

}  // namespace
