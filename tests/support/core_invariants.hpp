#pragma once
// The promises of core.hpp as a checker that runs over a trace of steps.
//
// Shared by the property test (tests/unit/core_property_test.cpp), the
// libFuzzer target (fuzz/fuzz_core.cpp) and the replay of the fuzz corpus
// and regressions (tests/unit/fuzz_replay_test.cpp), so that all three judge
// a machine by exactly the same rules. Header-only and Asio-free: the fuzzer
// is built with clang and no other part of the test tree.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ostream>

#include "closewise/core.hpp"

namespace closewise::test {

// Everything a caller can observe about a machine.
struct snapshot {
  read_state read{};
  write_state write{};
  phase ph{};
  bool closing = false;
  bool finished = false;
  bool draining = false;
  close_policy policy{};
  std::uint64_t received = 0;
  std::uint64_t delivered = 0;
  std::uint64_t discarded = 0;
  std::uint64_t sent = 0;
  std::uint32_t in_flight = 0;
  bool mid_exchange = false;
  bool exchange_complete = false;
  side first_fin{};
  close_cause cause{};
  drain_end drain{};
  reset_refusal refusal{};
  bool rst_sent = false;
  bool rst_received = false;
  side time_wait{};

  friend bool operator==(const snapshot&, const snapshot&) = default;
};

// Templated so that a deliberately broken machine (a subclass that overrides
// `on`) is observed through the same accessors.
template <typename Machine>
snapshot observe(const Machine& s) {
  return {s.read(),
          s.write(),
          s.current_phase(),
          s.closing(),
          s.finished(),
          s.draining(),
          s.policy(),
          s.bytes_received(),
          s.bytes_delivered(),
          s.bytes_discarded(),
          s.bytes_sent(),
          s.writes_in_flight(),
          s.mid_exchange(),
          s.exchange_complete(),
          s.first_fin(),
          s.cause(),
          s.how_drain_ended(),
          s.refusal(),
          s.rst_sent(),
          s.rst_received(),
          s.time_wait_holder()};
}

inline std::string describe(const snapshot& s) {
  std::string out = "read=" + std::string{to_string(s.read)} + " write=" + std::string{to_string(s.write)} +
                    " phase=" + std::string{to_string(s.ph)} + " finished=" + std::to_string(s.finished) +
                    " draining=" + std::to_string(s.draining) + " in_flight=" + std::to_string(s.in_flight) +
                    " cause=" + std::string{to_string(s.cause)} + " first_fin=" + std::string{to_string(s.first_fin)};
  return out;
}

// GoogleTest prints snapshots with this (found by argument-dependent lookup).
inline void PrintTo(const snapshot& s, std::ostream* os) { *os << describe(s); }

inline std::string describe(const event& e) {
  std::string out{to_string(e.what)};
  out += "(bytes=" + std::to_string(e.bytes) + " error=" + std::string{to_string(e.error)};
  out += " policy=" + std::string{to_string(e.policy)} + " probe=" + (e.probe.valid ? "valid" : "invalid");
  out += "/" + std::to_string(e.probe.unread) + "/" + std::to_string(e.probe.unacked);
  out += " max_discard=" + std::to_string(e.limits.max_discard_bytes);
  out += " cause=" + std::string{to_string(e.cause)} + ")";
  return out;
}

// One step of a run: what went in, what came out, and the state either side.
struct trace_entry {
  event ev;
  snapshot before;
  step result;
  snapshot after;
};

inline std::string describe(const trace_entry& t) {
  return describe(t.ev) +
         (t.result.accepted ? " -> " + to_string(t.result.todo) : " -> rejected: " + std::string{t.result.reason}) +
         " | " + describe(t.after);
}

inline std::string format_trace(const std::vector<trace_entry>& trace) {
  std::string out;
  for (std::size_t i = 0; i < trace.size(); ++i) out += "  #" + std::to_string(i) + " " + describe(trace[i]) + "\n";
  return out;
}

// The promises of core.hpp, checked one step at a time over a whole run. It
// only looks at trace entries, so a hand-built trace can prove it flags a
// violation (see checker_self_test in core_property_test.cpp).
class invariant_checker {
 public:
  // Returns a description of the first broken promise, or nothing.
  std::optional<std::string> check(const trace_entry& t) {
    const snapshot& b = t.before;
    const snapshot& a = t.after;
    const actions todo = t.result.todo;

    if (b.finished && t.result.accepted) return "an event was accepted after finished";
    if (!t.result.accepted) {
      if (t.result.reason.empty()) return "a rejection without a reason";
      if (!todo.empty()) return "a rejection with actions";
      if (!(a == b)) return "a rejection changed the state";
    }

    if (todo.has(action::send_fin)) {
      if (++fins_ > 1) return "send_fin returned twice";
      if (a.in_flight != 0) return "send_fin while writes were in flight";
      if (a.write != write_state::fin_sent) return "send_fin without write() == fin_sent";
      if (a.first_fin == side::none) return "send_fin without recording who sent the first FIN";
    }
    if (todo.has(action::send_rst)) {
      if (b.finished) return "send_rst after finished";
      if (!a.finished || !a.rst_sent) return "send_rst without finishing with rst_sent()";
    }
    if (todo.has(action::notify_peer_fin)) {
      if (++notifies_ > 1) return "notify_peer_fin returned twice";
      if (reset_seen_ || a.rst_received || a.rst_sent) return "notify_peer_fin after a reset";
      if (a.read != read_state::peer_fin) return "notify_peer_fin without read() == peer_fin";
    }
    if (todo.has(action::finished) != (a.finished && !b.finished))
      return "the finished action does not match the transition to finished()";
    if (todo.has(action::finished) && ++finishes_ > 1) return "finished returned twice";

    if (t.result.accepted && t.ev.what == event::kind::bytes_read) bytes_read_ += t.ev.bytes;
    if (a.delivered + a.discarded != a.received) return "delivered + discarded != received";
    if (a.received != bytes_read_) return "bytes_received() is not the sum of the accepted bytes_read events";

    if (a.finished && a.cause == close_cause::none) return "finished with cause none";
    if (!a.finished && a.cause != close_cause::none) return "a cause before finished";
    if (a.finished && a.draining) return "still draining after finished";
    const bool any_reset = a.rst_sent || a.rst_received || a.write == write_state::broken;
    if ((a.ph == phase::reset) != any_reset) return "phase reset does not match rst_sent/rst_received/broken";
    if (a.finished && a.ph != phase::reset && a.ph != phase::closed) return "finished but phase not closed/reset";
    if (!a.finished && a.time_wait != side::none) return "a TIME_WAIT holder before the end";
    if (a.finished && any_reset && a.time_wait != side::none) return "a TIME_WAIT holder after a RST";
    if (a.finished && !any_reset && a.time_wait != a.first_fin) return "the TIME_WAIT holder is not the first FIN";
    if (b.first_fin != side::none && a.first_fin != b.first_fin) return "first_fin changed once set";
    if (b.closing && !a.closing) return "closing() went back to false";
    if (a.sent < b.sent) return "bytes_sent() went down";
    if (b.rst_received && !a.rst_received) return "a received reset was forgotten";

    reset_seen_ = reset_seen_ || a.rst_received || a.rst_sent;
    return std::nullopt;
  }

 private:
  int fins_ = 0;
  int notifies_ = 0;
  int finishes_ = 0;
  bool reset_seen_ = false;
  std::uint64_t bytes_read_ = 0;
};

inline std::optional<std::string> check_trace(const std::vector<trace_entry>& trace) {
  invariant_checker checker;
  for (std::size_t i = 0; i < trace.size(); ++i) {
    if (auto bad = checker.check(trace[i])) return "step " + std::to_string(i) + ": " + *bad;
  }
  return std::nullopt;
}

struct run_result {
  std::vector<trace_entry> trace;
  std::optional<std::string> failure;
};

// Feeds `events` to a fresh Machine, checking every step; stops at the first
// broken promise. Then replays the run on a second machine: the core is pure
// and deterministic, so the same events must give the same answers.
template <typename Machine>
run_result run_events(const std::vector<event>& events) {
  run_result out;
  Machine m;
  invariant_checker checker;
  for (std::size_t i = 0; i < events.size(); ++i) {
    const Machine before = m;
    trace_entry t{events[i], observe(m), {}, {}};
    t.result = m.on(t.ev);
    t.after = observe(m);
    out.trace.push_back(t);
    if (auto bad = checker.check(out.trace.back())) {
      out.failure = "step " + std::to_string(i) + ": " + *bad;
      return out;
    }
    // A peer-gone error that ends the connection must end it with the cause
    // classify() gives for the state it hit: the stream reports that cause to
    // the application, and the server counts it.
    const bool peer_gone = t.ev.what == event::kind::read_error || t.ev.what == event::kind::write_error;
    const bool classified = t.ev.error == io_error::reset || t.ev.error == io_error::broken_pipe ||
                            t.ev.error == io_error::timed_out || t.ev.error == io_error::other;
    if (peer_gone && classified && t.result.accepted && !t.before.finished && t.after.finished &&
        t.after.cause != classify(t.ev.error, before)) {
      out.failure = "step " + std::to_string(i) + ": the cause is not classify()'s for that error";
      return out;
    }
  }
  Machine replay;
  for (std::size_t i = 0; i < out.trace.size(); ++i) {
    const step r = replay.on(out.trace[i].ev);
    if (r.accepted != out.trace[i].result.accepted || !(r.todo == out.trace[i].result.todo) ||
        !(observe(replay) == out.trace[i].after)) {
      out.failure = "step " + std::to_string(i) + ": replay diverged";
      return out;
    }
  }
  return out;
}

}  // namespace closewise::test
