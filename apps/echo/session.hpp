#pragma once
// The echo session: every byte back, correct across half-close.
//
// It echoes until the peer's FIN, then finishes echoing what it has and
// returns; the server ends the connection with its close policy (graceful:
// our FIN, then the close, the peer keeps TIME_WAIT). A FIN is the end of the
// peer's input, not of the connection: muduo#366 treats it as a full close and
// an echo of 100 MB after SHUT_WR loses data.
//
// Memory: each piece read is written back before the next read, so a session
// holds at most `read_size` bytes for its peer (at most the server's write
// high watermark). A peer that stops reading stops us reading from it, and
// TCP flow control then stops it sending; every byte is still delivered once
// it reads again. The kernel's send buffer, not a user-space queue, keeps the
// wire busy while we wait for the next read.

#include <cstddef>
#include <functional>
#include <memory>

#include <boost/asio/awaitable.hpp>

#include "closewise/server.hpp"

namespace closewise::echo {

struct session_options {
  /// Bytes asked for per read: the most a session ever holds for its peer.
  std::size_t read_size = 64 * 1024;
  /// Test hook: called on the connection's thread before each write with the
  /// bytes the session holds for the peer (the piece plus `connection::queued()`).
  /// Empty in the app.
  std::function<void(std::size_t held)> on_held;
};

/// The session as a named coroutine (no capturing lambda coroutine: g++ 12,
/// chriskohlhoff/asio#858). `c` outlives the session (the server holds it).
asio::awaitable<void> echo_session(connection& c, std::shared_ptr<const session_options> opts);

/// A server session handler running `echo_session` with `opts`.
session_handler make_session(session_options opts);

/// Session options for a server: the read size never exceeds its write high watermark.
session_options session_options_for(const server_options& o);

}  // namespace closewise::echo
