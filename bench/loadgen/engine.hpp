#pragma once
// closewise-bench's load engine: one epoll loop per thread, each driving its
// share of the connections through a fixed cycle, with no allocation and no
// lock on the hot path.
//
// A cycle, by mode:
//   client_fin    connect, request, whole response, close()          (FIN first: the client keeps TIME_WAIT)
//   client_rst    connect, request, whole response, SO_LINGER{1,0} + close()  (RST: nobody keeps TIME_WAIT)
//   server_close  connect, request with "Connection: close", whole response,
//                 the server's FIN, close()                          (the server keeps TIME_WAIT)
//   keepalive     requests one after another on a kept connection; a cycle is one
//                 request, and a connection is replaced after --requests-per-conn
//                 requests or when the server says it closes
//
// With TLS (load_config::tls, tls_engine.cpp) every connection makes a full
// handshake (no session is ever offered for resumption) before its request,
// and the client ends TLS as the mode says:
//   client_fin    close_notify, FIN, then the server's close_notify or FIN (bounded)
//   client_rst    RST, no close_notify
//   server_close  the server's close_notify (or bare FIN), then our FIN alone:
//                 the server closed its socket already, and a close_notify
//                 sent to it now would be answered with a RST that ends the
//                 server's TIME_WAIT, which this mode is there to keep
//   keepalive     requests over one TLS connection, replaced as above with
//                 close_notify, FIN and the server's end
// A TLS cycle ends when its connection's close does; its latency includes
// the handshake and the close.
//
// A response is a success only when its status is 2xx and its whole body
// arrived (Content-Length, chunked or close-delimited). Everything else is
// an error of exactly one class.
//
// Thread-safety: `run_load` is called once at a time; it owns its threads.

#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "closewise/report.hpp"
#include "histogram.hpp"

namespace closewise::bench {

enum class mode : std::uint8_t { client_fin, client_rst, server_close, keepalive };
std::string_view to_string(mode m) noexcept;

/// Why a cycle failed. One class per failure.
enum class error_class : std::uint8_t {
  refused,           ///< ECONNREFUSED on connect
  reset,             ///< ECONNRESET before the response was complete (what had arrived was cut short)
  broken_pipe,       ///< EPIPE writing the request
  timeout,           ///< no completion within --timeout (the connection is then reset)
  truncated,         ///< the server's FIN before the end of the response (shorter than its Content-Length, a
                     ///< chunked body without its last chunk, or no response at all)
  addr_unavailable,  ///< EADDRNOTAVAIL on connect: no ephemeral port free (TIME_WAIT holds them)
  bad_status,        ///< a whole response whose status is not 2xx
  protocol,          ///< bytes that are not a response we can delimit, or bytes after it
  tls_handshake,     ///< --tls: the handshake failed (tls_summary::handshake_failures says how)
  tls,               ///< --tls: a TLS error after the handshake (an alert, a bad record; tls_summary says which)
  other,             ///< any other errno (in the log at debug level)
};
inline constexpr std::size_t error_class_count = 11;
std::string_view to_string(error_class e) noexcept;

/// TLS versions the client offers.
enum class tls_version_choice : std::uint8_t { both, tls12, tls13 };

/// What TLS did in a run, counted like the cycles (inside the window only).
struct tls_summary {
  std::uint64_t handshakes = 0;  ///< completed handshakes
  std::uint64_t resumed = 0;     ///< of which resumed a session: 0 unless something is wrong
  std::uint64_t tls12 = 0;       ///< handshakes that negotiated TLS 1.2
  std::uint64_t tls13 = 0;       ///< ... TLS 1.3
  /// Failed handshakes by closewise::tls_handshake (timeout, alert_received,
  /// wrong_version, plaintext_http, peer_closed, error).
  std::array<std::uint64_t, 8> handshake_failures{};
  std::uint64_t alerts = 0;             ///< after the handshake: a fatal alert from the server
  std::uint64_t ssl_errors = 0;         ///< after the handshake: any other OpenSSL error (bad record, decryption)
  std::uint64_t truncated = 0;          ///< the server's FIN without close_notify before the response was whole
  std::uint64_t peer_close_notify = 0;  ///< the server ended a connection with close_notify
  std::uint64_t peer_fin_no_close_notify = 0;  ///< the server ended one with a bare FIN after a whole response
  std::uint64_t close_notify_sent = 0;         ///< connections we ended with close_notify

  void merge(const tls_summary& o) noexcept {
    handshakes += o.handshakes;
    resumed += o.resumed;
    tls12 += o.tls12;
    tls13 += o.tls13;
    for (std::size_t i = 0; i < handshake_failures.size(); ++i) handshake_failures[i] += o.handshake_failures[i];
    alerts += o.alerts;
    ssl_errors += o.ssl_errors;
    truncated += o.truncated;
    peer_close_notify += o.peer_close_notify;
    peer_fin_no_close_notify += o.peer_fin_no_close_notify;
    close_notify_sent += o.close_notify_sent;
  }
};

/// What a run does.
struct load_config {
  sockaddr_storage target{};
  socklen_t target_len = 0;
  /// Local addresses to connect from, in turn (empty: the kernel's choice).
  /// Each source address has its own ephemeral ports, so N of them lift the
  /// client-side TIME_WAIT cap of client-fin (~14k usable ports per
  /// destination, each reusable 1 s after its TIME_WAIT began) N-fold.
  std::vector<sockaddr_storage> sources;
  mode run_mode = mode::client_fin;
  std::string request;  ///< the request bytes, sent whole on each cycle
  unsigned threads = 1;
  unsigned connections = 1;                                    ///< in total; spread over the threads
  std::uint64_t requests_per_conn = 0;                         ///< keepalive: requests per connection (0: unlimited)
  std::chrono::nanoseconds timeout = std::chrono::seconds(5);  ///< per cycle (keepalive: per request)
  std::chrono::nanoseconds warmup = std::chrono::seconds(1);
  std::chrono::nanoseconds duration = std::chrono::seconds(5);  ///< used when count == 0
  std::uint64_t count = 0;                                      ///< > 0: stop after this many measured cycles instead
  std::chrono::nanoseconds grace = std::chrono::seconds(1);     ///< cycles in flight at the end may finish this long
  bool tls = false;                                             ///< HTTPS: see the top of this file
  tls_version_choice tls_versions = tls_version_choice::both;
  std::string tls_server_name = "localhost";  ///< SNI (empty: none); the certificate is not verified
};

/// What a run measured. Only cycles that ended inside the measured window count.
struct load_result {
  histogram latency;            ///< whole cycle (keepalive: one request), nanoseconds
  std::uint64_t completed = 0;  ///< successful cycles
  std::array<std::uint64_t, error_class_count> errors{};
  std::uint64_t connections_opened = 0;  ///< connect() calls that succeeded or were in progress
  std::uint64_t bytes_in = 0;
  /// server_close / keepalive: the server ended the connection with a RST
  /// instead of a FIN after a whole response (a success, noted).
  std::uint64_t server_reset_after_response = 0;
  std::uint64_t aborted_at_end = 0;  ///< cycles still in flight after the grace period (reset, not counted)
  double window_s = 0;               ///< length of the measured window
  tls_summary tls;                   ///< --tls only
  std::uint64_t errors_total() const noexcept {
    std::uint64_t n = 0;
    for (auto e : errors) n += e;
    return n;
  }
};

/// Progress, once a second: seconds since the start, the phase ("warm-up",
/// "measuring", "ending"), successes and errors so far in the window.
using progress_fn =
    std::function<void(double elapsed_s, std::string_view phase, std::uint64_t completed, std::uint64_t errors)>;

/// Runs the load and returns the counts. Throws std::system_error when a
/// thread cannot set up (epoll_create).
load_result run_load(const load_config& cfg, const progress_fn& progress);

/// The TLS engine (tls_engine.cpp), which run_load calls when cfg.tls: one
/// Asio io_context per thread, closewise::basic_tls_stream as the client.
load_result run_tls_load(const load_config& cfg, const progress_fn& progress);

}  // namespace closewise::bench
