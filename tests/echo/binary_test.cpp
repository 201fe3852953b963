// The closewise-echo binary as a subprocess on port 0 (its "listening on"
// line gives the port): clients nobody here wrote (nc, socat), its Unix
// listener, abortive teardown, its own client mode, SIGTERM drain, and the CLI.

#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

#include <nlohmann/json.hpp>

#include "../support/descriptors.hpp"
#include "closewise/version.hpp"
#include "echo_support.hpp"

using namespace closewise;
using namespace closewise::echo::test;
using closewise::test::count_sockets;
using closewise::test::open_descriptors;
using namespace std::chrono_literals;

namespace {

class echo_binary_test : public ::testing::Test {
 protected:
  void SetUp() override { fds_ = fd_count(); }
  void TearDown() override { EXPECT_EQ(fd_count(), fds_) << "descriptors leaked in the test process"; }

 private:
  std::size_t fds_ = 0;
};

// Waits (bounded) until process `pid` holds `n` sockets again: the server
// closed every connection it accepted. Sockets only: UBSan's runtime opens a
// pipe of its own when it first probes memory, at a moment of its choosing.
bool wait_fd_count(pid_t pid, std::size_t n, std::chrono::milliseconds limit = 10s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (count_sockets(open_descriptors(pid)) != n) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(5ms);  // polling another process's state, bounded
  }
  return true;
}

// SIGTERM drains and exits 0.
void expect_clean_exit(echo_process& srv) {
  srv.proc.signal(SIGTERM);
  const auto status = srv.proc.wait(30s);
  ASSERT_TRUE(status.has_value()) << "closewise-echo did not exit after SIGTERM";
  EXPECT_EQ(*status, 0) << srv.proc.err();
}

// nc of OpenBSD (the one with -N); the traditional netcat has no half-close flag.
std::string openbsd_nc() {
  const std::string nc = find_tool("nc");
  if (nc.empty()) return {};
  child probe({nc, "-h"});
  (void)probe.wait(10s);
  return (probe.out() + probe.err()).find("OpenBSD") != std::string::npos ? nc : std::string{};
}

struct piped_file {
  temp_dir dir;
  std::string in = dir.file("in.bin");
  std::string out = dir.file("out.bin");
  std::uint64_t size;
  std::string digest;
  explicit piped_file(std::uint64_t n) : size(n), digest(write_seeded_file(in, n, 404)) {}
};

// Runs a client tool with the file as stdin and the output file as stdout;
// expects exit 0 and the file back, identical.
void pipe_through(const std::vector<std::string>& argv, piped_file& f) {
  child tool(argv, {f.in, f.out, true});
  const auto status = tool.wait(120s);
  ASSERT_TRUE(status.has_value()) << argv.front() << " did not finish";
  EXPECT_EQ(*status, 0) << tool.err();
  const auto back = file_digest(f.out);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->second, f.size);
  EXPECT_EQ(back->first, f.digest);
}

TEST_F(echo_binary_test, nc_pipes_a_file_through_and_gets_it_back_identical) {
  const std::string nc = openbsd_nc();
  if (nc.empty()) GTEST_SKIP() << "nc (netcat-openbsd, with -N) is not installed; scripts/deps.sh test installs it";
  piped_file f(scaled(8u << 20, 1u << 20));
  echo_process srv({"--listen", "127.0.0.1:0", "--threads", "1"});
  const std::size_t fds = count_sockets(open_descriptors(srv.proc.pid()));
  pipe_through({nc, "-N", "127.0.0.1", std::to_string(srv.port())}, f);
  EXPECT_TRUE(wait_fd_count(srv.proc.pid(), fds)) << "the server kept a connection's descriptor";
  expect_no_half_closed_leftovers(srv.port());
  expect_clean_exit(srv);
}

TEST_F(echo_binary_test, socat_pipes_a_file_through_and_gets_it_back_identical) {
  const std::string socat = find_tool("socat");
  if (socat.empty()) GTEST_SKIP() << "socat is not installed; scripts/deps.sh test installs it";
  piped_file f(scaled(8u << 20, 1u << 20));
  echo_process srv({"--listen", "127.0.0.1:0", "--threads", "1"});
  const std::size_t fds = count_sockets(open_descriptors(srv.proc.pid()));
  // -t: after stdin's EOF (our half-close) keep receiving for up to 60 s;
  // socat's default of 0.5 s would cut a slow echo short.
  pipe_through({socat, "-t", "60", "-", "TCP:127.0.0.1:" + std::to_string(srv.port())}, f);
  EXPECT_TRUE(wait_fd_count(srv.proc.pid(), fds)) << "the server kept a connection's descriptor";
  expect_no_half_closed_leftovers(srv.port());
  expect_clean_exit(srv);
}

TEST_F(echo_binary_test, unix_listener_echoes_a_file_for_the_client_mode) {
  temp_dir dir;
  const std::string path = dir.file("echo.sock");
  echo_process srv({"--unix", path, "--threads", "1"});
  ASSERT_EQ(srv.endpoints.front(), "unix:" + path);
  const std::size_t fds = count_sockets(open_descriptors(srv.proc.pid()));

  child client(
      {echo_binary(), "--client", "unix:" + path, "--bytes", std::to_string(scaled(4u << 20, 1u << 20)), "--json"});
  const auto status = client.wait(60s);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(*status, 0) << client.out() << client.err();
  const auto j = nlohmann::json::parse(client.out(), nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << client.out();
  EXPECT_TRUE(j.value("match", false));
  EXPECT_EQ(j.value("end", ""), "eof");
  EXPECT_TRUE(wait_fd_count(srv.proc.pid(), fds)) << "the server kept a connection's descriptor";
  expect_clean_exit(srv);
}

// A client nobody here wrote on the Unix socket: a test of its own, so that
// without nc ctest reports it skipped rather than a pass that checked less.
TEST_F(echo_binary_test, unix_listener_echoes_a_file_for_nc) {
  const std::string nc = openbsd_nc();
  if (nc.empty()) GTEST_SKIP() << "nc (netcat-openbsd, with -N) is not installed; scripts/deps.sh test installs it";
  temp_dir dir;
  const std::string path = dir.file("echo.sock");
  echo_process srv({"--unix", path, "--threads", "1"});
  ASSERT_EQ(srv.endpoints.front(), "unix:" + path);
  const std::size_t fds = count_sockets(open_descriptors(srv.proc.pid()));
  piped_file f(scaled(4u << 20, 1u << 20));
  pipe_through({nc, "-N", "-U", path}, f);
  EXPECT_TRUE(wait_fd_count(srv.proc.pid(), fds)) << "the server kept a connection's descriptor";
  expect_clean_exit(srv);
}

// The client mode against the server: exit 0 and a match; --file too.
TEST_F(echo_binary_test, client_mode_reports_matching_digests) {
  echo_process srv({"--listen", "127.0.0.1:0", "--threads", "2"});
  const std::size_t fds = count_sockets(open_descriptors(srv.proc.pid()));
  const std::string target = "127.0.0.1:" + std::to_string(srv.port());
  {
    child client({echo_binary(), "--client", target, "--bytes", std::to_string(scaled(20'000'000, 1'000'000)), "--seed",
                  "5", "--chunk", "10000", "--json"});
    const auto status = client.wait(60s);
    ASSERT_TRUE(status.has_value());
    EXPECT_EQ(*status, 0) << client.out() << client.err();
    const auto j = nlohmann::json::parse(client.out(), nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << client.out();
    EXPECT_TRUE(j.value("match", false));
    EXPECT_EQ(j.value("bytes_sent", 0u), j.value("bytes_received", 1u));
    EXPECT_EQ(j.value("sha256_sent", "x"), j.value("sha256_received", "y"));
    EXPECT_EQ(j.value("sha256_sent", "").size(), 64u);
  }
  {
    piped_file f(1'234'567);
    child client({echo_binary(), "--client", target, "--file", f.in});
    const auto status = client.wait(60s);
    ASSERT_TRUE(status.has_value());
    EXPECT_EQ(*status, 0) << client.out() << client.err();
    EXPECT_NE(client.out().find("sha256 " + f.digest), std::string::npos) << client.out();
    EXPECT_NE(client.out().find("digests match: yes"), std::string::npos) << client.out();
  }
  EXPECT_TRUE(wait_fd_count(srv.proc.pid(), fds)) << "the server kept a connection's descriptor";
  expect_no_half_closed_leftovers(srv.port());
  expect_clean_exit(srv);
}

// --teardown abortive: the client sees RST (ECONNRESET), never EOF; the
// client mode says so and exits 1 only if bytes were lost.
TEST_F(echo_binary_test, abortive_teardown_reaches_the_client_as_reset) {
  echo_process srv({"--listen", "127.0.0.1:0", "--threads", "1", "--teardown", "abortive"});
  const int fd = connect_tcp(srv.port());
  ASSERT_GE(fd, 0);
  exchange_plan plan;
  plan.bytes = 300'000;
  const exchange_result r = run_exchange(fd, plan);
  ::close(fd);
  EXPECT_FALSE(r.eof) << "EOF before the reset";
  EXPECT_EQ(r.error, ECONNRESET);

  child client({echo_binary(), "--client", "127.0.0.1:" + std::to_string(srv.port()), "--bytes", "1000", "--json"});
  ASSERT_TRUE(client.wait(60s).has_value());
  const auto j = nlohmann::json::parse(client.out(), nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << client.out();
  EXPECT_EQ(j.value("end", ""), "reset");
  expect_no_half_closed_leftovers(srv.port());
  expect_clean_exit(srv);
}

// SIGTERM with --stats: drain, the statistics as JSON on stdout, exit 0.
TEST_F(echo_binary_test, sigterm_drains_and_prints_stats) {
  echo_process srv({"--listen", "127.0.0.1:0", "--stats"});
  const int fd = connect_tcp(srv.port());
  ASSERT_GE(fd, 0);
  exchange_plan plan;
  plan.bytes = 100'000;
  const exchange_result r = run_exchange(fd, plan);
  ::close(fd);
  EXPECT_TRUE(r.matches());
  // An idle connection at SIGTERM: the drain closes it gracefully (our FIN).
  // One byte echoed first proves the server accepted it (a connection still
  // in the backlog would be reset when the listener closes).
  const int idle = connect_tcp(srv.port());
  ASSERT_GE(idle, 0);
  char byte = 'x';
  ASSERT_EQ(::send(idle, &byte, 1, MSG_NOSIGNAL), 1);
  pollfd p{idle, POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 20'000), 1);
  ASSERT_EQ(::recv(idle, &byte, 1, 0), 1);
  srv.proc.signal(SIGTERM);
  ASSERT_EQ(::poll(&p, 1, 20'000), 1) << "no FIN from the drain";
  EXPECT_EQ(::recv(idle, &byte, 1, 0), 0) << "the drain should end an idle connection with FIN";
  ::close(idle);
  const auto status = srv.proc.wait(30s);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(*status, 0) << srv.proc.err();
  const auto j = nlohmann::json::parse(srv.proc.out().substr(srv.proc.out().find('{')), nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << srv.proc.out();
  EXPECT_EQ(j.value("connections_accepted", 0u), 2u);
  EXPECT_EQ(j.value("connections_closed", 0u), 2u);
  EXPECT_EQ(j.value("drain_closed", 0u), 1u);
  expect_no_half_closed_leftovers(srv.port());
}

// ---- the command line -----------------------------------------------------------

struct run_result {
  int status = -1;
  std::string out;
  std::string err;
};

run_result run(std::vector<std::string> args) {
  args.insert(args.begin(), echo_binary());
  child c(args);
  const auto status = c.wait(20s);
  return {status.value_or(-1), c.out(), c.err()};
}

std::size_t lines(const std::string& s) { return static_cast<std::size_t>(std::count(s.begin(), s.end(), '\n')); }

TEST_F(echo_binary_test, help_explains_every_flag_and_exits_0) {
  const auto r = run({"--help"});
  EXPECT_EQ(r.status, 0);
  for (const char* flag : {"--listen", "--unix", "--threads", "--teardown", "--linger-timeout", "--idle-timeout",
                           "--max-connections", "--log-level", "--stats", "--version", "--client", "--file", "--bytes",
                           "--seed", "--chunk", "--json", "--no-verify", "--timeout", "listening on"}) {
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag << " missing from --help";
  }
}

TEST_F(echo_binary_test, bad_flags_exit_2_with_one_line_on_stderr) {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--no-such-flag"},
           {"--teardown", "sometimes"},
           {"--listen", "not-an-endpoint"},
           {"--threads", "many"},
           {"--client", "127.0.0.1:1"},  // neither --file nor --bytes
           {"--bytes", "10"},            // client flag without --client
           {"--client", "127.0.0.1:1", "--bytes", "10", "--file", "/etc/hostname"},
       }) {
    const auto r = run(args);
    EXPECT_EQ(r.status, 2) << args.front() << ": " << r.err;
    EXPECT_EQ(lines(r.err), 1u) << args.front() << ": " << r.err;
    EXPECT_EQ(r.err.rfind("closewise-echo: error: ", 0), 0u) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
}

TEST_F(echo_binary_test, version_prints_name_and_version) {
  const auto r = run({"--version"});
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.out, std::string("closewise-echo ") + closewise::version_string + "\n");
}

TEST_F(echo_binary_test, listen_on_a_taken_port_fails_with_status_1) {
  echo_process srv({"--listen", "127.0.0.1:0", "--threads", "1"});
  const auto r = run({"--listen", "127.0.0.1:" + std::to_string(srv.port())});
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  expect_clean_exit(srv);
}

}  // namespace
