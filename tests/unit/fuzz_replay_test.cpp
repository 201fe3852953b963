// Replays every input in fuzz/corpus/<target>/ and fuzz/regressions/<target>/
// through the same decoder and invariant checker as the libFuzzer target, but
// without libFuzzer: a crash found once by scripts/fuzz becomes a file in
// fuzz/regressions/ and stays fixed in the everyday gcc build (fuzz/README.md).

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "../support/core_fuzz_input.hpp"
#include "../support/fuzz_inputs.hpp"
#include "closewise/core.hpp"

namespace closewise {
namespace {

using namespace closewise::test;
namespace fs = std::filesystem;

const fs::path fuzz_dir{CLOSEWISE_FUZZ_DIR};

std::map<std::string, std::vector<fs::path>> inputs_by_target() { return test::inputs_by_target(fuzz_dir); }

// Targets whose inputs need sockets and the HTTP and echo sessions: replayed
// by tests/loopback/net_fuzz_replay_test.cpp, not here.
bool replayed_elsewhere(const std::string& target) { return target == "fuzz_http" || target == "fuzz_replay"; }

TEST(fuzz_replay, every_corpus_and_regression_input_keeps_every_promise) {
  const auto inputs = inputs_by_target();
  ASSERT_TRUE(inputs.count("fuzz_core")) << "no fuzz/corpus/fuzz_core under " << fuzz_dir;
  std::size_t replayed = 0;
  for (const auto& [target, files] : inputs) {
    if (replayed_elsewhere(target)) continue;
    // A directory for a target no test replays would silently go stale.
    ASSERT_EQ(target, "fuzz_core") << "no replayer for fuzz target '" << target << "': add one here";
    for (const auto& file : files) {
      const auto bytes = read_bytes(file);
      const auto r = run_fuzz_input<connection_state>(bytes.data(), bytes.size());
      EXPECT_FALSE(r.failure.has_value()) << file << ": " << r.failure.value_or("") << "\n" << format_trace(r.trace);
      ++replayed;
    }
  }
  // The hand-made seeds are there: the directory layout is what scripts/fuzz uses.
  EXPECT_GE(replayed, 10u);
}

// A broken build of the machine (FIN with a write in flight, the mutation
// scripts/fuzz builds as fuzz_core_mutant) fails on the corpus itself: the
// replay is not vacuous.
struct premature_fin : connection_state {
  step on(const event& e) noexcept {
    const bool busy =
        e.what == event::kind::shutdown_write && !finished() && writes_in_flight() > 0 && write() == write_state::open;
    step r = connection_state::on(e);
    if (busy) r.todo |= action::send_fin;
    return r;
  }
};

TEST(fuzz_replay, corpus_catches_a_machine_that_sends_fin_with_a_write_in_flight) {
  const auto inputs = inputs_by_target();
  std::size_t caught = 0;
  for (const auto& file : inputs.at("fuzz_core")) {
    const auto bytes = read_bytes(file);
    const auto r = run_fuzz_input<premature_fin>(bytes.data(), bytes.size());
    if (r.failure && r.failure->find("send_fin while writes were in flight") != std::string::npos) ++caught;
  }
  EXPECT_GE(caught, 1u);
}

// Every byte string is a valid input, and the decoder reaches every event kind.
TEST(fuzz_replay, decoder_is_total_and_reaches_every_event_kind) {
  EXPECT_TRUE(decode_events(nullptr, 0).empty());
  // Each opcode alone, with operands to spare, decodes first to its own kind.
  std::vector<bool> seen(11, false);
  for (std::uint8_t op = 0; op < fuzz_op_count; ++op) {
    const std::array<std::uint8_t, 8> input{op, 1, 1, 1, 1, 1, 1, 1};
    const auto events = decode_events(input.data(), input.size());
    ASSERT_FALSE(events.empty());
    seen[static_cast<std::size_t>(events.front().what)] = true;
  }
  for (std::size_t k = 0; k < seen.size(); ++k)
    EXPECT_TRUE(seen[k]) << "never decoded " << to_string(static_cast<event::kind>(k));
  const std::vector<std::uint8_t> huge(max_fuzz_events * 3, 0);
  EXPECT_EQ(decode_events(huge.data(), huge.size()).size(), max_fuzz_events);
}

}  // namespace
}  // namespace closewise
