// The real closewise-reqresp and closewise-demo binaries as subprocesses:
// flags and exit statuses, the "listening on" line, SIGTERM's drain, and the
// demo's verdict against a server that closes badly.

#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "../support/loopback.hpp"

extern char** environ;

using namespace closewise::test;
using namespace std::chrono_literals;

namespace {

// A child process with its stdout and stderr on pipes. Killed (SIGKILL) if
// still running on destruction.
class child {
 public:
  explicit child(std::vector<std::string> args) {
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) return;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
    ::close(out[1]);
    ::close(err[1]);
    out_ = out[0];
    err_ = err[0];
    if (pid_ > 0) pidfd_ = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
  }
  ~child() {
    if (pid_ > 0 && !status_) {
      ::kill(pid_, SIGKILL);
      wait(5s);
    }
    for (int fd : {out_, err_, pidfd_}) {
      if (fd >= 0) ::close(fd);
    }
  }
  child(const child&) = delete;
  child& operator=(const child&) = delete;

  bool started() const { return pid_ > 0 && pidfd_ >= 0; }
  void signal(int sig) { ::kill(pid_, sig); }

  // One line of stdout (without the newline), waiting up to `limit`.
  std::optional<std::string> read_line(std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    for (;;) {
      if (const auto nl = out_text_.find('\n'); nl != std::string::npos) {
        std::string line = out_text_.substr(0, nl);
        out_text_.erase(0, nl + 1);
        return line;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      if (left <= 0ms || !pump(out_, out_text_, left)) return std::nullopt;
    }
  }

  // Waits for the exit (bounded) and collects what is left of the output.
  // Returns the exit status, or nullopt if it did not exit in time.
  std::optional<int> wait(std::chrono::milliseconds limit) {
    if (!status_) {
      pollfd p{pidfd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(limit.count())) != 1) return std::nullopt;
      int st = 0;
      if (::waitpid(pid_, &st, 0) != pid_) return std::nullopt;
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    while (pump(out_, out_text_, 1000ms)) {
    }
    while (pump(err_, err_text_, 1000ms)) {
    }
    return status_;
  }
  const std::string& out() const { return out_text_; }
  const std::string& err() const { return err_text_; }

 private:
  // Reads what `fd` has within `limit`; false at EOF or timeout.
  static bool pump(int fd, std::string& into, std::chrono::milliseconds limit) {
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

std::uint16_t port_of_listening_line(const std::string& line) {
  const auto colon = line.rfind(':');
  return colon == std::string::npos ? 0 : static_cast<std::uint16_t>(std::stoi(line.substr(colon + 1)));
}

// Reads until `marker` arrived (bounded).
std::string read_until(raw_peer& p, std::string_view marker, std::chrono::milliseconds limit = 5s) {
  std::string got;
  char buf[4096];
  const auto end = std::chrono::steady_clock::now() + limit;
  while (got.find(marker) == std::string::npos && std::chrono::steady_clock::now() < end) {
    pollfd pfd{p.fd(), POLLIN, 0};
    if (::poll(&pfd, 1, 100) != 1) continue;
    const long n = p.recv_some(buf, sizeof(buf));
    if (n <= 0) break;
    got.append(buf, static_cast<std::size_t>(n));
  }
  return got;
}

TEST(reqresp_binary, bad_flags_exit_2_and_version_exits_0) {
  for (const char* bad : {"--bogus", "--teardown=sometimes", "--listen=nowhere", "--max-header-bytes=3"}) {
    child c({CLOSEWISE_REQRESP_BINARY, bad});
    ASSERT_TRUE(c.started());
    EXPECT_EQ(c.wait(10s), 2) << bad;
    EXPECT_NE(c.err().find("closewise-reqresp: error:"), std::string::npos) << bad << ": " << c.err();
  }
  child v({CLOSEWISE_REQRESP_BINARY, "--version"});
  EXPECT_EQ(v.wait(10s), 0);
  EXPECT_EQ(v.out().rfind("closewise-reqresp ", 0), 0u) << v.out();
}

// Port 0 and the first line; a limit flag at work; SIGTERM drains: the idle
// keep-alive connection gets EOF, the process exits 0 and prints its stats.
TEST(reqresp_binary, serves_and_drains_on_sigterm) {
  child c({CLOSEWISE_REQRESP_BINARY, "--listen", "127.0.0.1:0", "--threads", "1", "--max-bytes", "1000", "--stats",
           "--log-level", "warn"});
  ASSERT_TRUE(c.started());
  const auto line = c.read_line(10s);
  ASSERT_TRUE(line) << "no first line; stderr: " << c.err();
  ASSERT_EQ(line->rfind("listening on 127.0.0.1:", 0), 0u) << *line;
  const auto port = port_of_listening_line(*line);
  auto p = connect_to(port);
  ASSERT_GE(p.fd(), 0);
  ASSERT_GT(p.send(std::string("GET /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n"
                               "GET /bytes/1001 HTTP/1.1\r\nHost: x\r\n\r\n")),
            0);
  const std::string got = read_until(p, "exceeds --max-bytes");
  EXPECT_NE(got.find("HTTP/1.1 200 OK"), std::string::npos);
  EXPECT_NE(got.find("HTTP/1.1 400 Bad Request"), std::string::npos) << got;
  c.signal(SIGTERM);
  const auto end = p.drain();
  EXPECT_TRUE(end.eof) << "errno " << end.error;
  p.close();
  EXPECT_EQ(c.wait(15s), 0) << c.err();
  EXPECT_NE(c.out().find("\"connections_accepted\":1"), std::string::npos) << c.out();
}

TEST(demo_binary, json_run_exits_0_and_bad_flags_exit_2) {
  child ok({CLOSEWISE_DEMO_BINARY, "--only", "7", "--json"});
  ASSERT_TRUE(ok.started());
  EXPECT_EQ(ok.wait(60s), 0) << ok.err();
  EXPECT_NE(ok.out().find("\"all_match\": true"), std::string::npos) << ok.out();
  EXPECT_NE(ok.out().find("\"close_cause\": \"safe_reset\""), std::string::npos) << ok.out();
  for (const char* bad : {"--only=0", "--size=10", "--target=nowhere", "--bogus"}) {
    child c({CLOSEWISE_DEMO_BINARY, bad});
    EXPECT_EQ(c.wait(10s), 2) << bad;
  }
}

// Against a server that closes with fin_close, the graceful scenario (5)
// loses data: the demo prints the mismatch and exits 1.
TEST(demo_binary, a_server_that_closes_badly_fails_the_demo) {
  child server({CLOSEWISE_REQRESP_BINARY, "--listen", "127.0.0.1:0", "--threads", "1", "--teardown", "fin_close",
                "--log-level", "error"});
  ASSERT_TRUE(server.started());
  const auto line = server.read_line(10s);
  ASSERT_TRUE(line) << server.err();
  const std::string target = line->substr(std::string("listening on ").size());
  child demo({CLOSEWISE_DEMO_BINARY, "--target", target, "--only", "5"});
  EXPECT_EQ(demo.wait(60s), 1) << demo.out() << demo.err();
  EXPECT_NE(demo.out().find("scenario 5 (the same, with the graceful close) does not match"), std::string::npos)
      << demo.out();
  EXPECT_NE(demo.out().find("data lost"), std::string::npos) << demo.out();
  server.signal(SIGTERM);
  EXPECT_EQ(server.wait(15s), 0) << server.err();
}

}  // namespace
