// libFuzzer target: bytes -> core events (tests/support/core_fuzz_input.hpp)
// -> closewise::connection_state, with every promise of core.hpp checked
// after every step (tests/support/core_invariants.hpp). A broken promise
// prints the trace and aborts, which libFuzzer reports as a crash and saves
// as an input to replay (see fuzz/README.md).
//
// Built twice: fuzz_core against lib/core/src/core.cpp, and fuzz_core_mutant
// against a copy patched at build time to send FIN with a write in flight,
// which scripts/fuzz expects to crash: proof that this harness can fail.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "core_fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto result = closewise::test::run_fuzz_input<closewise::connection_state>(data, size);
  if (result.failure) {
    std::fprintf(stderr, "closewise: core invariant broken: %s\n%s", result.failure->c_str(),
                 closewise::test::format_trace(result.trace).c_str());
    std::abort();
  }
  return 0;
}
