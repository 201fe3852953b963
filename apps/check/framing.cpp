#include "check/framing.hpp"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string_view>

#include "demo/client.hpp"

namespace closewise::check {

namespace {

using namespace std::chrono_literals;
using clock = std::chrono::steady_clock;
using ms = std::chrono::milliseconds;

// How every case is laid out. Each sends, on a fresh connection:
//
//   primary request (malformed framing) | hidden request | final request
//
// where the hidden request (to /closewise-check-smuggled-<case>) sits where
// the case's reference framing reads body bytes, and only a wrong framing
// finds a request. The final request ("GET /", Connection: close) follows
// what every framing the case considers reads as the primary's end, so a
// server that frames consistently answers exactly twice (the primary and the
// final request) and closes: no wait is a window, the close ends the read.
// A wrong framing answers three times (the hidden request too), or answers
// body bytes with a 400 after the first response.
//
// When a wrong framing would leave bytes of the reference body behind the
// hidden request (the last chunk, "\r\n0\r\n\r\n"), the hidden request is a
// POST whose Content-Length swallows them, so the final request still parses
// and the answer count stays exact.
constexpr std::string_view chunk_tail = "\r\n0\r\n\r\n";

// The bound of one case: a consistent server closes at once after the final
// request; a silent one costs this much.
constexpr ms case_limit = 2000ms;

struct request_parts {
  std::string host;
  std::string name;
};

// Concatenation by append: g++ 12 at -O3 reports a false -Wrestrict for
// "literal" + std::string&&.
std::string cat(std::initializer_list<std::string_view> parts) {
  std::string s;
  for (const auto part : parts) s.append(part);
  return s;
}

std::string hex(std::size_t n) {
  char buf[24];
  const auto [end, ec] = std::to_chars(std::begin(buf), std::end(buf), n, 16);
  return std::string(buf, end);
}

std::string hidden_get(const request_parts& p) {
  std::string s = "GET /closewise-check-smuggled-";
  s.append(p.name).append(" HTTP/1.1\r\nHost: ").append(p.host).append("\r\n\r\n");
  return s;
}

// The hidden request with a body of `swallow` bytes (what a wrong framing
// leaves behind it).
std::string hidden_post(const request_parts& p, std::size_t swallow) {
  std::string s = "POST /closewise-check-smuggled-";
  s.append(p.name).append(" HTTP/1.1\r\nHost: ").append(p.host).append("\r\nContent-Length: ");
  s.append(std::to_string(swallow)).append("\r\n\r\n");
  return s;
}

std::string final_request(const std::string& host) {
  std::string s = "GET / HTTP/1.1\r\nHost: ";
  s.append(host).append("\r\nConnection: close\r\n\r\n");
  return s;
}

// A head: the request line, then `fields` verbatim (each with its own line
// end), then the empty line.
std::string head(std::string_view request_line, const request_parts& p, std::string_view fields,
                 std::string_view eol = "\r\n") {
  std::string s(request_line);
  s.append(eol).append("Host: ").append(p.host).append(eol).append(fields).append(eol);
  return s;
}

// Chunked reference, Content-Length wrong: the hidden request is the data of
// the one chunk; a parser that reads Content-Length (the size line's bytes)
// finds it right after.
struct chunk_hiding {
  std::string size_line;  // "1f\r\n"
  std::string body;       // size line, data, CRLF, last chunk
};
chunk_hiding hide_in_chunk(const request_parts& p) {
  const std::string data = hidden_post(p, chunk_tail.size());
  chunk_hiding h;
  h.size_line = hex(data.size()).append("\r\n");
  h.body = h.size_line + data;
  h.body.append(chunk_tail);
  return h;
}
std::string chunk_hiding_request(const request_parts& p, std::string_view request_line, std::string_view te_field,
                                 bool te_first = false) {
  const auto h = hide_in_chunk(p);
  const std::string cl = cat({"Content-Length: ", std::to_string(h.size_line.size()), "\r\n"});
  std::string fields = te_first ? std::string(te_field).append(cl) : std::string(cl).append(te_field);
  return head(request_line, p, fields) + h.body;
}

// Content-Length reference, chunked wrong: the body is a last chunk and the
// hidden request; a parser that reads it as chunked ends at the last chunk.
std::string te_hiding_body(const request_parts& p) { return std::string("0\r\n\r\n").append(hidden_get(p)); }
std::string te_hiding_request(const request_parts& p, std::string_view fields_before_cl) {
  const std::string body = te_hiding_body(p);
  std::string fields(fields_before_cl);
  fields.append("Content-Length: ").append(std::to_string(body.size())).append("\r\n");
  return head("POST / HTTP/1.1", p, fields) + body;
}

// Content-Length reference (`length` fields built from the hidden request's
// size): the body is the hidden request; a parser that reads no body (or a
// shorter one) finds it.
std::string length_hiding_request(const request_parts& p, std::string_view request_line,
                                  const std::function<std::string(std::size_t)>& fields,
                                  std::string_view eol = "\r\n") {
  const std::string body = hidden_get(p);
  return head(request_line, p, fields(body.size()), eol) + body;
}

// Two lengths: 5 bytes of filler, then the hidden request. The shorter
// length ends at the filler; the longer one takes the hidden request too.
constexpr std::string_view filler = "hello";
std::string two_lengths_request(const request_parts& p,
                                const std::function<std::string(std::size_t shorter, std::size_t longer)>& fields) {
  const std::string body = std::string(filler).append(hidden_get(p));
  return head("POST / HTTP/1.1", p, fields(filler.size(), body.size())) + body;
}

// A malformed chunk-size line whose data starts with CRLF: a parser that
// reads the line as size 0 ends the body there (the CRLF closes an empty
// trailer section) and finds the hidden request; one that reads the
// intended size takes it as data.
std::string bad_chunk_size_request(const request_parts& p, const std::function<std::string(std::size_t)>& size_line) {
  const std::string data = std::string("\r\n").append(hidden_post(p, chunk_tail.size()));
  std::string body = size_line(data.size());
  body.append(data).append(chunk_tail);
  return head("POST / HTTP/1.1", p, "Transfer-Encoding: chunked\r\n") + body;
}

std::string cl_field(std::size_t n) { return cat({"Content-Length: ", std::to_string(n), "\r\n"}); }

struct case_def {
  framing_case info;
  std::string title;
  /// RFC 9112 6.1: a server that accepts Transfer-Encoding with
  /// Content-Length (or in HTTP/1.0) closes after responding.
  bool must_close = false;
  /// The bytes the case sends before the final request.
  std::function<std::string(const request_parts&)> build;
};

const std::vector<case_def>& case_table() {
  static const std::vector<case_def> table = [] {
    std::vector<case_def> t;
    auto add = [&t](std::string name, std::string rfc, std::string what, std::string title, bool must_close,
                    std::function<std::string(const request_parts&)> build) {
      t.push_back({{std::move(name), std::move(rfc), std::move(what)}, std::move(title), must_close, std::move(build)});
    };
    const std::string post = "POST / HTTP/1.1";
    // Chunked reference with Content-Length beside it: the cases differ in the Transfer-Encoding field only.
    auto add_te = [&add, post](std::string name, std::string rfc, std::string what, std::string title,
                               std::string te_field, bool te_first = false) {
      add(std::move(name), std::move(rfc), std::move(what), std::move(title), true,
          [post, te_field, te_first](const request_parts& p) {
            return chunk_hiding_request(p, post, te_field, te_first);
          });
    };

    // ---- Content-Length ----
    add("cl-cl", "RFC 9112 6.3 (5)",
        "two different Content-Length fields, the shorter first: a parser that takes the first frames the hidden "
        "request as a request",
        "CL.CL, shorter first", false, [](const request_parts& p) {
          return two_lengths_request(p, [](std::size_t s, std::size_t l) { return cl_field(s) + cl_field(l); });
        });
    add("cl-cl-reversed", "RFC 9112 6.3 (5)",
        "two different Content-Length fields, the longer first: a parser that takes the last frames the hidden "
        "request as a request",
        "CL.CL, longer first", false, [](const request_parts& p) {
          return two_lengths_request(p, [](std::size_t s, std::size_t l) { return cl_field(l) + cl_field(s); });
        });
    add("cl-list-same", "RFC 9110 8.6",
        "Content-Length \"N, N\": a recipient may read it as N (the reference); one that reads no body (an "
        "unparsable value ignored) frames the hidden request",
        "CL list of equal values", false, [](const request_parts& p) {
          return length_hiding_request(p, "POST / HTTP/1.1", [](std::size_t n) {
            return cat({"Content-Length: ", std::to_string(n), ", ", std::to_string(n), "\r\n"});
          });
        });
    add("cl-list-diff", "RFC 9110 8.6, RFC 9112 6.3 (5)",
        "Content-Length \"5, N\" (different values): a parser that takes the first value frames the hidden request",
        "CL list of different values", false, [](const request_parts& p) {
          return two_lengths_request(p, [](std::size_t s, std::size_t l) {
            return cat({"Content-Length: ", std::to_string(s), ", ", std::to_string(l), "\r\n"});
          });
        });
    add("cl-list-diff-reversed", "RFC 9110 8.6, RFC 9112 6.3 (5)",
        "Content-Length \"N, 5\" (different values): a parser that takes the last value frames the hidden request",
        "CL list, longer first", false, [](const request_parts& p) {
          return two_lengths_request(p, [](std::size_t s, std::size_t l) {
            return cat({"Content-Length: ", std::to_string(l), ", ", std::to_string(s), "\r\n"});
          });
        });
    add("cl-plus", "RFC 9110 8.6",
        "Content-Length \"+N\" (not 1*DIGIT): reference N (what a lenient number parser reads); a parser that "
        "ignores the invalid field reads no body and frames the hidden request",
        "CL with a sign", false, [](const request_parts& p) {
          return length_hiding_request(p, "POST / HTTP/1.1", [](std::size_t n) {
            return cat({"Content-Length: +", std::to_string(n), "\r\n"});
          });
        });
    add("cl-ws-before-colon", "RFC 9112 5.1",
        "\"Content-Length : N\" (whitespace before the colon, a 400 by the RFC): reference N; a parser that takes "
        "\"Content-Length \" for another field reads no body and frames the hidden request",
        "whitespace between name and colon", false, [](const request_parts& p) {
          return length_hiding_request(p, "POST / HTTP/1.1", [](std::size_t n) {
            return cat({"Content-Length : ", std::to_string(n), "\r\n"});
          });
        });
    add("get-cl-body", "RFC 9112 6.3 (6), RFC 9110 9.3.1",
        "a GET with Content-Length and a body: the body is framed by Content-Length whatever the method; a parser "
        "that reads no body on a GET frames the hidden request",
        "Content-Length on a GET", false,
        [](const request_parts& p) { return length_hiding_request(p, "GET / HTTP/1.1", cl_field); });

    // ---- Content-Length with Transfer-Encoding ----
    add_te(
        "cl-te", "RFC 9112 6.1, 6.3 (3)",
        "Content-Length then Transfer-Encoding: chunked; chunked wins (or a 400); a parser that reads Content-Length "
        "frames the hidden request (the chunk's data)",
        "CL.TE", "Transfer-Encoding: chunked\r\n");
    add_te(
        "te-cl", "RFC 9112 6.1, 6.3 (3)",
        "Transfer-Encoding: chunked then Content-Length; chunked wins (or a 400); a parser that reads Content-Length "
        "frames the hidden request (the chunk's data)",
        "TE.CL ordering", "Transfer-Encoding: chunked\r\n", true);
    add_te("te-xchunked", "RFC 9112 6.1, 6.3 (4)",
           "Transfer-Encoding: xchunked (an unknown coding: 501 or 400) with Content-Length; a parser that falls back "
           "to Content-Length frames the hidden request",
           "TE: xchunked", "Transfer-Encoding: xchunked\r\n");
    add("te-space-before-colon", "RFC 9112 5.1",
        "\"Transfer-Encoding : chunked\" (a 400 by the RFC) with Content-Length: reference Content-Length (the line is "
        "no Transfer-Encoding field); a parser that strips the space reads chunked and frames the hidden request",
        "TE with space before colon", false,
        [](const request_parts& p) { return te_hiding_request(p, "Transfer-Encoding : chunked\r\n"); });
    add("te-leading-space-name", "RFC 9112 5.2",
        "\" Transfer-Encoding: chunked\" after another field (obs-fold: part of that field's value, or a 400) with "
        "Content-Length; a parser that takes it as a field reads chunked and frames the hidden request",
        "TE with leading space in name", false, [](const request_parts& p) {
          return te_hiding_request(p, "X-Closewise-Check: fold\r\n Transfer-Encoding: chunked\r\n");
        });
    add_te("te-chunked-identity", "RFC 9112 6.3 (4)",
           "Transfer-Encoding: chunked, identity (chunked not last: a 400) with Content-Length; a parser that falls "
           "back to Content-Length frames the hidden request",
           "TE: chunked, identity", "Transfer-Encoding: chunked, identity\r\n");
    add_te("te-identity-chunked", "RFC 9112 6.1, 6.3 (3)",
           "Transfer-Encoding: identity, chunked (chunked last: framed as chunked, identity a 501) with "
           "Content-Length; a parser that reads Content-Length frames the hidden request",
           "TE: identity, chunked", "Transfer-Encoding: identity, chunked\r\n");
    add_te("te-tab", "RFC 9110 5.6.3",
           "Transfer-Encoding:<HT>chunked (a tab is valid whitespace: chunked) with Content-Length; a parser that does "
           "not trim the tab falls back to Content-Length and frames the hidden request",
           "TE with a tab", "Transfer-Encoding:\tchunked\r\n");
    add_te("te-twice", "RFC 9112 6.1, 7",
           "two Transfer-Encoding: chunked fields (chunked applied twice: a 400) with Content-Length; a parser that "
           "falls back to Content-Length frames the hidden request",
           "TE: chunked twice", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n");
    add_te("te-uppercase", "RFC 9112 7",
           "Transfer-Encoding: CHUNKED (coding names are case-insensitive: chunked) with Content-Length; a parser that "
           "compares case-sensitively falls back to Content-Length and frames the hidden request",
           "TE: CHUNKED", "Transfer-Encoding: CHUNKED\r\n");
    add_te("te-vertical-tab", "RFC 9110 5.5, 5.6.3",
           "Transfer-Encoding:<VT>chunked (VT is no whitespace: an unknown coding) with Content-Length; a parser that "
           "falls back to Content-Length frames the hidden request",
           "TE with a vertical tab",
           "Transfer-Encoding:\x0b"
           "chunked\r\n");
    add_te("te-form-feed", "RFC 9110 5.5, 5.6.3",
           "Transfer-Encoding:<FF>chunked (FF is no whitespace: an unknown coding) with Content-Length; a parser that "
           "falls back to Content-Length frames the hidden request",
           "TE with a form feed",
           "Transfer-Encoding:\x0c"
           "chunked\r\n");
    add("http10-te", "RFC 9112 6.1",
        "an HTTP/1.0 keep-alive request with Transfer-Encoding: chunked and Content-Length (faulty framing: close "
        "after it, or a 400); a parser that reads Content-Length frames the hidden request",
        "HTTP/1.0 with TE chunked", true, [](const request_parts& p) {
          return chunk_hiding_request(p, "POST / HTTP/1.0", "Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n");
        });
    add("get-te", "RFC 9112 6.3 (4), RFC 9110 9.3.1",
        "a GET with Transfer-Encoding: chunked and a chunked body: framed as chunked whatever the method; a parser "
        "that reads no body on a GET takes the chunk-size line for a request (a 400 after the first answer)",
        "TE on a GET", false, [](const request_parts& p) {
          return head("GET / HTTP/1.1", p, "Transfer-Encoding: chunked\r\n") + hide_in_chunk(p).body;
        });

    // ---- chunk sizes and chunk lines ----
    // A malformed size line (built from the data's size) before data that starts with CRLF.
    auto add_size = [&add](std::string name, std::string what, std::string title,
                           std::function<std::string(std::size_t)> size_line) {
      add(std::move(name), "RFC 9112 7.1", std::move(what), std::move(title), false,
          [size_line](const request_parts& p) { return bad_chunk_size_request(p, size_line); });
    };
    add_size(
        "chunk-size-0x",
        "chunk-size \"0x<hex>\" (not HEXDIG: a 400); a parser that reads \"0\" and skips the rest of the line ends the "
        "body and frames the hidden request",
        "chunk size 0x prefix", [](std::size_t n) {
          return cat({"0x", hex(n), "\r\n"});
        });
    add_size("chunk-size-negative",
             "chunk-size \"-<hex>\" (a 400); a parser that reads it as 0 ends the body and frames the hidden request",
             "negative chunk size", [](std::size_t n) {
               return cat({"-", hex(n), "\r\n"});
             });
    add_size(
        "chunk-size-overflow",
        "chunk-size ffffffffffffffffff (over 64 bits: a 400); a parser that turns the overflow into 0 ends the body "
        "and frames the hidden request",
        "chunk size overflow", [](std::size_t) { return std::string("ffffffffffffffffff\r\n"); });
    add_size(
        "chunk-size-wrap",
        "chunk-size 10000000000000000 (2^64: a 400); a parser whose 64-bit size wraps to 0 ends the body and frames "
        "the hidden request",
        "chunk size wrapping to 0", [](std::size_t) { return std::string("10000000000000000\r\n"); });
    add_size("chunk-size-leading-space",
             "chunk-size \" <hex>\" (whitespace before the size: a 400); a number parser that skips leading "
             "whitespace reads <hex> (the reference), one that finds no digit and reads the line as size 0 with an "
             "extension ends the body and frames the hidden request",
             "chunk size after a space", [](std::size_t n) {
               return cat({" ", hex(n), "\r\n"});
             });
    add_size("chunk-size-inner-space",
             "chunk-size \"0 <hex>\" (whitespace inside the size: a 400, BWS only precedes ';'); a parser that ends "
             "the size at the space and reads the rest as an extension reads 0, ends the body and frames the hidden "
             "request, which a parser that drops the space reads as data",
             "chunk size with a space inside", [](std::size_t n) {
               return cat({"0 ", hex(n), "\r\n"});
             });
    add("chunk-missing-crlf", "RFC 9112 7.1",
        "chunk data followed by \"XX\" instead of CRLF (a 400); a parser that skips two bytes unchecked ends the "
        "body at the last chunk and answers the hidden request after it, which a strict parser never reaches",
        "missing CRLF after chunk data", false, [](const request_parts& p) {
          return head("POST / HTTP/1.1", p, "Transfer-Encoding: chunked\r\n")
              .append("5\r\nhelloXX0\r\n\r\n")
              .append(hidden_get(p));
        });
    add("chunk-ext-bare-lf", "RFC 9112 2.2, 7.1.1",
        "a chunk extension ended by a bare LF (\"<hex>;x<LF>\"); a parser that reads the line as size 0 ends the "
        "body and frames the hidden request",
        "chunk extension with bare LF", false, [](const request_parts& p) {
          return bad_chunk_size_request(p, [](std::size_t n) { return cat({hex(n), ";x\n"}); });
        });

    // ---- field lines and the request line ----
    add("bare-cr-header", "RFC 9112 2.2",
        "a field value with a bare CR before \"Content-Length: 0\" (a 400, or the CR read as SP: reference N); a "
        "parser that ends the line at the CR sees a second Content-Length 0 and frames the hidden request",
        "bare CR in a header", false, [](const request_parts& p) {
          return length_hiding_request(p, "POST / HTTP/1.1", [](std::size_t n) {
            return cat({cl_field(n), "X-Closewise-Check: a\rContent-Length: 0\r\n"});
          });
        });
    add("bare-lf", "RFC 9112 2.2",
        "every line of the head ended by a bare LF (a recipient may accept it: reference Content-Length N); a "
        "parser that misreads the head frames the hidden request",
        "bare LF line endings", false, [](const request_parts& p) {
          return length_hiding_request(
              p, "POST / HTTP/1.1",
              [](std::size_t n) {
                return cat({"Content-Length: ", std::to_string(n), "\n"});
              },
              "\n");
        });
    add("nul-header", "RFC 9110 5.5",
        "a NUL in a field value before Content-Length (a 400, or NUL read as SP: reference N); a parser that stops "
        "the head at the NUL reads no body and frames the hidden request",
        "NUL in a header value", false, [](const request_parts& p) {
          return length_hiding_request(p, "POST / HTTP/1.1", [](std::size_t n) {
            return cat({std::string_view("X-Closewise-Check: a\0b\r\n", 24), cl_field(n)});
          });
        });
    add("obs-fold", "RFC 9112 5.2",
        "a field continued by obs-fold with \" Content-Length: 0\" (a 400, or unfolded into the value: reference N); "
        "a parser that takes the folded line as a field frames the hidden request",
        "obs-fold line", false, [](const request_parts& p) {
          return length_hiding_request(p, "POST / HTTP/1.1", [](std::size_t n) {
            return cat({cl_field(n), "X-Closewise-Check: a\r\n Content-Length: 0\r\n"});
          });
        });
    add("ws-before-first-header", "RFC 9112 2.2",
        "\" Transfer-Encoding: chunked\" right after the request line (a 400, or the line ignored: reference "
        "Content-Length); a parser that takes it as a field reads chunked and frames the hidden request",
        "whitespace before the first header", false, [](const request_parts& p) {
          const std::string body = te_hiding_body(p);
          std::string s = "POST / HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: ";
          s.append(p.host).append("\r\n").append(cl_field(body.size())).append("\r\n").append(body);
          return s;
        });
    add("request-line-double-space", "RFC 9112 3",
        "\"POST  / HTTP/1.1\" (two spaces: a 400, or parsed on word boundaries: reference Content-Length N); a "
        "parser that misreads the line frames the hidden request",
        "request line with two spaces", false,
        [](const request_parts& p) { return length_hiding_request(p, "POST  / HTTP/1.1", cl_field); });
    return t;
  }();
  return table;
}

// ---- the connection ----

// A plain or TLS connection to the target, each step bounded.
class link {
 public:
  static std::unique_ptr<link> open(const options& opts, ms limit, std::string& error) {
    auto c = demo::raw_client::connect(opts.target, 0, limit, error);
    if (!c) return nullptr;
    std::unique_ptr<link> l(new link(std::move(*c)));
    if (opts.tls) {
      l->tls_ = std::make_unique<demo::tls_client>(l->raw_);
      if (!l->tls_->handshake(limit, error)) return nullptr;
    }
    return l;
  }
  int send(std::string_view data, ms limit) { return tls_ ? tls_->send_all(data, limit) : raw_.send_all(data, limit); }
  demo::read_step read(char* data, std::size_t n, ms limit) {
    if (tls_) return tls_->read_some(data, n, limit);
    const long r = raw_.recv_some(data, n, limit);
    demo::read_step s;
    if (r > 0) {
      s.n = static_cast<std::size_t>(r);
    } else if (r == 0) {
      s.end = demo::read_end::eof;
    } else if (r == -ETIMEDOUT) {
      s.end = demo::read_end::timeout;
    } else {
      s.end = r == -ECONNRESET ? demo::read_end::reset : demo::read_end::error;
      s.error = static_cast<int>(-r);
    }
    return s;
  }

 private:
  explicit link(demo::raw_client c) : raw_(std::move(c)) {}
  demo::raw_client raw_;  // outlives tls_ (declared first, destroyed last)
  std::unique_ptr<demo::tls_client> tls_;
};

// ---- the answers ----

// The responses in what the server sent: status codes of every final (non-1xx)
// response whose head arrived, in order.
struct answers {
  std::vector<int> statuses;
  bool garbage = false;  // bytes that are no response
};

std::string lower_trimmed(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

// Skips a chunked body at `pos`; npos if it is incomplete or malformed.
std::size_t skip_chunked(std::string_view s, std::size_t pos) {
  for (;;) {
    const auto eol = s.find("\r\n", pos);
    if (eol == std::string_view::npos) return std::string_view::npos;
    std::uint64_t size = 0;
    const auto [end, ec] = std::from_chars(s.data() + pos, s.data() + eol, size, 16);
    if (ec != std::errc{} || end == s.data() + pos) return std::string_view::npos;
    pos = eol + 2;
    if (size == 0) {
      // The trailer section: field lines up to an empty one.
      for (;;) {
        const auto line_end = s.find("\r\n", pos);
        if (line_end == std::string_view::npos) return std::string_view::npos;
        const bool empty = line_end == pos;
        pos = line_end + 2;
        if (empty) return pos;
      }
    }
    if (s.size() - pos < size + 2) return std::string_view::npos;
    pos += static_cast<std::size_t>(size) + 2;
  }
}

answers parse_answers(std::string_view s) {
  answers a;
  std::size_t pos = 0;
  while (pos < s.size()) {
    const auto end = s.find("\r\n\r\n", pos);
    if (!s.substr(pos).starts_with("HTTP/1.")) {
      a.garbage = true;
      return a;
    }
    if (end == std::string_view::npos) return a;  // a head cut short
    const std::string_view head_text = s.substr(pos, end - pos);
    int status = 0;
    if (head_text.size() >= 12) std::from_chars(head_text.data() + 9, head_text.data() + 12, status);
    std::optional<std::uint64_t> length;
    bool chunked = false;
    std::size_t line = head_text.find("\r\n");
    while (line != std::string_view::npos) {
      const std::size_t next = head_text.find("\r\n", line + 2);
      const std::string_view field =
          head_text.substr(line + 2, next == std::string_view::npos ? next : next - line - 2);
      const auto colon = field.find(':');
      if (colon != std::string_view::npos) {
        const std::string name = lower_trimmed(field.substr(0, colon));
        const std::string value = lower_trimmed(field.substr(colon + 1));
        if (name == "content-length") {
          std::uint64_t n = 0;
          if (std::from_chars(value.data(), value.data() + value.size(), n).ec == std::errc{}) length = n;
        } else if (name == "transfer-encoding") {
          chunked = value.ends_with("chunked");
        }
      }
      line = next;
    }
    pos = end + 4;
    if (status >= 100 && status < 200) continue;  // 100 Continue: not an answer
    a.statuses.push_back(status);
    if (status == 204 || status == 304) continue;
    if (chunked) {
      pos = skip_chunked(s, pos);
      if (pos == std::string_view::npos) return a;
    } else if (length) {
      if (s.size() - pos < *length) return a;
      pos += static_cast<std::size_t>(*length);
    } else {
      return a;  // delimited by the close: the rest is its body
    }
  }
  return a;
}

// ---- grading ----

// A status that refuses the request itself (not a route's answer such as 404
// or 405 to "POST /").
bool refusal_status(int s) { return s >= 500 || (s >= 400 && s != 401 && s != 403 && s != 404 && s != 405); }

// How a case went; the row's verdict fails only on a desync.
enum outcome : int { rejected, lenient, desync, unanswered };
constexpr int outcome_count = 4;
std::string_view outcome_name(int o) {
  static constexpr std::string_view names[outcome_count] = {"rejected", "lenient", "desync", "unanswered"};
  return names[o];
}

std::string statuses_text(const std::vector<int>& st) {
  std::string s;
  for (std::size_t i = 0; i < st.size(); ++i) {
    if (i) s.append(", ");
    s.append(std::to_string(st[i]));
  }
  return s;
}

std::string_view end_words(demo::read_end e) {
  switch (e) {
    case demo::read_end::eof:
      return "then closed";
    case demo::read_end::close_notify:
      return "then closed (close_notify)";
    case demo::read_end::reset:
      return "then reset";
    case demo::read_end::timeout:
      return "then kept the connection open";
    default:
      return "then failed";
  }
}

row run_case(const case_def& def, const options& opts) {
  row r;
  r.name = def.info.name;
  r.title = def.title;
  r.expected =
      "400 (or another refusal) and a close, or exactly the answers a consistent framing implies (the "
      "request and the final GET); never an answer to the hidden request";
  r.facts["rfc"] = def.info.rfc;
  r.facts["what"] = def.info.what;

  const ms limit = std::min(opts.wait_limit, case_limit);
  const request_parts parts{opts.host, def.info.name};
  std::string bytes = def.build(parts);
  bytes.append(final_request(opts.host));
  r.facts["bytes_sent"] = bytes.size();

  std::string error;
  const auto started = clock::now();
  auto l = link::open(opts, opts.wait_limit, error);
  if (!l) {
    r.result = verdict::skip;
    r.observed = "no connection";
    r.reason = cat({"connecting to ", opts.target, ": ", error});
    return r;
  }
  if (const int e = l->send(bytes, opts.wait_limit); e != 0) {
    // A server may refuse and close before it read everything; what it
    // answered is still graded below.
    r.facts["send_error"] = demo::errno_name(e);
  }

  std::string received;
  std::vector<char> buf(16 * 1024);
  demo::read_step last;
  const auto deadline = clock::now() + limit;
  for (;;) {
    const auto left = std::chrono::duration_cast<ms>(deadline - clock::now());
    if (left <= ms::zero()) {
      last.end = demo::read_end::timeout;
      break;
    }
    last = l->read(buf.data(), buf.size(), left);
    if (last.end != demo::read_end::none) break;
    received.append(buf.data(), last.n);
  }
  const auto elapsed = std::chrono::duration_cast<ms>(clock::now() - started);
  const answers a = parse_answers(received);
  const auto n = a.statuses.size();

  r.facts["responses"] = n;
  r.facts["statuses"] = a.statuses;
  r.facts["end"] = std::string(demo::to_string(last.end));
  r.facts["ms"] = elapsed.count();
  if (last.end == demo::read_end::reset || last.end == demo::read_end::error) {
    r.facts["errno"] = demo::errno_name(last.error);
  }

  const bool refused_later =
      std::any_of(a.statuses.begin() + std::min<std::size_t>(1, n), a.statuses.end(), refusal_status);
  outcome o;
  std::string note;
  if (n > 2 || refused_later) {
    o = desync;
    note = n > 2 ? cat({"answered ", std::to_string(n),
                        " requests where a consistent framing sees 2: the hidden request /closewise-check-smuggled-",
                        def.info.name, " was executed"})
                 : std::string("refused a request after the first answer: it took body bytes for a request");
  } else if (n == 0) {
    o = last.end == demo::read_end::timeout ? unanswered : rejected;
    if (o == unanswered) note = cat({"no answer and no close within ", std::to_string(limit.count()), " ms"});
  } else if (refusal_status(a.statuses[0])) {
    o = rejected;
    if (n == 2) note = "refused, but kept the connection open and answered the next request";
  } else if (n == 1 && last.end != demo::read_end::timeout && !def.must_close) {
    // A route's answer (nginx answers before it reads a body it discards),
    // then a close instead of the final request: it gave up on the framing.
    o = rejected;
    note = "answered, then closed without reading on to the final request";
  } else {
    o = lenient;
    if (n == 1 && last.end != demo::read_end::timeout) {
      note = "accepted, then closed (as RFC 9112 6.1 requires after such a request)";
    } else if (n == 1) {
      note = cat({"accepted; the final request got no answer within ", std::to_string(limit.count()),
                  " ms (read as body, or awaited)"});
    } else if (n == 2 && def.must_close) {
      note = "accepted, and kept the connection open after it (RFC 9112 6.1: close after such a request)";
    } else {
      note = "accepted, framed consistently";
    }
  }
  if (a.garbage) r.facts["unparsed_bytes"] = true;

  std::string observed;
  observed.append(outcome_name(o)).append(": ");
  if (n == 0) {
    observed.append("no response, ");
  } else {
    observed.append(std::to_string(n)).append(n == 1 ? " response (" : " responses (");
    observed.append(statuses_text(a.statuses)).append("), ");
  }
  observed.append(end_words(last.end));
  observed.append(" after ").append(std::to_string(elapsed.count())).append(" ms");
  r.observed = std::move(observed);
  r.facts["outcome"] = std::string(outcome_name(o));
  r.result = o == desync ? verdict::fail : verdict::pass;
  r.reason = note;
  if (o == desync) r.reason.append(". The case: ").append(def.info.what);
  return r;
}

}  // namespace

const std::vector<framing_case>& framing_cases() {
  static const std::vector<framing_case> cases = [] {
    std::vector<framing_case> out;
    for (const auto& d : case_table()) out.push_back(d.info);
    return out;
  }();
  return cases;
}

row check_framing_case(const std::string& name, const options& opts) {
  for (const auto& d : case_table()) {
    if (d.info.name == name) return run_case(d, opts);
  }
  row r;
  r.name = name;
  r.result = verdict::skip;
  r.reason = "no such case";
  return r;
}

row check_framing(const options& opts) {
  row r;
  r.name = "framing";
  r.title = "framing and desync";
  r.expected =
      "every ambiguous or invalid framing refused (400/501 and a close) or framed consistently; no request "
      "hidden in a body ever answered";
  std::size_t counts[outcome_count] = {};
  std::size_t skipped = 0;
  std::vector<std::string> desynced;
  for (const auto& d : case_table()) {
    row c = run_case(d, opts);
    if (c.result == verdict::skip) {
      ++skipped;
    } else {
      const std::string o = c.facts.value("outcome", "");
      for (int i = 0; i < outcome_count; ++i) {
        if (o == outcome_name(i)) ++counts[i];
      }
      if (c.result == verdict::fail) desynced.push_back(c.name);
    }
    r.cases.push_back(std::move(c));
  }
  const std::size_t total = r.cases.size();
  std::string observed = cat({std::to_string(total), " cases: "});
  observed.append(std::to_string(counts[rejected])).append(" rejected, ");
  observed.append(std::to_string(counts[lenient])).append(" lenient, ");
  observed.append(std::to_string(counts[desync])).append(" desync");
  if (counts[unanswered]) observed.append(", ").append(std::to_string(counts[unanswered])).append(" unanswered");
  if (skipped) observed.append(", ").append(std::to_string(skipped)).append(" skipped");
  r.observed = observed;
  r.facts["cases"] = total;
  r.facts["rejected"] = counts[rejected];
  r.facts["lenient"] = counts[lenient];
  r.facts["desync"] = counts[desync];
  r.facts["unanswered"] = counts[unanswered];
  r.facts["skipped"] = skipped;
  if (!desynced.empty()) {
    r.result = verdict::fail;
    std::string reason = "desync in: ";
    for (std::size_t i = 0; i < desynced.size(); ++i) {
      if (i) reason.append(", ");
      reason.append(desynced[i]);
    }
    r.reason = reason;
  } else if (skipped == total) {
    r.result = verdict::skip;
    r.reason = r.cases.empty() ? "no cases" : r.cases.front().reason;
  } else {
    r.result = verdict::pass;
    if (counts[lenient])
      r.reason = cat({std::to_string(counts[lenient]), " malformed requests accepted (framed consistently)"});
  }
  return r;
}

}  // namespace closewise::check
