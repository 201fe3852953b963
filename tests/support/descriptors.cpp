#include "descriptors.hpp"

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace closewise::test {

namespace {

// " (TCP port LOCAL -> REMOTE, STATE)" for an IPv4 TCP socket's inode, from /proc/net/tcp.
std::string tcp_socket_by_inode(std::string_view inode) {
  static constexpr std::array<std::string_view, 12> states{"?",          "ESTABLISHED", "SYN_SENT",  "SYN_RECV",
                                                           "FIN_WAIT1",  "FIN_WAIT2",   "TIME_WAIT", "CLOSE",
                                                           "CLOSE_WAIT", "LAST_ACK",    "LISTEN",    "CLOSING"};
  std::FILE* f = std::fopen("/proc/net/tcp", "r");
  if (!f) return {};
  char line[512];
  std::string out;
  while (std::fgets(line, sizeof line, f)) {
    unsigned local_port = 0, remote_port = 0, st = 0;
    unsigned long ino = 0;
    if (std::sscanf(line, " %*d: %*8x:%x %*8x:%x %x %*x:%*x %*x:%*x %*x %*u %*u %lu", &local_port, &remote_port, &st,
                    &ino) == 4 &&
        std::to_string(ino) == inode) {
      out = " (TCP port " + std::to_string(local_port) + " -> " + std::to_string(remote_port) + ", " +
            std::string(st < states.size() ? states[st] : "?") + ")";
      break;
    }
  }
  std::fclose(f);
  return out;
}

}  // namespace

std::map<int, std::string> open_descriptors(pid_t pid) {
  std::map<int, std::string> out;
  const std::string dir = pid > 0 ? "/proc/" + std::to_string(pid) + "/fd" : "/proc/self/fd";
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  const int own = pid > 0 ? -1 : ::dirfd(d);
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const int fd = std::atoi(e->d_name);
    if (fd == own) continue;
    char link[256];
    const std::string path = dir + "/" + e->d_name;
    const ssize_t n = ::readlink(path.c_str(), link, sizeof link - 1);
    out.emplace(fd, n > 0 ? std::string(link, static_cast<std::size_t>(n)) : std::string("?"));
  }
  ::closedir(d);
  return out;
}

std::size_t count_sockets(const std::map<int, std::string>& fds) {
  return static_cast<std::size_t>(
      std::count_if(fds.begin(), fds.end(), [](const auto& fd) { return fd.second.starts_with("socket:"); }));
}

std::string new_descriptors(const std::map<int, std::string>& before, const std::map<int, std::string>& after) {
  std::string out;
  for (const auto& [fd, what] : after) {
    const auto b = before.find(fd);
    if (b != before.end() && b->second == what) continue;
    if (!out.empty()) out += ", ";
    out += std::to_string(fd) + " = " + what;
    if (what.starts_with("socket:[")) out += tcp_socket_by_inode(std::string_view(what).substr(8, what.size() - 9));
  }
  return out.empty() ? "none new" : out;
}

}  // namespace closewise::test
