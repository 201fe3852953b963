#include "reqresp/http_rules.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <vector>

#include <boost/beast/core/string.hpp>

namespace closewise::reqresp {

namespace {

std::string_view trim(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// The codings of every Transfer-Encoding field, in order, parameters dropped,
// empty list elements ignored (RFC 9110 section 5.6.1).
std::vector<std::string_view> transfer_codings(const request_header& h) {
  std::vector<std::string_view> out;
  auto [first, last] = h.equal_range(http::field::transfer_encoding);
  for (auto it = first; it != last; ++it) {
    std::string_view rest(it->value().data(), it->value().size());
    while (!rest.empty()) {
      const auto comma = rest.find(',');
      std::string_view element = rest.substr(0, comma);
      rest = comma == std::string_view::npos ? std::string_view{} : rest.substr(comma + 1);
      element = trim(element.substr(0, element.find(';')));
      if (!element.empty()) out.push_back(element);
    }
  }
  return out;
}

bool iequals(std::string_view a, std::string_view b) noexcept { return boost::beast::iequals(a, b); }

rejection bad(std::string reason) { return {http::status::bad_request, std::move(reason)}; }

std::optional<rejection> check_transfer_encoding(const request_header& h) {
  if (h.count(http::field::transfer_encoding) == 0) return std::nullopt;
  // Both framings at once is the classic smuggling vector: refuse, never pick one.
  if (h.count(http::field::content_length) > 0) return bad("Transfer-Encoding with Content-Length");
  if (h.version() < 11) return bad("Transfer-Encoding in an HTTP/1.0 request");
  const auto codings = transfer_codings(h);
  if (codings.empty()) return bad("empty Transfer-Encoding");
  const auto chunked = std::count_if(codings.begin(), codings.end(), [](auto c) { return iequals(c, "chunked"); });
  if (chunked > 1) return bad("chunked applied more than once");
  for (auto c : codings) {
    if (!iequals(c, "chunked")) {
      return rejection{http::status::not_implemented, "unsupported transfer coding: " + std::string(c)};
    }
  }
  return std::nullopt;  // exactly "chunked"
}

}  // namespace

std::optional<rejection> check_header(const request_header& h) {
  // Refused like a malformed request (and the connection closed): whatever
  // follows a method we do not know cannot be trusted to be framed as we think.
  if (h.method() == http::verb::unknown) return rejection{http::status::not_implemented, "method not implemented"};
  const auto hosts = h.count(http::field::host);
  if (hosts > 1) return bad("more than one Host");
  if (hosts == 0 && h.version() >= 11) return bad("HTTP/1.1 request without Host");

  const auto lengths = h.count(http::field::content_length);
  if (lengths > 1) return bad("more than one Content-Length");
  if (lengths == 1) {
    // Beast accepts a list of equal values ("5, 5"); one value or nothing.
    const auto v = h[http::field::content_length];
    if (std::string_view(v.data(), v.size()).find(',') != std::string_view::npos) return bad("Content-Length list");
  }
  if (auto r = check_transfer_encoding(h)) return r;

  const std::string_view target(h.target().data(), h.target().size());
  const bool origin = !target.empty() && target.front() == '/';
  const bool absolute = target.starts_with("http://") || target.starts_with("https://");
  const bool asterisk = target == "*";
  if (!origin && !absolute && !asterisk) return bad("request target not in origin, absolute or asterisk form");

  if (h.count(http::field::expect) > 0) {
    const auto e = h[http::field::expect];
    if (!iequals(trim(std::string_view(e.data(), e.size())), "100-continue")) {
      return rejection{http::status::expectation_failed, "unsupported Expect"};
    }
  }
  return std::nullopt;
}

std::optional<rejection> classify_parse_error(const error_code& ec, bool start_line_done, bool header_done,
                                              std::string_view unparsed) {
  if (!ec) return std::nullopt;
  if (ec == http::error::header_limit || (ec == http::error::buffer_overflow && !header_done)) {
    if (!start_line_done) {
      // The request line alone is over the limit: a runaway method or target.
      const auto sp = unparsed.find(' ');
      if (sp == std::string_view::npos || sp > max_method_length) {
        return rejection{http::status::not_implemented, "method too long"};
      }
      return rejection{http::status::uri_too_long, "request line too long"};
    }
    return rejection{http::status::request_header_fields_too_large, "header block too large"};
  }
  if (ec == http::error::body_limit) return rejection{http::status::payload_too_large, "request body too large"};
  if (ec == http::error::buffer_overflow) return bad("chunk header line too long");
  // The peer ended the stream (FIN before a whole request) or the connection
  // failed: there is nobody to answer, or nothing to answer.
  if (ec == http::error::end_of_stream || ec == http::error::partial_message) return std::nullopt;
  // Every other parser error is a malformed request: bad method, target,
  // version or line ending (bare LF), a control character in a field, a bad or
  // conflicting Content-Length, a bad chunk (a chunk-size over 64 bits).
  if (ec.category() == http::make_error_code(http::error::bad_method).category()) {
    return bad("malformed request: " + ec.message());
  }
  return std::nullopt;
}

std::string_view target_path(std::string_view target) noexcept {
  for (std::string_view scheme : {"http://", "https://"}) {
    if (target.starts_with(scheme)) {
      target.remove_prefix(scheme.size());
      const auto slash = target.find('/');
      target = slash == std::string_view::npos ? std::string_view("/") : target.substr(slash);
      break;
    }
  }
  return target.substr(0, target.find('?'));
}

route_match match_route(http::verb method, std::string_view target, std::uint64_t max_bytes) {
  route_match m;
  if (method == http::verb::unknown) {
    m.refusal = rejection{http::status::not_implemented, "method not implemented"};
    return m;
  }
  const std::string_view path = target_path(target);
  const bool get = method == http::verb::get || method == http::verb::head;
  auto only = [&](bool ok, route r, const char* allow) {
    if (ok) {
      m.which = r;
    } else {
      m.refusal = rejection{http::status::method_not_allowed, "method not allowed"};
      m.allow = allow;
    }
  };
  if (path == "/") {
    only(get, route::root, "GET, HEAD");
  } else if (path == "/stats") {
    only(get, route::stats, "GET, HEAD");
  } else if (path == "/metrics") {
    only(get, route::metrics, "GET, HEAD");
  } else if (path == "/ready") {
    only(get, route::ready, "GET, HEAD");
  } else if (path == "/echo") {
    only(method == http::verb::post, route::echo, "POST");
  } else if (path.starts_with("/bytes/")) {
    const std::string_view digits = path.substr(7);
    std::uint64_t n = 0;
    const auto [end, err] = std::from_chars(digits.data(), digits.data() + digits.size(), n);
    const bool all_digits =
        !digits.empty() && std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!all_digits || err != std::errc{} || end != digits.data() + digits.size()) {
      m.refusal = bad("/bytes/N needs a decimal N");
    } else if (n > max_bytes) {
      m.refusal = bad("N exceeds --max-bytes (" + std::to_string(max_bytes) + ")");
    } else {
      only(get, route::bytes, "GET, HEAD");
      m.bytes = n;
    }
  } else {
    m.refusal = rejection{http::status::not_found, "no such resource"};
  }
  return m;
}

namespace {

// period + span bytes, so that any offset's span is contiguous.
const std::array<char, pattern_period + pattern_span>& pattern_table() noexcept {
  static const auto table = [] {
    std::array<char, pattern_period + pattern_span> t{};
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = pattern_byte(i);
    return t;
  }();
  return table;
}

}  // namespace

const char* pattern_at(std::uint64_t offset) noexcept { return pattern_table().data() + offset % pattern_period; }

std::string pattern(std::size_t n) {
  std::string s;
  s.reserve(n);
  for (std::size_t done = 0; done < n;) {
    const std::size_t k = std::min(pattern_span, n - done);
    s.append(pattern_at(done), k);
    done += k;
  }
  return s;
}

std::optional<std::uint64_t> pattern_mismatch(std::string_view data, std::uint64_t offset) noexcept {
  std::size_t done = 0;
  while (done < data.size()) {
    const std::size_t k = std::min(pattern_span, data.size() - done);
    const char* want = pattern_at(offset + done);
    const auto [a, b] = std::mismatch(data.data() + done, data.data() + done + k, want);
    if (a != data.data() + done + k) return done + static_cast<std::uint64_t>(a - (data.data() + done));
    done += k;
  }
  return std::nullopt;
}

}  // namespace closewise::reqresp
