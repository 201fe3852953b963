#pragma once
// Private network namespaces for fault-injection tests, and the commands that
// configure them (ip, nft, tc, ss).
//
// A test that injects faults never touches the machine's own loopback: it
// re-executes itself (the same binary, filtered to the same test) under
// `unshare --net` (as root) or `unshare --map-root-user --net`, and only the
// child, after checking that its namespace really differs from its parent's,
// brings `lo` up and adds nft rules or qdiscs. The rules die with the
// namespace when the child exits. Where namespaces are unavailable the test
// is skipped with the reason.
//
//   TEST(netns, something) {
//     CLOSEWISE_IN_PRIVATE_NETNS(60s);   // the parent returns here with the child's verdict
//     ... runs inside the namespace, lo is up ...
//   }

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace closewise::test {

/// The outcome of a command.
struct command_result {
  int status = -1;         ///< exit status; -1 if it did not exit normally or could not start
  bool timed_out = false;  ///< killed at the time limit
  std::string output;      ///< stdout and stderr, interleaved
  bool ok() const noexcept { return status == 0 && !timed_out; }
};

/// Runs `argv` (no shell; argv[0] looked up in PATH) with `extra_env`
/// ("NAME=value") added, capturing its output; killed after `limit`.
command_result run_command(const std::vector<std::string>& argv,
                           std::chrono::milliseconds limit = std::chrono::seconds(10),
                           const std::vector<std::string>& extra_env = {});

/// Runs a command that must succeed; on failure, a gtest failure with its output.
/// Returns the output.
std::string must_run(const std::vector<std::string>& argv);

/// One nft command (e.g. "add rule inet closewise out tcp dport 5000 drop").
std::string nft(const std::string& command);

/// True in a child started by `run_current_test_in_private_netns`.
bool in_private_netns_child();

/// Inside the child: checks that the namespace is not the parent's and brings
/// `lo` up. Returns the reason it cannot, or nothing.
std::optional<std::string> prepare_private_netns();

/// The verdict of a test run in a private namespace.
struct netns_verdict {
  enum class outcome { passed, failed, skipped, unavailable } result = outcome::failed;
  std::string reason;  ///< why it was skipped, failed or could not run
};

/// Runs the current test again in a child process inside a new network
/// namespace, for at most `limit`.
netns_verdict run_current_test_in_private_netns(std::chrono::seconds limit);

/// True when `tool --version` (or equivalent) runs.
bool have_tool(const std::string& tool);

}  // namespace closewise::test

/// Makes the rest of the test body run inside a private network namespace
/// (see the file comment). In the parent it reports the child's verdict and
/// returns; in the child it prepares the namespace or fails.
#define CLOSEWISE_IN_PRIVATE_NETNS(limit)                                                                \
  do {                                                                                                   \
    using closewise_outcome = ::closewise::test::netns_verdict::outcome;                                 \
    if (!::closewise::test::in_private_netns_child()) {                                                  \
      const auto closewise_verdict = ::closewise::test::run_current_test_in_private_netns(limit);        \
      switch (closewise_verdict.result) {                                                                \
        case closewise_outcome::passed:                                                                  \
          return;                                                                                        \
        case closewise_outcome::skipped:                                                                 \
        case closewise_outcome::unavailable:                                                             \
          GTEST_SKIP() << closewise_verdict.reason;                                                      \
        case closewise_outcome::failed:                                                                  \
          FAIL() << "in the private network namespace:\n" << closewise_verdict.reason;                   \
      }                                                                                                  \
      return;                                                                                            \
    }                                                                                                    \
    if (const auto closewise_why = ::closewise::test::prepare_private_netns()) FAIL() << *closewise_why; \
  } while (false)

/// Like CLOSEWISE_IN_PRIVATE_NETNS, for load tests that prefer a namespace but
/// do not need one: where namespaces are unavailable the rest of the test runs
/// here, on this machine's own loopback, with a note saying so (and
/// netns.a_private_namespace_is_available_for_the_load_tests, which needs
/// one, is reported skipped with the reason).
#define CLOSEWISE_IN_PRIVATE_NETNS_IF_POSSIBLE(limit)                                                       \
  do {                                                                                                      \
    using closewise_outcome = ::closewise::test::netns_verdict::outcome;                                    \
    if (!::closewise::test::in_private_netns_child()) {                                                     \
      const auto closewise_verdict = ::closewise::test::run_current_test_in_private_netns(limit);           \
      if (closewise_verdict.result == closewise_outcome::passed) return;                                    \
      if (closewise_verdict.result == closewise_outcome::failed)                                            \
        FAIL() << "in the private network namespace:\n" << closewise_verdict.reason;                        \
      if (closewise_verdict.result == closewise_outcome::skipped) GTEST_SKIP() << closewise_verdict.reason; \
      /* netns.a_private_namespace_is_available_for_the_load_tests is skipped then, with the reason. */     \
      std::printf("note: running on this machine's own loopback (%s)\n", closewise_verdict.reason.c_str()); \
    } else if (const auto closewise_why = ::closewise::test::prepare_private_netns()) {                     \
      FAIL() << *closewise_why;                                                                             \
    }                                                                                                       \
  } while (false)
