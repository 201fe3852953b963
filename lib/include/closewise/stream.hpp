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
#include "closewise/log.hpp"
#include "closewise/probe.hpp"
#include "closewise/report.hpp"

namespace closewise {

namespace asio = boost::asio;
using error_code = boost::system::error_code;

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

namespace detail {

inline std::uint64_t next_connection_id() noexcept {
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

// The state shared by a stream and its pending operations.
template <class NextLayer>
struct stream_impl {
  using clock = std::chrono::steady_clock;

  template <class... Args>
  explicit stream_impl(stream_options o, Args&&... args)
      : next(std::forward<Args>(args)...), opts(o), read_watch(next.get_executor()), write_watch(next.get_executor()) {}

  NextLayer next;
  stream_options opts;
  connection_state core;
  std::uint64_t id = next_connection_id();
  std::uint8_t writes_issued = 0;   // counted up to 2, for opts.no_delay
  error_code pending_socket_error;  // note_socket_error: what the next read or write completes with
  std::string preloaded;            // preload: input read from the socket before the stream had it
  std::size_t preloaded_taken = 0;  // how much of it reads have delivered
  // The timers only a teardown or a shutdown waits on, made when one first
  // does: a connection in the middle of its life does not carry them
  // (360 bytes, a third of this state).
  struct teardown_timers {
    explicit teardown_timers(const typename NextLayer::executor_type& ex) : deadline(ex), finished(ex), fin(ex) {
      finished.expires_at(clock::time_point::max());
      fin.expires_at(clock::time_point::max());
    }
    asio::steady_timer deadline;  // teardown deadline (flush, drain, safe-reset wait)
    asio::steady_timer finished;  // never expires; cancelled when the connection finished
    asio::steady_timer fin;       // never expires; cancelled when our FIN went out (or it never will)
    char first_drain[256];        // the drain's first read (uninitialised: what it reads is discarded)
  };
  std::unique_ptr<teardown_timers> teardown;
  teardown_timers& timers() {
    if (!teardown) teardown = std::make_unique<teardown_timers>(next.get_executor());
    return *teardown;
  }
  asio::cancellation_signal read_cancel;   // cancels the application's read (close takeover, timeout)
  asio::cancellation_signal write_cancel;  // cancels the application's write (timeout)
  bool app_read_in_flight = false;
  bool app_write_in_flight = false;
  clock::time_point app_read_started{};  // when the read in flight began (how long it has waited)

  // Per-operation timeouts. One timer per direction, armed lazily: a
  // completed operation does not cancel it; the handler re-checks the
  // deadline of whatever operation is in flight when it fires.
  struct watch {
    clock::time_point deadline = clock::time_point::max();
    std::uint64_t generation = 0;
    bool armed = false;
    bool fired = false;  // the operation in flight was cancelled by this timeout
    timeout_kind kind = timeout_kind::none;
  };
  asio::steady_timer read_watch;
  asio::steady_timer write_watch;
  watch read_w;
  watch write_w;
  timeout_kind timed_out = timeout_kind::none;
  std::size_t write_completing = 0;    // bytes of a write whose continuation is running
  bool in_write_continuation = false;  // that write is done, though the core still counts it
  bool close_requested = false;
  clock::time_point close_started{};
  clock::time_point idle_deadline{};
  clock::time_point hard_deadline{};
  std::unique_ptr<char[]> drain_buffer;
  error_code last_error;
  std::optional<close_report> report;
  std::function<void(const close_report&)> on_close;

  int fd() noexcept { return next.is_open() ? static_cast<int>(next.native_handle()) : -1; }

  // stream_options::no_delay: the option goes on before the second write.
  void before_write() noexcept {
    if (!opts.no_delay || writes_issued > 1) return;
    if (writes_issued++ == 1) {
      const int one = 1;
      ::setsockopt(fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
  }

  // Feeds one event and performs the actions it yields, in order.
  step feed(const event& e) {
    const step s = core.on(e);
    if (s.accepted) apply(s.todo);
    return s;
  }

  void apply(actions todo) {
    error_code ec;
    if (todo.has(action::notify_peer_fin)) log(spdlog::level::debug, "peer FIN: read side closed, write side open");
    if (todo.has(action::send_fin)) {
      next.shutdown(asio::socket_base::shutdown_send, ec);
      log(spdlog::level::debug, "FIN sent");
      if (teardown) teardown->fin.cancel();
    }
    socket_probe last{};
    if (todo.has(action::send_rst) || todo.has(action::close)) {
      // Only what the report can use: input read to the FIN (or cut by a
      // reset) leaves nothing unread, and unacknowledged bytes are lost only
      // when we reset. A teardown costs one probe syscall in the common case.
      unsigned fields = opts.probe_final_state ? probe_state : 0u;
      if (core.read() != read_state::peer_fin && core.read() != read_state::reset) fields |= probe_unread;
      if (todo.has(action::send_rst)) fields |= probe_unacked;
      if (fields != 0) last = probe(fd(), fields);
      if (todo.has(action::send_rst)) {
        // An explicit close after linger {1,0}: Asio's destructor would turn
        // the linger off and send a FIN instead (see FIELD-NOTES).
        next.set_option(asio::socket_base::linger(true, 0), ec);
      }
      next.close(ec);
    }
    if (todo.has(action::finished)) finish(last);
  }

  void finish(const socket_probe& last) {
    close_report r;
    r.cause = core.cause();
    r.policy = core.policy();
    r.close_requested = close_requested;
    r.bytes_in = core.bytes_delivered();
    r.bytes_out = core.bytes_sent() + write_completing;
    r.bytes_discarded = core.bytes_discarded();
    r.drain = core.how_drain_ended();
    if (close_requested) r.drain_time = clock::now() - close_started;
    r.refusal = core.refusal();
    r.first_fin = core.first_fin();
    r.time_wait = core.time_wait_holder();
    r.rst_sent = core.rst_sent();
    r.rst_received = core.rst_received();
    r.unread_at_close = last.unread.value_or(0);
    r.unacked_at_close = last.unacked.value_or(0);
    r.final_state = last.state;
    if (r.kernel_reset()) r.time_wait = side::none;  // the kernel answered our close with RST
    if (last_error) r.error = last_error.message();
    r.timeout = timed_out;
    report = std::move(r);
    read_watch.cancel();
    write_watch.cancel();
    if (teardown) {
      teardown->deadline.cancel();
      teardown->finished.cancel();
      teardown->fin.cancel();
    }
    const bool loud = report->rst_sent || report->rst_received || report->kernel_reset() ||
                      report->drain == drain_end::timeout || report->drain == drain_end::byte_limit;
    const auto level = loud ? spdlog::level::info : spdlog::level::debug;
    // describe() formats a whole line: only when it will be printed.
    if (closewise::logger()->should_log(level)) log(level, "closed: {}", report->describe());
    if (on_close) on_close(*report);
  }

  std::size_t preloaded_left() const noexcept { return preloaded.size() - preloaded_taken; }

  // Delivers preloaded input into `buffers`; frees it once all is taken.
  template <class Buffers>
  std::size_t take_preloaded(const Buffers& buffers) {
    const std::size_t n =
        asio::buffer_copy(buffers, asio::buffer(preloaded.data() + preloaded_taken, preloaded_left()));
    preloaded_taken += n;
    if (preloaded_left() == 0) {
      preloaded = std::string();
      preloaded_taken = 0;
    }
    return n;
  }

  // A close took over the read side: preloaded input nobody read is
  // discarded, as the drain discards what is still in the kernel.
  void discard_preloaded() {
    const std::size_t left = preloaded_left();
    if (left == 0) return;
    preloaded = std::string();
    preloaded_taken = 0;
    if (!core.finished() && core.read() == read_state::open) feed(event::read(left));
  }

  void note_error(const error_code& ec) {
    if (ec && ec != asio::error::operation_aborted && !last_error) last_error = ec;
  }

  // Feeds a read completion: bytes first, then EOF or the error.
  void on_read(const error_code& ec, std::size_t n) {
    if (n > 0) feed(event::read(n));
    if (!ec || ec == asio::error::operation_aborted) return;  // a local cancellation ends nothing
    if (ec == asio::error::eof) {
      feed(event::read_eof());
      return;
    }
    note_error(ec);
    feed(event::read_failed(to_io_error(ec)));
  }

  // What an operation started after the teardown took over completes with.
  // After a peer reset the answer stays "reset": Linux would return 0 on the
  // next read, which is not a FIN (DESIGN.md row 8).
  error_code read_refused() const noexcept {
    if (!core.finished()) return asio::error::operation_aborted;
    if (core.rst_received()) return asio::error::connection_reset;
    if (core.read() == read_state::peer_fin) return asio::error::eof;
    return asio::error::operation_aborted;
  }
  error_code write_refused() const noexcept {
    return core.finished() ? error_code{asio::error::broken_pipe} : error_code{};
  }

  // Teardown deadline: progress moves idle_deadline; the timer re-waits until
  // the earlier of the two deadlines really passed, so re-arming never races
  // a stale expiry.
  void touch() noexcept { idle_deadline = std::min(clock::now() + opts.linger_timeout, hard_deadline); }

  void arm_deadline(std::shared_ptr<stream_impl> self) {
    asio::steady_timer& deadline = timers().deadline;
    deadline.expires_at(idle_deadline);
    deadline.async_wait([self = std::move(self)](const error_code& ec) mutable {
      if (ec || self->core.finished()) return;
      if (clock::now() < self->idle_deadline) {
        auto& impl = *self;
        impl.arm_deadline(std::move(self));
        return;
      }
      self->feed(event::timer_fired());
    });
  }

  // Starts the clock of an application operation in one direction.
  // `now`: the caller's clock reading, if it has one (else read here when a limit applies).
  void start_watch(std::shared_ptr<stream_impl> self, bool reading, clock::time_point now = {}) {
    watch& w = reading ? read_w : write_w;
    std::chrono::milliseconds limit = opts.write_timeout;
    w.kind = timeout_kind::write;
    if (reading) {
      // A read started from the continuation of the only write in flight
      // follows a completed answer: it waits for a new exchange.
      const bool answered = in_write_continuation && core.writes_in_flight() == 1;
      const bool idle = !core.mid_exchange() || answered;
      limit = idle ? opts.idle_timeout : opts.read_timeout;
      w.kind = idle ? timeout_kind::idle : timeout_kind::read;
    }
    w.fired = false;
    if (limit.count() > 0 && now == clock::time_point{}) now = clock::now();
    w.deadline = limit.count() > 0 ? now + limit : clock::time_point::max();
    if (w.deadline != clock::time_point::max()) arm_watch(std::move(self), reading);
  }

  void arm_watch(std::shared_ptr<stream_impl> self, bool reading) {
    watch& w = reading ? read_w : write_w;
    asio::steady_timer& t = reading ? read_watch : write_watch;
    if (w.armed && t.expiry() <= w.deadline) return;  // fires earlier and re-checks then
    w.armed = true;
    t.expires_at(w.deadline);
    t.async_wait([self = std::move(self), reading, gen = ++w.generation](const error_code& ec) mutable {
      auto& impl = *self;
      watch& w = reading ? impl.read_w : impl.write_w;
      if (ec || gen != w.generation) return;
      w.armed = false;
      const bool in_flight = reading ? impl.app_read_in_flight : impl.app_write_in_flight;
      if (!in_flight || w.deadline == clock::time_point::max() || impl.core.finished()) return;
      if (clock::now() < w.deadline) return impl.arm_watch(std::move(self), reading);
      w.fired = true;
      impl.timed_out = w.kind;
      impl.log(spdlog::level::info, "{} timeout", to_string(w.kind));
      (reading ? impl.read_cancel : impl.write_cancel).emit(asio::cancellation_type::terminal);
    });
  }

  // Ends an application operation's clock; maps its own cancellation by a
  // timeout onto asio::error::timed_out.
  void stop_watch(bool reading, error_code& ec) noexcept {
    watch& w = reading ? read_w : write_w;
    w.deadline = clock::time_point::max();
    if (w.fired && ec == asio::error::operation_aborted) ec = asio::error::timed_out;
    w.fired = false;
  }

  template <class... Args>
  void log(spdlog::level::level_enum level, fmt::format_string<Args...> f, Args&&... args) {
    const auto& l = closewise::logger();
    if (!l->should_log(level)) return;
    l->log(level, "[conn {}] {}", id, fmt::format(f, std::forward<Args>(args)...));
  }
};

}  // namespace detail

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
  socket_probe probe(unsigned fields = probe_all) const noexcept { return closewise::probe(impl_->fd(), fields); }

  /// The application declares that the requester has everything it asked
  /// for (e.g. the whole response was written). rst_if_safe needs this.
  /// New input clears the mark.
  void mark_exchange_complete() { impl_->feed(event::complete()); }

  /// Records that the connection ends because of a timeout its owner enforced
  /// outside the stream (a server's wait for the first byte): the close
  /// report carries it as it would one of the stream's own timeouts.
  void note_timeout(timeout_kind k) noexcept { impl_->timed_out = k; }

  /// Hands the stream an error its socket reported to someone else first: a
  /// read before the stream had the socket takes the pending ECONNRESET,
  /// after which the socket reads as EOF and writes fail with EPIPE. The
  /// next write, or the next read once preloaded input is taken, completes
  /// with it, as the socket would have answered.
  void note_socket_error(const error_code& ec) noexcept { impl_->pending_socket_error = ec; }

  /// Hands the stream input its owner already read from the socket (a
  /// server reads a request's first bytes while the connection waits to
  /// become a session). The next reads deliver these bytes first, counted
  /// as input like any other; a close discards what no read took (counted
  /// in `bytes_discarded` by a drain, and as unread input by rst_if_safe).
  /// Call before the first read.
  void preload(std::string bytes) {
    impl_->preloaded = std::move(bytes);
    impl_->preloaded_taken = 0;
  }
  /// Preloaded bytes no read has taken yet.
  std::size_t preloaded() const noexcept { return impl_->preloaded_left(); }

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

  /// Writes some bytes. After our FIN the kernel answers EPIPE (DESIGN.md row 5).
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

  template <class Buffers>
  struct read_op {
    std::shared_ptr<impl_type> impl;
    Buffers buffers;
    enum { starting, reading, posted } stage = starting;
    error_code posted_ec{};

    template <class Self>
    void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
      switch (stage) {
        case starting:
          if (impl->core.closing()) {
            // The close owns the read side now (draining or closed).
            stage = posted;
            posted_ec = impl->read_refused();
            asio::post(std::move(self));
            return;
          }
          stage = reading;
          impl->app_read_in_flight = true;
          impl->app_read_started = std::chrono::steady_clock::now();
          if (impl->preloaded_left() > 0) {
            // Input the stream already has: no wait, so no clock to watch it.
            const std::size_t taken = impl->take_preloaded(buffers);
            asio::post(asio::append(std::move(self), error_code{}, taken));
            return;
          }
          impl->start_watch(impl, true, impl->app_read_started);
          // The caller's cancellation reaches the socket through our own
          // signal, which async_close also uses to take over the read side.
          if (auto slot = self.get_cancellation_state().slot(); slot.is_connected()) {
            slot.assign([sig = &impl->read_cancel](asio::cancellation_type t) { sig->emit(t); });
          }
          if (impl->pending_socket_error) {
            asio::post(asio::append(std::move(self), std::exchange(impl->pending_socket_error, {}), std::size_t{0}));
            return;
          }
          impl->next.async_read_some(buffers, asio::bind_cancellation_slot(impl->read_cancel.slot(), std::move(self)));
          return;
        case reading:
          impl->app_read_in_flight = false;
          impl->on_read(ec, n);
          impl->stop_watch(true, ec);  // our own timeout: timed_out, not operation_aborted
          self.complete(ec, n);
          return;
        case posted:
          self.complete(posted_ec, 0);
          return;
      }
    }
  };

  template <class Buffers>
  struct write_op {
    std::shared_ptr<impl_type> impl;
    Buffers buffers;
    bool started = false;
    bool counted = false;

    template <class Self>
    void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
      if (!started) {
        started = true;
        if (const error_code refused = impl->write_refused()) {
          asio::post(asio::append(std::move(self), refused, std::size_t{0}));
          return;
        }
        counted = impl->feed(event::write_start(asio::buffer_size(buffers))).accepted;
        impl->app_write_in_flight = true;
        impl->start_watch(impl, false);
        if (auto slot = self.get_cancellation_state().slot(); slot.is_connected()) {
          slot.assign([sig = &impl->write_cancel](asio::cancellation_type t) { sig->emit(t); });
        }
        if (impl->pending_socket_error) {
          asio::post(asio::append(std::move(self), std::exchange(impl->pending_socket_error, {}), std::size_t{0}));
          return;
        }
        impl->before_write();
        impl->next.async_write_some(buffers, asio::bind_cancellation_slot(impl->write_cancel.slot(), std::move(self)));
        return;
      }
      impl->app_write_in_flight = false;
      const error_code raw = ec;
      impl->stop_watch(false, ec);
      if (!counted) {
        self.complete(ec, n);
        return;
      }
      if (raw && raw != asio::error::operation_aborted) {
        impl->note_error(ec);
        if (raw == asio::error::eof) {
          // A socket write never says EOF; a next layer such as TLS does when
          // the peer closed its side. The write is over, and so is the input.
          impl->feed(event::wrote(n));
          impl->feed(event::read_eof());
        } else {
          impl->feed(event::write_failed(to_io_error(ec)));
        }
        self.complete(ec, n);
        return;
      }
      // Run the caller's continuation first: a composed write (asio::async_write,
      // beast::http::async_write) issues its next write_some from inside it, and
      // a FIN requested meanwhile must wait for that one too.
      auto keep = impl;
      keep->write_completing = n;  // counted in a report made inside the continuation
      keep->in_write_continuation = true;
      self.complete(ec, n);
      keep->in_write_continuation = false;
      keep->write_completing = 0;
      if (keep->core.closing()) keep->touch();
      keep->feed(event::wrote(n));
    }
  };

  struct shutdown_op {
    std::shared_ptr<impl_type> impl;
    enum { starting, waiting, posted } stage = starting;
    error_code result{};

    template <class Self>
    void operator()(Self& self, error_code = {}) {
      switch (stage) {
        case starting: {
          const step s = impl->feed(event::shutdown());
          if (!s.accepted) result = asio::error::broken_pipe;
          if (!s.accepted || impl->core.write() == write_state::fin_sent || impl->core.finished()) {
            stage = posted;
            asio::post(std::move(self));
            return;
          }
          stage = waiting;  // flushing: the last write in flight sends the FIN
          impl->timers().fin.async_wait(std::move(self));
          return;
        }
        case waiting:
          if (impl->core.write() != write_state::fin_sent) result = asio::error::broken_pipe;
          self.complete(result);
          return;
        case posted:
          self.complete(result);
          return;
      }
    }
  };

  struct close_op {
    std::shared_ptr<impl_type> impl;
    close_policy policy;
    enum { starting, safe_wait, draining, waiting_finish, posted } stage = starting;
    std::chrono::milliseconds poll{1};
    typename impl_type::clock::time_point safe_deadline{};
    std::unique_ptr<asio::steady_timer> poll_timer{};

    template <class Self>
    void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
      auto& s = *impl;
      switch (stage) {
        case starting:
          // Asked from inside a write's completion handler: that write is
          // done but not yet retired (see async_write_some). Decide once it is,
          // or rst_if_safe would refuse over a write that already finished.
          if (s.in_write_continuation) return asio::post(std::move(self));
          if (s.core.finished()) return post_complete(self);
          if (s.core.closing() && policy != close_policy::abortive) return wait_finish(self);
          if (!s.core.closing()) {
            s.close_requested = true;
            s.close_started = impl_type::clock::now();
            s.hard_deadline = s.close_started + s.opts.linger_max;
            s.touch();
          }
          if (s.app_read_in_flight) s.read_cancel.emit(asio::cancellation_type::terminal);
          if (policy == close_policy::rst_if_safe && s.core.exchange_complete() && s.core.writes_in_flight() == 0) {
            safe_deadline = impl_type::clock::now() + s.opts.safe_reset_wait;
            return safe_poll(self);
          }
          // Only rst_if_safe decides on the kernel's queues; the other policies
          // cost no probe here.
          return decide(self, policy == close_policy::rst_if_safe ? queues_now() : queue_probe{});
        case safe_wait:
          return safe_poll(self);
        case draining:
          s.on_read(ec, n);
          if (ec == asio::error::operation_aborted && !s.core.finished() && s.core.draining()) {
            // Our own read was cancelled while still draining (an application
            // cancellation raced us): keep draining.
            return drain(self);
          }
          if (!ec && s.core.draining()) {
            if (n > 0) s.touch();
            if (!s.drain_buffer && n >= std::min(sizeof s.timers().first_drain, s.opts.drain_buffer_size)) {
              s.drain_buffer = std::make_unique_for_overwrite<char[]>(s.opts.drain_buffer_size);  // more is coming
            }
            return drain(self);
          }
          if (s.core.finished()) return self.complete(*s.report);
          return wait_finish(self);
        case waiting_finish:
          if (s.core.finished()) return self.complete(*s.report);
          return wait_finish(self);
        case posted:
          return self.complete(*s.report);
      }
    }

    // rst_if_safe: wait (bounded) until the peer acknowledged every byte we
    // sent, then let the core decide. Input arriving meanwhile is a reason not
    // to reset, so it is decided at once.
    template <class Self>
    void safe_poll(Self& self) {
      auto& s = *impl;
      if (s.core.finished()) return self.complete(*s.report);
      const queue_probe q = queues_now();
      if (!q.valid || q.unacked == 0 || q.unread > 0 || impl_type::clock::now() >= safe_deadline) {
        return decide(self, q);
      }
      stage = safe_wait;
      if (!poll_timer) poll_timer = std::make_unique<asio::steady_timer>(s.next.get_executor());
      poll_timer->expires_after(poll);
      poll = std::min(poll * 2, std::chrono::milliseconds{16});
      poll_timer->async_wait(std::move(self));
    }

    queue_probe queues_now() const noexcept {
      const int fd = impl->fd();
      queue_probe q = fd >= 0 ? closewise::probe(fd, probe_unread | probe_unacked).queues() : queue_probe{};
      q.unread += impl->preloaded_left();  // input read before the stream had it, and not taken since
      return q;
    }

    template <class Self>
    void decide(Self& self, queue_probe q) {
      auto& s = *impl;
      drain_limits limits;
      limits.max_discard_bytes = s.opts.max_discard_bytes;
      const step st = s.feed(event::close_with(policy, q, limits));
      s.discard_preloaded();
      if (s.core.finished()) return post_complete(self);
      if (!st.accepted) return wait_finish(self);
      if (closewise::logger()->should_log(spdlog::level::debug)) {  // to_string(actions) allocates
        s.log(spdlog::level::debug, "close requested: {} ({})", to_string(policy), to_string(st.todo));
      }
      s.arm_deadline(impl);
      if (st.todo.has(action::start_drain)) {
        return drain(self);
      }
      return wait_finish(self);
    }

    // Where the drain reads: the teardown state's small buffer until a read
    // fills it, then a buffer of drain_buffer_size (discarded: no zeroing).
    asio::mutable_buffer drain_target() {
      auto& s = *impl;
      if (s.drain_buffer) return asio::buffer(s.drain_buffer.get(), s.opts.drain_buffer_size);
      auto& first = s.timers().first_drain;
      return asio::buffer(first, std::min(sizeof first, s.opts.drain_buffer_size));
    }

    template <class Self>
    void drain(Self& self) {
      stage = draining;
      auto& s = *impl;
      s.next.async_read_some(drain_target(), std::move(self));
    }

    template <class Self>
    void wait_finish(Self& self) {
      stage = waiting_finish;
      impl->timers().finished.async_wait(std::move(self));
    }

    template <class Self>
    void post_complete(Self& self) {
      stage = posted;
      asio::post(std::move(self));
    }
  };

  std::shared_ptr<impl_type> impl_;
};

}  // namespace closewise
