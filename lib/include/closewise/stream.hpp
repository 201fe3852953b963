#pragma once
// closewise::basic_stream: an Asio AsyncStream that knows how its connection ends.
//
// It wraps a stream socket (tcp::socket or local::stream_protocol::socket),
// feeds every completion into the sans-I/O core (core.hpp), surfaces the
// peer's FIN as an event (asio::error::eof on the read that reaches it, after
// every byte before it; the write side stays open), and ends the connection
// through a teardown policy with `async_close`, which completes with a
// `close_report`.
//
// Thread-safety: like an Asio socket, one stream is used from one executor
// (one thread or one strand) at a time. The hot path takes no lock.
//
// Lifetime: operations hold the stream's state alive, so destroying the
// stream with operations pending is safe: the destructor closes the socket
// (a plain close, reported as local_error), and pending operations complete
// with operation_aborted.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include <spdlog/logger.h>
#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/compose.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/socket_base.hpp>
#include <boost/asio/steady_timer.hpp>

#include "closewise/core.hpp"
#include "closewise/error.hpp"
#include "closewise/log.hpp"
#include "closewise/probe.hpp"
#include "closewise/report.hpp"

namespace closewise {

namespace asio = boost::asio;

/// Maps an Asio error code onto the outcomes the core distinguishes.
inline io_error to_io_error(const error_code& ec) noexcept {
  if (!ec) return io_error::none;
  if (ec == asio::error::eof) return io_error::eof;
  if (ec == asio::error::connection_reset) return io_error::reset;
  if (ec == asio::error::broken_pipe) return io_error::broken_pipe;
  if (ec == asio::error::operation_aborted) return io_error::aborted;
  if (ec == asio::error::timed_out) return io_error::timed_out;
  return io_error::other;
}

/// `classify` for Asio error codes.
inline close_cause classify(const error_code& ec, const connection_state& s) noexcept {
  return classify(to_io_error(ec), s);
}

/// Teardown limits of one stream.
struct stream_options {
  /// Graceful drain and flush: give up (RST) after this long without progress.
  /// Re-armed whenever drained or flushed bytes move (nginx: lingering_timeout).
  std::chrono::milliseconds linger_timeout{5000};
  /// Graceful drain and flush: give up (RST) after this long in total (nginx: lingering_time).
  std::chrono::milliseconds linger_max{30000};
  /// Graceful drain: give up (RST) after discarding this many bytes.
  std::uint64_t max_discard_bytes = 16u * 1024 * 1024;
  /// rst_if_safe: how long to wait for the peer to acknowledge our bytes
  /// (SIOCOUTQ == 0) before falling back to graceful.
  std::chrono::milliseconds safe_reset_wait{1000};
  /// Size of the buffer the drain reads into, allocated only once the
  /// drain's first read (into a few hundred bytes the teardown state
  /// carries) comes back full: a peer whose FIN is all that is left costs
  /// no allocation.
  std::size_t drain_buffer_size = 16 * 1024;
  /// A read waiting for a new exchange (no input unanswered, no write in
  /// flight) fails with asio::error::timed_out after this long. 0: no limit.
  std::chrono::milliseconds idle_timeout{0};
  /// A read in the middle of an exchange fails with timed_out after this long
  /// without a byte. 0: no limit.
  std::chrono::milliseconds read_timeout{0};
  /// A write_some that moves no byte for this long fails with timed_out. 0: no limit.
  std::chrono::milliseconds write_timeout{0};
  /// TCP: set TCP_NODELAY before the second write. A first write never waits
  /// for Nagle's algorithm (Linux holds a small segment back only while an
  /// earlier small one is unacknowledged), so a connection that writes one
  /// response and closes is spared the syscall; the server sets this for its
  /// TCP connections.
  bool no_delay = false;
  /// TCP: read the connection's state (TCP_INFO) just before the close, for
  /// `close_report::final_state`: one getsockopt per connection. Off, the
  /// report says `unknown` there; everything else in it (cause, FINs, who
  /// keeps TIME_WAIT, bytes) comes from the state machine and costs nothing.
  bool probe_final_state = true;
};

/// What a stream's owner read from a socket before handing it to a stream
/// (a server reads a request's first bytes while the connection waits to
/// become a session, with no stream or buffer of its own). Given to the
/// stream's constructor, it is the start of the stream's input: the next
/// reads deliver `bytes` first, counted as input like any other, and a
/// close discards what no read took (counted in `bytes_discarded` by a
/// drain, and as unread input by rst_if_safe). `error`, an errno the
/// owner's read took from the socket (a pending ECONNRESET, after which the
/// socket reads as EOF and writes fail with EPIPE), is what the next write,
/// or the next read once `bytes` are taken, completes with, as the socket
/// would have answered.
struct read_ahead {
  std::string bytes;
  int error = 0;
};

}  // namespace closewise

#include "closewise/impl/stream_impl.hpp"

namespace closewise {

/// An Asio AsyncReadStream + AsyncWriteStream over `NextLayer` that tracks
/// half-close state and ends connections through a teardown policy.
template <class NextLayer>
class basic_stream {
  using impl_type = detail::stream_impl<NextLayer>;

 public:
  using next_layer_type = NextLayer;
  using executor_type = typename NextLayer::executor_type;

  /// Wraps a connected socket.
  explicit basic_stream(NextLayer&& socket, stream_options opts = {})
      : impl_(std::make_shared<impl_type>(opts, std::move(socket))) {}

  /// Takes over a socket its owner already read from (`read_ahead`): the
  /// reads deliver those bytes first, then the error the owner's read met.
  basic_stream(NextLayer&& socket, stream_options opts, read_ahead ahead)
      : impl_(std::make_shared<impl_type>(opts, std::move(socket))) {
    impl_->preloaded = std::move(ahead.bytes);
    if (ahead.error != 0) impl_->pending_socket_error = error_code(ahead.error, asio::error::get_system_category());
  }

  /// Constructs the socket from `arg` (an executor or an io_context).
  template <class Arg>
  requires(!std::is_same_v<std::decay_t<Arg>, NextLayer>) explicit basic_stream(Arg&& arg, stream_options opts = {})
      : impl_(std::make_shared<impl_type>(opts, std::forward<Arg>(arg))) {}

  /// Moves the connection; the moved-from stream is empty (use only to destroy or assign).
  basic_stream(basic_stream&&) noexcept = default;
  /// Closes this stream's own connection first (as the destructor does), then takes `other`'s.
  basic_stream& operator=(basic_stream&& other) noexcept {
    if (this != &other) {
      abandon();
      impl_ = std::move(other.impl_);
    }
    return *this;
  }
  basic_stream(const basic_stream&) = delete;
  basic_stream& operator=(const basic_stream&) = delete;

  /// Closes the socket if no close ran (plain close, cause local_error).
  ~basic_stream() { abandon(); }

  /// The socket's executor: every operation of this stream runs there.
  executor_type get_executor() noexcept { return impl_->next.get_executor(); }
  /// The wrapped socket. Reading or writing it directly bypasses the state
  /// machine; closing it behind the stream's back loses the report's details.
  NextLayer& next_layer() noexcept { return impl_->next; }
  const NextLayer& next_layer() const noexcept { return impl_->next; }
  /// The socket under every layer (for Asio layers above this one, such as ssl::stream).
  using lowest_layer_type = typename NextLayer::lowest_layer_type;
  lowest_layer_type& lowest_layer() noexcept { return impl_->next.lowest_layer(); }
  const lowest_layer_type& lowest_layer() const noexcept { return impl_->next.lowest_layer(); }

  /// The half-close state machine of this connection.
  const connection_state& state() const noexcept { return impl_->core; }
  /// This connection's number in log lines.
  std::uint64_t id() const noexcept { return impl_->id; }
  /// Timeouts and teardown limits; `set_options` applies to operations started afterwards.
  const stream_options& options() const noexcept { return impl_->opts; }
  void set_options(const stream_options& o) noexcept { impl_->opts = o; }

  /// True while an application read is in flight (the connection waits for input).
  bool read_pending() const noexcept { return impl_->app_read_in_flight; }
  /// When the read in flight began (meaningful while `read_pending()`).
  std::chrono::steady_clock::time_point read_pending_since() const noexcept { return impl_->app_read_started; }

  /// The kernel's view now: TCP state, SIOCINQ, SIOCOUTQ, SIOCOUTQNSD (those in `fields`).
  socket_probe probe(probe_fields fields = probe_all) const noexcept { return closewise::probe(impl_->fd(), fields); }

  /// The application declares that the requester has everything it asked
  /// for (e.g. the whole response was written). rst_if_safe needs this.
  /// New input clears the mark.
  void mark_exchange_complete() { impl_->feed(event::complete()); }

  /// The application says an exchange is in progress although no input is
  /// unanswered (after an interim response such as HTTP 100 Continue):
  /// `state().mid_exchange()` holds until `mark_exchange_complete`.
  void mark_exchange_open() { impl_->feed(event::open_exchange()); }

  /// A server's drain ends this connection: if it ends with both FINs, the
  /// report's cause is server_drain (the state machine decides, not the caller).
  void note_server_drain() { impl_->feed(event::drain()); }

  /// True when the connection has waited for a new exchange since `cutoff`
  /// or longer: an application read is pending since then, nothing is
  /// unanswered or held open, no close began, and no input waits unread
  /// (read ahead, or in the kernel: a request that came as the caller looked,
  /// which a graceful close would read and discard). One SIOCINQ probe.
  bool idle_since(std::chrono::steady_clock::time_point cutoff) const noexcept {
    const auto& i = *impl_;
    if (i.core.closing() || !i.app_read_in_flight || i.core.mid_exchange() || i.app_read_started > cutoff) return false;
    if (i.preloaded_left() > 0) return false;
    return probe(probe_unread).unread.value_or(0) == 0;
  }

  /// Records that the connection ends because of a timeout its owner enforced
  /// outside the stream (a server's wait for the first byte): the close
  /// report carries it as it would one of the stream's own timeouts.
  void note_timeout(timeout_kind k) noexcept { impl_->timed_out = k; }

  /// Input its owner read ahead (`read_ahead`) that no read has taken yet.
  std::size_t read_ahead_left() const noexcept { return impl_->preloaded_left(); }

  /// The close report, once the connection finished (by async_close, by the
  /// peer's reset, or by both FINs crossing).
  const std::optional<close_report>& report() const noexcept { return impl_->report; }

  /// Called once, with the report, when the connection finishes. Runs on
  /// the stream's executor, inside whichever completion finished it.
  void on_close(std::function<void(const close_report&)> f) { impl_->on_close = std::move(f); }

  /// Reads some bytes. A peer FIN completes it with asio::error::eof after
  /// every byte before it was delivered; the write side stays open. Fails
  /// with operation_aborted once a close has taken over the read side.
  template <class MutableBufferSequence, class CompletionToken>
  auto async_read_some(const MutableBufferSequence& buffers, CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(error_code, std::size_t)>(
        read_op<MutableBufferSequence>{impl_, buffers}, token, impl_->next);
  }

  /// Reads what is there now, without waiting: the bytes, or 0 with
  /// asio::error::would_block when nothing is. Otherwise as a completed
  /// async_read_some: the same accounting, `eof` for the peer's FIN, the
  /// same refusals after a close. For a layer above (TLS) that takes a
  /// buffer only when there is input, and waits with async_wait_readable
  /// when there is none. Not while an async_read_some is in flight.
  template <class MutableBufferSequence>
  std::size_t read_some_now(const MutableBufferSequence& buffers, error_code& ec) {
    auto& i = *impl_;
    ec = {};
    if (i.core.closing()) {
      ec = i.read_refused();
      return 0;
    }
    if (i.preloaded_left() > 0) return i.take_preloaded(buffers);
    if (i.pending_socket_error) {
      ec = std::exchange(i.pending_socket_error, {});
    } else {
      // The socket's own non-blocking mode: Asio sets it for its first
      // asynchronous operation anyway, and then does not set it again.
      if (!i.next.non_blocking()) i.next.non_blocking(true, ec);
      const std::size_t n = ec ? 0 : i.next.read_some(buffers, ec);
      if (ec == asio::error::would_block || ec == asio::error::try_again) {
        ec = asio::error::would_block;
        return 0;
      }
      i.on_read(ec, n);
      return n;
    }
    i.on_read(ec, 0);
    return 0;
  }

  /// Completes once a read would not wait (input, the peer's FIN or an
  /// error is there), holding no buffer meanwhile: a layer above (TLS) takes
  /// its record buffer only then, so an idle connection holds none. The same
  /// clock (idle or read timeout, then asio::error::timed_out), cancellation
  /// and refusal after a close as async_read_some; reads nothing.
  template <class CompletionToken>
  auto async_wait_readable(CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(error_code)>(wait_readable_op{impl_}, token, impl_->next);
  }

  /// Writes some bytes. After our FIN the kernel answers EPIPE
  /// (docs/design.md, 'Kernel experiments', row 5).
  /// Inside the completion handler, `state()` still counts this write as in
  /// flight (a composed write issues its next step from there, and a FIN
  /// requested meanwhile must wait for it); it is retired when the handler returns.
  template <class ConstBufferSequence, class CompletionToken>
  auto async_write_some(const ConstBufferSequence& buffers, CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(error_code, std::size_t)>(
        write_op<ConstBufferSequence>{impl_, buffers}, token, impl_->next);
  }

  /// Sends our FIN once the writes in flight completed; completes when it
  /// went out. The read side stays open. A second call is a no-op (FIN is
  /// raised once). Fails with broken_pipe if the write side is broken.
  template <class CompletionToken>
  auto async_shutdown_write(CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(error_code)>(shutdown_op{impl_}, token, impl_->next);
  }

  /// Ends the connection with `policy` and completes with its report (never
  /// an error: what went wrong is in the report). Takes over a pending
  /// application read (it completes with operation_aborted); a write in
  /// flight is flushed first (graceful, fin_close, rst_if_safe) or discarded
  /// (abortive). Calling it again, or after the peer ended the connection,
  /// completes with the same report; an abortive call overrides a graceful
  /// close in progress.
  template <class CompletionToken>
  auto async_close(close_policy policy, CompletionToken&& token) {
    return asio::async_compose<CompletionToken, void(close_report)>(close_op{impl_, policy}, token, impl_->next);
  }

 private:
  void abandon() {
    if (!impl_ || impl_->core.finished()) return;
    impl_->close_requested = false;
    impl_->feed(event::failed_locally(close_cause::local_error));
  }

  // The operations, defined in impl/stream.hpp.
  template <class Buffers>
  struct read_op;
  template <class Buffers>
  struct write_op;
  struct wait_readable_op;
  struct shutdown_op;
  struct close_op;

  std::shared_ptr<impl_type> impl_;
};

}  // namespace closewise

#include "closewise/impl/stream.hpp"
