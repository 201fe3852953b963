#pragma once
// closewise-reqresp's HTTP rules, without I/O: which requests the server
// accepts, what it answers when it does not, the routes, and the response
// pattern.
//
// Beast 1.81's parser is lenient where a server must not be: it accepts the
// same Content-Length twice ("5, 5" or two fields), a Transfer-Encoding whose
// last coding is not chunked (it then reads no body, so the body would be
// parsed as the next request: request smuggling), unknown codings, and an
// HTTP/1.1 request without Host. `check_header` rejects those after Beast
// parsed the header and before anything reads the body. What Beast itself
// rejects (bare LF, control characters, conflicting Content-Length, a
// chunk-size that overflows 64 bits) arrives here as a parse error and is
// mapped by `classify_parse_error`.
//
// Thread-safety: every function is pure or reads immutable data.

#include <cstddef>
#include <cstdint>
#include <memory_resource>
#include <optional>
#include <string>
#include <string_view>

#include <boost/beast/http/error.hpp>
#include <boost/beast/http/fields.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/status.hpp>
#include <boost/beast/http/verb.hpp>

namespace closewise::reqresp {

namespace http = boost::beast::http;
using error_code = boost::system::error_code;

/// The header fields of the server's requests: Beast's container over a
/// polymorphic allocator, so that a session can give each request an arena
/// (the target and every field carved from one buffer and released as a
/// whole) instead of one heap allocation per field. A default-constructed
/// header uses the heap, as with std::allocator.
using field_allocator = std::pmr::polymorphic_allocator<char>;
using request_fields = http::basic_fields<field_allocator>;
using request_header = http::request_header<request_fields>;

/// Why a request is refused before any route sees it.
struct rejection {
  http::status status = http::status::bad_request;
  std::string reason;  ///< one line, sent as the response body
};

/// Methods longer than this are refused with 501 as soon as the header limit
/// is hit (RFC 9112 section 3: "a method longer than any that it implements").
inline constexpr std::size_t max_method_length = 32;

/// Checks a header Beast parsed. nullopt: acceptable. Rules (RFC 9112):
/// - a method Beast does not know (501);
/// - HTTP/1.1 needs exactly one Host; no version may send two (400);
/// - at most one Content-Length field, a single value, no list (400);
/// - Transfer-Encoding with Content-Length, in HTTP/1.0, empty, or with chunked
///   repeated or not last (400); any coding but chunked (501);
/// - a target in origin form ("/..."), absolute form, or "*" (400 otherwise);
/// - an Expect other than 100-continue (417).
std::optional<rejection> check_header(const request_header& h);

/// What a parse error means for the client. `header_done`: the parser got
/// through the header; `start_line_done`: it parsed the request line (method
/// non-empty); `unparsed`: the bytes the parser did not consume (used to tell a
/// huge method (501) from a huge request line (414) from a huge header block (431)).
/// nullopt: no answer is possible or useful (the peer ended the stream, a reset,
/// a local cancellation).
std::optional<rejection> classify_parse_error(const error_code& ec, bool start_line_done, bool header_done,
                                              std::string_view unparsed);

/// The routes.
enum class route : std::uint8_t {
  root,     ///< GET / : a small body
  bytes,    ///< GET /bytes/N : N bytes of the pattern
  echo,     ///< POST /echo : the request body back
  stats,    ///< GET /stats : teardown statistics, JSON
  metrics,  ///< GET /metrics : teardown statistics, Prometheus text
  ready,    ///< GET /ready : 200 while the server is ready, 503 from SIGTERM on (--drain-delay, drain)
};

/// A request matched against the routes.
struct route_match {
  std::optional<route> which;        ///< nullopt: the answer is `refusal`
  std::uint64_t bytes = 0;           ///< route::bytes: N
  std::optional<rejection> refusal;  ///< 404, 405 (with `allow`), 400 (bad N), 501 (unknown method)
  std::string_view allow;            ///< for 405: the Allow header (static text)
};

/// Matches method and target (query string ignored; absolute form reduced to
/// its path). HEAD is accepted wherever GET is. `max_bytes` caps /bytes/N.
route_match match_route(http::verb method, std::string_view target, std::uint64_t max_bytes);

/// The path of a target: absolute form ("http://h/p?q") reduced to "/p", query dropped.
std::string_view target_path(std::string_view target) noexcept;

/// Byte `i` of the deterministic response pattern. Period 6526 = 251 * 26.
/// The same formula as the test support's pattern_byte, so tests compare bytes directly.
inline char pattern_byte(std::uint64_t i) noexcept { return static_cast<char>('a' + (i * 7 + i / 251) % 26); }
inline constexpr std::uint64_t pattern_period = 251 * 26;
/// Bytes [offset, offset + pattern_span) of the pattern, contiguous, from an immutable table.
inline constexpr std::size_t pattern_span = 64 * 1024;
const char* pattern_at(std::uint64_t offset) noexcept;
/// The first n bytes of the pattern.
std::string pattern(std::size_t n);
/// Index of the first byte of `data` (which starts at pattern offset `offset`)
/// that differs from the pattern; nullopt when all match.
std::optional<std::uint64_t> pattern_mismatch(std::string_view data, std::uint64_t offset) noexcept;

}  // namespace closewise::reqresp
