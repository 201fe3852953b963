#pragma once
// A small HTTP/1.1 server for closewise-check's tests, with one knob per
// teardown bug, so that each check can be shown to fail against the bug it
// is about. Without knobs it does what a correct server does: reads a
// request's head (byte by byte, so pipelined bytes stay in the kernel),
// answers GET /bytes/N with the closewise-reqresp pattern and anything else
// with a short 200, refuses oversized heads (431), bodies (413) and bad
// request lines (400), keeps connections alive with idle, read and write
// timeouts, and closes gracefully: shutdown(SHUT_WR), drain until the
// client's FIN (bounded), close.
//
// Thread-per-connection, blocking sockets, loopback port 0. The destructor
// shuts every connection down and joins every thread.
//
// Thread-safety: construct and destroy on one thread; the server runs on its own.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace closewise::test {

/// The bugs, one knob each.
struct broken_knobs {
  /// After a Connection: close response (or an error), a plain close() at
  /// once: pipelined bytes still unread turn it into a RST.
  bool close_with_unread_input = false;
  /// The client's FIN right behind its request is taken for the end: the
  /// server closes without answering.
  bool half_close_is_end = false;
  /// Every error response is followed by an abortive close (SO_LINGER {1,0}).
  bool rst_after_error = false;
  /// No idle, read, header or write timeout at all.
  bool no_timeouts = false;
  /// The idle timeout closes with RST (SO_LINGER {1,0}) instead of FIN.
  bool idle_close_by_rst = false;
  /// A client's FIN before any request is ignored: the socket stays open
  /// (CLOSE_WAIT) until the server stops.
  bool leak_on_eof = false;
  /// Bytes already behind a Connection: close request make the server
  /// answer 400 instead of the request (Node's http module does this).
  bool refuse_pipelined_after_close = false;
  /// A client's RST mid-response stalls the whole server for `stall`.
  bool stall_after_reset = false;
  std::chrono::milliseconds stall{3000};
  /// The idle, read and write timeouts (the header must be whole within twice this).
  std::chrono::milliseconds timeout{1000};
};

class broken_server {
 public:
  /// Listens on 127.0.0.1:0 and starts accepting. Throws std::system_error.
  explicit broken_server(broken_knobs knobs);
  ~broken_server();
  broken_server(const broken_server&) = delete;
  broken_server& operator=(const broken_server&) = delete;

  /// "127.0.0.1:PORT".
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  void accept_loop();
  void serve(int fd);
  bool wait_stall();

  broken_knobs knobs_;
  int listener_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<std::int64_t> stalled_until_ms_{0};  // steady_clock, milliseconds since its epoch
  std::mutex mutex_;
  std::set<int> open_;  // connection descriptors, shut down by the destructor
  std::vector<std::thread> threads_;
  std::thread acceptor_;
};

}  // namespace closewise::test
