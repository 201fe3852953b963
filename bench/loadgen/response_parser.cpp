#include "response_parser.hpp"

#include <algorithm>
#include <charconv>
#include <cstring>

namespace closewise::bench {

namespace {

constexpr std::string_view crlfcrlf = "\r\n\r\n";

char lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool iequals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

std::string_view trim(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Calls f(token) for each comma-separated token of a field value.
template <class F>
void for_each_token(std::string_view value, F f) {
  while (!value.empty()) {
    const auto comma = value.find(',');
    f(trim(value.substr(0, comma)));
    if (comma == std::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
}

bool parse_decimal(std::string_view s, std::uint64_t& out) noexcept {
  if (s.empty() || s.size() > 18) return false;
  const auto [end, err] = std::from_chars(s.data(), s.data() + s.size(), out);
  return err == std::errc{} && end == s.data() + s.size();
}

}  // namespace

void response_parser::reset() noexcept {
  phase_ = phase::header;
  started_ = false;
  truncated_ = false;
  keep_alive_ = true;
  status_code_ = 0;
  content_length_ = -1;
  remaining_ = 0;
  body_seen_ = 0;
  header_.clear();
  error_ = nullptr;
}

bool response_parser::parse_header(std::string_view block) {
  // Status line: HTTP/1.x SP 3DIGIT SP reason CRLF
  const auto eol = block.find("\r\n");
  const std::string_view line = block.substr(0, eol);
  if (line.size() < 12 || line.substr(0, 7) != "HTTP/1." || (line[7] != '0' && line[7] != '1') || line[8] != ' ') {
    error_ = "bad status line";
    return false;
  }
  const bool http10 = line[7] == '0';
  int code = 0;
  for (std::size_t i = 9; i < 12; ++i) {
    if (line[i] < '0' || line[i] > '9') {
      error_ = "bad status code";
      return false;
    }
    code = code * 10 + (line[i] - '0');
  }
  if (line.size() > 12 && line[12] != ' ') {
    error_ = "bad status line";
    return false;
  }
  status_code_ = code;
  keep_alive_ = !http10;

  bool chunked = false;
  bool has_te = false;
  std::string_view rest = block.substr(eol + 2);
  while (!rest.empty()) {
    const auto end = rest.find("\r\n");
    if (end == std::string_view::npos) {
      error_ = "header line without CRLF";
      return false;
    }
    const std::string_view field = rest.substr(0, end);
    rest.remove_prefix(end + 2);
    if (field.empty()) break;  // the empty line that ends the header
    const auto colon = field.find(':');
    if (colon == std::string_view::npos || colon == 0) {
      error_ = "header field without a name";
      return false;
    }
    const std::string_view name = field.substr(0, colon);
    const std::string_view value = trim(field.substr(colon + 1));
    if (iequals(name, "content-length")) {
      std::uint64_t n = 0;
      if (!parse_decimal(value, n) || (content_length_ >= 0 && static_cast<std::uint64_t>(content_length_) != n)) {
        error_ = "bad Content-Length";
        return false;
      }
      content_length_ = static_cast<std::int64_t>(n);
    } else if (iequals(name, "transfer-encoding")) {
      has_te = true;
      chunked = false;
      for_each_token(value, [&](std::string_view t) { chunked = iequals(t, "chunked"); });  // chunked must be last
    } else if (iequals(name, "connection")) {
      for_each_token(value, [&](std::string_view t) {
        if (iequals(t, "close")) keep_alive_ = false;
        if (iequals(t, "keep-alive") && http10) keep_alive_ = true;
      });
    }
  }

  if ((code >= 100 && code < 200) || code == 204 || code == 304) {
    phase_ = phase::done;
  } else if (has_te) {
    // RFC 9112 6.3: Transfer-Encoding overrides Content-Length; a coding
    // other than a final chunked means "read until the connection closes".
    content_length_ = -1;
    phase_ = chunked ? phase::chunk_size : phase::body_until_eof;
  } else if (content_length_ >= 0) {
    remaining_ = static_cast<std::uint64_t>(content_length_);
    phase_ = remaining_ == 0 ? phase::done : phase::body_length;
  } else {
    phase_ = phase::body_until_eof;
  }
  if (phase_ == phase::body_until_eof) keep_alive_ = false;
  return true;
}

response_parser::result response_parser::feed(const char* data, std::size_t size) {
  if (size > 0) started_ = true;
  if (phase_ == phase::done) {
    if (error_ != nullptr) return {status::error, 0};
    return {status::complete, 0};
  }
  std::size_t used = 0;
  for (;;) {
    if (phase_ == phase::header) {
      std::size_t header_end = std::string_view::npos;  // offset in `data` just past the empty line
      if (header_.empty()) {
        const std::string_view view(data + used, size - used);
        const auto pos = view.find(crlfcrlf);
        if (pos != std::string_view::npos) {
          header_end = used + pos + 4;
          if (!parse_header(view.substr(0, pos + 4))) return fail(error_, header_end);
        }
      } else {
        const std::size_t old = header_.size();
        header_.append(data + used, size - used);
        const auto pos = header_.find(crlfcrlf, old >= 3 ? old - 3 : 0);
        if (pos != std::string::npos) {
          header_end = used + (pos + 4 - old);
          header_.resize(pos + 4);
          const bool ok = parse_header(header_);
          header_.clear();
          if (!ok) return fail(error_, header_end);
        } else {
          header_.resize(old);  // re-appended below
        }
      }
      if (header_end == std::string_view::npos) {
        if (header_.size() + (size - used) > max_header_bytes) return fail("header too large", size);
        header_.append(data + used, size - used);
        return {status::need_more, size};
      }
      used = header_end;
      if (phase_ == phase::done && status_code_ >= 100 && status_code_ < 200 && status_code_ != 101) {
        // An interim response (100 Continue): the real one follows.
        const bool keep = keep_alive_;
        reset();
        started_ = true;
        keep_alive_ = keep;
        continue;
      }
    }
    if (phase_ == phase::done) return {status::complete, used};
    if (used == size) return {status::need_more, used};
    bool done = false;
    bool bad = false;
    used += feed_body(data + used, data + size, done, bad);
    if (bad) return fail(error_, used);
    if (done) {
      phase_ = phase::done;
      return {status::complete, used};
    }
    if (used == size) return {status::need_more, used};
  }
}

std::size_t response_parser::feed_body(const char* p, const char* end, bool& done, bool& bad) {
  const char* const begin = p;
  // Takes one CRLF-terminated line (chunk size, chunk end, trailer field),
  // buffering it in header_ while it spans reads.
  auto take_line = [&](std::string_view& line) -> bool {
    const char* nl = static_cast<const char*>(std::memchr(p, '\n', static_cast<std::size_t>(end - p)));
    if (nl == nullptr) {
      header_.append(p, end);
      p = end;
      if (header_.size() > 4096) {
        error_ = "chunk line too long";
        bad = true;
      }
      return false;
    }
    if (header_.empty()) {
      line = std::string_view(p, static_cast<std::size_t>(nl - p));
    } else {
      header_.append(p, nl);
      line = header_;
    }
    p = nl + 1;
    if (line.empty() || line.back() != '\r') {
      error_ = "bare LF in chunked body";
      bad = true;
      return false;
    }
    line.remove_suffix(1);
    return true;
  };

  while (p < end && !done && !bad) {
    switch (phase_) {
      case phase::body_length:
      case phase::chunk_data: {
        const auto n =
            static_cast<std::size_t>(std::min<std::uint64_t>(remaining_, static_cast<std::uint64_t>(end - p)));
        p += n;
        remaining_ -= n;
        body_seen_ += n;
        if (remaining_ == 0) {
          if (phase_ == phase::body_length) {
            done = true;
          } else {
            phase_ = phase::chunk_crlf;
          }
        }
        break;
      }
      case phase::body_until_eof:
        body_seen_ += static_cast<std::uint64_t>(end - p);
        p = end;
        break;
      case phase::chunk_size: {
        std::string_view line;
        if (!take_line(line)) break;
        const auto semi = line.find(';');
        const std::string_view hex = trim(line.substr(0, semi));
        std::uint64_t n = 0;
        const auto [e, err] = std::from_chars(hex.data(), hex.data() + hex.size(), n, 16);
        header_.clear();
        if (hex.empty() || hex.size() > 15 || err != std::errc{} || e != hex.data() + hex.size()) {
          error_ = "bad chunk size";
          bad = true;
          break;
        }
        if (n == 0) {
          phase_ = phase::trailer;
        } else {
          remaining_ = n;
          phase_ = phase::chunk_data;
        }
        break;
      }
      case phase::chunk_crlf: {
        std::string_view line;
        if (!take_line(line)) break;
        const bool empty = line.empty();
        header_.clear();
        if (!empty) {
          error_ = "chunk data longer than its size";
          bad = true;
          break;
        }
        phase_ = phase::chunk_size;
        break;
      }
      case phase::trailer: {
        std::string_view line;
        if (!take_line(line)) break;
        const bool empty = line.empty();
        header_.clear();
        if (empty) done = true;  // else: a trailer field, ignored
        break;
      }
      case phase::header:
      case phase::done:
        done = true;
        break;
    }
  }
  return static_cast<std::size_t>(p - begin);
}

response_parser::status response_parser::on_eof() {
  if (phase_ == phase::done) return error_ != nullptr ? status::error : status::complete;
  if (phase_ == phase::body_until_eof) {
    phase_ = phase::done;
    return status::complete;
  }
  truncated_ = true;
  return status::need_more;
}

}  // namespace closewise::bench
