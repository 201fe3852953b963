#pragma once
// A line-based key/value server on closewise: the store, the protocol and the
// session coroutine.
//
// Protocol: one command per line ("\n", an optional "\r" before it is
// dropped), one reply line per command, in order:
//
//   SET key value   ->  OK              (the value is the rest of the line, spaces included)
//   GET key         ->  VALUE value  |  NOT_FOUND
//   DEL key         ->  DELETED      |  NOT_FOUND
//   QUIT            ->  BYE, then the server closes with the connection's policy
//   QUIT!           ->  no reply: the server resets the connection (abortive close)
//   anything else   ->  ERR reason   (the connection stays usable)
//
// A client says "done" by half-closing (shutdown(SHUT_WR)): the server answers
// every command it received before that FIN, including a last one without a
// newline, and then closes gracefully. A line longer than `max_line` bytes is
// answered with "ERR line too long" and ends the connection gracefully: the
// rest of the line is read and discarded, so the error reply is not destroyed
// by the RST that closing with unread input would cause (docs/design.md,
// 'Kernel experiments', row 7).

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include <boost/asio/awaitable.hpp>

#include "closewise/server.hpp"

namespace closewise::kv {

/// The data, one per server. A connection lives on one I/O thread, but the
/// store is shared by every connection and the server may run several I/O
/// threads, so each operation takes a lock (held for one map operation only,
/// never across a co_await). With `--threads 1` the lock is never contended.
class store {
 public:
  void set(std::string_view key, std::string_view value);
  std::optional<std::string> get(std::string_view key) const;
  /// True when the key existed.
  bool del(std::string_view key);
  std::size_t size() const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::string, std::less<>> data_;
};

/// What a command asks of the connection besides its reply.
enum class outcome : std::uint8_t {
  next,   ///< keep reading commands
  quit,   ///< reply sent ("BYE"): end the connection with its policy
  abort,  ///< no reply: end the connection with a RST
};

/// Executes one command line (without its newline) against `db` and appends
/// its reply line (with "\n") to `reply`. Pure but for the store: no I/O.
outcome execute(std::string_view line, store& db, std::string& reply);

/// Limits of one session.
struct session_options {
  /// Longest accepted line, newline excluded. Past it: "ERR line too long"
  /// and a graceful close.
  std::size_t max_line = 4096;
  /// Bytes asked for per read.
  std::size_t read_size = 16 * 1024;
};

/// The session: a named coroutine taking its state by value (a capturing
/// lambda coroutine double-frees under g++ 12, chriskohlhoff/asio#858). The
/// server owns `c` and keeps it alive until the session returns; when it
/// returns, the server flushes the queued replies and closes the connection
/// with `c.policy()`.
asio::awaitable<void> kv_session(connection& c, std::shared_ptr<store> db, session_options opts);

/// A server session handler running `kv_session` over `db`.
session_handler make_session(std::shared_ptr<store> db, session_options opts = {});

}  // namespace closewise::kv
