// closewise-bench: the teardown-throughput load generator.
//
// Cycle modes (client-fin, client-rst, server-close, keepalive) report the
// rate of whole cycles, their latency, errors by class, and the sockets the
// run left in TIME_WAIT on each side (sock_diag). Memory modes (idle,
// half-request) hold N connections (with --tls: once their handshake is
// complete) and report the server's RSS per connection. See engine.hpp and hold.hpp for exactly what is measured.
//
// Exit status: 0 when the run measured something (and, with --fail-on-error,
// had no error), 1 otherwise or on a setup failure, 2 on a usage error.

#include <netdb.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "closewise/probe.hpp"
#include "closewise/sock_diag.hpp"
#include "common/app.hpp"
#include "engine.hpp"
#include "hold.hpp"

namespace {

namespace app = closewise::app;
namespace cb = closewise::bench;
using json = nlohmann::ordered_json;

constexpr const char* name = "closewise-bench";

struct target_address {
  sockaddr_storage addr{};
  socklen_t len = 0;
  std::uint16_t port = 0;
};

// "HOST:PORT" or "[V6]:PORT"; the host may be a name (localhost).
bool resolve(const std::string& text, target_address& out, std::string& why) {
  std::string host;
  std::string port;
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      why = "expected [V6]:PORT";
      return false;
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string::npos || colon == 0) {
      why = "expected HOST:PORT";
      return false;
    }
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0 || res == nullptr) {
    why = gai_strerror(rc);
    return false;
  }
  std::memcpy(&out.addr, res->ai_addr, res->ai_addrlen);
  out.len = static_cast<socklen_t>(res->ai_addrlen);
  out.port = static_cast<std::uint16_t>(std::stoul(port));
  ::freeaddrinfo(res);
  return true;
}

// The client needs a descriptor per connection: up to the hard limit.
void raise_nofile() {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
}

std::string grouped(std::uint64_t v) {
  const std::string digits = std::to_string(v);
  std::string s;
  s.reserve(digits.size() + digits.size() / 3);
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) s.push_back(',');
    s.push_back(digits[i]);
  }
  return s;
}

std::string fixed(double v, int digits) {
  char b[64];
  std::snprintf(b, sizeof(b), "%.*f", digits, v);
  return b;
}

std::string ms(std::uint64_t ns) { return fixed(static_cast<double>(ns) / 1e6, ns < 10'000'000 ? 3 : 1) + " ms"; }

double us(std::uint64_t ns) { return std::round(static_cast<double>(ns) / 10.0) / 100.0; }

std::array<double, 3> load_average() {
  std::array<double, 3> l{-1, -1, -1};
  ::getloadavg(l.data(), 3);
  return l;
}

// The sockets on the target port by state, each side, after a run.
struct socket_census {
  std::map<std::string, std::size_t> server;  // local port == target port
  std::map<std::string, std::size_t> client;  // remote port == target port
  std::string error;
};

socket_census take_census(std::uint16_t port) {
  socket_census c;
  closewise::error_code ec;
  for (const auto& s : closewise::list_tcp_sockets(port, ec)) {
    if (s.state == closewise::tcp_state::listen) continue;
    std::string st(closewise::to_string(s.state));  // "TIME_WAIT" -> "time_wait": JSON keys
    for (char& ch : st) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (s.local_port == port) ++c.server[st];
    if (s.remote_port == port) ++c.client[st];
  }
  if (ec) c.error = ec.message();
  return c;
}

std::size_t count_in(const std::map<std::string, std::size_t>& m, const std::string& key) {
  const auto it = m.find(key);
  return it == m.end() ? 0 : it->second;
}

// CSV: one header for every mode, so that rows of several runs share a file.
const std::vector<std::string> csv_columns = {"mode",
                                              "target",
                                              "path",
                                              "threads",
                                              "connections",
                                              "window_s",
                                              "completed",
                                              "rate",
                                              "unit",
                                              "p50_us",
                                              "p90_us",
                                              "p99_us",
                                              "max_us",
                                              "errors",
                                              "refused",
                                              "reset",
                                              "broken_pipe",
                                              "timeout",
                                              "truncated",
                                              "addr_unavailable",
                                              "bad_status",
                                              "protocol",
                                              "other",
                                              "time_wait_client",
                                              "time_wait_server",
                                              "opened",
                                              "failed",
                                              "rss_before_kib",
                                              "rss_after_kib",
                                              "kib_per_connection",
                                              "load1"};

bool write_csv(const std::string& path, const json& j) {
  bool need_header = true;
  {
    std::ifstream in(path);
    need_header = !in || in.peek() == std::ifstream::traits_type::eof();
  }
  std::ofstream out(path, std::ios::app);
  if (!out) return false;
  auto cell = [&](const std::string& col) -> std::string {
    const json* v = nullptr;
    if (col == "errors") {
      if (j.contains("errors")) v = &j["errors"]["total"];
    } else if (j.contains(col)) {
      v = &j[col];
    } else if (j.contains("errors") && j["errors"].contains(col)) {
      v = &j["errors"][col];
    } else if (col.rfind("p", 0) == 0 && col.size() > 3 && j.contains("latency_us")) {
      const std::string k = col.substr(0, col.size() - 3);
      if (j["latency_us"].contains(k)) v = &j["latency_us"][k];
    } else if (col == "max_us" && j.contains("latency_us")) {
      v = &j["latency_us"]["max"];
    } else if (col == "time_wait_client" && j.contains("time_wait")) {
      v = &j["time_wait"]["client"];
    } else if (col == "time_wait_server" && j.contains("time_wait")) {
      v = &j["time_wait"]["server"];
    } else if (col == "load1" && j.contains("load_average")) {
      v = &j["load_average"]["start"][0];
    }
    if (v == nullptr || v->is_null()) return "";
    if (v->is_string()) return v->get<std::string>();
    return v->dump();
  };
  if (need_header) {
    for (std::size_t i = 0; i < csv_columns.size(); ++i) out << (i ? "," : "") << csv_columns[i];
    out << '\n';
  }
  for (std::size_t i = 0; i < csv_columns.size(); ++i) out << (i ? "," : "") << cell(csv_columns[i]);
  out << '\n';
  return static_cast<bool>(out);
}

bool write_json(const std::string& path, const json& j) {
  std::ofstream out(path);
  out << j.dump(2) << '\n';
  return static_cast<bool>(out);
}

// The live line: rewritten in place on a terminal.
struct progress_line {
  bool enabled = false;
  void show(const std::string& s) const {
    if (!enabled) return;
    std::fprintf(stderr, "\r\033[K%s", s.c_str());
    std::fflush(stderr);
  }
  void clear() const {
    if (!enabled) return;
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
  }
};

}  // namespace

int main(int argc, char** argv) {
  app::ignore_sigpipe();
  CLI::App cli{
      "Teardown-throughput load generator: whole connect-request-response-close cycles per second, by who "
      "closes and how (FIN or RST), with latency, errors by class and TIME_WAIT left on each side; or the "
      "server's memory per idle / half-request connection.",
      name};
  std::string target_text;
  std::string path = "/";
  std::string method = "GET";
  std::string body;
  std::string host;
  std::vector<std::string> headers;
  std::string mode_text = "client-fin";
  unsigned connections = 64;
  double duration_s = 5.0;
  std::uint64_t count = 0;
  unsigned threads = 2;
  double warmup_s = 1.0;
  std::uint64_t requests_per_conn = 0;
  double timeout_s = 5.0;
  std::string json_path;
  std::string csv_path;
  int server_pid = 0;
  double hold_s = 0.0;
  unsigned warmup_requests = 200;
  unsigned sources = 0;
  bool no_progress = false;
  bool fail_on_error = false;
  bool tls = false;
  std::string tls_versions = "both";
  std::string tls_server_name = "localhost";
  std::string log_level = "warn";

  cli.add_option("--target", target_text, "Server to load, HOST:PORT")->required()->type_name("HOST:PORT");
  cli.add_option("--path", path, "Request target")->capture_default_str();
  cli.add_option("--method", method,
                 "Request method; POST is not idempotent, so a proxy must not retry it on another upstream")
      ->check(CLI::IsMember({"GET", "POST", "PUT", "DELETE"}))
      ->capture_default_str();
  cli.add_option("--body", body, "Request body, sent with its Content-Length (cycle modes)");
  cli.add_option("--host", host, "Host header (default: the --target text)");
  cli.add_option("--header", headers, "Extra request header field, 'Name: value' (repeatable)");
  cli.add_option("--mode", mode_text,
                 "client-fin | client-rst | server-close | keepalive (cycles); idle | half-request (memory)")
      ->check(CLI::IsMember({"client-fin", "client-rst", "server-close", "keepalive", "idle", "half-request"}))
      ->capture_default_str();
  cli.add_option("--connections", connections, "Concurrent connections (memory modes: connections to hold)")
      ->check(CLI::Range(1u, 1'000'000u))
      ->capture_default_str();
  auto* dur = cli.add_option("--duration", duration_s, "Seconds measured (after the warm-up)")
                  ->check(CLI::PositiveNumber)
                  ->capture_default_str();
  cli.add_option("--count", count, "Stop after this many measured cycles (keepalive: requests) instead")->excludes(dur);
  cli.add_option("--threads", threads, "Client threads, one epoll loop each")
      ->check(CLI::Range(1u, 256u))
      ->capture_default_str();
  cli.add_option("--warmup", warmup_s, "Seconds of load before the measured window")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--requests-per-conn", requests_per_conn, "keepalive: requests per connection (0: unlimited)")
      ->capture_default_str();
  cli.add_option("--timeout", timeout_s, "Seconds a cycle (keepalive: a request) may take; then: timeout error")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cli.add_option("--sources", sources,
                 "Connect from this many loopback addresses in turn (127.0.0.1, .2, ...; IPv4 targets on loopback "
                 "only): each has its own ephemeral ports, which lifts client-fin's TIME_WAIT port cap")
      ->check(CLI::Range(0u, 250u))
      ->capture_default_str();
  cli.add_option("--json", json_path, "Write the results as JSON to FILE")->type_name("FILE");
  cli.add_option("--csv", csv_path, "Append the results as a CSV row to FILE (header when new)")->type_name("FILE");
  cli.add_option("--server-pid", server_pid, "Memory modes: the server process whose VmRSS is read");
  cli.add_option("--hold", hold_s, "Memory modes: seconds to keep the connections after measuring")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--warmup-requests", warmup_requests, "Memory modes: whole exchanges before the first RSS reading")
      ->capture_default_str();
  cli.add_flag("--no-progress", no_progress, "No live progress line (it is shown only on a terminal anyway)");
  cli.add_flag("--fail-on-error", fail_on_error, "Exit 1 when any cycle failed");
  cli.add_flag("--tls", tls,
               "HTTPS: a full handshake per connection (no session resumption); cycle modes end TLS as the mode "
               "says and count handshake failures and TLS errors by class; memory modes hold connections whose "
               "handshake is complete");
  cli.add_option("--tls-versions", tls_versions, "--tls: the versions offered, 1.2 | 1.3 | both")
      ->check(CLI::IsMember({"1.2", "1.3", "both"}))
      ->capture_default_str();
  cli.add_option("--tls-server-name", tls_server_name, "--tls: SNI sent (empty: none); the certificate is not verified")
      ->capture_default_str();
  app::add_common_flags(cli, log_level);
  if (const int rc = app::parse(cli, argc, argv); rc >= 0) return rc;
  app::setup_logging(log_level);

  target_address target;
  if (std::string why; !resolve(target_text, target, why)) {
    std::cerr << name << ": error: --target " << target_text << ": " << why << " (see " << name << " --help)\n";
    return app::exit_usage;
  }
  if (path.empty() || (path.front() != '/' && path != "*")) {
    std::cerr << name << ": error: --path must start with '/' (see " << name << " --help)\n";
    return app::exit_usage;
  }
  raise_nofile();
  if (host.empty()) host = target_text;

  std::string request = method + " " + path + " HTTP/1.1\r\nHost: " + host + "\r\n";
  for (const auto& h : headers) request += h + "\r\n";
  const std::string partial = request;  // request line and fields, without the empty line
  const bool server_close = mode_text == "server-close";
  std::string full = request + "\r\n";
  if (server_close) request += "Connection: close\r\n";
  if (!body.empty() || method == "POST" || method == "PUT") {
    request += "Content-Length: " + std::to_string(body.size()) + "\r\n";
  }
  request += "\r\n" + body;

  progress_line live;
  live.enabled = !no_progress && ::isatty(STDERR_FILENO) != 0;
  const auto load_start = load_average();

  json j;
  j["tool"] = name;
  j["version"] = app::version();
  j["mode"] = mode_text;
  j["tls"] = tls;
  j["target"] = target_text;
  j["path"] = path;
  j["method"] = method;

  if (mode_text == "idle" || mode_text == "half-request") {
    cb::hold_config hc;
    hc.target = target.addr;
    hc.target_len = target.len;
    hc.port = target.port;
    hc.half_request = mode_text == "half-request";
    hc.full_request = full;
    hc.partial_request = partial;
    hc.connections = connections;
    hc.hold = app::seconds(hold_s);
    hc.server_pid = server_pid;
    hc.warmup_requests = warmup_requests;
    hc.tls = tls;
    hc.tls_versions = tls_versions == "1.2"   ? cb::tls_version_choice::tls12
                      : tls_versions == "1.3" ? cb::tls_version_choice::tls13
                                              : cb::tls_version_choice::both;
    hc.tls_server_name = tls_server_name;
    const cb::hold_result r = cb::run_hold(hc, [&](const std::string& s) { live.show(s); });
    live.clear();
    j["connections"] = connections;
    j["opened"] = r.opened;
    j["failed"] = r.failed;
    j["warmup_failed"] = r.warmup_failed;
    j["open_s"] = std::round(r.open_s * 1000) / 1000;
    j["server_pid"] = server_pid;
    j["rss_before_kib"] = r.rss_before_kib >= 0 ? json(r.rss_before_kib) : json(nullptr);
    j["rss_after_kib"] = r.rss_after_kib >= 0 ? json(r.rss_after_kib) : json(nullptr);
    j["kib_per_connection"] =
        r.rss_after_kib >= 0 ? json(std::round(r.kib_per_connection * 1000) / 1000) : json(nullptr);
    j["server_established"] = r.server_established;
    j["accept_queue_left"] = r.accept_queue_left;
    j["closed_by_server"] = r.closed_by_server;
    j["hold_s"] = hold_s;
    if (tls) {
      j["tls"] = {{"versions_offered", tls_versions},
                  {"negotiated", {{"TLSv1.2", r.tls12}, {"TLSv1.3", r.tls13}}},
                  {"handshake_failed", r.handshake_failed}};
    }
    j["load_average"] = {{"start", load_start}, {"end", load_average()}};

    std::cout << name << " " << app::version() << ": " << mode_text << (tls ? " over TLS" : "") << " against "
              << target_text << ", " << grouped(connections) << " connections\n";
    std::cout << "  opened " << grouped(r.opened) << " (failed " << r.failed << ") in " << fixed(r.open_s, 2)
              << " s; server side ESTABLISHED " << grouped(r.server_established) << ", not yet accepted "
              << r.accept_queue_left << ", closed by the server " << r.closed_by_server << "\n";
    if (tls) {
      std::cout << "  tls (" << tls_versions << " offered): full handshakes held " << grouped(r.tls12 + r.tls13)
                << " (TLSv1.3 " << grouped(r.tls13) << ", TLSv1.2 " << grouped(r.tls12) << "), handshakes failed "
                << r.handshake_failed << "\n";
    }
    if (r.rss_after_kib >= 0) {
      std::cout << "  server RSS " << grouped(static_cast<std::uint64_t>(r.rss_before_kib)) << " KiB -> "
                << grouped(static_cast<std::uint64_t>(r.rss_after_kib)) << " KiB: " << fixed(r.kib_per_connection, 2)
                << " KiB per connection\n";
    } else {
      std::cout << "  server RSS not read (give --server-pid)\n";
    }
    if (!json_path.empty() && !write_json(json_path, j)) return app::fail(name, "cannot write " + json_path);
    if (!csv_path.empty() && !write_csv(csv_path, j)) return app::fail(name, "cannot write " + csv_path);
    const bool bad = r.opened == 0 || (fail_on_error && (r.failed > 0 || r.closed_by_server > 0));
    return bad ? app::exit_failure : app::exit_ok;
  }

  cb::load_config cfg;
  cfg.target = target.addr;
  cfg.target_len = target.len;
  if (sources > 0) {
    if (target.addr.ss_family != AF_INET) {
      std::cerr << name << ": error: --sources needs an IPv4 loopback target (see " << name << " --help)\n";
      return app::exit_usage;
    }
    for (unsigned i = 0; i < sources; ++i) {
      sockaddr_storage ss{};
      auto* a = reinterpret_cast<sockaddr_in*>(&ss);
      a->sin_family = AF_INET;
      a->sin_addr.s_addr = htonl(INADDR_LOOPBACK + i);  // 127.0.0.1 + i: all of 127/8 is local
      cfg.sources.push_back(ss);
    }
  }
  cfg.run_mode = mode_text == "client-fin"     ? cb::mode::client_fin
                 : mode_text == "client-rst"   ? cb::mode::client_rst
                 : mode_text == "server-close" ? cb::mode::server_close
                                               : cb::mode::keepalive;
  cfg.request = request;
  cfg.threads = threads;
  cfg.connections = connections;
  cfg.requests_per_conn = requests_per_conn;
  cfg.timeout = app::seconds(timeout_s);
  cfg.warmup = app::seconds(warmup_s);
  cfg.duration = app::seconds(duration_s);
  cfg.count = count;
  cfg.tls = tls;
  cfg.tls_versions = tls_versions == "1.2"   ? cb::tls_version_choice::tls12
                     : tls_versions == "1.3" ? cb::tls_version_choice::tls13
                                             : cb::tls_version_choice::both;
  cfg.tls_server_name = tls_server_name;
  const bool keepalive = cfg.run_mode == cb::mode::keepalive;
  const std::string unit = keepalive ? "req/s" : "conn/s";

  closewise::error_code ec;
  const auto tw_before = closewise::count_tcp_state(target.port, closewise::tcp_state::time_wait, ec);
  cb::load_result r;
  try {
    std::uint64_t last = 0;
    double last_t = 0;
    r = cb::run_load(cfg, [&](double t, std::string_view phase, std::uint64_t done, std::uint64_t errors) {
      const double rate = t > last_t ? static_cast<double>(done - last) / (t - last_t) : 0;
      last = done;
      last_t = t;
      live.show(std::string(name) + " " + fixed(t, 0) + " s " + std::string(phase) + ": " +
                grouped(static_cast<std::uint64_t>(rate)) + " " + unit + ", " + grouped(done) + " done, " +
                grouped(errors) + " errors");
    });
  } catch (const std::exception& e) {
    live.clear();
    return app::fail(name, e.what());
  }
  live.clear();
  // Let the last closes reach their final state before counting.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const socket_census after = take_census(target.port);
  const std::size_t tw_client = count_in(after.client, "time_wait");
  const std::size_t tw_server = count_in(after.server, "time_wait");
  const std::size_t tw_client_new = tw_client > tw_before.remote_side ? tw_client - tw_before.remote_side : 0;
  const std::size_t tw_server_new = tw_server > tw_before.local_side ? tw_server - tw_before.local_side : 0;
  const double rate = r.window_s > 0 ? static_cast<double>(r.completed) / r.window_s : 0;

  j["threads"] = std::max(1u, std::min(threads, connections));
  j["connections"] = connections;
  j["warmup_s"] = warmup_s;
  j["duration_s"] = count > 0 ? json(nullptr) : json(duration_s);
  j["count"] = count;
  j["requests_per_conn"] = requests_per_conn;
  j["sources"] = sources;
  j["window_s"] = std::round(r.window_s * 1e4) / 1e4;
  j["completed"] = r.completed;
  j["rate"] = std::round(rate * 10) / 10;
  j["unit"] = unit;
  j["latency_us"] = {{"p50", us(r.latency.quantile(0.50))},
                     {"p90", us(r.latency.quantile(0.90))},
                     {"p99", us(r.latency.quantile(0.99))},
                     {"max", us(r.latency.max())},
                     {"mean", std::round(r.latency.mean() / 10.0) / 100.0}};
  json errors;
  for (std::size_t i = 0; i < cb::error_class_count; ++i) {
    errors[std::string(cb::to_string(static_cast<cb::error_class>(i)))] = r.errors[i];
  }
  errors["total"] = r.errors_total();
  j["errors"] = errors;
  j["connections_opened"] = r.connections_opened;
  j["server_reset_after_response"] = r.server_reset_after_response;
  j["aborted_at_end"] = r.aborted_at_end;
  j["bytes_in"] = r.bytes_in;
  if (tls) {
    json failures;
    for (std::size_t i = 0; i < r.tls.handshake_failures.size(); ++i) {
      const auto h = static_cast<closewise::tls_handshake>(i);
      if (h != closewise::tls_handshake::none && h != closewise::tls_handshake::ok)
        failures[std::string(closewise::to_string(h))] = r.tls.handshake_failures[i];
    }
    j["tls"] = {{"versions_offered", tls_versions},
                {"handshakes", r.tls.handshakes},
                {"resumed", r.tls.resumed},
                {"negotiated", {{"TLSv1.2", r.tls.tls12}, {"TLSv1.3", r.tls.tls13}}},
                {"handshake_failures", failures},
                {"errors", {{"alert", r.tls.alerts}, {"ssl", r.tls.ssl_errors}, {"truncated", r.tls.truncated}}},
                {"server_end",
                 {{"close_notify", r.tls.peer_close_notify},
                  {"fin_without_close_notify", r.tls.peer_fin_no_close_notify},
                  {"reset", r.server_reset_after_response}}},
                {"close_notify_sent", r.tls.close_notify_sent}};
  }
  j["time_wait"] = {{"client", tw_client_new},
                    {"server", tw_server_new},
                    {"client_before", tw_before.remote_side},
                    {"server_before", tw_before.local_side}};
  j["sockets_after"] = {{"server", after.server}, {"client", after.client}};
  if (!after.error.empty() || ec) j["sock_diag_error"] = !after.error.empty() ? after.error : ec.message();
  j["load_average"] = {{"start", load_start}, {"end", load_average()}};

  std::cout << name << " " << app::version() << ": " << mode_text << (tls ? " over TLS" : "") << " against "
            << target_text << " " << path << ", " << j["threads"].get<unsigned>() << " threads, " << connections
            << " connections, " << (sources > 0 ? std::to_string(sources) + " source addresses, " : "")
            << fixed(r.window_s, 2) << " s measured (+" << fixed(warmup_s, 2) << " s warm-up)\n";
  std::cout << "  " << grouped(static_cast<std::uint64_t>(rate)) << " " << unit << "  (" << grouped(r.completed)
            << (keepalive ? " requests" : " cycles") << ", " << grouped(r.errors_total()) << " errors";
  if (keepalive) std::cout << ", " << grouped(r.connections_opened) << " connections";
  std::cout << ")\n";
  std::cout << "  latency (" << (keepalive ? "request" : "whole cycle") << "): p50 " << ms(r.latency.quantile(0.5))
            << "  p90 " << ms(r.latency.quantile(0.9)) << "  p99 " << ms(r.latency.quantile(0.99)) << "  max "
            << ms(r.latency.max()) << "\n";
  std::cout << "  errors:";
  for (std::size_t i = 0; i < cb::error_class_count; ++i) {
    std::cout << (i ? ", " : " ") << cb::to_string(static_cast<cb::error_class>(i)) << " " << r.errors[i];
  }
  std::cout << "\n";
  if (tls) {
    std::cout << "  tls (" << tls_versions << " offered): " << grouped(r.tls.handshakes) << " full handshakes (TLSv1.3 "
              << grouped(r.tls.tls13) << ", TLSv1.2 " << grouped(r.tls.tls12) << "), resumed " << r.tls.resumed
              << "; handshake failures:";
    for (std::size_t i = 0; i < r.tls.handshake_failures.size(); ++i) {
      const auto h = static_cast<closewise::tls_handshake>(i);
      if (h == closewise::tls_handshake::none || h == closewise::tls_handshake::ok) continue;
      std::cout << " " << closewise::to_string(h) << " " << r.tls.handshake_failures[i];
    }
    std::cout << "\n  tls errors: alert " << r.tls.alerts << ", ssl " << r.tls.ssl_errors << ", truncated "
              << r.tls.truncated << "; server ended with close_notify " << grouped(r.tls.peer_close_notify)
              << ", bare FIN " << grouped(r.tls.peer_fin_no_close_notify) << "; close_notify sent "
              << grouped(r.tls.close_notify_sent) << "\n";
  }
  if (r.server_reset_after_response > 0) {
    std::cout << "  note: " << grouped(r.server_reset_after_response)
              << " whole responses were followed by the server's RST instead of its FIN\n";
  }
  std::cout << "  TIME_WAIT left: client side " << grouped(tw_client_new) << ", server side " << grouped(tw_server_new);
  if (tw_before.local_side + tw_before.remote_side > 0) {
    std::cout << " (besides " << grouped(tw_before.remote_side) << " / " << grouped(tw_before.local_side)
              << " from before)";
  }
  std::cout << "\n";
  for (const auto* side : {&after.server, &after.client}) {
    std::string others;
    for (const auto& [st, n] : *side) {
      if (st != "time_wait") others += (others.empty() ? "" : ", ") + st + " " + grouped(n);
    }
    if (!others.empty()) {
      std::cout << "  other sockets left, " << (side == &after.server ? "server" : "client") << " side: " << others
                << "\n";
    }
  }

  if (!json_path.empty() && !write_json(json_path, j)) return app::fail(name, "cannot write " + json_path);
  if (!csv_path.empty() && !write_csv(csv_path, j)) return app::fail(name, "cannot write " + csv_path);
  if (r.completed == 0) return app::fail(name, "no cycle completed");
  if (fail_on_error && r.errors_total() > 0) return app::exit_failure;
  return app::exit_ok;
}
