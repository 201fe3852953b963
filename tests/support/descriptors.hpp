#pragma once
// The descriptors a process holds, read from /proc: for tests that check
// that connections leave nothing open. Sockets are what a server's
// connections hold; the sanitizers' runtime opens pipes of its own at any
// moment (UBSan's vptr check probes memory through one), so leak checks
// count sockets.

#include <sys/types.h>

#include <cstddef>
#include <map>
#include <string>

namespace closewise::test {

/// Descriptors open in process `pid` (0: this one): number -> what it is (the
/// /proc/PID/fd link). The listing's own descriptor is left out.
std::map<int, std::string> open_descriptors(pid_t pid = 0);

/// How many of `fds` are sockets.
std::size_t count_sockets(const std::map<int, std::string>& fds);

/// The descriptors in `after` that `before` did not have, described (for an
/// IPv4 TCP socket also its ports and state, from /proc/net/tcp).
std::string new_descriptors(const std::map<int, std::string>& before, const std::map<int, std::string>& after);

}  // namespace closewise::test
