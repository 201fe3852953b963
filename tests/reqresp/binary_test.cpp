// The real closewise-reqresp and closewise-demo binaries as subprocesses:
// flags and exit statuses, the "listening on" line, SIGTERM's drain, and the
// demo's verdict against a server that closes badly.

#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "../support/child_process.hpp"
#include "../support/loopback.hpp"

using namespace closewise::test;
using namespace std::chrono_literals;

namespace {

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

// closewise-demo --tls: every TLS row as expected, as the binary prints it;
// --tls with --target or a scenario past the TLS ones is a usage error.
TEST(demo_binary, tls_run_exits_0_with_every_row_as_expected) {
  child ok({CLOSEWISE_DEMO_BINARY, "--tls", "--json"});
  ASSERT_TRUE(ok.started());
  EXPECT_EQ(ok.wait(120s), 0) << ok.out() << ok.err();
  EXPECT_NE(ok.out().find("\"tls\": true"), std::string::npos) << ok.out();
  EXPECT_NE(ok.out().find("\"all_match\": true"), std::string::npos) << ok.out();
  EXPECT_NE(ok.out().find("\"scenarios\": 8"), std::string::npos) << ok.out();
  EXPECT_NE(ok.out().find("\"peer_end\": \"truncated\""), std::string::npos) << ok.out();
  EXPECT_NE(ok.out().find("\"close_cause\": \"linger_timeout\""), std::string::npos) << ok.out();
  child table({CLOSEWISE_DEMO_BINARY, "--tls", "--only", "3"});
  ASSERT_TRUE(table.started());
  EXPECT_EQ(table.wait(60s), 0) << table.out() << table.err();
  EXPECT_NE(table.out().find("1 of 1 scenarios as expected"), std::string::npos) << table.out();
  for (const std::vector<std::string>& bad : {std::vector<std::string>{"--tls", "--target", "127.0.0.1:1"},
                                              std::vector<std::string>{"--tls", "--only", "9"}}) {
    std::vector<std::string> args{CLOSEWISE_DEMO_BINARY};
    args.insert(args.end(), bad.begin(), bad.end());
    child c(args);
    EXPECT_EQ(c.wait(10s), 2) << bad.front() << " " << bad.back();
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
