#include "closewise/core.hpp"

#include <array>

namespace closewise {

namespace {

template <typename Enum, std::size_t N>
std::string_view name_of(Enum e, const std::array<std::string_view, N>& names) noexcept {
  const auto i = static_cast<std::size_t>(e);
  return i < N ? names[i] : std::string_view{"?"};
}

}  // namespace

std::string_view to_string(read_state s) noexcept {
  static constexpr std::array<std::string_view, 4> names{"open", "peer_fin", "reset", "shut"};
  return name_of(s, names);
}
std::string_view to_string(write_state s) noexcept {
  static constexpr std::array<std::string_view, 5> names{"open", "flushing", "fin_sent", "broken", "reset_sent"};
  return name_of(s, names);
}
std::string_view to_string(phase p) noexcept {
  static constexpr std::array<std::string_view, 6> names{
      "established", "remote_half_closed", "local_half_closed", "lingering", "closed", "reset"};
  return name_of(p, names);
}
std::string_view to_string(close_policy p) noexcept {
  static constexpr std::array<std::string_view, 4> names{"graceful", "fin_close", "abortive", "rst_if_safe"};
  return name_of(p, names);
}
std::string_view to_string(close_cause c) noexcept {
  static constexpr std::array<std::string_view, 13> names{"none",
                                                          "peer_fin_then_ours",
                                                          "ours_then_peer_fin",
                                                          "local_fin_close",
                                                          "peer_reset_idle",
                                                          "peer_reset_mid_exchange",
                                                          "local_abort",
                                                          "safe_reset",
                                                          "linger_timeout",
                                                          "linger_limit",
                                                          "broken_pipe",
                                                          "local_error",
                                                          "server_drain"};
  return name_of(c, names);
}
std::string_view to_string(side s) noexcept {
  static constexpr std::array<std::string_view, 3> names{"none", "local", "peer"};
  return name_of(s, names);
}
std::string_view to_string(io_error e) noexcept {
  static constexpr std::array<std::string_view, 7> names{"none",    "eof",       "reset", "broken_pipe",
                                                         "aborted", "timed_out", "other"};
  return name_of(e, names);
}
std::string_view to_string(reset_refusal r) noexcept {
  static constexpr std::array<std::string_view, 5> names{"none", "exchange_incomplete", "writes_pending",
                                                         "unacked_output", "unread_input"};
  return name_of(r, names);
}
std::string_view to_string(drain_end d) noexcept {
  static constexpr std::array<std::string_view, 6> names{"none",       "peer_fin", "timeout",
                                                         "byte_limit", "error",    "aborted"};
  return name_of(d, names);
}
std::string_view to_string(event::kind k) noexcept {
  static constexpr std::array<std::string_view, 13> names{
      "bytes_read",     "eof",   "read_error",     "write_started",     "write_done",  "write_error",
      "shutdown_write", "close", "linger_timeout", "exchange_complete", "local_error", "exchange_open",
      "server_drain"};
  return name_of(k, names);
}

bool parse(std::string_view text, close_policy& out) noexcept {
  for (auto p : {close_policy::graceful, close_policy::fin_close, close_policy::abortive, close_policy::rst_if_safe}) {
    if (to_string(p) == text) {
      out = p;
      return true;
    }
  }
  return false;
}

std::string to_string(actions a) {
  static constexpr std::array<std::pair<action, std::string_view>, 6> names{{
      {action::notify_peer_fin, "notify_peer_fin"},
      {action::send_fin, "send_fin"},
      {action::start_drain, "start_drain"},
      {action::send_rst, "send_rst"},
      {action::close, "close"},
      {action::finished, "finished"},
  }};
  std::string out;
  for (const auto& [bit, name] : names) {
    if (a.has(bit)) {
      if (!out.empty()) out += '|';
      out += name;
    }
  }
  return out.empty() ? std::string{"none"} : out;
}

phase connection_state::current_phase() const noexcept {
  if (write_ == write_state::reset_sent || write_ == write_state::broken || read_ == read_state::reset)
    return phase::reset;
  if (finished_) return phase::closed;
  if (draining_) return phase::lingering;
  const bool fin_in = read_ == read_state::peer_fin;
  const bool fin_out = write_ == write_state::fin_sent;
  if (fin_in && fin_out) return phase::closed;
  if (fin_in) return phase::remote_half_closed;
  if (fin_out) return phase::local_half_closed;
  return phase::established;
}

bool connection_state::mid_exchange() const noexcept {
  return !exchange_complete_ && (unanswered_input_ || exchange_open_ || writes_in_flight_ > 0);
}

side connection_state::time_wait_holder() const noexcept {
  if (!finished_ || rst_sent() || rst_received() || write_ == write_state::broken) return side::none;
  return first_fin_;
}

actions connection_state::finish(close_cause c) noexcept {
  // A drain that ends without a peer FIN, a timeout, a byte limit or an abort
  // was cut short by an error; drain_end::none would claim there was no drain.
  if (draining_ && drain_end_ == drain_end::none) drain_end_ = drain_end::error;
  finished_ = true;
  closing_ = true;
  draining_ = false;
  // A drain that ended in an orderly exchange of FINs: the drain is why.
  if (drain_requested_ && (c == close_cause::ours_then_peer_fin || c == close_cause::peer_fin_then_ours))
    c = close_cause::server_drain;
  cause_ = c;
  if (read_ == read_state::open) read_ = read_state::shut;
  return action::close | action::finished;
}

actions connection_state::finish_reset_sent(close_cause c, drain_end d) noexcept {
  if (draining_) drain_end_ = d;
  write_ = write_state::reset_sent;
  return action::send_rst | finish(c);
}

namespace {
close_cause both_fins_cause(side first) noexcept {
  return first == side::local ? close_cause::ours_then_peer_fin : close_cause::peer_fin_then_ours;
}
}  // namespace

// Our FIN goes out now. What follows depends on the teardown in progress:
// fin_close closes at once; any close, or a plain half-close, ends the
// connection once the peer's FIN is in too (both directions are done and
// nothing is left to flush, the Envoy rule).
actions connection_state::fin_now() noexcept {
  write_ = write_state::fin_sent;
  if (first_fin_ == side::none) first_fin_ = side::local;
  actions out = action::send_fin;
  if (read_ == read_state::peer_fin) return out | finish(both_fins_cause(first_fin_));
  if (closing_ && policy_ == close_policy::fin_close) return out | finish(close_cause::local_fin_close);
  return out;
}

step connection_state::on_peer_gone(io_error e, bool from_write) noexcept {
  switch (e) {
    case io_error::none:
      return reject("an error event needs an error");
    case io_error::aborted:
      return reject("a locally cancelled operation is not a connection event");
    case io_error::eof:
      if (from_write) return reject("a write cannot end with eof");
      return on(event::read_eof());
    default:
      break;
  }
  // Classify while the failed write still counts as in flight: output in
  // flight when the RST came is a mid-exchange reset.
  const close_cause c = classify(e, *this);
  if (from_write) --writes_in_flight_;
  if (e == io_error::reset) read_ = read_state::reset;
  write_ = write_state::broken;
  return {true, {}, finish(c)};
}

step connection_state::on_close(const event& e) noexcept {
  if (e.policy == close_policy::abortive) {
    // Allowed even while another close is in progress: an abort overrides a
    // graceful close that takes too long (the Envoy AbortReset escape hatch).
    if (!closing_) policy_ = close_policy::abortive;
    closing_ = true;
    return {true, {}, finish_reset_sent(close_cause::local_abort, drain_end::aborted)};
  }
  if (closing_) return reject("a close is already in progress");
  closing_ = true;
  policy_ = e.policy;
  limits_ = e.limits;

  if (e.policy == close_policy::rst_if_safe) {
    if (!exchange_complete_)
      refusal_ = reset_refusal::exchange_incomplete;
    else if (writes_in_flight_ > 0)
      refusal_ = reset_refusal::writes_pending;
    else if (!e.probe.valid || e.probe.unacked > 0)
      refusal_ = reset_refusal::unacked_output;
    else if (e.probe.unread > 0)
      refusal_ = reset_refusal::unread_input;
    if (refusal_ == reset_refusal::none) {
      return {true, {}, finish_reset_sent(close_cause::safe_reset, drain_end::none)};
    }
    // Fall through to graceful: the report keeps the policy and the refusal.
  }

  actions out;
  const bool drain = e.policy != close_policy::fin_close && read_ == read_state::open;
  if (drain) {
    draining_ = true;
    out |= action::start_drain;
  }
  switch (write_) {
    case write_state::open:
      if (writes_in_flight_ > 0) {
        write_ = write_state::flushing;
        return {true, {}, out};
      }
      return {true, {}, out | fin_now()};
    case write_state::flushing:
      return {true, {}, out};
    case write_state::fin_sent:
      if (e.policy == close_policy::fin_close) return {true, {}, finish(close_cause::local_fin_close)};
      if (!drain) return {true, {}, finish(both_fins_cause(first_fin_))};
      return {true, {}, out};
    case write_state::broken:
    case write_state::reset_sent:
      break;
  }
  return {true, {}, finish(close_cause::local_error)};  // unreachable: broken states are finished
}

step connection_state::on(const event& e) noexcept {
  if (finished_) return reject("the connection is finished");
  using k = event::kind;
  switch (e.what) {
    case k::bytes_read:
      if (read_ == read_state::peer_fin) return reject("bytes cannot follow the peer's FIN");
      if (read_ != read_state::open) return reject("the read side is not open");
      if (closing_) {
        discarded_ += e.bytes;
        if (discarded_ > limits_.max_discard_bytes)
          return {true, {}, finish_reset_sent(close_cause::linger_limit, drain_end::byte_limit)};
        return {};
      }
      delivered_ += e.bytes;
      if (e.bytes > 0) {
        unanswered_input_ = true;
        exchange_complete_ = false;
      }
      return {};

    case k::eof: {
      if (read_ == read_state::reset) return {};     // Linux: reads after ECONNRESET return 0; not a FIN
      if (read_ == read_state::peer_fin) return {};  // reading again after EOF: nothing new
      if (read_ != read_state::open) return reject("the read side is not open");
      read_ = read_state::peer_fin;
      if (first_fin_ == side::none) first_fin_ = side::peer;
      actions out;
      if (draining_) {
        drain_end_ = drain_end::peer_fin;
        draining_ = false;
      } else if (!closing_ && !peer_fin_notified_) {
        peer_fin_notified_ = true;
        out |= action::notify_peer_fin;
      }
      // Both FINs crossed and nothing left to flush: the connection is done.
      if (write_ == write_state::fin_sent) out |= finish(both_fins_cause(first_fin_));
      return {true, {}, out};
    }

    case k::read_error:
      return on_peer_gone(e.error, false);

    case k::write_started:
      switch (write_) {
        case write_state::open:
        case write_state::flushing:  // a composed write continuing after shutdown was asked
          ++writes_in_flight_;
          exchange_complete_ = false;
          return {};
        case write_state::fin_sent:
          return reject("write after our FIN (EPIPE)");
        default:
          return reject("the write side is broken");
      }

    case k::write_done: {
      if (writes_in_flight_ == 0) return reject("no write in flight");
      --writes_in_flight_;
      sent_ += e.bytes;
      if (writes_in_flight_ > 0) return {};
      unanswered_input_ = false;
      if (write_ == write_state::flushing) return {true, {}, fin_now()};
      return {};
    }

    case k::write_error:
      // on_peer_gone retires the write only once the error is known to be legal.
      if (writes_in_flight_ == 0) return reject("no write in flight");
      return on_peer_gone(e.error, true);

    case k::shutdown_write:
      switch (write_) {
        case write_state::open:
          if (writes_in_flight_ > 0) {
            write_ = write_state::flushing;
            return {};
          }
          return {true, {}, fin_now()};
        case write_state::flushing:
        case write_state::fin_sent:
          return {};  // FIN is raised exactly once
        default:
          return reject("the write side is broken");
      }

    case k::close:
      return on_close(e);

    case k::linger_timeout:
      if (!closing_) return reject("no teardown timer is running");
      return {true, {}, finish_reset_sent(close_cause::linger_timeout, drain_end::timeout)};

    case k::exchange_complete:
      exchange_complete_ = true;
      unanswered_input_ = false;
      exchange_open_ = false;
      return {};

    case k::exchange_open:
      exchange_open_ = true;
      exchange_complete_ = false;
      return {};

    case k::server_drain:
      drain_requested_ = true;
      return {};

    case k::local_error:
      // A finished connection must always say why it ended.
      if (e.cause == close_cause::none) return reject("a local error needs a cause");
      return {true, {}, finish(e.cause)};
  }
  return reject("unknown event");
}

close_cause classify(io_error e, const connection_state& s) noexcept {
  switch (e) {
    case io_error::none:
    case io_error::aborted:
      return close_cause::none;
    case io_error::eof:
      if (s.read() == read_state::reset)
        return s.mid_exchange() ? close_cause::peer_reset_mid_exchange : close_cause::peer_reset_idle;
      // Whose FIN went first decides, not write(): once the peer's FIN has been
      // answered, write() is fin_sent although the peer went first.
      return s.first_fin() == side::local ? close_cause::ours_then_peer_fin : close_cause::peer_fin_then_ours;
    case io_error::reset:
      return s.mid_exchange() ? close_cause::peer_reset_mid_exchange : close_cause::peer_reset_idle;
    case io_error::broken_pipe:
      return close_cause::broken_pipe;
    case io_error::timed_out:
    case io_error::other:
      return close_cause::local_error;
  }
  return close_cause::local_error;
}

}  // namespace closewise

// The core depends on nothing but the standard library (docs/design.md,
// 'Layers'); the build says so if that ever changes.
#if defined(BOOST_CONFIG_HPP) || defined(SPDLOG_VERSION) || defined(FMT_VERSION)
#error "closewise's sans-I/O core must not include Boost, spdlog or fmt"
#endif
