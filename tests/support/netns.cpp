#include "netns.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

extern char** environ;

namespace closewise::test {

namespace {

// Set in the child: the inode of the parent's network namespace, so the
// child can prove it is somewhere else before it adds a single rule.
constexpr const char* child_env = "CLOSEWISE_NETNS_PARENT";

std::string netns_id() {
  struct stat st {};
  if (::stat("/proc/self/ns/net", &st) != 0) return {};
  return std::to_string(st.st_ino);
}

std::string self_exe() {
  std::string path(4096, '\0');
  const ssize_t n = ::readlink("/proc/self/exe", path.data(), path.size() - 1);
  if (n <= 0) return {};
  path.resize(static_cast<std::size_t>(n));
  return path;
}

// The unshare prefix for this user: a root user may create a namespace
// directly; anyone else needs a user namespace that maps them to root.
std::vector<std::string> unshare_prefix() {
  if (::geteuid() == 0) return {"unshare", "--net", "--"};
  return {"unshare", "--map-root-user", "--net", "--"};
}

// gtest's report of a skip: "file:line: Skipped\n<message>\n[  SKIPPED ] ...".
std::string skip_reason(const std::string& output) {
  const auto at = output.find("Skipped\n");
  if (at == std::string::npos) return output;
  const auto from = at + 8;
  const auto to = output.find("[  SKIPPED ]", from);
  std::string reason = output.substr(from, to == std::string::npos ? std::string::npos : to - from);
  while (!reason.empty() && (reason.back() == '\n' || reason.back() == ' ')) reason.pop_back();
  return reason;
}

}  // namespace

command_result run_command(const std::vector<std::string>& argv, std::chrono::milliseconds limit,
                           const std::vector<std::string>& extra_env) {
  command_result r;
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    r.output = std::string("pipe: ") + std::strerror(errno);
    return r;
  }
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<char*> env;
  for (char** e = environ; *e != nullptr; ++e) env.push_back(*e);
  for (const auto& e : extra_env) env.push_back(const_cast<char*>(e.c_str()));
  env.push_back(nullptr);

  // posix_spawn, not fork: the test process may run server threads, and the
  // child must not inherit their locks between fork and exec.
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], STDERR_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  pid_t pid = -1;
  const int spawned = ::posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), env.data());
  posix_spawn_file_actions_destroy(&actions);
  ::close(pipe_fds[1]);
  if (spawned != 0) {
    ::close(pipe_fds[0]);
    r.output = argv[0] + ": " + std::strerror(spawned);
    return r;
  }

  const auto deadline = std::chrono::steady_clock::now() + limit;
  char buf[4096];
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      r.timed_out = true;
      ::kill(pid, SIGKILL);
      break;
    }
    pollfd p{pipe_fds[0], POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) continue;  // the deadline check above ends it
    const ssize_t n = ::read(pipe_fds[0], buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // every writer closed: the command exited (or closed its output)
    r.output.append(buf, static_cast<std::size_t>(n));
  }
  ::close(pipe_fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!r.timed_out && WIFEXITED(status)) r.status = WEXITSTATUS(status);
  return r;
}

std::string must_run(const std::vector<std::string>& argv) {
  const auto r = run_command(argv);
  std::string line;
  for (const auto& a : argv) line += (line.empty() ? "" : " ") + a;
  EXPECT_TRUE(r.ok()) << "`" << line << "` failed (status " << r.status << (r.timed_out ? ", timed out" : "") << "):\n"
                      << r.output;
  return r.output;
}

std::string nft(const std::string& command) { return must_run({"nft", command}); }

bool have_tool(const std::string& tool) {
  const auto r = run_command({tool, tool == "ss" || tool == "ip" || tool == "tc" ? "-V" : "--version"});
  return r.ok();
}

bool in_private_netns_child() { return std::getenv(child_env) != nullptr; }

std::optional<std::string> prepare_private_netns() {
  const char* parent = std::getenv(child_env);
  if (parent == nullptr) return "not started by run_current_test_in_private_netns";
  // Never configure the machine's own network: only a namespace of our own.
  if (netns_id().empty() || netns_id() == parent)
    return "refusing to touch the network: this process is not in a private namespace";
  const auto up = run_command({"ip", "link", "set", "lo", "up"});
  if (!up.ok()) return "ip link set lo up failed in the private namespace: " + up.output;
  return std::nullopt;
}

netns_verdict run_current_test_in_private_netns(std::chrono::seconds limit) {
  netns_verdict v;
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string exe = self_exe();
  if (info == nullptr || exe.empty()) {
    v.reason = "cannot find this test binary or test name";
    return v;
  }
  if (!have_tool("unshare") || !have_tool("ip")) {
    v.result = netns_verdict::outcome::unavailable;
    v.reason = "unshare or ip (util-linux, iproute2) not installed";
    return v;
  }
  auto probe = unshare_prefix();
  probe.push_back("true");
  if (const auto r = run_command(probe); !r.ok()) {
    v.result = netns_verdict::outcome::unavailable;
    v.reason = "cannot create a network namespace here (`unshare --net` failed: " + r.output + ")";
    return v;
  }
  auto argv = unshare_prefix();
  argv.push_back(exe);
  argv.push_back(std::string("--gtest_filter=") + info->test_suite_name() + "." + info->name());
  argv.push_back("--gtest_color=no");
  const auto r = run_command(argv, limit, {std::string(child_env) + "=" + netns_id()});
  if (r.timed_out) {
    v.reason = "killed after " + std::to_string(limit.count()) + " s; its output:\n" + r.output;
    return v;
  }
  if (r.status != 0) {
    v.reason = "exit status " + std::to_string(r.status) + "; its output:\n" + r.output;
    return v;
  }
  if (r.output.find("[  SKIPPED ]") != std::string::npos) {
    v.result = netns_verdict::outcome::skipped;
    v.reason = skip_reason(r.output);
  } else if (r.output.find("[       OK ]") == std::string::npos) {
    v.reason = "the child ran no test; its output:\n" + r.output;
    return v;
  } else {
    v.result = netns_verdict::outcome::passed;
  }
  // The child's own lines (timings, counts) belong in this test's log too,
  // a skipped one's as well (a test may skip one assertion after running the
  // rest, and CI collects their figures); gtest's banner lines would only
  // repeat the parent's.
  std::size_t from = 0;
  while (from < r.output.size()) {
    auto to = r.output.find('\n', from);
    if (to == std::string::npos) to = r.output.size();
    const std::string line = r.output.substr(from, to - from);
    if (!line.empty() && line.front() != '[' && line.rfind("Note: Google Test filter", 0) != 0 &&
        line.rfind("Running main()", 0) != 0)
      std::printf("  (netns) %s\n", line.c_str());
    from = to + 1;
  }
  return v;
}

}  // namespace closewise::test
