#include "echo_support.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <random>
#include <stdexcept>

#include "closewise/sock_diag.hpp"
#include "echo/client.hpp"
#include "echo/sha256.hpp"

extern char** environ;

namespace closewise::echo::test {

namespace {
using clock = std::chrono::steady_clock;
}  // namespace

double scale() {
  const char* env = std::getenv("CLOSEWISE_ECHO_SCALE");
  if (!env || !*env) return 1.0;
  char* end = nullptr;
  const double v = std::strtod(env, &end);
  if (end == env || !std::isfinite(v)) return 1.0;
  return std::clamp(v, 0.01, 1.0);
}

std::uint64_t scaled(std::uint64_t n, std::uint64_t floor) {
  return std::max(floor, static_cast<std::uint64_t>(std::llround(static_cast<double>(n) * scale())));
}

server_options local_options(unsigned threads) {
  server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = threads;
  return o;
}

// ---- running_echo_server ----------------------------------------------------

namespace {
// As in the app: a session never holds more than the server's high watermark.
session_options within_watermark(session_options s, const server_options& o) {
  s.read_size = std::clamp<std::size_t>(o.write_high_watermark, 1, s.read_size);
  return s;
}
}  // namespace

running_echo_server::running_echo_server(server_options o, session_options s)
    : srv_(o, make_session(within_watermark(std::move(s), o))) {
  srv_.on_close([this](const connection&, const close_report& r) {
    std::lock_guard lock(mu_);
    reports_.push_back(r);
  });
  srv_.start();
  for (const auto& e : srv_.local_endpoints()) {
    if (e.rfind("unix:", 0) == 0) continue;
    port_ = parse_endpoint(e).port();
    break;
  }
  thread_ = std::thread([this] { srv_.run(); });
}

running_echo_server::~running_echo_server() {
  srv_.stop();
  if (thread_.joinable()) thread_.join();
}

std::vector<close_report> running_echo_server::reports() {
  std::lock_guard lock(mu_);
  return reports_;
}

bool running_echo_server::wait_closed(std::uint64_t n, std::chrono::milliseconds limit) {
  const auto end = clock::now() + limit;
  for (;;) {
    {
      std::lock_guard lock(mu_);
      if (reports_.size() >= n) return true;
    }
    if (clock::now() > end) return false;
    std::this_thread::sleep_for(2ms);  // polling a condition owned by the server threads, bounded
  }
}

// ---- sockets ------------------------------------------------------------------

int connect_tcp(std::uint16_t port, int rcvbuf, int sndbuf) {
  ::closewise::test::raw_peer p(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (p.fd() < 0) return -1;
  if (rcvbuf > 0) p.set_rcvbuf(rcvbuf);
  if (sndbuf > 0) p.set_sndbuf(sndbuf);
  if (::closewise::test::connect_loopback(p.fd(), port) != 0) return -1;
  return p.release();
}

int connect_unix(const std::string& path) { return ::closewise::test::connect_unix(path).release(); }

exchange_result run_exchange(int fd, const exchange_plan& plan) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  std::mt19937_64 rng(plan.rng_seed);
  std::uniform_int_distribution<std::size_t> chunk_size(std::max<std::size_t>(plan.min_chunk, 1),
                                                        std::max(plan.min_chunk, plan.max_chunk));
  std::bernoulli_distribution pause(plan.pause_probability);
  std::uniform_int_distribution<std::int64_t> pause_us(0, plan.max_pause.count());
  seeded_bytes gen(plan.seed);
  sha256 out_hash;
  sha256 in_hash;
  std::vector<char> chunk(std::max(plan.min_chunk, plan.max_chunk));
  std::size_t chunk_len = 0;
  std::size_t chunk_off = 0;
  std::vector<char> in(256 * 1024);
  std::uint64_t to_generate = plan.bytes;
  auto last_progress = clock::now();
  auto resume = clock::time_point{};
  exchange_result r;
  bool sending = true;

  for (;;) {
    const auto now = clock::now();
    if (sending && chunk_off == chunk_len && now >= resume) {
      if (to_generate > 0) {
        chunk_len = static_cast<std::size_t>(std::min<std::uint64_t>(chunk_size(rng), to_generate));
        gen.fill(chunk.data(), chunk_len);
        out_hash.update(chunk.data(), chunk_len);
        to_generate -= chunk_len;
        chunk_off = 0;
      } else {
        // The last byte went out: the half-close under test.
        r.sent_fin = ::shutdown(fd, SHUT_WR) == 0;
        sending = false;
      }
    }
    const bool want_out = sending && chunk_off < chunk_len;
    pollfd p{fd, static_cast<short>(POLLIN | (want_out ? POLLOUT : 0)), 0};
    timespec wait{0, 100'000'000};
    if (sending && !want_out && now < resume) {
      const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(resume - now).count();
      wait = {static_cast<time_t>(left / 1'000'000'000), static_cast<long>(left % 1'000'000'000)};
    }
    const int ready = ::ppoll(&p, 1, &wait, nullptr);
    if (ready < 0 && errno != EINTR) {
      r.error = errno;
      break;
    }
    if (ready <= 0) {
      if (clock::now() - last_progress > plan.stall_limit) {
        r.error = ETIMEDOUT;
        break;
      }
      continue;
    }
    if (want_out && (p.revents & (POLLOUT | POLLERR | POLLHUP))) {
      const ssize_t n = ::send(fd, chunk.data() + chunk_off, chunk_len - chunk_off, MSG_NOSIGNAL);
      if (n > 0) {
        chunk_off += static_cast<std::size_t>(n);
        r.sent += static_cast<std::uint64_t>(n);
        last_progress = clock::now();
        if (chunk_off == chunk_len && pause(rng)) resume = last_progress + std::chrono::microseconds(pause_us(rng));
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        r.error = errno;
        break;
      }
    }
    if (p.revents & (POLLIN | POLLERR | POLLHUP)) {
      const ssize_t n = ::recv(fd, in.data(), in.size(), 0);
      if (n > 0) {
        in_hash.update(in.data(), static_cast<std::size_t>(n));
        r.received += static_cast<std::uint64_t>(n);
        last_progress = clock::now();
      } else if (n == 0) {
        r.eof = true;
        break;
      } else if (errno != EAGAIN && errno != EINTR) {
        r.error = errno;
        break;
      }
    }
  }
  r.sent_sha256 = to_hex(out_hash.finish());
  r.received_sha256 = to_hex(in_hash.finish());
  return r;
}

// ---- checks -------------------------------------------------------------------

void expect_no_half_closed_leftovers(std::uint16_t port) {
  closewise::error_code ec;
  for (const auto& s : list_tcp_sockets(port, ec)) {
    if (s.local_port != port) continue;
    EXPECT_NE(s.state, tcp_state::close_wait) << "server socket left in CLOSE_WAIT (peer port " << s.remote_port << ")";
    EXPECT_NE(s.state, tcp_state::fin_wait2) << "server socket left in FIN_WAIT2 (peer port " << s.remote_port << ")";
  }
  EXPECT_FALSE(ec) << ec.message();
}

std::size_t fd_count(pid_t pid) {
  const std::string dir = pid > 0 ? "/proc/" + std::to_string(pid) + "/fd" : "/proc/self/fd";
  std::size_t n = 0;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      if (e->d_name[0] != '.') ++n;
    }
    ::closedir(d);
  }
  return n;
}

std::uint64_t rss_bytes() {
  std::uint64_t pages = 0;
  std::uint64_t resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%lu %lu", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return resident * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

// ---- files --------------------------------------------------------------------

std::string write_seeded_file(const std::string& path, std::uint64_t n, std::uint64_t seed) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + path);
  seeded_bytes gen(seed);
  sha256 h;
  std::vector<char> buf(1 << 20);
  while (n > 0) {
    const std::size_t len = static_cast<std::size_t>(std::min<std::uint64_t>(n, buf.size()));
    gen.fill(buf.data(), len);
    h.update(buf.data(), len);
    std::size_t off = 0;
    while (off < len) {
      const ssize_t w = ::write(fd, buf.data() + off, len - off);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        ::close(fd);
        throw std::runtime_error("cannot write " + path);
      }
      off += static_cast<std::size_t>(w);
    }
    n -= len;
  }
  ::close(fd);
  return to_hex(h.finish());
}

std::optional<std::pair<std::string, std::uint64_t>> file_digest(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  sha256 h;
  std::uint64_t size = 0;
  std::vector<char> buf(1 << 20);
  for (;;) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      ::close(fd);
      return std::nullopt;
    }
    if (r == 0) break;
    h.update(buf.data(), static_cast<std::size_t>(r));
    size += static_cast<std::uint64_t>(r);
  }
  ::close(fd);
  return std::pair{to_hex(h.finish()), size};
}

std::string find_tool(const std::string& tool) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  std::size_t start = 0;
  while (start <= dirs.size()) {
    const std::size_t end = std::min(dirs.find(':', start), dirs.size());
    const std::string candidate = dirs.substr(start, end - start) + "/" + tool;
    if (end > start && ::access(candidate.c_str(), X_OK) == 0) return candidate;
    start = end + 1;
  }
  return {};
}

// ---- child processes ------------------------------------------------------------

child::child(const std::vector<std::string>& argv, const io& how) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // The child starts with default dispositions and nothing blocked, whatever
  // this test process did (closewise-echo relies on SIGTERM reaching it).
  sigset_t defaults;
  sigemptyset(&defaults);
  for (int s : {SIGPIPE, SIGTERM, SIGINT}) sigaddset(&defaults, s);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);

  posix_spawn_file_actions_addopen(&fa, 0, how.stdin_path.empty() ? "/dev/null" : how.stdin_path.c_str(), O_RDONLY, 0);
  int out_pipe[2] = {-1, -1};
  int err_pipe[2] = {-1, -1};
  if (how.stdout_path.empty()) {
    if (::pipe2(out_pipe, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
    posix_spawn_file_actions_adddup2(&fa, out_pipe[1], 1);
  } else {
    posix_spawn_file_actions_addopen(&fa, 1, how.stdout_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  }
  if (how.capture_stderr) {
    if (::pipe2(err_pipe, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
    posix_spawn_file_actions_adddup2(&fa, err_pipe[1], 2);
  } else {
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  }
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const int rc = ::posix_spawn(&pid_, args[0], &fa, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  for (int fd : {out_pipe[1], err_pipe[1]}) {
    if (fd >= 0) ::close(fd);
  }
  if (rc != 0) {
    // No destructor runs for a constructor that throws: close the read ends here.
    for (int fd : {out_pipe[0], err_pipe[0]}) {
      if (fd >= 0) ::close(fd);
    }
    pid_ = -1;
    throw std::runtime_error("cannot start " + argv.front() + ": " + std::strerror(rc));
  }
  out_fd_ = out_pipe[0];
  err_fd_ = err_pipe[0];
}

child::~child() {
  if (pid_ > 0 && !status_) {
    ::kill(pid_, SIGKILL);
    int st = 0;
    ::waitpid(pid_, &st, 0);
  }
  for (int fd : {out_fd_, err_fd_}) {
    if (fd >= 0) ::close(fd);
  }
}

void child::pump(int timeout_ms) {
  pollfd p[2] = {{out_fd_, POLLIN, 0}, {err_fd_, POLLIN, 0}};
  if (p[0].fd < 0 && p[1].fd < 0) return;
  if (::poll(p, 2, timeout_ms) <= 0) return;
  char buf[4096];
  for (int i = 0; i < 2; ++i) {
    if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    const ssize_t n = ::read(p[i].fd, buf, sizeof(buf));
    if (n > 0) {
      (i == 0 ? out_ : err_).append(buf, static_cast<std::size_t>(n));
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
      ::close(p[i].fd);
      (i == 0 ? out_fd_ : err_fd_) = -1;
    }
  }
}

std::optional<std::string> child::read_line(std::chrono::milliseconds limit) {
  const auto end = clock::now() + limit;
  for (;;) {
    const auto nl = out_.find('\n', out_consumed_);
    if (nl != std::string::npos) {
      std::string line = out_.substr(out_consumed_, nl - out_consumed_);
      out_consumed_ = nl + 1;
      return line;
    }
    if (out_fd_ < 0 || clock::now() >= end) return std::nullopt;
    pump(20);
  }
}

void child::signal(int sig) {
  if (pid_ > 0 && !status_) ::kill(pid_, sig);
}

std::optional<int> child::wait(std::chrono::milliseconds limit) {
  const auto end = clock::now() + limit;
  while (!status_) {
    int st = 0;
    const pid_t r = ::waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      break;
    }
    if (clock::now() >= end) return std::nullopt;
    pump(20);
  }
  // The pipes reach EOF once the child (and anything it started) is gone.
  while ((out_fd_ >= 0 || err_fd_ >= 0) && clock::now() < end) pump(20);
  return status_;
}

std::string echo_binary() { return CLOSEWISE_ECHO_BINARY; }

echo_process::echo_process(std::vector<std::string> args, std::size_t count)
    : proc([&] {
        // Built in place: g++ 12 at -O3 warns (-Warray-bounds, a false
        // positive) on moving a temporary std::string into the vector.
        std::vector<std::string> argv;
        argv.reserve(args.size() + 1);
        argv.emplace_back(CLOSEWISE_ECHO_BINARY);
        std::move(args.begin(), args.end(), std::back_inserter(argv));
        return argv;
      }()) {
  for (std::size_t i = 0; i < count; ++i) {
    const auto line = proc.read_line();
    const std::string prefix = "listening on ";
    if (!line || line->rfind(prefix, 0) != 0) {
      throw std::runtime_error("closewise-echo did not print 'listening on': got '" + line.value_or("<nothing>") +
                               "', stderr: " + proc.err());
    }
    endpoints.push_back(line->substr(prefix.size()));
  }
}

std::uint16_t echo_process::port() const {
  for (const auto& e : endpoints) {
    if (e.rfind("unix:", 0) != 0) return parse_endpoint(e).port();
  }
  return 0;
}

}  // namespace closewise::echo::test
