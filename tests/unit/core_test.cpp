// Unit tests of the sans-I/O core: every transition of connection_state, the
// teardown policies, classify() and time_wait_holder(). The expectations come
// from core.hpp and docs/design.md (the state machine, the policies), not
// from reading core.cpp: each row is what a user of the machine relies on.

#include "closewise/core.hpp"
#include "../support/core_invariants.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace closewise {

// Readable failure messages: gtest finds these by ADL.
void PrintTo(actions a, std::ostream* os) { *os << to_string(a); }
void PrintTo(read_state s, std::ostream* os) { *os << to_string(s); }
void PrintTo(write_state s, std::ostream* os) { *os << to_string(s); }
void PrintTo(phase p, std::ostream* os) { *os << to_string(p); }
void PrintTo(close_policy p, std::ostream* os) { *os << to_string(p); }
void PrintTo(close_cause c, std::ostream* os) { *os << to_string(c); }
void PrintTo(side s, std::ostream* os) { *os << to_string(s); }
void PrintTo(reset_refusal r, std::ostream* os) { *os << to_string(r); }
void PrintTo(drain_end d, std::ostream* os) { *os << to_string(d); }

namespace {

constexpr actions none{};

// snapshot / observe (tests/support/core_invariants.hpp): everything a caller can
// observe, so "a rejected event changes nothing" is one comparison.
using closewise::test::observe;
using closewise::test::snapshot;

// Feeds one event that the test expects to be accepted and returns its actions.
actions feed(connection_state& s, const event& e) {
  const step r = s.on(e);
  EXPECT_TRUE(r.accepted) << to_string(e.what) << " rejected: " << r.reason;
  return r.todo;
}

// Feeds an event that must be rejected: no actions, a reason, nothing changed.
void expect_rejected(connection_state& s, const event& e) {
  const snapshot before = observe(s);
  const step r = s.on(e);
  EXPECT_FALSE(r.accepted) << to_string(e.what);
  EXPECT_FALSE(r.reason.empty()) << to_string(e.what);
  EXPECT_EQ(r.todo, none) << to_string(e.what);
  EXPECT_EQ(observe(s), before) << to_string(e.what);
}

queue_probe empty_queues() { return {true, 0, 0}; }

// ---------------------------------------------------------------------------
// The start states. Each builder checks the path it takes, so a broken
// builder fails loudly instead of silently testing the wrong state.

connection_state established() { return {}; }

connection_state flushing() {  // FIN asked while a write is in flight
  connection_state s;
  EXPECT_EQ(feed(s, event::write_start(10)), none);
  EXPECT_EQ(feed(s, event::shutdown()), none);
  EXPECT_EQ(s.write(), write_state::flushing);
  return s;
}

connection_state fin_sent() {  // plain half-close, no close asked
  connection_state s;
  EXPECT_EQ(feed(s, event::shutdown()), action::send_fin);
  return s;
}

connection_state peer_fin() {
  connection_state s;
  EXPECT_EQ(feed(s, event::read_eof()), action::notify_peer_fin);
  return s;
}

connection_state draining() {  // graceful close with nothing to flush
  connection_state s;
  EXPECT_EQ(feed(s, event::close_with(close_policy::graceful)), action::send_fin | action::start_drain);
  return s;
}

connection_state graceful_flushing() {  // graceful close while a write is in flight
  connection_state s;
  EXPECT_EQ(feed(s, event::write_start(10)), none);
  EXPECT_EQ(feed(s, event::close_with(close_policy::graceful)), action::start_drain);
  return s;
}

connection_state fin_close_flushing() {  // fin_close while a write is in flight
  connection_state s;
  EXPECT_EQ(feed(s, event::write_start(10)), none);
  EXPECT_EQ(feed(s, event::close_with(close_policy::fin_close)), none);
  return s;
}

connection_state rst_if_safe_fallback() {  // rst_if_safe refused (exchange not complete): graceful drain
  connection_state s;
  EXPECT_EQ(feed(s, event::close_with(close_policy::rst_if_safe, empty_queues())),
            action::send_fin | action::start_drain);
  EXPECT_EQ(s.refusal(), reset_refusal::exchange_incomplete);
  return s;
}

connection_state finished_graceful() {
  connection_state s = draining();
  EXPECT_EQ(feed(s, event::read_eof()), action::close | action::finished);
  return s;
}

connection_state finished_fin_close() {
  connection_state s;
  EXPECT_EQ(feed(s, event::close_with(close_policy::fin_close)), action::send_fin | action::close | action::finished);
  return s;
}

connection_state finished_peer_reset() {
  connection_state s;
  EXPECT_EQ(feed(s, event::read_failed(io_error::reset)), action::close | action::finished);
  return s;
}

connection_state finished_abortive() {
  connection_state s;
  EXPECT_EQ(feed(s, event::close_with(close_policy::abortive)), action::send_rst | action::close | action::finished);
  return s;
}

connection_state finished_broken_pipe() {
  connection_state s;
  feed(s, event::write_start(5));
  EXPECT_EQ(feed(s, event::write_failed(io_error::broken_pipe)), action::close | action::finished);
  return s;
}

connection_state finished_local_error() {
  connection_state s;
  EXPECT_EQ(feed(s, event::failed_locally()), action::close | action::finished);
  return s;
}

struct named_state {
  std::string_view name;
  connection_state (*make)();
};

struct named_event {
  std::string_view name;
  event ev;
};

// One representative of every event kind (and of every close policy).
std::vector<named_event> all_events() {
  return {
      {"bytes_read", event::read(5)},
      {"eof", event::read_eof()},
      {"read_error(reset)", event::read_failed(io_error::reset)},
      {"write_started", event::write_start(7)},
      {"write_done", event::wrote(10)},
      {"write_error(broken_pipe)", event::write_failed(io_error::broken_pipe)},
      {"shutdown_write", event::shutdown()},
      {"close(graceful)", event::close_with(close_policy::graceful)},
      {"close(fin_close)", event::close_with(close_policy::fin_close)},
      {"close(abortive)", event::close_with(close_policy::abortive)},
      {"close(rst_if_safe)", event::close_with(close_policy::rst_if_safe, empty_queues())},
      {"linger_timeout", event::timer_fired()},
      {"exchange_complete", event::complete()},
      {"local_error", event::failed_locally()},
  };
}

// ---------------------------------------------------------------------------
// The transition table.

struct row {
  std::string_view state;
  std::string_view event;
  bool accepted;
  actions todo{};
  read_state read{};
  write_state write{};
  phase ph{};
  close_cause cause = close_cause::none;
};

row ok(std::string_view st, std::string_view ev, actions todo, read_state r, write_state w, phase p,
       close_cause c = close_cause::none) {
  return {st, ev, true, todo, r, w, p, c};
}
row no(std::string_view st, std::string_view ev) { return {st, ev, false}; }

using rs = read_state;
using ws = write_state;
using ph = phase;
using cc = close_cause;
using a = action;

const actions fin_close_done = a::send_fin | a::close | a::finished;
const actions closed_now = a::close | a::finished;
const actions rst_now = a::send_rst | a::close | a::finished;

std::vector<row> transition_table() {
  std::vector<row> t;
  // established: both halves open, nothing in flight.
  const char* st = "established";
  t.push_back(ok(st, "bytes_read", none, rs::open, ws::open, ph::established));
  t.push_back(ok(st, "eof", a::notify_peer_fin, rs::peer_fin, ws::open, ph::remote_half_closed));
  t.push_back(ok(st, "read_error(reset)", closed_now, rs::reset, ws::broken, ph::reset, cc::peer_reset_idle));
  t.push_back(ok(st, "write_started", none, rs::open, ws::open, ph::established));
  t.push_back(no(st, "write_done"));
  t.push_back(no(st, "write_error(broken_pipe)"));
  t.push_back(ok(st, "shutdown_write", a::send_fin, rs::open, ws::fin_sent, ph::local_half_closed));
  t.push_back(ok(st, "close(graceful)", a::send_fin | a::start_drain, rs::open, ws::fin_sent, ph::lingering));
  t.push_back(ok(st, "close(fin_close)", fin_close_done, rs::shut, ws::fin_sent, ph::closed, cc::local_fin_close));
  t.push_back(ok(st, "close(abortive)", rst_now, rs::shut, ws::reset_sent, ph::reset, cc::local_abort));
  t.push_back(ok(st, "close(rst_if_safe)", a::send_fin | a::start_drain, rs::open, ws::fin_sent, ph::lingering));
  t.push_back(no(st, "linger_timeout"));
  t.push_back(ok(st, "exchange_complete", none, rs::open, ws::open, ph::established));
  t.push_back(ok(st, "local_error", closed_now, rs::shut, ws::open, ph::closed, cc::local_error));

  // flushing: shutdown_write asked while a write is in flight; FIN waits for it.
  st = "flushing";
  t.push_back(ok(st, "bytes_read", none, rs::open, ws::flushing, ph::established));
  t.push_back(ok(st, "eof", a::notify_peer_fin, rs::peer_fin, ws::flushing, ph::remote_half_closed));
  t.push_back(ok(st, "read_error(reset)", closed_now, rs::reset, ws::broken, ph::reset, cc::peer_reset_mid_exchange));
  t.push_back(ok(st, "write_started", none, rs::open, ws::flushing, ph::established));
  t.push_back(ok(st, "write_done", a::send_fin, rs::open, ws::fin_sent, ph::local_half_closed));
  t.push_back(ok(st, "write_error(broken_pipe)", closed_now, rs::shut, ws::broken, ph::reset, cc::broken_pipe));
  t.push_back(ok(st, "shutdown_write", none, rs::open, ws::flushing, ph::established));
  t.push_back(ok(st, "close(graceful)", a::start_drain, rs::open, ws::flushing, ph::lingering));
  t.push_back(ok(st, "close(fin_close)", none, rs::open, ws::flushing, ph::established));
  t.push_back(ok(st, "close(abortive)", rst_now, rs::shut, ws::reset_sent, ph::reset, cc::local_abort));
  t.push_back(ok(st, "close(rst_if_safe)", a::start_drain, rs::open, ws::flushing, ph::lingering));
  t.push_back(no(st, "linger_timeout"));
  t.push_back(ok(st, "exchange_complete", none, rs::open, ws::flushing, ph::established));
  t.push_back(ok(st, "local_error", closed_now, rs::shut, ws::flushing, ph::closed, cc::local_error));

  // fin_sent: our FIN is out (FIN_WAIT), no close asked; the peer may still send.
  st = "fin_sent";
  t.push_back(ok(st, "bytes_read", none, rs::open, ws::fin_sent, ph::local_half_closed));
  t.push_back(
      ok(st, "eof", a::notify_peer_fin | closed_now, rs::peer_fin, ws::fin_sent, ph::closed, cc::ours_then_peer_fin));
  t.push_back(ok(st, "read_error(reset)", closed_now, rs::reset, ws::broken, ph::reset, cc::peer_reset_idle));
  t.push_back(no(st, "write_started"));  // EPIPE territory (docs/design.md, "the eight kernel experiments", row 5: a
                                         // write after our FIN)
  t.push_back(no(st, "write_done"));
  t.push_back(no(st, "write_error(broken_pipe)"));
  t.push_back(ok(st, "shutdown_write", none, rs::open, ws::fin_sent, ph::local_half_closed));
  t.push_back(ok(st, "close(graceful)", a::start_drain, rs::open, ws::fin_sent, ph::lingering));
  t.push_back(ok(st, "close(fin_close)", closed_now, rs::shut, ws::fin_sent, ph::closed, cc::local_fin_close));
  t.push_back(ok(st, "close(abortive)", rst_now, rs::shut, ws::reset_sent, ph::reset, cc::local_abort));
  t.push_back(ok(st, "close(rst_if_safe)", a::start_drain, rs::open, ws::fin_sent, ph::lingering));
  t.push_back(no(st, "linger_timeout"));
  t.push_back(ok(st, "exchange_complete", none, rs::open, ws::fin_sent, ph::local_half_closed));
  t.push_back(ok(st, "local_error", closed_now, rs::shut, ws::fin_sent, ph::closed, cc::local_error));

  // peer_fin: the peer half-closed (CLOSE_WAIT); we may still write.
  st = "peer_fin";
  t.push_back(no(st, "bytes_read"));
  t.push_back(ok(st, "eof", none, rs::peer_fin, ws::open, ph::remote_half_closed));  // re-read: nothing new
  t.push_back(ok(st, "read_error(reset)", closed_now, rs::reset, ws::broken, ph::reset, cc::peer_reset_idle));
  t.push_back(ok(st, "write_started", none, rs::peer_fin, ws::open, ph::remote_half_closed));
  t.push_back(no(st, "write_done"));
  t.push_back(no(st, "write_error(broken_pipe)"));
  t.push_back(ok(st, "shutdown_write", fin_close_done, rs::peer_fin, ws::fin_sent, ph::closed, cc::peer_fin_then_ours));
  t.push_back(
      ok(st, "close(graceful)", fin_close_done, rs::peer_fin, ws::fin_sent, ph::closed, cc::peer_fin_then_ours));
  t.push_back(
      ok(st, "close(fin_close)", fin_close_done, rs::peer_fin, ws::fin_sent, ph::closed, cc::peer_fin_then_ours));
  t.push_back(ok(st, "close(abortive)", rst_now, rs::peer_fin, ws::reset_sent, ph::reset, cc::local_abort));
  t.push_back(
      ok(st, "close(rst_if_safe)", fin_close_done, rs::peer_fin, ws::fin_sent, ph::closed, cc::peer_fin_then_ours));
  t.push_back(no(st, "linger_timeout"));
  t.push_back(ok(st, "exchange_complete", none, rs::peer_fin, ws::open, ph::remote_half_closed));
  t.push_back(ok(st, "local_error", closed_now, rs::peer_fin, ws::open, ph::closed, cc::local_error));

  // draining (and rst_if_safe's graceful fallback): FIN sent, discarding input until the peer's FIN.
  for (const char* dst : {"draining", "rst_if_safe_fallback"}) {
    t.push_back(ok(dst, "bytes_read", none, rs::open, ws::fin_sent, ph::lingering));
    t.push_back(ok(dst, "eof", closed_now, rs::peer_fin, ws::fin_sent, ph::closed, cc::ours_then_peer_fin));
    t.push_back(ok(dst, "read_error(reset)", closed_now, rs::reset, ws::broken, ph::reset, cc::peer_reset_idle));
    t.push_back(no(dst, "write_started"));
    t.push_back(no(dst, "write_done"));
    t.push_back(no(dst, "write_error(broken_pipe)"));
    t.push_back(ok(dst, "shutdown_write", none, rs::open, ws::fin_sent, ph::lingering));
    t.push_back(no(dst, "close(graceful)"));
    t.push_back(no(dst, "close(fin_close)"));
    t.push_back(ok(dst, "close(abortive)", rst_now, rs::shut, ws::reset_sent, ph::reset, cc::local_abort));
    t.push_back(no(dst, "close(rst_if_safe)"));
    t.push_back(ok(dst, "linger_timeout", rst_now, rs::shut, ws::reset_sent, ph::reset, cc::linger_timeout));
    t.push_back(ok(dst, "exchange_complete", none, rs::open, ws::fin_sent, ph::lingering));
    t.push_back(ok(dst, "local_error", closed_now, rs::shut, ws::fin_sent, ph::closed, cc::local_error));
  }

  // graceful_flushing: graceful close asked while a write is in flight: drain now, FIN after the write.
  st = "graceful_flushing";
  t.push_back(ok(st, "bytes_read", none, rs::open, ws::flushing, ph::lingering));
  t.push_back(ok(st, "eof", none, rs::peer_fin, ws::flushing, ph::remote_half_closed));
  t.push_back(ok(st, "read_error(reset)", closed_now, rs::reset, ws::broken, ph::reset, cc::peer_reset_mid_exchange));
  t.push_back(ok(st, "write_started", none, rs::open, ws::flushing, ph::lingering));
  t.push_back(ok(st, "write_done", a::send_fin, rs::open, ws::fin_sent, ph::lingering));
  t.push_back(ok(st, "write_error(broken_pipe)", closed_now, rs::shut, ws::broken, ph::reset, cc::broken_pipe));
  t.push_back(ok(st, "shutdown_write", none, rs::open, ws::flushing, ph::lingering));
  t.push_back(no(st, "close(graceful)"));
  t.push_back(no(st, "close(fin_close)"));
  t.push_back(ok(st, "close(abortive)", rst_now, rs::shut, ws::reset_sent, ph::reset, cc::local_abort));
  t.push_back(no(st, "close(rst_if_safe)"));
  t.push_back(ok(st, "linger_timeout", rst_now, rs::shut, ws::reset_sent, ph::reset, cc::linger_timeout));
  t.push_back(ok(st, "exchange_complete", none, rs::open, ws::flushing, ph::lingering));
  t.push_back(ok(st, "local_error", closed_now, rs::shut, ws::flushing, ph::closed, cc::local_error));

  // fin_close_flushing: fin_close asked while a write is in flight: FIN and close after the write.
  st = "fin_close_flushing";
  t.push_back(ok(st, "bytes_read", none, rs::open, ws::flushing, ph::established));
  t.push_back(ok(st, "eof", none, rs::peer_fin, ws::flushing, ph::remote_half_closed));  // closing: no notify
  t.push_back(ok(st, "read_error(reset)", closed_now, rs::reset, ws::broken, ph::reset, cc::peer_reset_mid_exchange));
  t.push_back(ok(st, "write_started", none, rs::open, ws::flushing, ph::established));
  t.push_back(ok(st, "write_done", fin_close_done, rs::shut, ws::fin_sent, ph::closed, cc::local_fin_close));
  t.push_back(ok(st, "write_error(broken_pipe)", closed_now, rs::shut, ws::broken, ph::reset, cc::broken_pipe));
  t.push_back(ok(st, "shutdown_write", none, rs::open, ws::flushing, ph::established));
  t.push_back(no(st, "close(graceful)"));
  t.push_back(no(st, "close(fin_close)"));
  t.push_back(ok(st, "close(abortive)", rst_now, rs::shut, ws::reset_sent, ph::reset, cc::local_abort));
  t.push_back(no(st, "close(rst_if_safe)"));
  t.push_back(ok(st, "linger_timeout", rst_now, rs::shut, ws::reset_sent, ph::reset, cc::linger_timeout));
  t.push_back(ok(st, "exchange_complete", none, rs::open, ws::flushing, ph::established));
  t.push_back(ok(st, "local_error", closed_now, rs::shut, ws::flushing, ph::closed, cc::local_error));
  return t;
}

const std::vector<named_state>& start_states() {
  static const std::vector<named_state> states{
      {"established", established},
      {"flushing", flushing},
      {"fin_sent", fin_sent},
      {"peer_fin", peer_fin},
      {"draining", draining},
      {"rst_if_safe_fallback", rst_if_safe_fallback},
      {"graceful_flushing", graceful_flushing},
      {"fin_close_flushing", fin_close_flushing},
  };
  return states;
}

const std::vector<named_state>& finished_states() {
  static const std::vector<named_state> states{
      {"finished_graceful", finished_graceful},       {"finished_fin_close", finished_fin_close},
      {"finished_peer_reset", finished_peer_reset},   {"finished_abortive", finished_abortive},
      {"finished_broken_pipe", finished_broken_pipe}, {"finished_local_error", finished_local_error},
  };
  return states;
}

TEST(transition_table, covers_every_event_in_every_live_state) {
  // A row missing from the table would silently leave a transition untested.
  const auto table = transition_table();
  for (const auto& st : start_states()) {
    for (const auto& ev : all_events()) {
      int matches = 0;
      for (const auto& r : table) matches += (r.state == st.name && r.event == ev.name) ? 1 : 0;
      EXPECT_EQ(matches, 1) << st.name << " x " << ev.name;
    }
  }
}

TEST(transition_table, every_transition_has_the_documented_outcome) {
  const auto events = all_events();
  for (const row& r : transition_table()) {
    const named_state* st = nullptr;
    for (const auto& s : start_states())
      if (s.name == r.state) st = &s;
    const named_event* ev = nullptr;
    for (const auto& e : events)
      if (e.name == r.event) ev = &e;
    ASSERT_NE(st, nullptr) << r.state;
    ASSERT_NE(ev, nullptr) << r.event;
    SCOPED_TRACE(std::string{r.state} + " --" + std::string{r.event} + "-->");

    connection_state s = st->make();
    const snapshot before = observe(s);
    ASSERT_FALSE(before.finished);
    const step result = s.on(ev->ev);
    const snapshot after = observe(s);
    if (!r.accepted) {
      EXPECT_FALSE(result.accepted);
      EXPECT_FALSE(result.reason.empty());
      EXPECT_EQ(result.todo, none);
      EXPECT_EQ(after, before);
      continue;
    }
    EXPECT_TRUE(result.accepted) << result.reason;
    EXPECT_TRUE(result.reason.empty());
    EXPECT_EQ(result.todo, r.todo);
    EXPECT_EQ(after.read, r.read);
    EXPECT_EQ(after.write, r.write);
    EXPECT_EQ(after.ph, r.ph);
    EXPECT_EQ(after.cause, r.cause);
    // The finished action is the report trigger: it must match the state flag exactly.
    EXPECT_EQ(after.finished, result.todo.has(action::finished));
    if (after.finished) {
      EXPECT_FALSE(after.draining);
    }
  }
}

TEST(transition_table, finished_rejects_every_event) {
  for (const auto& st : finished_states()) {
    for (const auto& ev : all_events()) {
      SCOPED_TRACE(std::string{st.name} + " x " + std::string{ev.name});
      connection_state s = st.make();
      ASSERT_TRUE(s.finished());
      expect_rejected(s, ev.ev);
    }
    // Variants the representative events do not cover.
    connection_state s = st.make();
    for (auto e : {io_error::eof, io_error::aborted, io_error::timed_out, io_error::other}) {
      expect_rejected(s, event::read_failed(e));
      expect_rejected(s, event::write_failed(e));
    }
    expect_rejected(s, event::read(0));
    expect_rejected(s, event::failed_locally(close_cause::server_drain));
  }
}

TEST(transition_table, finished_states_report_their_cause) {
  EXPECT_EQ(finished_graceful().cause(), close_cause::ours_then_peer_fin);
  EXPECT_EQ(finished_fin_close().cause(), close_cause::local_fin_close);
  EXPECT_EQ(finished_peer_reset().cause(), close_cause::peer_reset_idle);
  EXPECT_EQ(finished_abortive().cause(), close_cause::local_abort);
  EXPECT_EQ(finished_broken_pipe().cause(), close_cause::broken_pipe);
  EXPECT_EQ(finished_local_error().cause(), close_cause::local_error);
  EXPECT_EQ(finished_graceful().current_phase(), phase::closed);
  EXPECT_EQ(finished_fin_close().current_phase(), phase::closed);
  EXPECT_EQ(finished_peer_reset().current_phase(), phase::reset);
  EXPECT_EQ(finished_abortive().current_phase(), phase::reset);
  EXPECT_EQ(finished_broken_pipe().current_phase(), phase::reset);
}

// Events whose parameters make them illegal in any live state.
TEST(transition_table, malformed_events_are_rejected_without_effect) {
  for (const auto& st : start_states()) {
    SCOPED_TRACE(st.name);
    connection_state s = st.make();
    expect_rejected(s, event::read_failed(io_error::none));
    expect_rejected(s, event::read_failed(io_error::aborted));  // a local cancel is not a connection event
  }
  // Write errors with a write in flight: the illegal error must not consume the write either.
  for (auto make : {flushing, graceful_flushing, fin_close_flushing}) {
    connection_state s = make();
    ASSERT_EQ(s.writes_in_flight(), 1u);
    expect_rejected(s, event::write_failed(io_error::none));
    expect_rejected(s, event::write_failed(io_error::aborted));
    expect_rejected(s, event::write_failed(io_error::eof));
    EXPECT_EQ(s.writes_in_flight(), 1u);
    // The write is still accounted for: its completion raises the FIN.
    EXPECT_TRUE(feed(s, event::wrote(10)).has(action::send_fin));
  }
}

TEST(transition_table, local_error_without_a_cause_is_rejected) {
  // A finished connection must always say why it ended.
  for (const auto& st : start_states()) {
    SCOPED_TRACE(st.name);
    connection_state s = st.make();
    expect_rejected(s, event::failed_locally(close_cause::none));
  }
}

TEST(transition_table, local_error_reports_the_given_cause) {
  connection_state s;
  EXPECT_EQ(feed(s, event::failed_locally(close_cause::server_drain)), closed_now);
  EXPECT_EQ(s.cause(), close_cause::server_drain);
}

TEST(transition_table, read_error_eof_is_a_fin) {
  connection_state s;
  EXPECT_EQ(feed(s, event::read_failed(io_error::eof)), action::notify_peer_fin);
  EXPECT_EQ(s.read(), read_state::peer_fin);
  EXPECT_EQ(s.current_phase(), phase::remote_half_closed);
}

TEST(transition_table, other_read_errors_end_the_connection) {
  for (auto e : {io_error::timed_out, io_error::other}) {
    connection_state s;
    EXPECT_EQ(feed(s, event::read_failed(e)), closed_now);
    EXPECT_EQ(s.cause(), close_cause::local_error);
    EXPECT_TRUE(s.finished());
    EXPECT_FALSE(s.rst_received());  // not a RST from the peer
  }
}

// ---------------------------------------------------------------------------
// Invariants, on hand-written sequences.

TEST(invariants, send_fin_at_most_once) {
  connection_state s;
  EXPECT_EQ(feed(s, event::shutdown()), action::send_fin);
  EXPECT_EQ(feed(s, event::shutdown()), none);
  EXPECT_EQ(feed(s, event::close_with(close_policy::graceful)), action::start_drain);
  EXPECT_EQ(feed(s, event::read_eof()), closed_now);
}

TEST(invariants, send_fin_waits_for_every_write_in_flight) {
  connection_state s;
  feed(s, event::write_start(10));
  feed(s, event::write_start(20));
  EXPECT_EQ(feed(s, event::shutdown()), none);
  EXPECT_EQ(feed(s, event::wrote(10)), none);  // one write still in flight
  EXPECT_EQ(s.writes_in_flight(), 1u);
  EXPECT_EQ(s.write(), write_state::flushing);
  EXPECT_EQ(feed(s, event::wrote(20)), action::send_fin);
  EXPECT_EQ(s.writes_in_flight(), 0u);
  EXPECT_EQ(s.bytes_sent(), 30u);
}

TEST(invariants, notify_peer_fin_once_and_never_after_reset) {
  connection_state s;
  EXPECT_EQ(feed(s, event::read_eof()), action::notify_peer_fin);
  EXPECT_EQ(feed(s, event::read_eof()), none);
  EXPECT_EQ(feed(s, event::read_failed(io_error::eof)), none);

  connection_state r;
  EXPECT_EQ(feed(r, event::read_failed(io_error::reset)), closed_now);
  const step later = r.on(event::read_eof());
  EXPECT_FALSE(later.todo.has(action::notify_peer_fin));
}

TEST(invariants, byte_accounting_adds_up) {
  connection_state s;
  std::uint64_t fed = 0;
  for (std::uint64_t n : {100u, 0u, 7u}) {
    feed(s, event::read(n));
    fed += n;
  }
  feed(s, event::close_with(close_policy::graceful));
  for (std::uint64_t n : {50u, 3u}) {
    feed(s, event::read(n));
    fed += n;
  }
  EXPECT_EQ(s.bytes_delivered(), 107u);
  EXPECT_EQ(s.bytes_discarded(), 53u);
  EXPECT_EQ(s.bytes_received(), fed);
  EXPECT_EQ(s.bytes_delivered() + s.bytes_discarded(), s.bytes_received());
  // A rejected read does not count.
  feed(s, event::read_eof());
  expect_rejected(s, event::read(10));
  EXPECT_EQ(s.bytes_received(), fed);
}

TEST(invariants, no_send_rst_after_finished) {
  for (const auto& st : finished_states()) {
    connection_state s = st.make();
    for (auto p : {close_policy::abortive, close_policy::rst_if_safe})
      EXPECT_FALSE(s.on(event::close_with(p, empty_queues())).todo.has(action::send_rst)) << st.name;
    EXPECT_FALSE(s.on(event::timer_fired()).todo.has(action::send_rst)) << st.name;
  }
}

// ---------------------------------------------------------------------------
// Policies.

TEST(graceful, flushes_then_fins_then_drains_until_the_peer_fin) {
  connection_state s;
  feed(s, event::read(100));
  feed(s, event::write_start(200));
  // The response is still going out: drain starts, the FIN waits (never before queued writes).
  EXPECT_EQ(feed(s, event::close_with(close_policy::graceful)), action::start_drain);
  EXPECT_TRUE(s.draining());
  EXPECT_EQ(s.write(), write_state::flushing);
  EXPECT_EQ(feed(s, event::wrote(200)), action::send_fin);
  EXPECT_EQ(s.current_phase(), phase::lingering);
  EXPECT_EQ(feed(s, event::read(30)), none);  // discarded, not delivered
  EXPECT_EQ(feed(s, event::read_eof()), closed_now);
  EXPECT_EQ(s.cause(), close_cause::ours_then_peer_fin);
  EXPECT_EQ(s.how_drain_ended(), drain_end::peer_fin);
  EXPECT_EQ(s.first_fin(), side::local);
  EXPECT_EQ(s.time_wait_holder(), side::local);
  EXPECT_EQ(s.bytes_delivered(), 100u);
  EXPECT_EQ(s.bytes_discarded(), 30u);
  EXPECT_EQ(s.bytes_sent(), 200u);
  EXPECT_EQ(s.policy(), close_policy::graceful);
  EXPECT_FALSE(s.rst_sent());
}

TEST(graceful, linger_timeout_falls_back_to_rst) {
  connection_state s = draining();
  EXPECT_EQ(feed(s, event::timer_fired()), rst_now);
  EXPECT_EQ(s.cause(), close_cause::linger_timeout);
  EXPECT_EQ(s.how_drain_ended(), drain_end::timeout);
  EXPECT_TRUE(s.rst_sent());
  EXPECT_EQ(s.time_wait_holder(), side::none);
}

TEST(graceful, discard_budget_falls_back_to_rst) {
  connection_state s;
  EXPECT_EQ(feed(s, event::close_with(close_policy::graceful, {}, drain_limits{100})),
            action::send_fin | action::start_drain);
  EXPECT_EQ(feed(s, event::read(60)), none);
  EXPECT_EQ(feed(s, event::read(40)), none);  // exactly the budget is still fine
  EXPECT_EQ(feed(s, event::read(1)), rst_now);
  EXPECT_EQ(s.cause(), close_cause::linger_limit);
  EXPECT_EQ(s.how_drain_ended(), drain_end::byte_limit);
  EXPECT_EQ(s.bytes_discarded(), 101u);  // the bytes were read, so they count
  EXPECT_EQ(s.time_wait_holder(), side::none);
}

TEST(graceful, peer_reset_ends_the_drain_with_error) {
  connection_state s = draining();
  EXPECT_EQ(feed(s, event::read_failed(io_error::reset)), closed_now);
  EXPECT_EQ(s.how_drain_ended(), drain_end::error);
  EXPECT_EQ(s.cause(), close_cause::peer_reset_idle);
}

TEST(graceful, any_error_that_cuts_the_drain_short_is_reported) {
  // drain_end::none means "there was no drain": a drain cut short must not look like that.
  {
    connection_state s = draining();
    feed(s, event::read_failed(io_error::timed_out));
    EXPECT_EQ(s.how_drain_ended(), drain_end::error);
  }
  {
    connection_state s = graceful_flushing();
    feed(s, event::write_failed(io_error::broken_pipe));
    EXPECT_EQ(s.how_drain_ended(), drain_end::error);
  }
  {
    connection_state s = draining();
    feed(s, event::failed_locally());
    EXPECT_EQ(s.how_drain_ended(), drain_end::error);
  }
  {
    connection_state s = finished_fin_close();  // no drain at all
    EXPECT_EQ(s.how_drain_ended(), drain_end::none);
  }
}

TEST(graceful, after_peer_fin_answers_with_our_fin_and_closes) {
  connection_state s = peer_fin();
  feed(s, event::write_start(5));
  EXPECT_EQ(feed(s, event::close_with(close_policy::graceful)), none);  // nothing to drain, FIN after the write
  EXPECT_FALSE(s.draining());
  EXPECT_EQ(feed(s, event::wrote(5)), fin_close_done);
  EXPECT_EQ(s.cause(), close_cause::peer_fin_then_ours);
  EXPECT_EQ(s.time_wait_holder(), side::peer);
  EXPECT_EQ(s.how_drain_ended(), drain_end::none);
}

TEST(fin_close, fins_and_closes_at_once) {
  connection_state s;
  feed(s, event::read(10));
  EXPECT_EQ(feed(s, event::close_with(close_policy::fin_close)), fin_close_done);
  EXPECT_EQ(s.cause(), close_cause::local_fin_close);
  EXPECT_EQ(s.how_drain_ended(), drain_end::none);
  EXPECT_FALSE(s.draining());
  EXPECT_EQ(s.time_wait_holder(), side::local);
}

TEST(fin_close, waits_for_writes_in_flight) {
  connection_state s;
  feed(s, event::write_start(10));
  feed(s, event::write_start(10));
  EXPECT_EQ(feed(s, event::close_with(close_policy::fin_close)), none);
  EXPECT_FALSE(s.finished());
  EXPECT_EQ(feed(s, event::read(4)), none);  // nobody will read it: discarded
  EXPECT_EQ(s.bytes_discarded(), 4u);
  EXPECT_EQ(feed(s, event::wrote(10)), none);
  EXPECT_EQ(feed(s, event::wrote(10)), fin_close_done);
  EXPECT_EQ(s.cause(), close_cause::local_fin_close);
  EXPECT_EQ(s.bytes_sent(), 20u);
}

TEST(fin_close, after_a_plain_half_close_just_closes) {
  connection_state s = fin_sent();
  EXPECT_EQ(feed(s, event::close_with(close_policy::fin_close)), closed_now);  // FIN already out: never twice
  EXPECT_EQ(s.cause(), close_cause::local_fin_close);
}

TEST(abortive, resets_from_any_live_state) {
  for (const auto& st : start_states()) {
    SCOPED_TRACE(st.name);
    connection_state s = st.make();
    const bool was_draining = s.draining();
    EXPECT_EQ(feed(s, event::close_with(close_policy::abortive)), rst_now);
    EXPECT_EQ(s.cause(), close_cause::local_abort);
    EXPECT_TRUE(s.rst_sent());
    EXPECT_EQ(s.current_phase(), phase::reset);
    EXPECT_EQ(s.time_wait_holder(), side::none);
    EXPECT_EQ(s.how_drain_ended(), was_draining ? drain_end::aborted : drain_end::none);
  }
}

TEST(abortive, overrides_a_graceful_drain_and_keeps_the_asked_policy) {
  connection_state s = draining();
  feed(s, event::read(5));
  EXPECT_EQ(feed(s, event::close_with(close_policy::abortive)), rst_now);
  EXPECT_EQ(s.how_drain_ended(), drain_end::aborted);
  EXPECT_EQ(s.policy(), close_policy::graceful);  // the report keeps what was asked first
  EXPECT_EQ(s.bytes_discarded(), 5u);

  connection_state fresh;
  feed(fresh, event::close_with(close_policy::abortive));
  EXPECT_EQ(fresh.policy(), close_policy::abortive);
}

// A state where every rst_if_safe condition holds but the probe.
connection_state exchange_done() {
  connection_state s;
  feed(s, event::read(100));
  feed(s, event::write_start(300));
  feed(s, event::wrote(300));
  feed(s, event::complete());
  EXPECT_FALSE(s.mid_exchange());
  return s;
}

TEST(rst_if_safe, resets_when_nothing_can_be_lost) {
  connection_state s = exchange_done();
  EXPECT_EQ(feed(s, event::close_with(close_policy::rst_if_safe, empty_queues())), rst_now);
  EXPECT_EQ(s.cause(), close_cause::safe_reset);
  EXPECT_EQ(s.refusal(), reset_refusal::none);
  EXPECT_EQ(s.time_wait_holder(), side::none);
  EXPECT_EQ(s.policy(), close_policy::rst_if_safe);
  EXPECT_TRUE(s.rst_sent());
  EXPECT_EQ(s.how_drain_ended(), drain_end::none);
}

TEST(rst_if_safe, resets_after_our_half_close_too) {
  connection_state s = exchange_done();
  feed(s, event::shutdown());
  EXPECT_EQ(feed(s, event::close_with(close_policy::rst_if_safe, empty_queues())), rst_now);
  EXPECT_EQ(s.cause(), close_cause::safe_reset);
  EXPECT_EQ(s.time_wait_holder(), side::none);  // the RST, not our FIN, ended it
}

struct refusal_case {
  std::string_view name;
  connection_state (*make)();
  queue_probe probe;
  reset_refusal why;
  actions todo;  // the graceful fallback
};

TEST(rst_if_safe, each_refusal_falls_back_to_graceful_and_says_why) {
  const std::vector<refusal_case> cases{
      {"never marked complete", [] { return connection_state{}; }, empty_queues(), reset_refusal::exchange_incomplete,
       action::send_fin | action::start_drain},
      {"new input after complete",
       [] {
         connection_state s = exchange_done();
         feed(s, event::read(1));
         return s;
       },
       empty_queues(), reset_refusal::exchange_incomplete, action::send_fin | action::start_drain},
      {"write in flight",
       [] {
         connection_state s = exchange_done();
         feed(s, event::write_start(10));
         feed(s, event::complete());  // the application says complete, but a write is still in user space
         return s;
       },
       empty_queues(), reset_refusal::writes_pending, actions{action::start_drain}},
      {"SIOCOUTQ > 0", exchange_done, queue_probe{true, 0, 1}, reset_refusal::unacked_output,
       action::send_fin | action::start_drain},
      {"probe failed", exchange_done, queue_probe{false, 0, 0}, reset_refusal::unacked_output,
       action::send_fin | action::start_drain},
      {"SIOCINQ > 0", exchange_done, queue_probe{true, 1, 0}, reset_refusal::unread_input,
       action::send_fin | action::start_drain},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    connection_state s = c.make();
    EXPECT_EQ(feed(s, event::close_with(close_policy::rst_if_safe, c.probe)), c.todo);
    EXPECT_EQ(s.refusal(), c.why);
    EXPECT_FALSE(s.rst_sent());
    EXPECT_FALSE(s.finished());
    EXPECT_TRUE(s.draining());
    EXPECT_EQ(s.policy(), close_policy::rst_if_safe);
    // The fallback is a real graceful close: it ends with the peer's FIN.
    if (s.write() == write_state::flushing) {
      EXPECT_EQ(feed(s, event::wrote(10)), action::send_fin);
    }
    EXPECT_EQ(feed(s, event::read_eof()), closed_now);
    EXPECT_EQ(s.cause(), close_cause::ours_then_peer_fin);
    EXPECT_EQ(s.refusal(), c.why);  // still explained in the final state
    EXPECT_EQ(s.time_wait_holder(), side::local);
  }
}

TEST(rst_if_safe, fallback_honours_the_drain_limits) {
  connection_state s;
  feed(s, event::close_with(close_policy::rst_if_safe, empty_queues(), drain_limits{10}));
  EXPECT_EQ(feed(s, event::read(11)), rst_now);
  EXPECT_EQ(s.cause(), close_cause::linger_limit);
  EXPECT_EQ(s.refusal(), reset_refusal::exchange_incomplete);
}

TEST(rst_if_safe, after_peer_fin_refusal_still_closes_cleanly) {
  connection_state s = peer_fin();
  EXPECT_EQ(feed(s, event::close_with(close_policy::rst_if_safe, empty_queues())), fin_close_done);
  EXPECT_EQ(s.refusal(), reset_refusal::exchange_incomplete);
  EXPECT_EQ(s.cause(), close_cause::peer_fin_then_ours);
}

// ---------------------------------------------------------------------------
// classify().

TEST(classify, eof_is_a_fin_and_who_went_first_decides) {
  connection_state fresh;
  EXPECT_EQ(classify(io_error::eof, fresh), close_cause::peer_fin_then_ours);
  connection_state half = fin_sent();
  EXPECT_EQ(classify(io_error::eof, half), close_cause::ours_then_peer_fin);
  connection_state lingering = draining();
  EXPECT_EQ(classify(io_error::eof, lingering), close_cause::ours_then_peer_fin);
  // The peer's FIN went first and we answered: another 0-byte read must not flip the story.
  connection_state answered = peer_fin();
  feed(answered, event::shutdown());
  ASSERT_EQ(answered.cause(), close_cause::peer_fin_then_ours);
  EXPECT_EQ(classify(io_error::eof, answered), close_cause::peer_fin_then_ours);
}

TEST(classify, classify_agrees_with_the_machine_on_eof) {
  for (auto make : {established, fin_sent, draining, flushing}) {
    connection_state s = make();
    const close_cause predicted = classify(io_error::eof, s);
    feed(s, event::read_eof());
    if (s.write() == write_state::flushing) feed(s, event::wrote(10));
    if (!s.finished()) feed(s, event::shutdown());
    ASSERT_TRUE(s.finished());
    EXPECT_EQ(s.cause(), predicted);
  }
}

TEST(classify, reset_idle_vs_mid_exchange) {
  connection_state idle;
  EXPECT_EQ(classify(io_error::reset, idle), close_cause::peer_reset_idle);

  connection_state unanswered;
  feed(unanswered, event::read(10));
  EXPECT_EQ(classify(io_error::reset, unanswered), close_cause::peer_reset_mid_exchange);

  connection_state writing;
  feed(writing, event::write_start(10));
  EXPECT_EQ(classify(io_error::reset, writing), close_cause::peer_reset_mid_exchange);

  connection_state answered;
  feed(answered, event::read(10));
  feed(answered, event::write_start(10));
  feed(answered, event::wrote(10));
  EXPECT_EQ(classify(io_error::reset, answered), close_cause::peer_reset_idle);

  connection_state marked;
  feed(marked, event::read(10));
  feed(marked, event::complete());
  EXPECT_EQ(classify(io_error::reset, marked), close_cause::peer_reset_idle);

  connection_state empty_read;  // a 0-byte bytes_read is no request
  feed(empty_read, event::read(0));
  EXPECT_EQ(classify(io_error::reset, empty_read), close_cause::peer_reset_idle);
}

TEST(classify, the_machine_uses_classify_for_peer_resets) {
  connection_state s;
  feed(s, event::read(10));
  EXPECT_EQ(feed(s, event::read_failed(io_error::reset)), closed_now);
  EXPECT_EQ(s.cause(), close_cause::peer_reset_mid_exchange);
  EXPECT_TRUE(s.rst_received());
}

TEST(classify, a_write_reset_while_the_write_is_in_flight_is_mid_exchange) {
  // A client sending its request: output is in flight when the RST comes back.
  connection_state s;
  feed(s, event::write_start(50));
  EXPECT_EQ(feed(s, event::write_failed(io_error::reset)), closed_now);
  EXPECT_EQ(s.cause(), close_cause::peer_reset_mid_exchange);
  EXPECT_TRUE(s.rst_received());
  EXPECT_EQ(s.writes_in_flight(), 0u);
}

TEST(classify, broken_pipe_aborted_and_others) {
  connection_state s;
  EXPECT_EQ(classify(io_error::broken_pipe, s), close_cause::broken_pipe);
  EXPECT_EQ(classify(io_error::aborted, s), close_cause::none);
  EXPECT_EQ(classify(io_error::none, s), close_cause::none);
  EXPECT_EQ(classify(io_error::timed_out, s), close_cause::local_error);
  EXPECT_EQ(classify(io_error::other, s), close_cause::local_error);
}

TEST(classify, zero_byte_read_after_reset_stays_a_reset) {
  // docs/design.md, "the eight kernel experiments", row 8: Linux delivers queued bytes,
  // then ECONNRESET once, then reads return 0.
  connection_state s;
  feed(s, event::read(20));  // the queued bytes
  EXPECT_EQ(feed(s, event::read_failed(io_error::reset)), closed_now);
  const step later = s.on(event::read_eof());
  EXPECT_FALSE(later.todo.has(action::notify_peer_fin));
  EXPECT_TRUE(later.todo.empty());
  EXPECT_EQ(s.read(), read_state::reset);
  EXPECT_EQ(s.first_fin(), side::none);
  EXPECT_EQ(s.cause(), close_cause::peer_reset_mid_exchange);
  EXPECT_EQ(classify(io_error::eof, s), close_cause::peer_reset_mid_exchange);

  connection_state idle = finished_peer_reset();
  EXPECT_EQ(classify(io_error::eof, idle), close_cause::peer_reset_idle);
}

// ---------------------------------------------------------------------------
// time_wait_holder().

TEST(time_wait, first_fin_keeps_time_wait) {
  connection_state ours = fin_sent();
  EXPECT_EQ(ours.time_wait_holder(), side::none);  // not over yet
  feed(ours, event::read_eof());
  EXPECT_EQ(ours.time_wait_holder(), side::local);

  connection_state theirs = peer_fin();
  feed(theirs, event::shutdown());
  EXPECT_EQ(theirs.time_wait_holder(), side::peer);

  connection_state flushed = flushing();  // our FIN asked first but the peer's went out first
  feed(flushed, event::read_eof());
  feed(flushed, event::wrote(10));
  EXPECT_TRUE(flushed.finished());
  EXPECT_EQ(flushed.first_fin(), side::peer);
  EXPECT_EQ(flushed.time_wait_holder(), side::peer);
  EXPECT_EQ(flushed.cause(), close_cause::peer_fin_then_ours);
}

TEST(time_wait, nobody_after_any_rst) {
  {
    connection_state s = fin_sent();               // our FIN went first...
    feed(s, event::read_failed(io_error::reset));  // ...but the peer reset
    EXPECT_EQ(s.time_wait_holder(), side::none);
  }
  {
    connection_state s = peer_fin();
    feed(s, event::close_with(close_policy::abortive));
    EXPECT_EQ(s.time_wait_holder(), side::none);
  }
  {
    connection_state s = draining();
    feed(s, event::timer_fired());
    EXPECT_EQ(s.time_wait_holder(), side::none);
  }
  {
    connection_state s = exchange_done();
    feed(s, event::close_with(close_policy::rst_if_safe, empty_queues()));
    EXPECT_EQ(s.time_wait_holder(), side::none);
  }
  EXPECT_EQ(finished_broken_pipe().time_wait_holder(), side::none);
}

// ---------------------------------------------------------------------------
// Vocabulary.

TEST(vocabulary, actions_print_in_execution_order) {
  EXPECT_EQ(to_string(actions{}), "none");
  EXPECT_EQ(to_string(action::close | action::send_fin | action::finished), "send_fin|close|finished");
  EXPECT_EQ(to_string(rst_now), "send_rst|close|finished");
}

TEST(vocabulary, policies_round_trip) {
  for (auto p : {close_policy::graceful, close_policy::fin_close, close_policy::abortive, close_policy::rst_if_safe}) {
    close_policy out = p == close_policy::graceful ? close_policy::abortive : close_policy::graceful;
    EXPECT_TRUE(parse(to_string(p), out));
    EXPECT_EQ(out, p);
  }
  close_policy untouched = close_policy::fin_close;
  EXPECT_FALSE(parse("graceful ", untouched));
  EXPECT_FALSE(parse("", untouched));
  EXPECT_EQ(untouched, close_policy::fin_close);
}

// ---------------------------------------------------------------------------
// A server's drain and an exchange the application holds open: facts the
// machine records, so that the cause and "is it idle" are decided here.

TEST(server_drain, our_fin_then_the_peers_during_a_drain_is_server_drain) {
  connection_state s;
  ASSERT_TRUE(s.on(event::drain()).accepted);
  EXPECT_TRUE(s.drain_requested());
  EXPECT_TRUE(s.on(event::close_with(close_policy::graceful)).todo.has(action::send_fin));
  EXPECT_TRUE(s.on(event::read_eof()).todo.has(action::finished));
  EXPECT_EQ(s.cause(), close_cause::server_drain);
  EXPECT_EQ(s.first_fin(), side::local);
  EXPECT_EQ(s.time_wait_holder(), side::local);
}

TEST(server_drain, the_peers_fin_first_during_a_drain_is_server_drain) {
  connection_state s;
  ASSERT_TRUE(s.on(event::read_eof()).accepted);
  ASSERT_TRUE(s.on(event::drain()).accepted);
  EXPECT_TRUE(s.on(event::close_with(close_policy::graceful)).todo.has(action::finished));
  EXPECT_EQ(s.cause(), close_cause::server_drain);
  EXPECT_EQ(s.first_fin(), side::peer);
}

TEST(server_drain, a_reset_or_a_timeout_during_a_drain_keeps_its_own_cause) {
  connection_state reset;
  reset.on(event::drain());
  reset.on(event::close_with(close_policy::graceful));
  reset.on(event::read_failed(io_error::reset));
  EXPECT_EQ(reset.cause(), close_cause::peer_reset_idle);
  connection_state timeout;
  timeout.on(event::drain());
  timeout.on(event::close_with(close_policy::graceful));
  timeout.on(event::timer_fired());
  EXPECT_EQ(timeout.cause(), close_cause::linger_timeout);
  connection_state abort;
  abort.on(event::drain());
  abort.on(event::close_with(close_policy::abortive));
  EXPECT_EQ(abort.cause(), close_cause::local_abort);
}

TEST(server_drain, without_a_drain_the_same_close_is_ours_then_peer_fin) {
  connection_state s;
  s.on(event::close_with(close_policy::graceful));
  s.on(event::read_eof());
  EXPECT_FALSE(s.drain_requested());
  EXPECT_EQ(s.cause(), close_cause::ours_then_peer_fin);
}

TEST(server_drain, a_finished_connection_rejects_it) {
  connection_state s;
  s.on(event::close_with(close_policy::abortive));
  ASSERT_TRUE(s.finished());
  expect_rejected(s, event::drain());
  expect_rejected(s, event::open_exchange());
  EXPECT_EQ(s.cause(), close_cause::local_abort);
}

TEST(exchange_open, holds_the_exchange_open_until_marked_complete) {
  connection_state s;
  s.on(event::read(10));
  s.on(event::write_start(25));
  s.on(event::wrote(25));  // an interim answer (HTTP 100 Continue) answered the input
  EXPECT_FALSE(s.mid_exchange());
  ASSERT_TRUE(s.on(event::open_exchange()).accepted);
  EXPECT_TRUE(s.mid_exchange());
  s.on(event::write_start(5));
  s.on(event::wrote(5));  // a write's completion does not close an exchange held open
  EXPECT_TRUE(s.mid_exchange());
  s.on(event::complete());
  EXPECT_FALSE(s.mid_exchange());
  EXPECT_TRUE(s.exchange_complete());
}

TEST(vocabulary, every_enum_value_has_a_name) {
  for (std::uint8_t i = 0; i <= static_cast<std::uint8_t>(close_cause::server_drain); ++i)
    EXPECT_NE(to_string(static_cast<close_cause>(i)), "?") << int{i};
  for (std::uint8_t i = 0; i <= static_cast<std::uint8_t>(event::kind::server_drain); ++i)
    EXPECT_NE(to_string(static_cast<event::kind>(i)), "?") << int{i};
  EXPECT_EQ(to_string(static_cast<close_cause>(200)), "?");
}

}  // namespace
}  // namespace closewise
