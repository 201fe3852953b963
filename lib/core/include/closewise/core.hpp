#pragma once
// The sans-I/O half of closewise: the per-connection half-close state machine.
//
// Nothing here performs I/O or includes Asio. The machine is fed events (what
// the socket reported, what the application asked for) and answers with the
// actions the I/O layer must perform, in order. It is pure and deterministic:
// the same event sequence always yields the same states and actions, which is
// what lets it be tested exhaustively and fuzzed.
//
// Thread-safety: none. One machine belongs to one connection, which lives on
// one executor.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "closewise/core_export.hpp"

namespace closewise {

/// What we know about the bytes coming towards us.
enum class read_state : std::uint8_t {
  open,      ///< the peer may still send
  peer_fin,  ///< the peer's FIN was read (after every byte before it)
  reset,     ///< the peer reset the connection (ECONNRESET); a later 0-byte read is not a FIN
  shut,      ///< we stopped reading (our side closed the descriptor)
};

/// What we know about the bytes going out.
enum class write_state : std::uint8_t {
  open,        ///< we may write
  flushing,    ///< a FIN was requested; writes in flight still go out first
  fin_sent,    ///< our FIN is on its way; further writes fail with EPIPE
  broken,      ///< a write failed: EPIPE or ECONNRESET
  reset_sent,  ///< we sent a RST (SO_LINGER {1,0} + close)
};

/// The connection as a whole, derived from the two halves and the teardown.
enum class phase : std::uint8_t {
  established,         ///< both directions open
  remote_half_closed,  ///< peer FIN seen, we may still write (TCP CLOSE_WAIT)
  local_half_closed,   ///< our FIN sent, the peer may still write (FIN_WAIT)
  lingering,           ///< graceful close: discarding input until the peer's FIN (our FIN sent, or due after the flush)
  closed,              ///< the descriptor is closed (or both FINs crossed) without a reset
  reset,               ///< a RST ended it, sent or received
};

/// How the application wants a connection to end.
enum class close_policy : std::uint8_t {
  graceful,     ///< flush, FIN, read and discard until the peer's FIN or a limit, then close; RST if a limit fires
  fin_close,    ///< flush, FIN, close at once (the kernel sends RST if unread input remains)
  abortive,     ///< SO_LINGER {1,0} + close: RST, no TIME_WAIT, unsent bytes are lost
  rst_if_safe,  ///< RST only when nothing can be lost; otherwise graceful
};

/// Why a connection ended.
enum class close_cause : std::uint8_t {
  none,                     ///< not ended yet
  peer_fin_then_ours,       ///< the peer sent the first FIN, we answered with ours (the peer keeps TIME_WAIT)
  ours_then_peer_fin,       ///< we sent the first FIN, the peer answered (we keep TIME_WAIT)
  local_fin_close,          ///< we sent FIN and closed without waiting for the peer's FIN
  peer_reset_idle,          ///< RST from the peer with no exchange in flight
  peer_reset_mid_exchange,  ///< RST from the peer while input was unanswered or output in flight
  local_abort,              ///< our abortive close (RST)
  safe_reset,               ///< rst_if_safe proved nothing could be lost and sent RST
  linger_timeout,           ///< graceful drain hit its time limit; we sent RST
  linger_limit,             ///< graceful drain hit its discard-byte budget; we sent RST
  broken_pipe,              ///< we wrote after the peer was gone (EPIPE)
  local_error,              ///< an error on our side (timeout, descriptor error, destructor close)
  server_drain,             ///< the server closed it while shutting down
};

/// Which side did something first.
enum class side : std::uint8_t { none, local, peer };

/// The I/O outcomes the machine distinguishes. The I/O layer maps its error
/// codes onto these (see `closewise::to_io_error` in stream.hpp).
enum class io_error : std::uint8_t {
  none,
  eof,          ///< orderly end of the byte stream: the peer's FIN
  reset,        ///< ECONNRESET
  broken_pipe,  ///< EPIPE
  aborted,      ///< the operation was cancelled locally (not a connection event)
  timed_out,    ///< ETIMEDOUT (keepalive, TCP_USER_TIMEOUT)
  other,        ///< anything else
};

/// Why rst_if_safe did not reset (and fell back to graceful).
enum class reset_refusal : std::uint8_t {
  none,
  exchange_incomplete,  ///< the application did not mark the exchange complete
  writes_pending,       ///< a write was still in flight in user space
  unacked_output,       ///< SIOCOUTQ > 0: the peer has not acknowledged all our bytes
  unread_input,         ///< SIOCINQ > 0 or unread input: a RST would discard the peer's bytes
};

/// How a graceful drain ended.
enum class drain_end : std::uint8_t {
  none,        ///< there was no drain
  peer_fin,    ///< the peer's FIN arrived
  timeout,     ///< the linger time ran out
  byte_limit,  ///< the discard budget ran out
  error,       ///< an error ended it: a read or write error (e.g. a reset) or a local error
  aborted,     ///< an abortive close overrode it
};

/// Names of every enumerator, as used in reports, logs and JSON (snake_case).
CLOSEWISE_CORE_API std::string_view to_string(read_state) noexcept;
CLOSEWISE_CORE_API std::string_view to_string(write_state) noexcept;
CLOSEWISE_CORE_API std::string_view to_string(phase) noexcept;
CLOSEWISE_CORE_API std::string_view to_string(close_policy) noexcept;
CLOSEWISE_CORE_API std::string_view to_string(close_cause) noexcept;
CLOSEWISE_CORE_API std::string_view to_string(side) noexcept;
CLOSEWISE_CORE_API std::string_view to_string(io_error) noexcept;
CLOSEWISE_CORE_API std::string_view to_string(reset_refusal) noexcept;
CLOSEWISE_CORE_API std::string_view to_string(drain_end) noexcept;

/// Parses "graceful", "fin_close", "abortive", "rst_if_safe"; false on anything else.
CLOSEWISE_CORE_API bool parse(std::string_view text, close_policy& out) noexcept;

/// Actions the I/O layer performs, in the order listed here.
enum class action : std::uint8_t {
  notify_peer_fin = 1u << 0,  ///< tell the application the peer half-closed (once per connection)
  send_fin = 1u << 1,         ///< shutdown(SHUT_WR); never before queued writes completed, never twice
  start_drain = 1u << 2,      ///< start reading and discarding input, arm the linger timer
  send_rst = 1u << 3,         ///< SO_LINGER {1,0} then close: the peer gets RST, unsent bytes are lost
  close = 1u << 4,            ///< close the descriptor (plain close; after send_rst it is implied)
  finished = 1u << 5,         ///< the connection is over: emit the close report (exactly once)
};

/// A set of flags of the enum `E`, each enumerator a distinct bit: the one
/// style of bit flags in closewise's public API (`actions`, `probe_fields`).
template <class E>
class flag_set {
 public:
  using bits_type = std::underlying_type_t<E>;
  constexpr flag_set() noexcept = default;
  constexpr flag_set(E e) noexcept : bits_(static_cast<bits_type>(e)) {}  // NOLINT: implicit by design
  constexpr bool has(E e) const noexcept { return (bits_ & static_cast<bits_type>(e)) != 0; }
  constexpr bool empty() const noexcept { return bits_ == 0; }
  constexpr flag_set& operator|=(flag_set o) noexcept {
    bits_ |= o.bits_;
    return *this;
  }
  friend constexpr flag_set operator|(flag_set a, flag_set b) noexcept { return a |= b; }
  friend constexpr bool operator==(flag_set, flag_set) noexcept = default;
  constexpr bits_type bits() const noexcept { return bits_; }

 private:
  bits_type bits_ = 0;
};

/// A set of `action`s.
using actions = flag_set<action>;
constexpr actions operator|(action a, action b) noexcept { return actions{a} | actions{b}; }
CLOSEWISE_CORE_API std::string to_string(actions);

/// What the kernel says about a socket at one moment (see probe.hpp), as far
/// as the machine needs it to decide rst_if_safe.
struct queue_probe {
  bool valid = false;         ///< false when the probe could not be taken
  std::uint64_t unread = 0;   ///< SIOCINQ: bytes received but not read by us
  std::uint64_t unacked = 0;  ///< SIOCOUTQ: bytes written but not yet acknowledged by the peer
};

/// Limits on a graceful drain.
struct drain_limits {
  std::uint64_t max_discard_bytes = 64u * 1024 * 1024;  ///< past this, RST (cause linger_limit)
};

/// One input to the machine.
struct event {
  enum class kind : std::uint8_t {
    bytes_read,         ///< `bytes` arrived and were read
    eof,                ///< a read returned 0 / asio::error::eof
    read_error,         ///< a read failed with `error`
    write_started,      ///< a write of `bytes` was handed to the kernel
    write_done,         ///< a write completed having sent `bytes`
    write_error,        ///< a write failed with `error`
    shutdown_write,     ///< the application asked for our FIN (after queued writes)
    close,              ///< the application asked to end the connection with `policy`
    linger_timeout,     ///< the graceful drain's timer fired
    exchange_complete,  ///< the application says the requester has everything it asked for
    local_error,        ///< an error on our side ends the connection (e.g. a timeout)
    exchange_open,      ///< the application says an exchange is in progress though no input is unanswered
    server_drain,       ///< a server's drain ends this connection: an orderly end is reported as server_drain
  };
  kind what{};
  std::uint64_t bytes = 0;
  io_error error = io_error::none;
  close_policy policy = close_policy::graceful;
  queue_probe probe{};    ///< with close(rst_if_safe): the kernel's queues at the moment of the decision
  drain_limits limits{};  ///< with close(graceful or fallback)
  close_cause cause = close_cause::local_error;  ///< with local_error: the cause to report

  static event read(std::uint64_t n) noexcept { return {kind::bytes_read, n}; }
  static event read_eof() noexcept { return {kind::eof}; }
  static event read_failed(io_error e) noexcept { return {kind::read_error, 0, e}; }
  static event write_start(std::uint64_t n) noexcept { return {kind::write_started, n}; }
  static event wrote(std::uint64_t n) noexcept { return {kind::write_done, n}; }
  static event write_failed(io_error e) noexcept { return {kind::write_error, 0, e}; }
  static event shutdown() noexcept { return {kind::shutdown_write}; }
  static event close_with(close_policy p, queue_probe q = {}, drain_limits l = {}) noexcept {
    event e{kind::close};
    e.policy = p;
    e.probe = q;
    e.limits = l;
    return e;
  }
  static event timer_fired() noexcept { return {kind::linger_timeout}; }
  static event complete() noexcept { return {kind::exchange_complete}; }
  static event open_exchange() noexcept { return {kind::exchange_open}; }
  static event drain() noexcept { return {kind::server_drain}; }
  static event failed_locally(close_cause c = close_cause::local_error) noexcept {
    event e{kind::local_error};
    e.cause = c;
    return e;
  }
};
CLOSEWISE_CORE_API std::string_view to_string(event::kind) noexcept;

/// The machine's answer to one event.
struct step {
  bool accepted = true;       ///< false: the event is illegal in this state; nothing changed
  std::string_view reason{};  ///< why it was rejected (static text)
  actions todo{};             ///< what the I/O layer must do, in `action` order
};

/// The half-close state machine of one connection.
///
/// Rules it enforces (each one a unit-tested invariant):
/// - after `finished`, every event is rejected and no action is ever returned;
/// - `send_fin` is returned at most once, and only when no write is in flight;
/// - `send_rst` is never returned once the connection finished;
/// - `notify_peer_fin` is returned at most once, and never after a reset;
/// - bytes delivered + bytes discarded == bytes received.
class CLOSEWISE_CORE_API connection_state {
 public:
  /// Feeds one event; returns what to do. Illegal events are rejected with a
  /// reason and leave the state untouched.
  step on(const event& e) noexcept;

  /// The read side: open, peer_fin, reset or shut.
  read_state read() const noexcept { return read_; }
  /// The write side: open, flushing, fin_sent, broken or reset_sent.
  write_state write() const noexcept { return write_; }
  /// The phase derived from both sides and the teardown in progress.
  phase current_phase() const noexcept;

  /// A close was requested (the teardown is in progress or done).
  bool closing() const noexcept { return closing_; }
  /// The connection is over; the report is final.
  bool finished() const noexcept { return finished_; }
  /// Graceful drain in progress: reads are discarded, not delivered.
  bool draining() const noexcept { return draining_; }
  /// The policy of the requested close (meaningful when closing()).
  close_policy policy() const noexcept { return policy_; }

  /// Byte accounting: received == delivered (to the application) + discarded (while draining).
  std::uint64_t bytes_received() const noexcept { return delivered_ + discarded_; }
  std::uint64_t bytes_delivered() const noexcept { return delivered_; }
  std::uint64_t bytes_discarded() const noexcept { return discarded_; }
  std::uint64_t bytes_sent() const noexcept { return sent_; }
  std::uint32_t writes_in_flight() const noexcept { return writes_in_flight_; }
  /// True when input arrived that no completed write has answered yet, or a
  /// write is in flight, or the application said an exchange is open
  /// (`exchange_open`), and the application has not marked the exchange complete.
  bool mid_exchange() const noexcept;
  /// A server's drain ends this connection (`server_drain`): if it ends with
  /// both FINs, its cause is server_drain.
  bool drain_requested() const noexcept { return drain_requested_; }
  bool exchange_complete() const noexcept { return exchange_complete_; }

  /// Whose FIN went first (none yet, local, peer).
  side first_fin() const noexcept { return first_fin_; }
  /// Why the connection ended (none until finished()).
  close_cause cause() const noexcept { return cause_; }
  drain_end how_drain_ended() const noexcept { return drain_end_; }
  reset_refusal refusal() const noexcept { return refusal_; }
  bool rst_sent() const noexcept { return write_ == write_state::reset_sent; }
  bool rst_received() const noexcept { return read_ == read_state::reset; }
  /// Who keeps TIME_WAIT once the connection is over: the side whose FIN went
  /// first, unless a RST ended the connection (then nobody).
  side time_wait_holder() const noexcept;

 private:
  step reject(std::string_view why) const noexcept { return {false, why, {}}; }
  actions fin_now() noexcept;
  actions finish(close_cause c) noexcept;
  actions finish_reset_sent(close_cause c, drain_end d) noexcept;
  actions after_fin_sent() noexcept;
  step on_close(const event& e) noexcept;
  step on_peer_gone(io_error e, bool from_write) noexcept;

  read_state read_ = read_state::open;
  write_state write_ = write_state::open;
  close_policy policy_ = close_policy::graceful;
  close_cause cause_ = close_cause::none;
  side first_fin_ = side::none;
  drain_end drain_end_ = drain_end::none;
  reset_refusal refusal_ = reset_refusal::none;
  bool closing_ = false;
  bool draining_ = false;
  bool finished_ = false;
  bool close_after_flush_ = false;  // fin_close / graceful waiting for writes in flight
  bool exchange_complete_ = false;
  bool unanswered_input_ = false;
  bool exchange_open_ = false;
  bool drain_requested_ = false;
  bool peer_fin_notified_ = false;
  std::uint32_t writes_in_flight_ = 0;
  std::uint64_t delivered_ = 0;
  std::uint64_t discarded_ = 0;
  std::uint64_t sent_ = 0;
  drain_limits limits_{};
};

/// Maps an I/O outcome onto the cause it would end the connection with,
/// given what the connection has seen so far. EOF is a FIN; a reset is a
/// peer reset (idle or mid-exchange); EPIPE is a broken pipe; and a 0-byte
/// read after a reset stays a reset (Linux returns ECONNRESET once, then 0).
CLOSEWISE_CORE_API close_cause classify(io_error e, const connection_state& s) noexcept;

}  // namespace closewise
