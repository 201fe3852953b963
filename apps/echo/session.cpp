#include "echo/session.hpp"

#include <algorithm>
#include <utility>

#include <boost/asio/error.hpp>

namespace closewise::echo {

// Why read, then write, and not connection::send with the watermarks: the
// kernel's send buffer already overlaps our reads with the transmission, so a
// user-space queue adds no throughput to an echo, only memory (up to the
// watermark per connection) and CPU (an allocation per piece: 5-25% more
// server CPU per byte in A/B runs on loopback). And connection::read_some
// pauses only once the queue is above the mark, so queued bytes could reach
// high watermark + read size.
asio::awaitable<void> echo_session(connection& c, std::shared_ptr<const session_options> opts) {
  const std::size_t size = std::max<std::size_t>(opts->read_size, 1);
  // One buffer for the connection's life, allocated once.
  const auto buf = std::make_unique<char[]>(size);
  for (;;) {
    auto [ec, n] = co_await c.read_some(asio::buffer(buf.get(), size));
    if (n > 0) {
      if (opts->on_held) opts->on_held(n + c.queued());
      // A write error means the peer is gone: the server closes and reports how.
      if (co_await c.write(asio::buffer(buf.get(), n))) co_return;
    }
    if (ec == asio::error::eof) {
      // The peer's FIN: it sent everything it will, and we read and wrote all
      // of it (the flush is a no-op here; it keeps the order explicit). Our
      // write side is still open; returning lets the server close with its
      // policy. The exchange is complete only now, which is what lets
      // rst_if_safe reset without losing a byte.
      if (co_await c.flush()) co_return;
      c.mark_exchange_complete();
      co_return;
    }
    // A reset, a timeout, or a drain taking over the read side: the server
    // ends the connection and its report says which.
    if (ec) co_return;
  }
}

session_handler make_session(session_options opts) {
  auto shared = std::make_shared<const session_options>(std::move(opts));
  // Not a coroutine itself: it only starts the named coroutine.
  return [shared](connection& c) { return echo_session(c, shared); };
}

session_options session_options_for(const server_options& o) {
  session_options s;
  s.read_size = std::clamp<std::size_t>(o.write_high_watermark, 1, s.read_size);
  return s;
}

}  // namespace closewise::echo
