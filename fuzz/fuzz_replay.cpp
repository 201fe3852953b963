// libFuzzer target: a script of socket operations (connect, send, SHUT_WR,
// RST, close, pause and resume reading, wait, finish) on raw client
// connections to in-process echo and HTTP servers; the echo must come back as
// a prefix of what was sent (all of it after SHUT_WR and EOF), and after every
// input both servers must be back to no connections, no socket in CLOSE_WAIT
// or FIN_WAIT2, and the sockets the process had before
// (tests/support/replay_fuzz_input.hpp). A broken promise prints why and
// aborts, which libFuzzer saves as a crash input (see fuzz/README.md).

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "replay_fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Started once: libFuzzer runs every input in this process. Its destructor
  // at exit stops the server threads before LeakSanitizer looks. The kernel's
  // socket table is read after every 16th input (see replay_fuzz_input.hpp).
  static closewise::test::replay_fuzz_target target(16);
  if (const auto failure = target.run(data, size)) {
    std::fprintf(stderr, "closewise: replay promise broken: %s\n", failure->c_str());
    std::abort();
  }
  return 0;
}
