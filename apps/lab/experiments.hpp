#pragma once
// closewise-lab: the eight kernel experiments of docs/design.md ('Kernel
// experiments'), reproduced.
//
// Rows 1-2 use raw syscalls (socketpair, pipe). Rows 3-8 are about TCP and run
// through the library: "we" are a closewise::basic_stream<tcp::socket> driven
// on an io_context, the misbehaving peer is a raw blocking socket. Everything
// runs on loopback port 0; every wait is a bounded poll for a condition, never
// a sleep that hopes the kernel got there.
//
// The app and the tests call the very same functions, so the table the app
// prints is what the tests assert. A row never throws: a setup failure (no
// IPv6, no sockets) becomes a row that does not match, with the reason.
//
// Thread-safety: each experiment owns its sockets and io_context; experiments
// may run concurrently with each other (they share nothing but the kernel).
// Row 2 changes the process's SIGPIPE disposition for the duration of one
// write (restored afterwards).

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace closewise::lab {

/// How the experiments run.
struct options {
  bool ipv6 = false;  ///< ::1 instead of 127.0.0.1
  /// Bound of every wait for a condition (a completion, a TCP state, SIOCINQ);
  /// conditions are polled every millisecond.
  std::chrono::milliseconds wait_limit{2000};
  /// Row 7: the size of the response the server writes before it closes.
  std::size_t response_bytes = std::size_t{4} << 20;
};

/// Which end of the connection saw something.
enum class party : std::uint8_t {
  ours,  ///< the closewise stream (or our raw end in rows 1, 2 and 8b)
  peer,  ///< the raw peer socket
};
std::string_view to_string(party) noexcept;

/// One thing one side saw: an event, an errno name ("EPIPE"), a byte count,
/// a TCP state ("CLOSE_WAIT", or "gone" when the kernel lists no socket).
struct observation {
  party by = party::ours;
  std::string key;    ///< stable identifier, unique within a row (tests and JSON use it)
  std::string label;  ///< short human text for the table
  std::string value;  ///< what was seen
};

/// One experiment's outcome.
struct row {
  int number = 0;
  std::string name;
  std::string done;                   ///< what the experiment did
  std::vector<observation> observed;  ///< events, errno names, byte counts, close reports
  std::vector<observation> states;    ///< TCP states (closewise::probe / sock_diag)
  std::string expected;               ///< the row of docs/design.md, 'Kernel experiments'
  bool matches = false;
  std::string mismatch;  ///< every deviation from `expected`, "; "-separated (empty when it matches)

  /// The value recorded under `key` (observed, then states); nullptr if none.
  const observation* find(std::string_view key) const noexcept;
  /// The value under `key`, or "" when nothing was recorded under it.
  std::string value(std::string_view key) const;
  /// The value under `key` read as a byte count; nullopt if absent or not a number.
  std::optional<std::uint64_t> count(std::string_view key) const noexcept;
};

/// Number of experiments (rows 1..row_count).
inline constexpr int row_count = 8;

/// 1: socketpair, reader end closed, send.
row socketpair_closed_reader(const options& opts);
/// 2: pipe, reader end closed, write with SIGPIPE ignored.
row pipe_closed_reader(const options& opts);
/// 3: the peer close()s; we send twice through the stream.
row peer_close_then_send_twice(const options& opts);
/// 4: the peer shutdown(SHUT_WR)s; we read to EOF, then send.
row peer_shutdown_then_read_and_send(const options& opts);
/// 5: we shut our write side (async_shutdown_write), then send.
row our_shutdown_then_send(const options& opts);
/// 6: the peer closes abortively (SO_LINGER {1,0}).
row peer_abortive_close(const options& opts);
/// 7: the server closes with unread request bytes while a large response is queued.
row close_with_unread_input(const options& opts);
/// 8: the peer resets after we received, but did not read, its data.
row reset_after_unread_data(const options& opts);

/// Runs experiment `number` (1..row_count); an unknown number yields a
/// non-matching row saying so.
row run_one(int number, const options& opts);
/// Runs every experiment in order.
std::vector<row> run_all(const options& opts);

/// "EPIPE" for EPIPE, "errno 1234" for what glibc cannot name.
std::string errno_name(int error);

}  // namespace closewise::lab
