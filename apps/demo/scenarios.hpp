#pragma once
// closewise-demo: nine ways an HTTP exchange ends, run against
// closewise-reqresp started in-process (a fresh server per scenario, with the
// teardown policy the scenario is about) or against --target HOST:PORT.
//
// Each scenario is observed, not assumed: the client's bytes and how its
// reads ended, the server's close report (in-process), and who holds
// TIME_WAIT afterwards, read from the kernel with sock_diag on the
// connection's two ports. The rule the table proves: a RST is safe only after
// the requester has received the whole response and the sender's queue has
// been acknowledged; closing with unread input or unsent output loses data.
//
// How the data-loss scenarios (3 to 6) stay deterministic (docs/design.md,
// 'Beast's teardown and the data-loss case'):
// - their response is larger than the kernel's buffers can hold while the
//   client does not read (twice net.ipv4.tcp_wmem's maximum, plus 2 MiB;
//   `unbufferable_size`), and the client sets SO_RCVBUF to 64 KiB (no receive
//   autotuning): the server's write cannot complete before the client reads
//   on, so the RST of scenario 3 always finds the write in flight;
// - the pipelined bytes are sent after the response head arrived (the server
//   has read the first request) and the client waits until its SIOCOUTQ is 0
//   (the server's kernel acknowledged them): they sit unread in the server's
//   receive queue, since the session is still writing;
// - the client then reads the body up to `reserve` bytes before its end and
//   stops, waits until the server's socket has left ESTABLISHED (sock_diag:
//   the server closed or sent its FIN), and only then reads the rest.
//
// With `tls`, eight scenarios over TLS instead (a throwaway self-signed
// certificate made on first use, closewise-reqresp's session behind
// server_options::tls, the demo's raw OpenSSL client): how the server tells
// a client's FIN without close_notify mid-request (truncated) from a clean
// close_notify, the same RST and lingering-close rules one layer down (the
// pipelined request unread, now a TLS record; the forced RST after the whole
// response), a client that never answers close_notify, and what the
// abortive close leaves the client.
//
// Thread-safety: scenarios run one at a time; each owns its sockets and server.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "closewise/probe.hpp"
#include "closewise/report.hpp"
#include "demo/client.hpp"

namespace closewise::demo {

/// How the demo runs.
struct options {
  /// Run against this server instead of an in-process one ("HOST:PORT",
  /// numeric). Scenarios 4, 6 and 7 need the server's teardown policy and are
  /// skipped; 5 and the server-side TIME_WAIT need a loopback target.
  std::optional<std::string> target;
  /// Path of the large response on --target; "{size}" is replaced by the size.
  std::string target_path = "/bytes/{size}";
  std::uint64_t size = std::uint64_t{4} << 20;  ///< the multi-megabyte response
  /// Bound of every wait (a recv, a TCP state, a close report).
  std::chrono::milliseconds wait_limit{10000};
  /// The TLS scenarios instead of the plain ones (in-process only).
  bool tls = false;
};

/// Who ends up holding TIME_WAIT, as sock_diag lists it.
enum class time_wait_holder : std::uint8_t { none, client, server, both, unknown };
std::string_view to_string(time_wait_holder) noexcept;

/// The kernel's view of one connection (sock_diag): the state of the
/// server's socket and of the client's; nullopt where a side is not listed.
struct pair_view {
  std::optional<tcp_state> server_side;
  std::optional<tcp_state> client_side;
  bool error = false;  ///< sock_diag failed
};
pair_view look(std::uint16_t server_port, std::uint16_t client_port);

/// Waits until the server's socket of this connection left ESTABLISHED: it
/// sent its FIN or is gone (tcp_state::unknown). nullopt at the limit.
std::optional<tcp_state> wait_server_left_established(std::uint16_t server_port, std::uint16_t client_port,
                                                      std::chrono::milliseconds limit);

/// Waits until the peer's kernel acknowledged everything `c` sent (SIOCOUTQ 0).
bool wait_acknowledged(const raw_client& c, std::chrono::milliseconds limit);

/// Who holds TIME_WAIT once a connection settled, in words too.
struct time_wait_view {
  time_wait_holder holder = time_wait_holder::unknown;
  std::string detail;
  bool settled = false;  ///< every socket of the connection in TIME_WAIT or gone
};
/// Once both ends are closed: waits (at most `limit`) until every socket of
/// the connection is in TIME_WAIT or gone, then says whose TIME_WAIT it is.
/// `server_visible`: the server's sockets are in this machine's kernel.
time_wait_view observe_time_wait(std::uint16_t server_port, std::uint16_t client_port, bool server_visible,
                                 std::chrono::milliseconds limit);

/// One scenario's outcome.
struct scenario_result {
  int number = 0;
  std::string title;   ///< what happens
  std::string closer;  ///< who closes and how
  bool skipped = false;
  std::string skip_reason;

  // What was observed.
  std::uint64_t expected_bytes = 0;  ///< response body bytes the server announced (Content-Length)
  std::uint64_t received_bytes = 0;  ///< response body bytes the client received
  int status = 0;                    ///< HTTP status the client read (0: none)
  bool intact = false;               ///< every byte received matched the pattern (or was not checked)
  read_end client_end = read_end::none;
  std::optional<read_end> after_close_notify;  ///< over TLS: how TCP ended after the server's close_notify
  std::string client_saw;                      ///< the client's story in a few words
  std::optional<close_report> server_report;   ///< in-process only (over TLS, with its `tls` facts)
  std::string server_saw;                      ///< close_cause and what the report adds
  time_wait_holder time_wait = time_wait_holder::unknown;
  std::string time_wait_detail;  ///< the TIME_WAIT cell
  bool data_lost = false;        ///< the verdict: data lost (true) or safe

  // What was expected, and whether it held.
  std::string expected;  ///< the expectation in words
  bool matches = false;
  std::string mismatch;  ///< every deviation, "; "-separated

  std::string verdict() const { return skipped ? "skipped" : data_lost ? "data lost" : "safe"; }
};

inline constexpr int scenario_count = 9;
inline constexpr int tls_scenario_count = 8;
/// How many scenarios `opts` runs: scenario_count, or tls_scenario_count with `tls`.
constexpr int scenarios_in(const options& opts) noexcept { return opts.tls ? tls_scenario_count : scenario_count; }
/// The server's linger timeout in the TLS scenario whose client never
/// answers close_notify: the bound the server's close must keep.
inline constexpr std::chrono::milliseconds silent_peer_linger{1000};

/// Runs scenario `n` (1..scenarios_in(opts)).
scenario_result run_scenario(int n, const options& opts);
/// Runs them all, in order.
std::vector<scenario_result> run_all(const options& opts);

/// A byte count for the table: "4 MiB", "1.27 MB", "23 B".
std::string human_bytes(std::uint64_t n);

/// The response size of scenarios 3 to 6: `size`, but at least twice the
/// kernel's largest send buffer plus 2 MiB, so that the server's write cannot
/// complete while the client does not read.
std::uint64_t unbufferable_size(std::uint64_t size);

}  // namespace closewise::demo
