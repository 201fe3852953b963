// Google Benchmark of the sans-I/O core: what one state-machine transition
// costs on the hot path. Items are transitions, so the reported rate is
// transitions per second (and its inverse, ns per transition).

#include "closewise/core.hpp"

#include <benchmark/benchmark.h>

#include <array>
#include <cstdint>

namespace {

using closewise::action;
using closewise::close_policy;
using closewise::connection_state;
using closewise::event;
using closewise::io_error;
using closewise::step;

// One keep-alive request/response on a long-lived connection: the steady state
// of a server, four transitions per exchange.
void BM_transition_keepalive_exchange(benchmark::State& state) {
  connection_state s;
  const event request = event::read(512);
  const event start = event::write_start(2048);
  const event done = event::wrote(2048);
  const event complete = event::complete();
  for (auto _ : state) {
    step r = s.on(request);
    benchmark::DoNotOptimize(r);
    r = s.on(start);
    benchmark::DoNotOptimize(r);
    r = s.on(done);
    benchmark::DoNotOptimize(r);
    r = s.on(complete);
    benchmark::DoNotOptimize(r);
  }
  // A rejected step would make the number meaningless: the loop must measure real transitions.
  if (s.finished() || s.bytes_delivered() != 512u * static_cast<std::uint64_t>(state.iterations()))
    state.SkipWithError("the keep-alive exchange did not run as intended");
  state.SetItemsProcessed(state.iterations() * 4);
}
BENCHMARK(BM_transition_keepalive_exchange);

// A whole graceful close on a fresh connection: the response is still in
// flight when the close is asked, so the FIN waits for it, then the drain
// discards a straggler until the peer's FIN.
const std::array<event, 6> graceful_sequence{
    event::write_start(2048),
    event::close_with(close_policy::graceful),  // start_drain; FIN waits for the write
    event::wrote(2048),                         // send_fin
    event::read(64),                            // discarded
    event::read(64),                            // discarded
    event::read_eof(),                          // close | finished
};

void BM_graceful_teardown(benchmark::State& state) {
  {
    // Check the sequence once, outside the timed loop.
    connection_state s;
    for (const event& e : graceful_sequence) {
      if (!s.on(e).accepted) state.SkipWithError("a step of the graceful sequence was rejected");
    }
    if (s.cause() != closewise::close_cause::ours_then_peer_fin) state.SkipWithError("graceful sequence misbuilt");
  }
  for (auto _ : state) {
    connection_state s;
    benchmark::DoNotOptimize(s);
    for (const event& e : graceful_sequence) {
      step r = s.on(e);
      benchmark::DoNotOptimize(r);
    }
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(graceful_sequence.size()));
}
BENCHMARK(BM_graceful_teardown);

// classify() over every I/O outcome against an idle, a mid-exchange and a
// reset connection: the per-completion cost the stream layer pays.
void BM_classify(benchmark::State& state) {
  std::array<connection_state, 3> states{};
  (void)states[1].on(event::read(100));
  (void)states[2].on(event::read_failed(io_error::reset));
  constexpr std::array<io_error, 7> errors{io_error::none,        io_error::eof,     io_error::reset,
                                           io_error::broken_pipe, io_error::aborted, io_error::timed_out,
                                           io_error::other};
  for (auto _ : state) {
    for (const auto& s : states) {
      for (io_error e : errors) {
        auto c = closewise::classify(e, s);
        benchmark::DoNotOptimize(c);
      }
    }
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(states.size() * errors.size()));
}
BENCHMARK(BM_classify);

}  // namespace

BENCHMARK_MAIN();
