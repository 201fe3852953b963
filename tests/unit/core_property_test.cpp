// Property test of the sans-I/O core: random event sequences, with every
// promise of core.hpp checked after every step. The checker is also run
// against deliberately broken machines to prove the harness can fail.
//
// Reproduce a failure with CLOSEWISE_PROPERTY_SEED=<seed printed in the failure>.

#include "closewise/core.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace closewise {
namespace {

constexpr std::uint64_t default_seed = 0xC105E5EEDull;
constexpr int sequence_count = 20'000;
constexpr int max_sequence_length = 40;

std::uint64_t base_seed() {
  // An override lets a failure printed by CI be replayed locally.
  if (const char* env = std::getenv("CLOSEWISE_PROPERTY_SEED"); env != nullptr && *env != '\0')
    return std::strtoull(env, nullptr, 0);
  return default_seed;
}

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

template <typename Machine>
snapshot observe(const Machine& s) {
  return {s.read(),           s.write(),           s.current_phase(),   s.closing(),        s.finished(),
          s.draining(),       s.policy(),          s.bytes_received(),  s.bytes_delivered(), s.bytes_discarded(),
          s.bytes_sent(),     s.writes_in_flight(), s.mid_exchange(),   s.exchange_complete(), s.first_fin(),
          s.cause(),          s.how_drain_ended(), s.refusal(),         s.rst_sent(),       s.rst_received(),
          s.time_wait_holder()};
}

std::string describe(const snapshot& s) {
  std::string out = "read=" + std::string{to_string(s.read)} + " write=" + std::string{to_string(s.write)} +
                    " phase=" + std::string{to_string(s.ph)} + " finished=" + std::to_string(s.finished) +
                    " draining=" + std::to_string(s.draining) + " in_flight=" + std::to_string(s.in_flight) +
                    " cause=" + std::string{to_string(s.cause)} + " first_fin=" + std::string{to_string(s.first_fin)};
  return out;
}

std::string describe(const event& e) {
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

std::string describe(const trace_entry& t) {
  return describe(t.ev) + (t.result.accepted ? " -> " + to_string(t.result.todo)
                                             : " -> rejected: " + std::string{t.result.reason}) +
         " | " + describe(t.after);
}

// The promises of core.hpp, checked one step at a time over a whole run. It
// only looks at trace entries, so a hand-built trace can prove it flags a
// violation (see checker_self_test below).
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

std::optional<std::string> check_trace(const std::vector<trace_entry>& trace) {
  invariant_checker checker;
  for (std::size_t i = 0; i < trace.size(); ++i) {
    if (auto bad = checker.check(trace[i])) return "step " + std::to_string(i) + ": " + *bad;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------
// Random events: every kind, with every field random (a kind must ignore the
// fields it does not use), weighted towards the traffic of a real connection.

event random_event(std::mt19937& rng) {
  using k = event::kind;
  static constexpr std::array<k, 11> kinds{k::bytes_read,     k::eof,   k::read_error,     k::write_started,
                                           k::write_done,     k::write_error, k::shutdown_write, k::close,
                                           k::linger_timeout, k::exchange_complete, k::local_error};
  std::discrete_distribution<int> kind_of{4, 1, 1, 4, 4, 1, 1, 2, 1, 2, 1};
  auto pick = [&](int n) { return std::uniform_int_distribution<int>{0, n - 1}(rng); };

  event e{};
  e.what = kinds[static_cast<std::size_t>(kind_of(rng))];
  switch (pick(4)) {
    case 0: e.bytes = 0; break;
    case 1: e.bytes = 1; break;
    case 2: e.bytes = std::uniform_int_distribution<std::uint64_t>{1, 1500}(rng); break;
    default: e.bytes = std::uniform_int_distribution<std::uint64_t>{0, 1u << 20}(rng); break;
  }
  e.error = static_cast<io_error>(pick(7));
  e.policy = static_cast<close_policy>(pick(4));
  e.probe.valid = pick(4) != 0;
  e.probe.unread = pick(2) == 0 ? 0 : std::uniform_int_distribution<std::uint64_t>{1, 4096}(rng);
  e.probe.unacked = pick(2) == 0 ? 0 : std::uniform_int_distribution<std::uint64_t>{1, 4096}(rng);
  static constexpr std::array<std::uint64_t, 4> budgets{0, 100, 4096, drain_limits{}.max_discard_bytes};
  e.limits.max_discard_bytes = budgets[static_cast<std::size_t>(pick(4))];
  e.cause = static_cast<close_cause>(pick(13));
  return e;
}

struct run_result {
  std::vector<trace_entry> trace;
  std::optional<std::string> failure;
};

// Runs one random sequence on a fresh Machine, checking after every step.
template <typename Machine>
run_result run_sequence(std::mt19937& rng) {
  run_result out;
  Machine m;
  invariant_checker checker;
  const int length = std::uniform_int_distribution<int>{1, max_sequence_length}(rng);
  for (int i = 0; i < length; ++i) {
    trace_entry t{random_event(rng), observe(m), {}, {}};
    t.result = m.on(t.ev);
    t.after = observe(m);
    out.trace.push_back(t);
    if (auto bad = checker.check(out.trace.back())) {
      out.failure = "step " + std::to_string(i) + ": " + *bad;
      return out;
    }
  }
  // Pure and deterministic: the same events must give the same answers.
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

std::string format_trace(const std::vector<trace_entry>& trace) {
  std::string out;
  for (std::size_t i = 0; i < trace.size(); ++i) out += "  #" + std::to_string(i) + " " + describe(trace[i]) + "\n";
  return out;
}

std::mt19937 sequence_rng(std::uint64_t seed, int sequence) {
  std::seed_seq seq{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32),
                    static_cast<std::uint32_t>(sequence)};
  return std::mt19937{seq};
}

// Runs the whole property over Machine; returns the first failure, described
// with the seed and the sequence that reproduce it.
template <typename Machine>
std::optional<std::string> run_property(std::uint64_t seed, int sequences, std::array<int, 13>* causes = nullptr) {
  for (int n = 0; n < sequences; ++n) {
    std::mt19937 rng = sequence_rng(seed, n);
    run_result r = run_sequence<Machine>(rng);
    if (r.failure)
      return "seed=" + std::to_string(seed) + " sequence=" + std::to_string(n) + " " + *r.failure + "\n" +
             format_trace(r.trace);
    if (causes != nullptr && !r.trace.empty() && r.trace.back().after.finished)
      ++(*causes)[static_cast<std::size_t>(r.trace.back().after.cause)];
  }
  return std::nullopt;
}

TEST(core_property, random_sequences_keep_every_promise) {
  const std::uint64_t seed = base_seed();
  SCOPED_TRACE("CLOSEWISE_PROPERTY_SEED=" + std::to_string(seed));
  std::array<int, 13> causes{};
  const auto failure = run_property<connection_state>(seed, sequence_count, &causes);
  ASSERT_FALSE(failure.has_value()) << *failure;
  // The generator must reach every way a connection can end, or the property
  // above proves little.
  for (std::size_t c = 1; c < causes.size(); ++c)
    EXPECT_GT(causes[c], 0) << "never ended with " << to_string(static_cast<close_cause>(c));
}

// ---------------------------------------------------------------------------
// The harness must be able to fail: a broken build of the machine is caught.

TEST(checker_self_test, hand_built_trace_with_fin_during_write_is_flagged) {
  connection_state s;
  ASSERT_TRUE(s.on(event::write_start(10)).accepted);
  trace_entry bad{event::shutdown(), observe(s), {}, observe(s)};
  // What a broken machine would answer: FIN at once, with the write still in flight.
  bad.result.todo = action::send_fin;
  bad.after.write = write_state::fin_sent;
  bad.after.ph = phase::local_half_closed;
  bad.after.first_fin = side::local;

  trace_entry first{event::write_start(10), observe(connection_state{}), {}, bad.before};
  const std::vector<trace_entry> trace{first, bad};
  const auto failure = check_trace(trace);
  ASSERT_TRUE(failure.has_value());
  EXPECT_NE(failure->find("send_fin while writes were in flight"), std::string::npos) << *failure;

  // The same trace with the honest answer passes: the checker is not simply always failing.
  connection_state honest;
  std::vector<trace_entry> good;
  for (const event& e : {event::write_start(10), event::shutdown(), event::wrote(10)}) {
    trace_entry t{e, observe(honest), {}, {}};
    t.result = honest.on(e);
    t.after = observe(honest);
    good.push_back(t);
  }
  EXPECT_FALSE(check_trace(good).has_value()) << *check_trace(good);
}

TEST(checker_self_test, hand_built_trace_with_action_after_finished_is_flagged) {
  connection_state s;
  ASSERT_TRUE(s.on(event::close_with(close_policy::abortive)).accepted);
  trace_entry bad{event::close_with(close_policy::abortive), observe(s), {}, observe(s)};
  bad.result.todo = action::send_rst | action::close | action::finished;  // a second RST
  const auto failure = check_trace({bad});
  ASSERT_TRUE(failure.has_value());
}

// Broken builds of the machine, each breaking one promise.
struct premature_fin : connection_state {
  step on(const event& e) noexcept {
    const bool busy = e.what == event::kind::shutdown_write && !finished() && writes_in_flight() > 0 &&
                      write() == write_state::open;
    step r = connection_state::on(e);
    if (busy) r.todo |= action::send_fin;  // the FIN jumps the queue
    return r;
  }
};

struct repeated_notify : connection_state {
  step on(const event& e) noexcept {
    const bool again = e.what == event::kind::eof && read() == read_state::peer_fin && !finished();
    step r = connection_state::on(e);
    if (again) r.todo |= action::notify_peer_fin;
    return r;
  }
};

struct leaky_reject : connection_state {
  step on(const event& e) noexcept {
    step r = connection_state::on(e);
    if (!r.accepted && finished()) r.todo |= action::close;  // "close again, to be sure"
    return r;
  }
};

TEST(checker_self_test, harness_catches_broken_machines) {
  const std::uint64_t seed = base_seed();
  SCOPED_TRACE("CLOSEWISE_PROPERTY_SEED=" + std::to_string(seed));
  const auto fin = run_property<premature_fin>(seed, sequence_count);
  ASSERT_TRUE(fin.has_value());
  EXPECT_NE(fin->find("send_fin while writes were in flight"), std::string::npos) << *fin;

  const auto notify = run_property<repeated_notify>(seed, sequence_count);
  ASSERT_TRUE(notify.has_value());
  EXPECT_NE(notify->find("notify_peer_fin returned twice"), std::string::npos) << *notify;

  const auto leak = run_property<leaky_reject>(seed, sequence_count);
  ASSERT_TRUE(leak.has_value());
  EXPECT_NE(leak->find("a rejection with actions"), std::string::npos) << *leak;
}

}  // namespace
}  // namespace closewise
