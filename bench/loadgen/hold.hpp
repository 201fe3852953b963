#pragma once
// closewise-bench's memory modes: open N connections and keep them, either
// idle (nothing sent) or with half a request sent (the request line and a
// header field, no empty line), and read the server's resident set size
// (/proc/PID/status VmRSS) before and after. The difference over N is what
// one such connection costs the server in user space plus the kernel's
// accounting of its pages (socket buffers are not in RSS).
//
// "After" is read once the server accepted every connection (its listener's
// accept queue is empty, asked through sock_diag) and its RSS stopped moving.
//
// With TLS (hold_config::tls) a connection is held once its handshake is
// complete (a full one: no session offered), and then sends nothing more
// (idle) or half a request as TLS application data (half-request); the
// warm-up exchanges are made over TLS too. The connections are reset at the
// end, without close_notify.
//
// Thread-safety: single-threaded; call from one thread.

#include <sys/socket.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "engine.hpp"

namespace closewise::bench {

struct hold_config {
  sockaddr_storage target{};
  socklen_t target_len = 0;
  std::uint16_t port = 0;
  bool half_request = false;
  std::string full_request;     ///< for the warm-up exchanges
  std::string partial_request;  ///< what a half-request connection sends
  unsigned connections = 1000;
  std::chrono::milliseconds hold{0};  ///< keep the connections this long after measuring
  int server_pid = 0;                 ///< 0: no RSS reading
  unsigned warmup_requests = 200;     ///< whole exchanges before "before", so that lazily built server state exists
  std::chrono::milliseconds settle_max{5000};
  std::chrono::milliseconds connect_timeout{5000};  ///< TLS: connect and handshake together
  bool tls = false;
  tls_version_choice tls_versions = tls_version_choice::both;
  std::string tls_server_name = "localhost";  ///< SNI (empty: none)
};

struct hold_result {
  unsigned opened = 0;  ///< connections established (and, half-request: the partial request written)
  unsigned failed = 0;  ///< connects that failed or timed out
  unsigned warmup_failed = 0;
  long rss_before_kib = -1;  ///< -1: not read
  long rss_after_kib = -1;
  double kib_per_connection = 0;
  std::size_t server_established = 0;  ///< the server side's ESTABLISHED sockets on the port (sock_diag)
  std::size_t accept_queue_left = 0;   ///< connections the server had not accepted when "after" was read
  unsigned closed_by_server = 0;       ///< connections that saw a FIN, RST or bytes from the server while held
  double open_s = 0;                   ///< seconds to open them all
  unsigned tls12 = 0;                  ///< TLS: held connections that negotiated TLS 1.2
  unsigned tls13 = 0;                  ///< ... TLS 1.3
  unsigned handshake_failed = 0;       ///< TLS: of `failed`, the handshakes that failed or timed out
};

/// Called while opening and holding: a line of progress.
using hold_progress_fn = std::function<void(const std::string& line)>;

/// Opens, measures, holds, and closes (RST: no TIME_WAIT left behind).
hold_result run_hold(const hold_config& cfg, const hold_progress_fn& progress);

/// VmRSS of `pid` in KiB, or -1.
long read_rss_kib(int pid);

/// Connections waiting in the accept queue of the listener on `port`
/// (family of `family`), or -1 when no such listener is visible.
long accept_queue_length(std::uint16_t port, int family);

}  // namespace closewise::bench
