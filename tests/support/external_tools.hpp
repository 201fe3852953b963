#pragma once
// What the tests that drive other programs (nginx, curl, openssl, python3)
// share: finding the program, a port for a server that cannot report the one
// it bound, and waiting until it accepts.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "loopback.hpp"

namespace closewise::test {

/// `name` from PATH or where Debian puts system programs (/usr/sbin is not on every PATH).
inline std::optional<std::string> find_program(const std::string& name) {
  std::vector<std::string> dirs;
  if (const char* path = std::getenv("PATH")) {
    std::stringstream ss(path);
    for (std::string d; std::getline(ss, d, ':');) dirs.push_back(d);
  }
  dirs.insert(dirs.end(), {"/usr/sbin", "/usr/local/sbin", "/sbin"});
  for (const auto& d : dirs) {
    if (d.empty()) continue;
    const std::filesystem::path p = std::filesystem::path(d) / name;
    if (::access(p.c_str(), X_OK) == 0) return p.string();
  }
  return std::nullopt;
}

/// A free port on 127.0.0.1, found by binding port 0. Only inside a private
/// network namespace, where nothing else can take it before the program binds it.
inline std::uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  std::uint16_t port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

/// Until something accepts on 127.0.0.1:`port` (for a program, such as nginx,
/// that prints nothing when it is ready).
inline bool wait_accepting(std::uint16_t port, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (connect_to(port).fd() >= 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling a process that has no readiness signal
  }
  return false;
}

}  // namespace closewise::test
