// libFuzzer target: raw request bytes, split and paused where the input says,
// sent on one connection to an in-process closewise-reqresp server; the
// client then half-closes or resets, and what came back must be complete
// HTTP/1.1 responses with documented statuses, nothing after a response that
// closed the connection, and counters that add up
// (tests/support/http_fuzz_input.hpp). A broken promise prints why and
// aborts, which libFuzzer saves as a crash input (see fuzz/README.md).

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "http_fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Started once: libFuzzer runs every input in this process. Its destructor
  // at exit stops the server thread before LeakSanitizer looks.
  static closewise::test::http_fuzz_target target;
  if (const auto failure = target.run(data, size)) {
    std::fprintf(stderr, "closewise: http promise broken: %s\n", failure->c_str());
    std::abort();
  }
  return 0;
}
