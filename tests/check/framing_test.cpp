// closewise-check's framing battery: against a deliberately lenient server
// (it must find the desyncs that server has), against an in-process
// closewise-reqresp (it must find none), and the case list itself.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "check/framing.hpp"
#include "closewise/server.hpp"
#include "closewise/tls.hpp"
#include "reqresp/http_session.hpp"

using namespace closewise;
using namespace closewise::check;

namespace {

// Bounds every wait of the lenient server: the battery closes each
// connection itself, so this only ends a connection the test abandoned.
constexpr int wait_ms = 10000;

// Waits until `fd` is readable; false on timeout or error.
bool readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, wait_ms) == 1;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// The classic smuggling leniencies in one blocking thread-per-connection
// server: it ignores Transfer-Encoding, frames every body by the first
// Content-Length (read with strtoull, so "5, 6" is 5 and "+5" is 5), and
// answers whatever it parses, keeping the connection open unless asked to
// close. "/" answers 200, any other path 404, a line that is no request 400.
class lenient_server {
 public:
  /// `silent`: read everything, answer nothing (until the client closes).
  explicit lenient_server(bool silent = false) : silent_(silent) {
    listen_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (listen_ < 0 || ::bind(listen_, reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(listen_, 64) != 0 ||
        ::getsockname(listen_, reinterpret_cast<sockaddr*>(&a), &len) != 0 || ::pipe(stop_) != 0) {
      throw std::runtime_error("lenient_server: setup failed");
    }
    endpoint_ = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~lenient_server() {
    const char c = 0;
    (void)!::write(stop_[1], &c, 1);
    acceptor_.join();
    for (auto& t : connections_) t.join();
    ::close(listen_);
    ::close(stop_[0]);
    ::close(stop_[1]);
  }
  lenient_server(const lenient_server&) = delete;
  lenient_server& operator=(const lenient_server&) = delete;

  const std::string& endpoint() const { return endpoint_; }

 private:
  void accept_loop() {
    for (;;) {
      pollfd p[2] = {{listen_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0) return;
      if (p[1].revents) return;
      const int fd = ::accept(listen_, nullptr, nullptr);
      if (fd < 0) continue;
      if (silent_) {
        connections_.emplace_back([fd] { drain(fd); });
      } else {
        connections_.emplace_back([fd] { serve(fd); });
      }
    }
  }

  // Reads until `buf` holds at least `n` bytes; false when the peer is gone.
  static bool fill(int fd, std::string& buf, std::size_t n) {
    char chunk[4096];
    while (buf.size() < n) {
      if (!readable(fd)) return false;
      const ssize_t r = ::recv(fd, chunk, sizeof chunk, 0);
      if (r <= 0) return false;
      buf.append(chunk, static_cast<std::size_t>(r));
    }
    return true;
  }

  static void serve(int fd) {
    std::string buf;
    for (;;) {
      std::size_t end;
      while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
        if (!fill(fd, buf, buf.size() + 1)) return finish(fd, false);
      }
      const std::string head = buf.substr(0, end + 2);
      buf.erase(0, end + 4);
      // The request line: METHOD SP TARGET SP HTTP/1.x, split on the first spaces.
      const std::string line = head.substr(0, head.find("\r\n"));
      const auto sp1 = line.find(' ');
      const auto sp2 = sp1 == std::string::npos ? sp1 : line.find(' ', sp1 + 1);
      const bool valid = sp2 != std::string::npos && sp1 > 0 && line.compare(sp2 + 1, 7, "HTTP/1.") == 0;
      if (!valid) {
        respond(fd, 400, true);
        return finish(fd, true);
      }
      const std::string path = line.substr(sp1 + 1, sp2 - sp1 - 1);
      std::optional<std::size_t> length;
      bool close = false;
      for (std::size_t pos = head.find("\r\n") + 2; pos < head.size();) {
        const auto eol = head.find("\r\n", pos);
        const std::string field = head.substr(pos, eol - pos);
        pos = eol + 2;
        const auto colon = field.find(':');
        if (colon == std::string::npos) continue;
        const std::string name = lower(field.substr(0, colon));
        const std::string value = lower(field.substr(colon + 1));
        if (name == "content-length" && !length) length = std::strtoull(value.c_str(), nullptr, 10);
        if (name == "connection" && value.find("close") != std::string::npos) close = true;
      }
      if (length) {
        if (!fill(fd, buf, *length)) return finish(fd, false);
        buf.erase(0, *length);
      }
      respond(fd, path == "/" ? 200 : 404, close);
      if (close) return finish(fd, true);
    }
  }

  static void respond(int fd, int status, bool close) {
    std::string r = "HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Length: 2\r\n";
    if (close) r.append("Connection: close\r\n");
    r.append("\r\nok");
    (void)::send(fd, r.data(), r.size(), MSG_NOSIGNAL);
  }

  // A graceful close: our FIN, then read the rest until the peer's FIN (a
  // close with unread bytes would be a RST that destroys the answers).
  static void finish(int fd, bool graceful) {
    if (graceful) ::shutdown(fd, SHUT_WR);
    drain(fd);
  }
  // Reads until the peer's FIN (or the bound), then closes.
  static void drain(int fd) {
    char sink[4096];
    while (readable(fd) && ::recv(fd, sink, sizeof sink, 0) > 0) {
    }
    ::close(fd);
  }

  bool silent_ = false;
  int listen_ = -1;
  int stop_[2] = {-1, -1};
  std::string endpoint_;
  std::thread acceptor_;
  std::vector<std::thread> connections_;  // joined on destruction; only the acceptor touches it
};

const row* find_case(const row& r, const std::string& name) {
  for (const auto& c : r.cases) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

std::string outcome(const row& r, const std::string& name) {
  const row* c = find_case(r, name);
  return c ? c->facts.value("outcome", std::string("none")) : std::string("missing");
}

std::string table(const row& r) {
  std::string s;
  for (const auto& c : r.cases) s.append(c.name).append(": ").append(c.observed).append(" | ").append(c.reason) += '\n';
  return s;
}

TEST(framing_cases, at_least_25_with_unique_names_and_their_rules) {
  const auto& cases = framing_cases();
  EXPECT_GE(cases.size(), 25u);
  std::set<std::string> names;
  for (const auto& c : cases) {
    EXPECT_TRUE(names.insert(c.name).second) << "duplicate case " << c.name;
    EXPECT_FALSE(c.rfc.empty()) << c.name;
    EXPECT_FALSE(c.what.empty()) << c.name;
  }
}

TEST(framing, a_lenient_server_desyncs_and_fails) {
  lenient_server s;
  options o;
  o.target = s.endpoint();
  const row r = check_framing(o);
  EXPECT_EQ(r.result, verdict::fail) << r.observed;
  EXPECT_EQ(r.cases.size(), framing_cases().size());
  // It frames by the first Content-Length and ignores Transfer-Encoding.
  for (const char* name : {"cl-cl", "cl-list-diff", "cl-te", "te-cl", "te-xchunked", "te-tab", "http10-te", "get-te",
                           "chunk-size-0x", "chunk-size-wrap"}) {
    EXPECT_EQ(outcome(r, name), "desync") << name << "\n" << table(r);
    const row* c = find_case(r, name);
    if (c) {
      EXPECT_EQ(c->result, verdict::fail) << name;
    }
  }
  // Where its choice agrees with the reference framing, it is only lenient.
  for (const char* name : {"cl-cl-reversed", "cl-list-same", "cl-plus", "get-cl-body"}) {
    EXPECT_EQ(outcome(r, name), "lenient") << name << "\n" << table(r);
  }
  EXPECT_NE(r.reason.find("cl-te"), std::string::npos) << r.reason;
}

TEST(framing, closewise_reqresp_passes_every_case) {
  server_options so;
  so.listen = {"127.0.0.1:0"};
  so.threads = 1;
  reqresp::http_server s(so, {});
  options o;
  o.target = s.endpoint();
  const row r = check_framing(o);
  EXPECT_EQ(r.result, verdict::pass) << r.observed << "\n" << table(r);
  EXPECT_EQ(r.facts.value("desync", 1), 0) << table(r);
  ASSERT_EQ(r.cases.size(), framing_cases().size());
  for (const auto& c : r.cases) {
    EXPECT_NE(c.result, verdict::skip) << c.name << ": " << c.reason;
    EXPECT_FALSE(c.observed.empty()) << c.name;
  }
  // A GET may carry a body (framed as any other); Content-Length with
  // Transfer-Encoding is refused.
  EXPECT_EQ(outcome(r, "get-cl-body"), "lenient") << table(r);
  EXPECT_EQ(outcome(r, "cl-te"), "rejected") << table(r);
  std::cout << r.observed << "\n" << table(r);
}

TEST(framing, closewise_reqresp_over_tls_passes_every_case) {
  server_options so;
  so.listen = {"127.0.0.1:0"};
  so.threads = 1;
  so.tls = std::make_shared<asio::ssl::context>(make_server_context(make_self_signed_certificate()));
  reqresp::http_server s(so, {});
  options o;
  o.target = s.endpoint();
  o.tls = true;
  const row r = check_framing(o);
  EXPECT_EQ(r.result, verdict::pass) << r.observed << "\n" << table(r);
  EXPECT_EQ(r.facts.value("desync", 1), 0) << table(r);
  for (const auto& c : r.cases) EXPECT_NE(c.result, verdict::skip) << c.name << ": " << c.reason;
  // The requests got through the TLS layer: a valid framing is answered twice.
  EXPECT_EQ(outcome(r, "get-cl-body"), "lenient") << table(r);
  EXPECT_EQ(outcome(r, "cl-te"), "rejected") << table(r);
}

// A server that never answers costs a case its bound and no verdict of
// desync: nothing was executed. The bound is the test's own (a silent
// server stays silent however slow the machine).
TEST(framing, a_silent_server_is_unanswered_within_the_bound) {
  lenient_server s(true);
  options o;
  o.target = s.endpoint();
  o.wait_limit = std::chrono::milliseconds(300);
  const row r = check_framing_case("cl-te", o);
  EXPECT_EQ(r.result, verdict::pass) << r.observed;
  EXPECT_EQ(r.facts.value("outcome", std::string()), "unanswered") << r.observed;
  EXPECT_EQ(r.facts.value("responses", 1), 0);
  EXPECT_EQ(r.facts.value("end", std::string()), "timeout");
}

TEST(framing, an_unknown_case_is_skipped_and_a_dead_target_skips) {
  options o;
  o.target = "127.0.0.1:1";
  o.wait_limit = std::chrono::milliseconds(2000);
  EXPECT_EQ(check_framing_case("no-such-case", o).result, verdict::skip);
  const row r = check_framing_case("cl-te", o);
  EXPECT_EQ(r.result, verdict::skip);
  EXPECT_FALSE(r.reason.empty());
}

}  // namespace
