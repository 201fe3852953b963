#pragma once
// The state a closewise::basic_stream shares with its pending operations.
// Implementation: included by closewise/stream.hpp, not meant to be used
// directly; its names may change without notice.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <spdlog/logger.h>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/socket_base.hpp>
#include <boost/asio/steady_timer.hpp>

#include "closewise/core.hpp"
#include "closewise/log.hpp"
#include "closewise/probe.hpp"
#include "closewise/report.hpp"

namespace closewise {

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
  error_code pending_socket_error;  // read_ahead::error: what the next read or write completes with
  std::string preloaded;            // read_ahead::bytes: input read from the socket before the stream had it
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
  // Unread bytes in the socket's receive queue (a FIN or an error is not input).
  bool input_waiting() noexcept {
    int n = 0;
    return fd() >= 0 && ::ioctl(fd(), FIONREAD, &n) == 0 && n > 0;
  }

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
      probe_fields fields = opts.probe_final_state ? probe_fields{probe_state} : probe_fields{};
      if (core.read() != read_state::peer_fin && core.read() != read_state::reset) fields |= probe_unread;
      if (todo.has(action::send_rst)) fields |= probe_unacked;
      if (!fields.empty()) last = probe(fd(), fields);
      if (todo.has(action::send_rst)) {
        // An explicit close after linger {1,0}: Asio's destructor would turn
        // the linger off and send a FIN instead (docs/design.md, 'Abortive
        // close needs an explicit close').
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
  // next read, which is not a FIN (docs/design.md, 'Kernel experiments', row 8).
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
      const auto now = clock::now();
      if (now < w.deadline) return impl.arm_watch(std::move(self), reading);
      if (reading && impl.input_waiting()) {
        // Bytes arrived before we acted on the timeout (a busy thread runs
        // the timer late): the peer was not idle, and the read's completion,
        // queued or about to be, carries them. Timing out now would close
        // on a request that is already here.
        const auto limit = w.kind == timeout_kind::idle ? impl.opts.idle_timeout : impl.opts.read_timeout;
        w.deadline = now + limit;
        return impl.arm_watch(std::move(self), reading);
      }
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

}  // namespace closewise
