#pragma once
// An incremental HTTP/1.1 response parser: just enough to know where a
// response ends and whether it arrived whole.
//
// It reads the status line, Content-Length, Transfer-Encoding: chunked and
// Connection, and then counts body bytes without keeping them. A response
// is complete only when its whole body arrived: Content-Length bytes, the
// last chunk, or (no length at all) the peer's FIN. A FIN or a reset before
// that is a truncated response, never a success.
//
// Bytes are only copied while a header spans several reads (rare: headers
// are small), so the common case parses the read buffer in place.
//
// Thread-safety: one parser per connection, used from one thread.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace closewise::bench {

class response_parser {
 public:
  enum class status : std::uint8_t {
    need_more,  ///< feed more bytes
    complete,   ///< a whole response arrived; `consumed` stops at its end
    error,      ///< not an HTTP/1.x response we can delimit (see `error_text`)
  };
  struct result {
    status st = status::need_more;
    std::size_t consumed = 0;
  };

  /// Largest header block accepted (status line and fields).
  static constexpr std::size_t max_header_bytes = 64 * 1024;

  /// Feeds bytes. Stops after a complete response: the caller decides what
  /// the bytes after it mean (a pipelined response, or a protocol error).
  result feed(const char* data, std::size_t size);
  /// The peer's FIN arrived. Completes a close-delimited body; anything else
  /// still expected makes the response truncated (returns need_more then:
  /// check `truncated()`), and no byte at all is not a response either.
  status on_eof();

  /// Ready for the next response on the same connection.
  void reset() noexcept;

  /// Some byte of this response arrived.
  bool started() const noexcept { return started_; }
  bool header_done() const noexcept { return phase_ > phase::header; }
  /// The response ended early (FIN before its end).
  bool truncated() const noexcept { return truncated_; }
  int status_code() const noexcept { return status_code_; }
  /// The server keeps the connection open after this response.
  bool keep_alive() const noexcept { return keep_alive_; }
  /// Body bytes seen (after de-chunking).
  std::uint64_t body_bytes() const noexcept { return body_seen_; }
  /// Content-Length, or -1 when the response had none.
  std::int64_t content_length() const noexcept { return content_length_; }
  const char* error_text() const noexcept { return error_; }

 private:
  enum class phase : std::uint8_t {
    header,
    body_length,
    body_until_eof,
    chunk_size,
    chunk_data,
    chunk_crlf,
    trailer,
    done
  };

  result fail(const char* why, std::size_t consumed) {
    error_ = why;
    phase_ = phase::done;
    return {status::error, consumed};
  }
  // Parses a complete header block (status line to the empty line, inclusive).
  bool parse_header(std::string_view block);
  // Consumes body bytes from [p, end); returns the bytes used and sets `done`.
  std::size_t feed_body(const char* p, const char* end, bool& done, bool& bad);

  phase phase_ = phase::header;
  bool started_ = false;
  bool truncated_ = false;
  bool keep_alive_ = true;
  int status_code_ = 0;
  std::int64_t content_length_ = -1;
  std::uint64_t remaining_ = 0;  // body_length / chunk_data: bytes left
  std::uint64_t body_seen_ = 0;
  std::string header_;  // only while a header (or a chunk-size / trailer line) spans reads
  const char* error_ = nullptr;
};

}  // namespace closewise::bench
