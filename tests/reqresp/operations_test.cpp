// Operations: the readiness endpoint and --drain-delay under load (the real
// closewise-reqresp, SIGTERM), and listening sockets inherited the way
// systemd passes them (systemd-socket-activate; a socket the test holds
// while it replaces instance after instance; server_options::inherited_listeners).

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "../support/child_process.hpp"
#include "../support/external_tools.hpp"
#include "../support/loopback.hpp"
#include "closewise/server.hpp"

using namespace closewise::test;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

// One HTTP response as a blocking client saw it; `error` says why there is none.
struct answer {
  int status = 0;
  bool close = false;  // Connection: close
  std::string error;
};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// Sends GET `path` on `fd` and reads the whole response (Content-Length
// framed, as closewise-reqresp answers), within `limit`.
answer get(int fd, const std::string& path, bool keep_alive = true, std::chrono::milliseconds limit = 15s) {
  answer a;
  const std::string req =
      "GET " + path + " HTTP/1.1\r\nHost: x\r\n" + (keep_alive ? "" : "Connection: close\r\n") + "\r\n";
  if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
    a.error = "send failed: errno " + std::to_string(errno);
    return a;
  }
  std::string got;
  std::size_t need = std::string::npos;  // header + body, once the header is known
  const auto end = steady::now() + limit;
  char buf[4096];
  while (got.size() < need) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - steady::now()).count();
    if (left <= 0) {
      a.error = "no complete response in time";
      return a;
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::min<long>(left, 200))) != 1) continue;
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) {
      a.error = n == 0 ? "EOF before the response ended" : "recv failed: errno " + std::to_string(errno);
      return a;
    }
    got.append(buf, static_cast<std::size_t>(n));
    if (need != std::string::npos) continue;
    const auto head_end = got.find("\r\n\r\n");
    if (head_end == std::string::npos) continue;
    const std::string head = lower(got.substr(0, head_end));
    std::size_t length = 0;
    if (const auto cl = head.find("\r\ncontent-length:"); cl != std::string::npos)
      length = std::stoul(head.substr(cl + 17));
    need = head_end + 4 + length;
    a.close = head.find("\r\nconnection: close") != std::string::npos;
    if (got.rfind("HTTP/1.1 ", 0) == 0) a.status = std::stoi(got.substr(9, 3));
  }
  return a;
}

// The text of a file (the server's log) as it is now.
std::string file_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Waits (bounded) until the file contains `marker`.
bool wait_for_text(const std::string& path, const std::string& marker, std::chrono::milliseconds limit = 20s) {
  const auto end = steady::now() + limit;
  while (steady::now() < end) {
    if (file_text(path).find(marker) != std::string::npos) return true;
    std::this_thread::sleep_for(5ms);
  }
  return false;
}

// A client thread doing keep-alive GET / until the server says Connection:
// close (the drain reached it), `stop`, or its bounds (count, time).
struct keep_alive_client {
  std::atomic<unsigned> served{0};
  std::atomic<unsigned> served_after_mark{0};  // answered once `mark` was set
  std::atomic<unsigned> failed{0};
  std::atomic<bool> ended_by_close{false};
  std::string first_error;
  std::thread thread;

  void start(std::uint16_t port, const std::atomic<bool>& mark, const std::atomic<bool>& stop) {
    thread = std::thread([this, port, &mark, &stop] {
      auto p = connect_to(port);
      if (p.fd() < 0) {
        failed = 1;
        first_error = "connect failed";
        return;
      }
      const auto end = steady::now() + 30s;
      for (unsigned i = 0; i < 200000 && steady::now() < end && !stop; ++i) {
        const bool marked = mark.load();
        const answer a = get(p.fd(), "/");
        if (!a.error.empty() || a.status != 200) {
          ++failed;
          first_error = a.error.empty() ? "status " + std::to_string(a.status) : a.error;
          return;
        }
        ++served;
        if (marked) ++served_after_mark;
        if (a.close) {
          ended_by_close = true;
          return;
        }
      }
    });
  }
};

// Waits (bounded) until pred() holds.
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = 20s) {
  const auto end = steady::now() + limit;
  while (!pred() && steady::now() < end) std::this_thread::sleep_for(2ms);
  return pred();
}

constexpr int load_clients = 3;

// closewise-reqresp on 127.0.0.1:0 with --drain-delay `delay`, its log in a file.
struct delayed_server {
  explicit delayed_server(const char* delay)
      : c({CLOSEWISE_REQRESP_BINARY, "--listen", "127.0.0.1:0", "--threads", "2", "--drain-delay", delay,
           "--drain-idle-grace", "5", "--log-level", "info"},
          log) {}
  // Waits for the "listening on" line; false if it did not come.
  bool up() {
    const auto line = c.started() ? c.read_line(10s) : std::nullopt;
    port = line ? port_of_listening_line(*line) : 0;
    return port != 0;
  }
  temp_dir dir;
  const std::string log = dir.file("server.log");
  child c;
  std::uint16_t port = 0;
};

// SIGTERM with --drain-delay 30: /ready answers 503 from the signal on (the
// first /ready sent after the server logged the signal; in practice the
// first or second after kill(2)), while GET / keeps being served with keep-alive; a
// second SIGTERM drains at once: every client gets Connection: close, no
// request fails, the process exits 0.
TEST(reqresp_readiness, sigterm_turns_ready_503_first_and_serves_through_the_delay) {
  delayed_server s("30");
  ASSERT_TRUE(s.up()) << file_text(s.log);
  auto& c = s.c;
  const auto& log = s.log;

  auto poller = connect_to(s.port);
  ASSERT_GE(poller.fd(), 0);
  const answer before = get(poller.fd(), "/ready");
  ASSERT_EQ(before.status, 200) << before.error;
  EXPECT_FALSE(before.close);

  std::atomic<bool> mark{false}, stop{false};
  std::vector<keep_alive_client> clients(load_clients);
  for (auto& cl : clients) cl.start(s.port, mark, stop);
  auto total = [&] {
    unsigned n = 0;
    for (auto& cl : clients) n += cl.served;
    return n;
  };
  EXPECT_TRUE(eventually([&] { return total() >= 30; }));

  // The signal, then /ready in a loop until it answers 503.
  c.signal(SIGTERM);
  unsigned ok_after_kill = 0;
  bool logged = false;
  answer r;
  for (int i = 0; i < 20000; ++i) {
    logged = file_text(log).find("not ready") != std::string::npos;
    r = get(poller.fd(), "/ready");
    ASSERT_TRUE(r.error.empty()) << r.error;
    if (r.status != 200) break;
    ++ok_after_kill;
    ASSERT_FALSE(logged) << "/ready answered 200 after the server logged the signal";
    if (i > 0) std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(r.status, 503);
  EXPECT_FALSE(r.close) << "during the delay /ready keeps the connection like every other answer";
  ASSERT_TRUE(wait_for_text(log, "not ready")) << file_text(log);
  mark = true;

  // The delay: everything else is served as before, keep-alive included.
  EXPECT_TRUE(eventually([&] {
    return std::all_of(clients.begin(), clients.end(), [](auto& cl) { return cl.served_after_mark >= 20; });
  })) << "requests during the delay: "
      << total();
  const answer root = get(poller.fd(), "/");
  EXPECT_EQ(root.status, 200) << root.error;
  EXPECT_FALSE(root.close);
  unsigned during_delay = 0;
  for (auto& cl : clients) during_delay += cl.served_after_mark;

  // A second signal: the drain at once.
  c.signal(SIGTERM);
  ASSERT_TRUE(wait_for_text(log, "signal 15: draining")) << file_text(log);
  const answer drained = get(poller.fd(), "/ready");
  EXPECT_EQ(drained.status, 503) << drained.error;
  EXPECT_TRUE(drained.close) << "in the drain /ready says Connection: close";
  poller.close();
  for (auto& cl : clients) cl.thread.join();
  unsigned failed = 0;
  for (auto& cl : clients) {
    failed += cl.failed;
    EXPECT_EQ(cl.failed, 0u) << cl.first_error;
    EXPECT_TRUE(cl.ended_by_close) << "the drain ends every keep-alive client with Connection: close";
  }
  EXPECT_EQ(c.wait(20s), 0) << file_text(log);
  std::printf(
      "readiness: /ready 503 after %u answers of 200 following SIGTERM; %u requests, %u during the delay, %u "
      "failed; exit 0 after the second SIGTERM\n",
      ok_after_kill, total(), during_delay, failed);
}

// One SIGTERM with a short --drain-delay: /ready answers 503, the delay
// runs out, the drain proceeds as without a delay (Connection: close to
// every keep-alive client, no failed request, exit 0).
TEST(reqresp_readiness, drain_follows_the_delay_and_exits_0) {
  delayed_server s("0.3");
  ASSERT_TRUE(s.up()) << file_text(s.log);
  auto& c = s.c;
  const auto& log = s.log;
  std::atomic<bool> mark{false}, stop{false};
  std::vector<keep_alive_client> clients(load_clients);
  for (auto& cl : clients) cl.start(s.port, mark, stop);
  EXPECT_TRUE(eventually([&] { return clients[0].served + clients[1].served + clients[2].served >= 30; }));
  c.signal(SIGTERM);
  ASSERT_TRUE(wait_for_text(log, "not ready")) << file_text(log);
  ASSERT_TRUE(wait_for_text(log, "drain delay over: draining")) << file_text(log);
  for (auto& cl : clients) cl.thread.join();
  for (auto& cl : clients) {
    EXPECT_EQ(cl.failed, 0u) << cl.first_error;
    EXPECT_TRUE(cl.ended_by_close);
  }
  EXPECT_EQ(c.wait(20s), 0) << file_text(log);
}

// ---- Socket activation ----

// Connects to the Unix socket at `path` once something listens on it: the
// file appears at bind(2), before listen(2).
raw_peer connect_once_listening(const std::string& path) {
  raw_peer p;
  eventually(
      [&] {
        p = connect_unix(path);
        return p.fd() >= 0;
      },
      10s);
  return p;
}

// closewise-reqresp and closewise-echo under systemd-socket-activate on a Unix
// socket of a fresh directory: --systemd finds the socket, serves on it and
// drains on SIGTERM.
TEST(socket_activation, systemd_socket_activate_passes_a_unix_listener) {
  const auto tool = find_program("systemd-socket-activate");
  if (!tool) GTEST_SKIP() << "systemd-socket-activate is not installed (Debian package systemd)";
  temp_dir dir;
  {
    const std::string sock = dir.file("reqresp.sock");
    child c({*tool, "-l", sock, CLOSEWISE_REQRESP_BINARY, "--systemd", "--threads", "1", "--log-level", "warn"});
    ASSERT_TRUE(c.started());
    auto p = connect_once_listening(sock);  // the tool starts the server at the first connection
    ASSERT_GE(p.fd(), 0);
    const answer a = get(p.fd(), "/ready");
    EXPECT_EQ(a.status, 200) << a.error;
    const answer b = get(p.fd(), "/");
    EXPECT_EQ(b.status, 200) << b.error;
    const auto line = c.read_line(10s);
    ASSERT_TRUE(line);
    EXPECT_EQ(*line, "listening on unix:" + sock);
    p.close();
    c.signal(SIGTERM);  // the tool exec'd the server: the same process
    EXPECT_EQ(c.wait(20s), 0) << c.err();
  }
  {
    const std::string sock = dir.file("echo.sock");
    child c({*tool, "-l", sock, CLOSEWISE_ECHO_BINARY, "--systemd", "--threads", "1"});
    ASSERT_TRUE(c.started());
    auto p = connect_once_listening(sock);
    ASSERT_GE(p.fd(), 0);
    ASSERT_EQ(p.send(std::string("hello, activation")), 17);
    p.shutdown_write();
    std::string got;
    const auto end = p.drain(&got);
    EXPECT_TRUE(end.eof);
    EXPECT_EQ(got, "hello, activation");
    c.signal(SIGTERM);
    EXPECT_EQ(c.wait(20s), 0) << c.err();
  }
}

// --systemd without sockets from systemd is a setup failure.
TEST(socket_activation, systemd_flag_without_sockets_fails) {
  child c({CLOSEWISE_REQRESP_BINARY, "--systemd"});
  ASSERT_TRUE(c.started());
  EXPECT_EQ(c.wait(10s), 1);
  EXPECT_NE(c.err().find("no listening sockets passed by systemd"), std::string::npos) << c.err();
}

// A closewise-reqresp started as systemd starts an activated service: the
// listening socket at descriptor 3, LISTEN_FDS=1 and LISTEN_PID=its pid.
class activated_instance {
 public:
  activated_instance(int listener, const std::vector<std::string>& args) {
    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return;
    // Everything the child needs is made before fork: after it, in a
    // threaded process, only async-signal-safe calls.
    std::vector<std::string> env_text;
    for (char** e = environ; *e; ++e) {
      const std::string v(*e);
      if (!v.starts_with("LISTEN_")) env_text.push_back(v);
    }
    env_text.push_back("LISTEN_FDS=1");
    env_text.push_back("LISTEN_PID=" + std::string(20, '\0'));  // the digits are written in the child
    std::vector<char*> envp, argv;
    for (auto& e : env_text) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::vector<std::string> args_copy = args;
    for (auto& a : args_copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    char* pid_digits = env_text.back().data() + 11;
    const int devnull = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    pid_ = ::fork();
    if (pid_ == 0) {
      char digits[20];
      int n = 0;
      for (pid_t v = ::getpid(); v > 0; v /= 10) digits[n++] = static_cast<char>('0' + v % 10);
      for (int i = 0; i < n; ++i) pid_digits[i] = digits[n - 1 - i];
      pid_digits[n] = '\0';
      ::dup2(devnull, 0);
      ::dup2(out[1], 1);
      ::dup2(devnull, 2);
      if (listener == 3) {
        ::fcntl(3, F_SETFD, 0);
      } else {
        ::dup2(listener, 3);  // dup2 clears close-on-exec on the copy
      }
      ::execve(argv[0], argv.data(), envp.data());
      ::_exit(127);
    }
    ::close(devnull);
    ::close(out[1]);
    out_ = out[0];
    if (pid_ > 0) pidfd_ = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
  }
  ~activated_instance() {
    if (pid_ > 0 && !status_) {
      ::kill(pid_, SIGKILL);
      wait(5s);
    }
    for (int fd : {out_, pidfd_}) {
      if (fd >= 0) ::close(fd);
    }
  }
  activated_instance(const activated_instance&) = delete;
  activated_instance& operator=(const activated_instance&) = delete;

  bool started() const { return pid_ > 0 && pidfd_ >= 0; }
  void signal(int sig) {
    if (pid_ > 0 && !status_) ::kill(pid_, sig);
  }
  // The first line of stdout, within `limit`.
  std::optional<std::string> read_line(std::chrono::milliseconds limit) {
    const auto end = steady::now() + limit;
    while (text_.find('\n') == std::string::npos && steady::now() < end) {
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, 100) != 1) continue;
      char buf[512];
      const ssize_t n = ::read(out_, buf, sizeof buf);
      if (n <= 0) break;
      text_.append(buf, static_cast<std::size_t>(n));
    }
    const auto nl = text_.find('\n');
    if (nl == std::string::npos) return std::nullopt;
    return text_.substr(0, nl);
  }
  std::optional<int> wait(std::chrono::milliseconds limit) {
    if (!status_) status_ = wait_for_exit(pid_, pidfd_, limit);
    return status_;
  }

 private:
  pid_t pid_ = -1;
  int out_ = -1, pidfd_ = -1;
  std::optional<int> status_;
  std::string text_;
};

// The restart: the test holds a listening socket and replaces the instance
// serving it several times (SIGTERM, wait for the exit, start the next)
// under load. Connections made while no instance accepts wait in the
// listen backlog and are served by the next one: no request fails.
TEST(socket_activation, instances_replaced_under_load_fail_no_request) {
  const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(listener, 256), 0);
  ASSERT_EQ(::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len), 0);
  const std::uint16_t port = ntohs(a.sin_port);
  const std::vector<std::string> args{
      CLOSEWISE_REQRESP_BINARY, "--threads", "1", "--drain-idle-grace", "5", "--log-level", "error"};

  constexpr int restarts = 3;
  constexpr int clients = 2;
  std::atomic<bool> stop{false};
  std::atomic<unsigned> served{0}, failed{0};
  std::atomic<long> longest_us{0};
  std::vector<std::string> errors(clients);
  std::vector<std::thread> threads;
  auto instance = std::make_unique<activated_instance>(listener, args);
  ASSERT_TRUE(instance->started());
  const auto first = instance->read_line(10s);
  ASSERT_TRUE(first);
  EXPECT_EQ(*first, "listening on 127.0.0.1:" + std::to_string(port));
  for (int t = 0; t < clients; ++t) {
    // One request per connection: every one of them goes through the backlog.
    threads.emplace_back([&, t] {
      const auto end = steady::now() + 60s;
      for (unsigned i = 0; i < 100000 && !stop && steady::now() < end; ++i) {
        const auto t0 = steady::now();
        auto p = connect_to(port);
        const answer r = p.fd() >= 0 ? get(p.fd(), "/", false) : answer{0, false, "connect failed"};
        const long us = std::chrono::duration_cast<std::chrono::microseconds>(steady::now() - t0).count();
        long seen = longest_us.load();
        while (us > seen && !longest_us.compare_exchange_weak(seen, us)) {
        }
        if (!r.error.empty() || r.status != 200) {
          ++failed;
          if (errors[t].empty()) errors[t] = r.error.empty() ? "status " + std::to_string(r.status) : r.error;
          continue;
        }
        ++served;
      }
    });
  }
  for (int k = 0; k < restarts; ++k) {
    const unsigned at = served;
    EXPECT_TRUE(eventually([&] { return served >= at + 50; })) << "instance " << k << " served too little";
    instance->signal(SIGTERM);
    EXPECT_EQ(instance->wait(20s), 0) << "instance " << k;
    instance = std::make_unique<activated_instance>(listener, args);
    ASSERT_TRUE(instance->started());
    const auto line = instance->read_line(10s);
    ASSERT_TRUE(line) << "instance " << k + 1 << " printed no listening line";
    EXPECT_EQ(*line, "listening on 127.0.0.1:" + std::to_string(port));
  }
  const unsigned at = served;
  EXPECT_TRUE(eventually([&] { return served >= at + 50; }));
  stop = true;
  for (auto& t : threads) t.join();
  instance->signal(SIGTERM);
  EXPECT_EQ(instance->wait(20s), 0);
  ::close(listener);
  for (const auto& e : errors) EXPECT_TRUE(e.empty()) << e;
  EXPECT_EQ(failed.load(), 0u);
  std::printf("activation: %u requests, %u failed, longest wait %ld ms over %d restarts\n", served.load(),
              failed.load(), (longest_us.load() + 500) / 1000, restarts);
}

// server_options::inherited_listeners: a listening Unix socket is served
// and named in local_endpoints; a socket that does not listen is refused.
TEST(socket_activation, inherited_listeners_are_checked_and_named) {
  temp_dir dir;
  const std::string path = dir.file("inherited.sock");
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  std::snprintf(un.sun_path, sizeof un.sun_path, "%s", path.c_str());
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&un), sizeof un), 0);
  ASSERT_EQ(::listen(fd, 16), 0);
  closewise::server_options o;
  o.threads = 1;
  o.inherited_listeners = {fd};
  closewise::server srv(o, [](closewise::connection& c) -> asio::awaitable<void> {
    co_await c.write(asio::buffer(std::string_view("hi")));
  });
  srv.start();
  EXPECT_EQ(srv.local_endpoints(), std::vector<std::string>{"unix:" + path});
  EXPECT_TRUE(srv.ready());
  EXPECT_FALSE(srv.draining());
  std::thread runner([&] { srv.run(); });
  auto p = connect_unix(path);
  ASSERT_GE(p.fd(), 0);
  std::string got;
  p.drain(&got);
  EXPECT_EQ(got, "hi");
  p.close();  // our FIN ends the server's graceful close
  srv.drain();
  EXPECT_FALSE(srv.ready());
  EXPECT_TRUE(srv.draining());
  runner.join();
  EXPECT_EQ(::access(path.c_str(), F_OK), 0) << "an inherited socket's file is not ours to remove";

  const int idle = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(idle, 0);
  closewise::server_options bad;
  bad.threads = 1;
  bad.inherited_listeners = {idle};
  closewise::server refused(bad, [](closewise::connection&) -> asio::awaitable<void> { co_return; });
  EXPECT_THROW(refused.start(), std::system_error);
  ::close(idle);  // a refused descriptor stays the caller's
}

}  // namespace
