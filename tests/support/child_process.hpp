#pragma once
// A child process for the tests that drive real binaries (closewise-reqresp,
// closewise-demo, closewise-bench, nginx): stdout on a pipe read line by line
// with a time limit, stderr on a pipe or in a file, and a bounded wait.
// Killed (SIGKILL) if still running on destruction, so no test leaves one
// behind on any exit path.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

extern char** environ;

namespace closewise::test {

/// Waits up to `limit` for the exit of child `pid` (its pidfd) and reaps it:
/// the exit status (128 + signal if killed), or nullopt if it did not exit in time.
inline std::optional<int> wait_for_exit(pid_t pid, int pidfd, std::chrono::milliseconds limit) {
  pollfd p{pidfd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(limit.count())) != 1) return std::nullopt;
  int st = 0;
  if (::waitpid(pid, &st, 0) != pid) return std::nullopt;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

class child {
 public:
  /// Starts `args` (argv[0] looked up in PATH unless it has a slash). With
  /// `stderr_file`, stderr goes there (appended) instead of a pipe: a child
  /// that logs more than a pipe holds must not block on it while nobody reads.
  /// With `stdin_file`, stdin reads that file instead of /dev/null.
  explicit child(std::vector<std::string> args, const std::string& stderr_file = {},
                 const std::string& stdin_file = {}) {
    int out[2] = {-1, -1}, err[2] = {-1, -1};
    if (::pipe2(out, O_CLOEXEC) != 0) return;
    if (stderr_file.empty() && ::pipe2(err, O_CLOEXEC) != 0) return;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    if (stderr_file.empty()) {
      posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    } else {
      posix_spawn_file_actions_addopen(&fa, 2, stderr_file.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    }
    posix_spawn_file_actions_addopen(&fa, 0, stdin_file.empty() ? "/dev/null" : stdin_file.c_str(), O_RDONLY, 0);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawnp(&pid_, argv[0], &fa, nullptr, argv.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
    ::close(out[1]);
    if (err[1] >= 0) ::close(err[1]);
    out_ = out[0];
    err_ = err[0];
    if (pid_ > 0) pidfd_ = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
  }
  ~child() {
    if (pid_ > 0 && !status_) {
      ::kill(pid_, SIGKILL);
      wait(std::chrono::seconds(5));
    }
    for (int fd : {out_, err_, pidfd_}) {
      if (fd >= 0) ::close(fd);
    }
  }
  child(const child&) = delete;
  child& operator=(const child&) = delete;

  bool started() const { return pid_ > 0 && pidfd_ >= 0; }
  pid_t pid() const { return pid_; }
  void signal(int sig) {
    if (pid_ > 0 && !status_) ::kill(pid_, sig);
  }

  /// One line of stdout (without the newline), waiting up to `limit`.
  std::optional<std::string> read_line(std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    for (;;) {
      if (const auto nl = out_text_.find('\n'); nl != std::string::npos) {
        std::string line = out_text_.substr(0, nl);
        out_text_.erase(0, nl + 1);
        return line;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      if (left <= std::chrono::milliseconds(0) || !pump(out_, out_text_, left)) return std::nullopt;
    }
  }

  /// Waits for the exit (bounded) and collects what is left of the output.
  /// Returns the exit status (128 + signal if killed), or nullopt if it did
  /// not exit in time.
  std::optional<int> wait(std::chrono::milliseconds limit) {
    if (!status_) status_ = wait_for_exit(pid_, pidfd_, limit);
    if (!status_) return std::nullopt;
    while (pump(out_, out_text_, std::chrono::milliseconds(1000))) {
    }
    while (pump(err_, err_text_, std::chrono::milliseconds(1000))) {
    }
    return status_;
  }
  /// stdout not yet consumed by read_line (all of it after `wait`).
  const std::string& out() const { return out_text_; }
  /// stderr (empty when it went to a file).
  const std::string& err() const { return err_text_; }

 private:
  // Reads what `fd` has within `limit`; false at EOF or timeout.
  static bool pump(int fd, std::string& into, std::chrono::milliseconds limit) {
    if (fd < 0) return false;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(limit.count())) != 1) return false;
    char buf[4096];
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) return false;
    into.append(buf, static_cast<std::size_t>(n));
    return true;
  }

  pid_t pid_ = -1;
  int out_ = -1, err_ = -1, pidfd_ = -1;
  std::optional<int> status_;
  std::string out_text_, err_text_;
};

/// The port of a "listening on HOST:PORT" line (0 if there is none).
inline std::uint16_t port_of_listening_line(const std::string& line) {
  const auto colon = line.rfind(':');
  if (colon == std::string::npos) return 0;
  try {
    return static_cast<std::uint16_t>(std::stoi(line.substr(colon + 1)));
  } catch (const std::exception&) {
    return 0;
  }
}

}  // namespace closewise::test
