// closewise-reqresp behind nginx (Debian's nginx-light) as a reverse proxy
// with upstream keep-alive, driven by closewise-bench, each run inside a
// private network namespace (fixed-free ports, its own sysctls).
//
//   restarts: both instances are restarted in turn under load (the
//     replacement listens on the same port with SO_REUSEPORT first, then the
//     old one drains on SIGTERM). No request may fail at the client, no 5xx
//     in nginx's access log, every old instance exits 0 within its drain
//     deadline and its statistics explain every connection it accepted.
//   idle race: closewise's idle timeout shorter than nginx's upstream
//     keepalive_timeout, and bursts of POSTs separated by pauses close to that
//     timeout: nginx sends a request on a connection closewise is closing and
//     answers 502. The same pattern with the default idle timeout (75 s, longer
//     than nginx's 60 s) gives none.
//
// CLOSEWISE_PROXY_SECONDS sets the restart run's load (default 30 s);
// CLOSEWISE_PROXY_RACE_SECONDS the length of the idle-race run that must not
// fail (default 20 s; the one that must fail stops at its first failure, or
// at ten times that);
// CLOSEWISE_PROXY_KEEP=1 keeps the temporary directory (configuration, logs).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "../support/child_process.hpp"
#include "../support/external_tools.hpp"
#include "../support/loopback.hpp"
#include "../support/netns.hpp"

using namespace closewise::test;
using namespace std::chrono_literals;
using json = nlohmann::json;
using clock_type = std::chrono::steady_clock;

namespace {

namespace fs = std::filesystem;

double env_seconds(const char* name, double fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  try {
    const double s = std::stod(v);
    return s > 0 ? s : fallback;
  } catch (const std::exception&) {
    return fallback;
  }
}

double since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

std::string read_file(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::size_t count_of(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

// A temporary directory, removed at the end unless CLOSEWISE_PROXY_KEEP=1.
class kept_temp_dir {
 public:
  kept_temp_dir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/closewise-proxy-XXXXXX";
    if (::mkdtemp(pattern.data()) != nullptr) path_ = pattern;
  }
  ~kept_temp_dir() {
    const char* keep = std::getenv("CLOSEWISE_PROXY_KEEP");
    if (keep != nullptr && std::string(keep) == "1") {
      std::printf("kept %s\n", path_.c_str());
      return;
    }
    std::error_code ignored;
    if (!path_.empty()) fs::remove_all(path_, ignored);
  }
  kept_temp_dir(const kept_temp_dir&) = delete;
  kept_temp_dir& operator=(const kept_temp_dir&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// net.ipv4.tcp_migrate_req of this (private) namespace.
bool set_tcp_migrate_req(bool on) {
  std::ofstream f("/proc/sys/net/ipv4/tcp_migrate_req");
  f << (on ? "1" : "0") << '\n';
  f.close();
  return static_cast<bool>(f) && read_file("/proc/sys/net/ipv4/tcp_migrate_req").rfind(on ? "1" : "0", 0) == 0;
}

// nginx as the reverse proxy: one process, one worker loop, no daemon, every
// file in `dir`. `master_process off` keeps it one process to signal and
// reap, and as root it then never switches users (the worker would otherwise
// become nobody, who cannot write the logs in our directory). The upstream
// keeps up to 32 idle connections per worker for its 60 s keepalive_timeout;
// HTTP/1.1 and an empty Connection header are what make nginx reuse them.
std::string nginx_config(const fs::path& dir, std::uint16_t listen, const std::vector<std::uint16_t>& upstreams) {
  std::string servers;
  // max_fails=0: by default one failed request takes a server out for 10 s
  // (max_fails=1, fail_timeout=10s), and with both out nginx answers 502 to
  // everything ("no live upstreams"): one race would count thousands of times.
  for (auto p : upstreams) servers += "    server 127.0.0.1:" + std::to_string(p) + " max_fails=0;\n";
  const std::string d = dir.string();
  return "daemon off;\n"
         "master_process off;\n"
         "worker_processes 1;\n"
         "pid " +
         d +
         "/nginx.pid;\n"
         "error_log " +
         d +
         "/error.log warn;\n"
         "events { worker_connections 4096; }\n"
         "http {\n"
         "  log_format probe '$status $upstream_status $request_method';\n"
         "  access_log " +
         d +
         "/access.log probe;\n"
         "  client_body_temp_path " +
         d +
         "/body;\n"
         "  proxy_temp_path " +
         d +
         "/proxy;\n"
         "  fastcgi_temp_path " +
         d +
         "/fastcgi;\n"
         "  uwsgi_temp_path " +
         d +
         "/uwsgi;\n"
         "  scgi_temp_path " +
         d +
         "/scgi;\n"
         "  upstream closewise {\n" +
         servers +
         "    keepalive 32;\n"
         "    keepalive_timeout 60s;\n"
         "  }\n"
         "  server {\n"
         "    listen 127.0.0.1:" +
         std::to_string(listen) +
         ";\n"
         "    location / {\n"
         "      proxy_pass http://closewise;\n"
         "      proxy_http_version 1.1;\n"
         "      proxy_set_header Connection \"\";\n"
         "    }\n"
         "  }\n"
         "}\n";
}

// What nginx's access and error logs say about a run.
struct nginx_logs {
  std::size_t requests = 0;
  std::size_t server_errors = 0;  // status 5xx sent to the client
  std::size_t retried = 0;        // answered by a second upstream after the first failed
  std::map<std::string, std::size_t> statuses;
  std::size_t premature_close = 0;  // "upstream prematurely closed connection"
  std::size_t reset_by_peer = 0;    // "Connection reset by peer"
  std::size_t connect_failed = 0;   // "connect() failed"
  std::string error_log;
};

nginx_logs read_nginx_logs(const fs::path& dir) {
  nginx_logs l;
  std::ifstream in(dir / "access.log");
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    std::string status, upstream;
    fields >> status >> upstream;
    ++l.requests;
    ++l.statuses[status];
    if (!status.empty() && status.front() == '5') ++l.server_errors;
    if (upstream.find(',') != std::string::npos) ++l.retried;
  }
  l.error_log = read_file(dir / "error.log");
  l.premature_close = count_of(l.error_log, "upstream prematurely closed connection");
  l.reset_by_peer = count_of(l.error_log, "Connection reset by peer");
  l.connect_failed = count_of(l.error_log, "connect() failed");
  return l;
}

std::string describe(const nginx_logs& l) {
  std::string s = std::to_string(l.requests) + " requests logged, statuses";
  for (const auto& [st, n] : l.statuses) s += " " + st + ":" + std::to_string(n);
  s += "; retried on the other upstream " + std::to_string(l.retried) + "; error log: upstream prematurely closed " +
       std::to_string(l.premature_close) + ", reset by peer " + std::to_string(l.reset_by_peer) +
       ", connect() failed " + std::to_string(l.connect_failed);
  return s;
}

// The first lines of nginx's error log, for a failure message.
std::string head_of(const std::string& text, std::size_t lines = 12) {
  std::size_t at = 0;
  for (std::size_t i = 0; i < lines && at != std::string::npos; ++i) {
    at = text.find('\n', at);
    if (at != std::string::npos) ++at;
  }
  return text.substr(0, at);
}

// One closewise-reqresp process.
struct instance {
  std::unique_ptr<child> proc;
  std::uint16_t port = 0;
};

struct instance_options {
  std::string idle_timeout;      // --idle-timeout; empty: the default (75 s)
  std::string drain_idle_grace;  // --drain-idle-grace; empty: the default (1 s)
  double drain_timeout_s = 5;
};

// Starts closewise-reqresp on `port` (0: any) with SO_REUSEPORT and waits for
// its "listening on" line: from then on its listener takes connections.
std::optional<instance> start_instance(std::uint16_t port, const instance_options& o, const fs::path& log,
                                       std::string& why) {
  // One thread each: two instances, nginx and the clients share two cores.
  std::vector<std::string> args = {CLOSEWISE_REQRESP_BINARY, "--listen", "127.0.0.1:" + std::to_string(port)};
  for (const char* flag : {"--reuse-port", "--stats"}) args.emplace_back(flag);
  args.insert(args.end(), {"--threads", "1", "--log-level", "warn"});
  args.insert(args.end(), {"--drain-timeout", std::to_string(o.drain_timeout_s)});
  if (!o.idle_timeout.empty()) {
    args.push_back("--idle-timeout");
    args.push_back(o.idle_timeout);
  }
  if (!o.drain_idle_grace.empty()) {
    args.push_back("--drain-idle-grace");
    args.push_back(o.drain_idle_grace);
  }
  instance in;
  in.proc = std::make_unique<child>(args, log.string());
  if (!in.proc->started()) {
    why = "cannot start closewise-reqresp";
    return std::nullopt;
  }
  const auto line = in.proc->read_line(15s);
  if (!line || line->rfind("listening on 127.0.0.1:", 0) != 0) {
    why =
        "no 'listening on' line from closewise-reqresp (got '" + line.value_or("") + "'); its log:\n" + read_file(log);
    return std::nullopt;
  }
  in.port = port_of_listening_line(*line);
  return in;
}

// What stopping an instance showed.
struct stopped_instance {
  std::optional<int> status;  // nullopt: did not exit within its limit (then killed)
  double exit_s = 0;          // SIGTERM to exit
  json stats;                 // its --stats at exit
  std::vector<std::string> unexplained;
};

std::uint64_t counter(const json& j, const char* group, const char* key) {
  if (!j.contains(group) || !j[group].contains(key)) return 0;
  return j[group][key].get<std::uint64_t>();
}

// A counter that must be there: a missing key (renamed, say) is recorded in
// `missing` and read as a value no assertion accepts, never as a quiet 0.
constexpr std::uint64_t missing_counter = ~std::uint64_t{0};
std::uint64_t required(const json& j, const std::string& key, std::vector<std::string>& missing) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_number_unsigned()) {
    missing.push_back(key);
    return missing_counter;
  }
  return j[key].get<std::uint64_t>();
}

// Every connection the instance accepted must have closed for a reason that
// a restart behind a proxy explains: the proxy closed it (peer FIN first),
// we closed it after a Connection: close or an idle timeout (our FIN first),
// or the drain closed it between requests. A reset of any kind, a forced
// close at the drain deadline or a lost report is a failure.
std::vector<std::string> unexplained_closes(const json& s) {
  std::vector<std::string> bad, missing;
  const auto accepted = required(s, "connections_accepted", missing);
  const auto closed = required(s, "connections_closed", missing);
  if (accepted != closed)
    bad.push_back("accepted " + std::to_string(accepted) + " but closed " + std::to_string(closed));
  if (required(s, "connections_open", missing) != 0) bad.push_back("connections still open at exit");
  if (!s.contains("closed_by_cause") || !s["closed_by_cause"].is_object()) missing.push_back("closed_by_cause");
  std::uint64_t by_cause = 0;
  const json causes = s.value("closed_by_cause", json::object());  // named: items() must not outlive it
  for (const auto& [cause, n] : causes.items()) {
    const auto v = n.get<std::uint64_t>();
    by_cause += v;
    if (v > 0 && cause != "peer_fin_then_ours" && cause != "ours_then_peer_fin" && cause != "server_drain")
      bad.push_back(std::to_string(v) + " closed by " + cause);
  }
  if (by_cause != closed)
    bad.push_back("causes add up to " + std::to_string(by_cause) + ", not " + std::to_string(closed));
  for (const char* k :
       {"rst_sent", "rst_received", "kernel_resets", "drain_forced", "linger_timeouts", "linger_limits"})
    if (const auto v = required(s, k, missing); v > 0 && v != missing_counter)
      bad.push_back(std::string(k) + " " + std::to_string(v));
  for (const auto& k : missing) bad.push_back("no '" + k + "' in the --stats JSON");
  return bad;
}

stopped_instance stop_instance(instance& in, const instance_options& o) {
  stopped_instance r;
  const auto t0 = clock_type::now();
  in.proc->signal(SIGTERM);
  // The drain deadline, plus the time a process takes to print and exit.
  const auto limit = std::chrono::milliseconds(static_cast<long>(o.drain_timeout_s * 1000)) + 3s;
  r.status = in.proc->wait(limit);
  r.exit_s = since(t0);
  const std::string& out = in.proc->out();
  const auto brace = out.find('{');
  if (brace != std::string::npos) r.stats = json::parse(out.substr(brace), nullptr, false);
  if (r.stats.is_object()) {
    r.unexplained = unexplained_closes(r.stats);
  } else {
    r.unexplained.push_back("no --stats JSON on its stdout: '" + out + "'");
  }
  in.proc.reset();  // kills it if it is still running
  return r;
}

std::string causes_line(const json& s) {
  std::string line = "accepted " + std::to_string(s.value("connections_accepted", std::uint64_t{0})) + ":";
  if (s.contains("closed_by_cause"))
    for (const auto& [cause, n] : s["closed_by_cause"].items())
      if (n.get<std::uint64_t>() > 0) line += " " + cause + " " + std::to_string(n.get<std::uint64_t>());
  line += ", drain_closed " + std::to_string(s.value("drain_closed", std::uint64_t{0}));
  line += ", idle timeouts " + std::to_string(counter(s, "timeouts", "idle"));
  return line;
}

// nginx in the foreground, killed on every exit path by its child object.
struct proxy {
  std::unique_ptr<child> proc;
  std::uint16_t port = 0;
};

std::optional<proxy> start_nginx(const std::string& nginx, const fs::path& dir,
                                 const std::vector<std::uint16_t>& upstreams, std::string& why) {
  proxy p;
  p.port = free_port();
  {
    std::ofstream conf(dir / "nginx.conf");
    conf << nginx_config(dir, p.port, upstreams);
  }
  // -e: the error log before the configuration is read; -p: the prefix, so
  // that nothing is looked up under /var/lib/nginx or /var/log/nginx.
  p.proc = std::make_unique<child>(std::vector<std::string>{nginx, "-e", (dir / "error.log").string(), "-p",
                                                            dir.string(), "-c", (dir / "nginx.conf").string()},
                                   (dir / "nginx.stderr").string());
  if (!p.proc->started() || !wait_accepting(p.port, 10s)) {
    why = "nginx did not start; its error log:\n" + read_file(dir / "error.log") + read_file(dir / "nginx.stderr");
    return std::nullopt;
  }
  return p;
}

// Stops nginx gracefully (SIGQUIT: finish requests, close connections).
std::optional<int> stop_nginx(proxy& p) {
  p.proc->signal(SIGQUIT);
  auto st = p.proc->wait(10s);
  p.proc.reset();
  return st;
}

// Two instances on ports of their own behind one nginx; the logs of
// instance `which`, generation n, go to reqresp-WHICH-N.log.
struct rig {
  std::vector<instance> live;
  std::optional<proxy> px;
  int generation = 0;
  fs::path log_of(const fs::path& dir, std::size_t which) {
    return dir / ("reqresp-" + std::to_string(which) + "-" + std::to_string(generation++) + ".log");
  }
};

bool start_rig(const std::string& nginx, const fs::path& dir, const instance_options& io, rig& r, std::string& why) {
  for (std::size_t i = 0; i < 2; ++i) {
    auto in = start_instance(0, io, r.log_of(dir, i), why);
    if (!in) return false;
    r.live.push_back(std::move(*in));
  }
  r.px = start_nginx(nginx, dir, {r.live[0].port, r.live[1].port}, why);
  return r.px.has_value();
}

// A run's directory and its rig; the rig (nginx, instances) goes first.
struct run_env {
  kept_temp_dir dir;
  rig r;
};

bool start_env(run_env& e, const instance_options& io, std::string& why) {
  const auto nginx = find_program("nginx");
  if (!nginx) {
    why = "nginx not found";
    return false;
  }
  if (e.dir.path().empty()) {
    why = "cannot make a temporary directory";
    return false;
  }
  return start_rig(*nginx, e.dir.path(), io, e.r, why);
}

// One closewise-bench run against nginx.
struct bench_run {
  std::unique_ptr<child> proc;
  fs::path json_path;
};

bench_run start_bench(const fs::path& dir, const std::string& name, std::uint16_t port,
                      const std::vector<std::string>& extra) {
  bench_run b;
  b.json_path = dir / (name + ".json");
  std::vector<std::string> args = {CLOSEWISE_BENCH_BINARY,
                                   "--target",
                                   "127.0.0.1:" + std::to_string(port),
                                   "--mode",
                                   "keepalive",
                                   "--threads",
                                   "1",
                                   "--warmup",
                                   "0",
                                   "--timeout",
                                   "10",
                                   "--no-progress",
                                   "--json",
                                   b.json_path.string()};
  args.insert(args.end(), extra.begin(), extra.end());
  b.proc = std::make_unique<child>(args, (dir / (name + ".stderr")).string());
  return b;
}

struct bench_result {
  std::optional<int> status;
  json j;
  std::uint64_t completed = 0;
  std::uint64_t errors = 0;
  std::string error_classes;         // "bad_status 3, reset 1"
  std::vector<std::string> missing;  // keys its JSON should have had
};

bench_result finish_bench(bench_run& b, std::chrono::milliseconds limit) {
  bench_result r;
  r.status = b.proc->wait(limit);
  b.proc.reset();
  r.j = json::parse(read_file(b.json_path), nullptr, false);
  if (!r.j.is_object()) {
    r.missing.push_back("the whole JSON report");
    r.errors = missing_counter;
    return r;
  }
  r.completed = required(r.j, "completed", r.missing);
  if (r.completed == missing_counter) r.completed = 0;
  const json errors = r.j.value("errors", json::object());
  r.errors = required(errors, "total", r.missing);
  for (const auto& [k, v] : errors.items()) {
    if (k == "total") continue;
    if (v.get<std::uint64_t>() > 0) {
      r.error_classes += (r.error_classes.empty() ? "" : ", ") + k + " " + std::to_string(v.get<std::uint64_t>());
    }
  }
  return r;
}

// What a request body looks like: small, so the run measures teardown and
// not copying.
const std::string post_body(64, 'p');

// ---- restarts under load ---------------------------------------------------

struct restart_outcome {
  std::vector<bench_result> loads;
  nginx_logs logs;
  std::vector<stopped_instance> stops;  // every instance, old and final
  std::vector<double> ready_s;          // replacement spawn to its "listening on" line
  std::size_t restarts = 0;
};

// Two instances behind nginx; closewise-bench (GETs and POSTs on kept-alive
// connections, more of them than nginx keeps idle, so that nginx also opens
// and closes upstream connections all the time) for `seconds`; meanwhile
// each instance is replaced in turn. Fails the test on setup errors.
void run_restarts(double seconds, const instance_options& io, restart_outcome& out) {
  run_env env;
  std::string why;
  ASSERT_TRUE(start_env(env, io, why)) << why;
  const kept_temp_dir& dir = env.dir;
  rig& r = env.r;
  auto& live = r.live;
  auto& px = r.px;

  const std::string secs = std::to_string(seconds);
  std::vector<bench_run> loads;
  loads.push_back(start_bench(dir.path(), "get", px->port, {"--duration", secs, "--connections", "24", "--path", "/"}));
  loads.push_back(start_bench(
      dir.path(), "post", px->port,
      {"--duration", secs, "--connections", "24", "--method", "POST", "--path", "/echo", "--body", post_body}));
  for (auto& b : loads) ASSERT_TRUE(b.proc->started());

  // Restarts spread over the run, one every ~3 s, alternating instances; the
  // first and last second of load see none.
  const auto start = clock_type::now();
  const std::size_t planned = std::max<std::size_t>(2, static_cast<std::size_t>(seconds / 3));
  for (std::size_t k = 0; k < planned; ++k) {
    const auto at = start + std::chrono::duration_cast<clock_type::duration>(
                                std::chrono::duration<double>(seconds * (static_cast<double>(k) + 0.5) / planned));
    std::this_thread::sleep_until(at);  // pacing the restarts, not synchronising
    const std::size_t which = k % 2;
    const auto t0 = clock_type::now();
    auto fresh = start_instance(live[which].port, io, r.log_of(dir.path(), which), why);
    ASSERT_TRUE(fresh) << why;
    ASSERT_EQ(fresh->port, live[which].port);
    out.ready_s.push_back(since(t0));
    out.stops.push_back(stop_instance(live[which], io));
    live[which] = std::move(*fresh);
    ++out.restarts;
  }
  for (auto& b : loads)
    out.loads.push_back(finish_bench(b, std::chrono::milliseconds(static_cast<long>(seconds * 1000)) + 30s));
  for (auto& in : live) out.stops.push_back(stop_instance(in, io));
  EXPECT_EQ(stop_nginx(*px), 0);
  out.logs = read_nginx_logs(dir.path());
}

void print_restarts(const char* title, const restart_outcome& o) {
  std::printf("%s\n", title);
  const char* names[] = {"GET /", "POST /echo"};
  for (std::size_t i = 0; i < o.loads.size(); ++i) {
    const auto& b = o.loads[i];
    std::printf("  closewise-bench %s: %llu completed, %llu errors%s%s, %.0f req/s\n", names[i],
                static_cast<unsigned long long>(b.completed), static_cast<unsigned long long>(b.errors),
                b.error_classes.empty() ? "" : ": ", b.error_classes.c_str(), b.j.value("rate", 0.0));
  }
  std::printf("  nginx: %s\n", describe(o.logs).c_str());
  double ready_max = 0, exit_max = 0;
  for (double r : o.ready_s) ready_max = std::max(ready_max, r);
  for (std::size_t i = 0; i < o.stops.size(); ++i) {
    const auto& s = o.stops[i];
    exit_max = std::max(exit_max, s.exit_s);
    std::printf("  instance %zu%s: exit %s after %.3f s; %s\n", i, i < o.restarts ? " (replaced)" : " (final)",
                s.status ? std::to_string(*s.status).c_str() : "none", s.exit_s, causes_line(s.stats).c_str());
  }
  std::printf("  %zu restarts; replacement ready within %.3f s, old instance gone within %.3f s\n", o.restarts,
              ready_max, exit_max);
}

void expect_clean_restarts(const restart_outcome& o) {
  ASSERT_EQ(o.loads.size(), 2u);
  for (const auto& b : o.loads) {
    EXPECT_EQ(b.status, 0) << "closewise-bench did not run to the end";
    EXPECT_TRUE(b.missing.empty()) << "closewise-bench's JSON lacks " << ::testing::PrintToString(b.missing);
    EXPECT_GT(b.completed, 0u);
    EXPECT_EQ(b.errors, 0u) << b.error_classes;
  }
  EXPECT_EQ(o.logs.server_errors, 0u) << describe(o.logs) << "\n" << head_of(o.logs.error_log);
  // What nginx saw upstream, not only what its clients got: proxy_next_upstream
  // retries a refused connect or a connection closed under a request on the
  // other instance, so a hand-over that refuses or drops one still answers
  // 200. A clean restart gives nginx nothing to retry and nothing to log.
  EXPECT_EQ(o.logs.connect_failed, 0u) << "a connect refused during a hand-over: " << describe(o.logs) << "\n"
                                       << head_of(o.logs.error_log);
  EXPECT_EQ(o.logs.retried, 0u) << "requests retried on the other upstream: " << describe(o.logs);
  EXPECT_EQ(o.logs.premature_close, 0u) << "upstream connections closed under a request: " << describe(o.logs);
  EXPECT_EQ(o.logs.reset_by_peer, 0u) << "upstream connections reset: " << describe(o.logs);
  EXPECT_GT(o.logs.requests, 0u) << "nginx logged no request: its access log format changed?";
  for (const auto& s : o.stops) {
    EXPECT_EQ(s.status, 0) << "an instance did not drain and exit 0 within its deadline";
    EXPECT_TRUE(s.unexplained.empty()) << ::testing::PrintToString(s.unexplained) << "\n" << s.stats.dump();
  }
}

bool have_nginx_or_skip_reason(std::string& why) {
  if (find_program("nginx")) return true;
  why = "nginx is not installed (Debian: apt-get install nginx-light; scripts/deps.sh test does it)";
  return false;
}

}  // namespace

// The documented procedure, with net.ipv4.tcp_migrate_req=1 in the namespace
// and the default --drain-idle-grace: nothing fails. To measure what each
// part prevents, CLOSEWISE_PROXY_MIGRATE_REQ=0 leaves tcp_migrate_req off and
// CLOSEWISE_PROXY_DRAIN_IDLE_GRACE=0 makes the drain close idle connections
// at once (the test then reports what failed).
TEST(proxy, restarts_behind_nginx_lose_nothing) {
  if (std::string why; !have_nginx_or_skip_reason(why)) GTEST_SKIP() << why;
  const double seconds = env_seconds("CLOSEWISE_PROXY_SECONDS", 30);
  CLOSEWISE_IN_PRIVATE_NETNS(std::chrono::seconds(static_cast<long>(seconds) + 120));
  const char* migrate = std::getenv("CLOSEWISE_PROXY_MIGRATE_REQ");
  const bool migrate_on = migrate == nullptr || std::string(migrate) != "0";
  ASSERT_TRUE(set_tcp_migrate_req(migrate_on)) << "cannot set net.ipv4.tcp_migrate_req in the private namespace";
  instance_options io;
  if (const char* grace = std::getenv("CLOSEWISE_PROXY_DRAIN_IDLE_GRACE")) io.drain_idle_grace = grace;
  const auto t0 = clock_type::now();
  restart_outcome o;
  run_restarts(seconds, io, o);
  if (HasFatalFailure()) return;
  const std::string title = std::string("tcp_migrate_req=") + (migrate_on ? "1" : "0") + ", --drain-idle-grace " +
                            (io.drain_idle_grace.empty() ? "1 (default)" : io.drain_idle_grace) + ", " +
                            std::to_string(static_cast<int>(since(t0))) + " s wall:";
  print_restarts(title.c_str(), o);
  expect_clean_restarts(o);
}

// ---- the idle-timeout race -------------------------------------------------

namespace {

struct race_outcome {
  std::size_t bursts = 0;
  std::uint64_t completed = 0;
  std::uint64_t errors = 0;
  std::map<std::string, std::uint64_t> classes;
  nginx_logs logs;
  std::vector<stopped_instance> stops;
  double wall_s = 0;
};

// Two instances behind nginx; bursts of POSTs (closewise-bench runs of 96
// requests on 32 kept-alive connections, as many as nginx keeps: each one a
// chance of the race) separated by gaps drawn around `gap_ms` with jitter,
// for `seconds`. nginx keeps the upstream connections
// idle between bursts; when closewise's idle timeout ends one just as the
// next burst arrives, the request meets our FIN. The gap is from the last
// response of one burst to the first request of the next: closewise-bench
// spends time before its window (connecting) and after it (its socket
// census), which the pause before the next burst leaves out.
void run_idle_race(double seconds, const instance_options& io, double gap_ms, double jitter_ms,
                   std::size_t enough_failures, race_outcome& out) {
  run_env env;
  std::string why;
  ASSERT_TRUE(start_env(env, io, why)) << why;
  const fs::path& dir = env.dir.path();
  const std::uint16_t proxy_port = env.r.px->port;

  std::mt19937 rng(8);  // fixed: the same jitter every run
  std::uniform_real_distribution<double> jitter(-jitter_ms, jitter_ms);
  const auto start = clock_type::now();
  while (since(start) < seconds) {
    const auto t0 = clock_type::now();
    auto b = start_bench(
        dir, "burst", proxy_port,
        {"--count", "96", "--connections", "32", "--method", "POST", "--path", "/echo", "--body", post_body});
    ASSERT_TRUE(b.proc->started());
    const auto r = finish_bench(b, 30s);
    ASSERT_TRUE(r.status.has_value()) << "closewise-bench did not finish a burst";
    ++out.bursts;
    out.completed += r.completed;
    out.errors += r.errors;
    double overhead_ms = since(t0) * 1000;
    if (r.j.is_object()) {
      overhead_ms -= r.j.value("window_s", 0.0) * 1000;
      for (const auto& [k, v] : r.j["errors"].items())
        if (k != "total") out.classes[k] += v.get<std::uint64_t>();
    }
    // nginx logs every answer at once: its 502s are what the clients got,
    // including those closewise-bench sent after its count was reached.
    if (enough_failures > 0 && read_nginx_logs(dir).server_errors >= enough_failures) break;
    // The pause is the point of the pattern, not a synchronisation.
    const double pause_ms = std::max(0.0, gap_ms - overhead_ms + jitter(rng));
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<long>(pause_ms * 1000)));
  }
  out.wall_s = since(start);
  for (auto& in : env.r.live) out.stops.push_back(stop_instance(in, io));
  EXPECT_EQ(stop_nginx(*env.r.px), 0);
  out.logs = read_nginx_logs(dir);
}

void print_race(const char* title, const race_outcome& o) {
  std::string classes;
  for (const auto& [k, v] : o.classes)
    if (v > 0) classes += " " + k + " " + std::to_string(v);
  std::printf("%s\n  %zu bursts in %.1f s: %llu POSTs completed, %llu failed%s\n  nginx: %s\n", title, o.bursts,
              o.wall_s, static_cast<unsigned long long>(o.completed), static_cast<unsigned long long>(o.errors),
              classes.empty() ? "" : (":" + classes).c_str(), describe(o.logs).c_str());
  for (std::size_t i = 0; i < o.stops.size(); ++i)
    std::printf("  instance %zu: %s\n", i, causes_line(o.stops[i].stats).c_str());
}

// The gap between bursts, centred a little under the 300 ms idle timeout (the
// bursts' own timing adds to it), and its jitter.
double race_gap_ms() { return env_seconds("CLOSEWISE_PROXY_RACE_GAP_MS", 240); }
double race_jitter_ms() { return env_seconds("CLOSEWISE_PROXY_RACE_JITTER_MS", 60); }

}  // namespace

// closewise closes idle connections after 300 ms while nginx keeps them for
// 60 s: some POSTs meet our FIN and nginx answers 502 without retrying. The
// window is narrow (nginx must pick the connection before it has processed
// our FIN), so the run goes on until a request failed (CLOSEWISE_PROXY_RACE_ENOUGH
// of them), for at most ten times CLOSEWISE_PROXY_RACE_SECONDS.
TEST(proxy, idle_timeout_shorter_than_the_proxy_keepalive_fails_requests) {
  if (std::string why; !have_nginx_or_skip_reason(why)) GTEST_SKIP() << why;
#ifdef CLOSEWISE_SANITIZED
  // The race is a matter of microseconds between two processes; under a
  // sanitizer's slowdown it is another race. The restart test runs here.
  GTEST_SKIP() << "timing race: measured in the plain build only";
#endif
  const double seconds = 10 * env_seconds("CLOSEWISE_PROXY_RACE_SECONDS", 20);
  const auto enough = static_cast<std::size_t>(env_seconds("CLOSEWISE_PROXY_RACE_ENOUGH", 1));
  CLOSEWISE_IN_PRIVATE_NETNS(std::chrono::seconds(static_cast<long>(seconds) + 120));
  ASSERT_TRUE(set_tcp_migrate_req(true));
  instance_options io;
  io.idle_timeout = "0.3";
  race_outcome o;
  run_idle_race(seconds, io, race_gap_ms(), race_jitter_ms(), enough, o);
  if (HasFatalFailure()) return;
  print_race("idle timeout 0.3 s, nginx upstream keepalive_timeout 60 s:", o);
  EXPECT_EQ(o.logs.server_errors, o.logs.statuses["502"]) << "every failure should be nginx's 502";
  EXPECT_EQ(o.errors, o.classes["bad_status"]) << "closewise-bench should see only the 502s";
  // The race is a matter of microseconds between two processes: with a CPU
  // hog on both cores it did not show once in 200 s (296 bursts, 28,416
  // POSTs). Not showing it proves nothing either way, so that run is a skip
  // with the reason, not a failure (nor a pass).
  if (o.logs.server_errors == 0)
    GTEST_SKIP() << "the race did not show in " << o.wall_s << " s (" << o.bursts
                 << " bursts): timing-dependent, a loaded machine can miss it";
}

// The same pattern with the default idle timeout (75 s, longer than nginx's
// 60 s), for CLOSEWISE_PROXY_RACE_SECONDS: nginx is always the side that
// closes an idle connection, and nothing fails.
TEST(proxy, idle_timeout_longer_than_the_proxy_keepalive_fails_none) {
  if (std::string why; !have_nginx_or_skip_reason(why)) GTEST_SKIP() << why;
#ifdef CLOSEWISE_SANITIZED
  GTEST_SKIP() << "the counterpart of a timing race: measured in the plain build only";
#endif
  const double seconds = env_seconds("CLOSEWISE_PROXY_RACE_SECONDS", 20);
  CLOSEWISE_IN_PRIVATE_NETNS(std::chrono::seconds(static_cast<long>(seconds) + 120));
  ASSERT_TRUE(set_tcp_migrate_req(true));
  race_outcome o;
  run_idle_race(seconds, instance_options{}, race_gap_ms(), race_jitter_ms(), 0, o);
  if (HasFatalFailure()) return;
  print_race("default idle timeout (75 s), nginx upstream keepalive_timeout 60 s:", o);
  EXPECT_GT(o.completed, 0u);
  EXPECT_EQ(o.errors, 0u);
  EXPECT_EQ(o.logs.server_errors, 0u) << head_of(o.logs.error_log);
  // Nothing retried behind the clients' backs either (see expect_clean_restarts).
  EXPECT_EQ(o.logs.connect_failed, 0u) << describe(o.logs);
  EXPECT_EQ(o.logs.retried, 0u) << describe(o.logs);
  EXPECT_EQ(o.logs.premature_close, 0u) << describe(o.logs);
  EXPECT_EQ(o.logs.reset_by_peer, 0u) << describe(o.logs);
  for (const auto& s : o.stops) {
    EXPECT_EQ(s.status, 0);
    EXPECT_TRUE(s.unexplained.empty()) << ::testing::PrintToString(s.unexplained);
  }
}
