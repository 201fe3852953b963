#pragma once
// closewise-reqresp's HTTP/1.1 session over closewise::basic_stream, and a
// server that runs it on its own threads (what closewise-demo and the tests
// start in-process).
//
// One session per connection: keep-alive and pipelining (requests already in
// the connection's buffer are answered in order before anything else is
// read), a request parser per request with the header and body limits, a
// whole-request deadline that a trickle of bytes does not move, and answers
// for what is refused (400, 408, 413, 414, 417, 431, 501), each followed by a
// graceful close so the client reads the status instead of a RST. A refused
// request never reaches a route and nothing pipelined after it is executed.
//
// How a connection ends: when the client asked for it (Connection: close),
// when it went away, or when the server drains, the session returns and the
// server closes the connection with its policy (--teardown). Refusals always
// close gracefully: fin_close or abortive there would turn the unread rest of
// the refused request into a RST that destroys the answer (docs/design.md,
// 'Kernel experiments', row 7).
//
// Thread-safety: a session runs on its connection's thread. `http_service` is
// shared by every session of a server: options are immutable, counters atomic.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "closewise/server.hpp"
#include "closewise/stats.hpp"

namespace closewise::reqresp {

/// Limits of the HTTP layer.
struct http_options {
  std::size_t max_header_bytes = 8 * 1024;     ///< request line + fields; over it: 431 (414 / 501 for the request line)
  std::uint64_t max_body_bytes = 1024 * 1024;  ///< request body; over it: 413
  std::uint64_t max_response_bytes = 1ull << 30;  ///< cap of GET /bytes/N (--max-bytes)
  /// From the first byte of a request to its last: over it, 408. Not moved by
  /// bytes arriving (a slow sender cannot keep a request alive). 0: none.
  std::chrono::milliseconds request_timeout{10000};
};

/// What sessions did, for tests and the demo. Relaxed atomics.
struct http_counters {
  std::atomic<std::uint64_t> requests{0};   ///< requests parsed completely and accepted by the rules
  std::atomic<std::uint64_t> routed{0};     ///< requests a route handler ran for
  std::atomic<std::uint64_t> refused{0};    ///< requests answered with an error status before any route
  std::atomic<std::uint64_t> timeouts{0};   ///< requests answered with 408
  std::atomic<std::uint64_t> responses{0};  ///< responses written completely
};

/// State shared by every session of one server.
class http_service {
 public:
  explicit http_service(http_options o) : opts_(std::move(o)) {}
  const http_options& options() const noexcept { return opts_; }
  http_counters& counters() noexcept { return counters_; }
  /// Where /stats and /metrics read from. Set before the server starts.
  void set_stats(const server_stats* s) noexcept { stats_ = s; }
  const server_stats* stats() const noexcept { return stats_; }

 private:
  http_options opts_;
  http_counters counters_;
  const server_stats* stats_ = nullptr;
};

/// The session: serves requests on `c` until the client closes, asks to
/// close, a request is refused, or the server drains. Returns; the server
/// then closes the connection with `c.policy()`.
asio::awaitable<void> http_session(connection c, std::shared_ptr<http_service> svc);

/// True once `waiting` holds a whole request header (the empty line that ends it).
bool header_complete(std::string_view waiting) noexcept;

/// Sets what the session expects of the server: sessions start only once a
/// request header is complete (start_on_input, input_ready), so connections
/// that sent nothing or half a header cost a parked socket, and their
/// request deadline counts from their first byte all the same. Without a
/// request timeout the first byte starts the session (nothing would bound
/// the wait for the rest of the header but the idle timeout).
void configure_server(server_options& so, const http_options& ho);

/// The session handler for closewise::server.
session_handler make_session_handler(std::shared_ptr<http_service> svc);

/// A closewise::server with the HTTP session, listening (loopback port 0 by
/// default) and running on its own thread from construction to destruction.
/// Close reports are kept per client port, so a caller that knows its own
/// port can wait for the server's side of the story.
///
/// Thread-safety: every member may be called from any thread.
class http_server {
 public:
  /// Starts listening and running. Throws std::system_error on setup errors.
  http_server(server_options so, http_options ho);
  ~http_server();
  http_server(const http_server&) = delete;
  http_server& operator=(const http_server&) = delete;

  std::uint16_t port() const noexcept { return port_; }
  /// "127.0.0.1:PORT".
  const std::string& endpoint() const noexcept { return endpoint_; }
  server& get() noexcept { return *srv_; }
  http_service& service() noexcept { return *svc_; }

  /// Takes the server's close report of the connection whose client port is
  /// `peer_port`, waiting up to `limit` for it. Each report is taken once (a
  /// port reused later finds only its own connection's report).
  std::optional<close_report> take_report(std::uint16_t peer_port, std::chrono::milliseconds limit);
  /// Every close report so far.
  std::vector<close_report> reports();
  /// Starts a drain (what SIGTERM does).
  void drain() { srv_->drain(); }
  /// True once `run` returned (after a drain), waiting up to `limit`.
  bool wait_stopped(std::chrono::milliseconds limit);

 private:
  std::shared_ptr<http_service> svc_;
  std::unique_ptr<server> srv_;
  std::uint16_t port_ = 0;
  std::string endpoint_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::multimap<std::uint16_t, close_report> by_port_;
  std::vector<close_report> all_;
  std::future<void> stopped_;
  std::thread thread_;
};

/// The client port of a connection's peer string ("127.0.0.1:PORT", "[::1]:PORT"); 0 if none.
std::uint16_t peer_port(const std::string& peer) noexcept;

}  // namespace closewise::reqresp
