#pragma once
// What the checks share inside closewise-check (not part of check.hpp): one
// client connection, plain or TLS, over the demo's raw socket; the requests
// the checks send; the row helpers; and the checks themselves.
//
// Thread-safety: as check.hpp; a connection belongs to one thread.

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "check/check.hpp"
#include "demo/client.hpp"

namespace closewise::check {

/// One connection to the target: TCP, and TLS over it with `options::tls`.
struct connection {
  demo::raw_client raw;
  std::unique_ptr<demo::tls_client> tls;
  std::uint16_t port = 0;  ///< the client's port

  /// Connects (and handshakes with options::tls) within opts.wait_limit;
  /// `rcvbuf` > 0 fixes SO_RCVBUF. nullopt with `error` set on failure.
  static std::optional<connection> open(const options& opts, int rcvbuf, std::string& error);
  /// Sends (through TLS when it speaks it); 0 or errno.
  int send(std::string_view bytes, std::chrono::milliseconds limit);
  /// Reads a response (see demo::read_response). With `head`, the raw head
  /// bytes are kept there too.
  void read(demo::response_read& r, std::uint64_t body_goal, std::chrono::milliseconds limit,
            std::string* head = nullptr);
  /// One read: bytes, or how the stream ended.
  demo::read_step read_some(char* data, std::size_t n, std::chrono::milliseconds limit);
};

/// The client's receive buffer when it must not swallow a large response.
inline constexpr int small_rcvbuf = 64 * 1024;

/// `opts.large_path` with "{size}" replaced by `size`.
std::string large_path(const options& opts, std::uint64_t size);
/// "GET PATH HTTP/1.1" with Host (and Connection: close with `close`).
std::string get_request(const options& opts, const std::string& path, bool close);
/// The server's port in opts.target.
std::uint16_t target_port(const options& opts);

/// Milliseconds since `start`.
std::int64_t ms_since(std::chrono::steady_clock::time_point start);
/// How a stream ended, for the facts: "eof", "reset", "timeout", ...
std::string end_fact(demo::read_end e);
/// The stream ended cleanly: EOF (over TLS: close_notify, then no RST).
bool clean_end(const demo::response_read& r);
/// "4 MiB of 4 MiB, then EOF": what a read of a response saw.
std::string describe(const demo::response_read& r);
/// The reason a large response cannot be used (not 200 or too small), or empty.
std::string large_unusable(const options& opts, const demo::response_read& r);
/// The row's facts of a response read: status, bytes, end.
void add_read_facts(row& out, const demo::response_read& r, std::string_view prefix = "");

/// A row before its check runs: name, title, what a correct server does.
row titled(std::string_view name, std::string title, std::string expected);
/// A fresh connection (see connection::open) that sent `request`; nullopt
/// with `out` failed when either step fails.
std::optional<connection> open_with_request(row& out, const options& opts, int rcvbuf, std::string_view request);

/// Fills the verdict: pass, fail (with reason) or skip (with reason).
row& pass(row& r, std::string note = {});
row& fail(row& r, std::string reason);
row& skip(row& r, std::string reason);

// The checks (check.hpp's all_checks lists them in order).
row check_pipelined_close(const options& opts);
row check_late_pipelined(const options& opts);
row check_half_close(const options& opts);
row check_error_readable(const options& opts);
row check_slow_reader(const options& opts);
row check_idle_keepalive(const options& opts);
row check_client_rst(const options& opts);
row check_slowloris(const options& opts);
row check_time_wait(const options& opts);
row check_close_wait(const options& opts);
row check_tls_close_notify(const options& opts);
row check_tls_truncation(const options& opts);
row check_tls_plain_to_tls(const options& opts);

}  // namespace closewise::check
