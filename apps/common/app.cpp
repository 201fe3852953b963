#include "app.hpp"

#include <systemd/sd-daemon.h>

#include <csignal>
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include <system_error>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "closewise/log.hpp"
#include "closewise/version.hpp"

namespace closewise::app {

std::string version() { return closewise::version_string; }

std::chrono::milliseconds seconds(double s) {
  return std::chrono::milliseconds(static_cast<std::int64_t>(s * 1000.0 + 0.5));
}

void server_flags::add_to(CLI::App& cli) {
  cli.add_option("--listen", listen, "Listen on HOST:PORT (repeatable; port 0 picks a free port)")
      ->type_name("HOST:PORT");
  cli.add_option("--unix", unix_paths, "Listen on a Unix stream socket at PATH (repeatable)")->type_name("PATH");
  cli.add_option("--threads", threads, "I/O threads (0: one per core)")->capture_default_str();
  cli.add_option("--teardown", teardown, "How the server ends connections")
      ->check(CLI::IsMember({"graceful", "fin_close", "abortive", "rst_if_safe"}))
      ->capture_default_str();
  cli.add_option("--linger-timeout", linger_timeout_s,
                 "Graceful close: seconds without progress before giving up with RST")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cli.add_option("--linger-max", linger_max_s, "Graceful close: total seconds before giving up with RST")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cli.add_option("--idle-timeout", idle_timeout_s,
                 "Seconds a connection may wait for a new request (0: none); behind a proxy keep it longer "
                 "than the proxy's upstream keepalive timeout")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--read-timeout", read_timeout_s, "Seconds without a byte in the middle of a request (0: none)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--write-timeout", write_timeout_s, "Seconds a write may make no progress (0: none)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--drain-timeout", drain_timeout_s,
                 "On SIGTERM/SIGINT: seconds to let exchanges finish before resetting the rest")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--drain-idle-grace", drain_idle_grace_s,
                 "On SIGTERM/SIGINT: close an idle keep-alive connection only once it has waited this many seconds "
                 "for a request (a proxy's next request would race our FIN on a connection it just used)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--max-connections", max_connections, "Open connections at most")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cli.add_option("--overflow", overflow,
                 "At the connection limit: pause (newcomers wait in the backlog) or reject (RST at once)")
      ->check(CLI::IsMember({"pause", "reject"}))
      ->capture_default_str();
  cli.add_flag("--reuse-port", reuse_port,
               "SO_REUSEPORT: share the port with other processes (zero-downtime restarts)");
  cli.add_flag("--final-state", final_state,
               "Read each connection's TCP state just before its close (TCP_INFO, one syscall per connection) for "
               "the close report's final_state, which is otherwise 'unknown'");
  cli.add_option("--tls-cert", tls_cert, "Serve TLS (1.2 and 1.3, ALPN http/1.1) with this PEM certificate chain")
      ->type_name("FILE");
  cli.add_option("--tls-key", tls_key, "The PEM private key of --tls-cert")->type_name("FILE");
  cli.add_flag("--tls-no-tickets", tls_no_tickets,
               "TLS: send no session tickets, so every handshake is full (resumption is otherwise by stateless "
               "tickets; the server keeps no session cache either way)");
  cli.add_option("--handshake-timeout", handshake_timeout_s, "TLS: seconds a handshake may take in all (0: none)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_flag("--systemd", systemd,
               "Require listening sockets from systemd socket activation (LISTEN_FDS; fail if there are none). "
               "Without it, sockets systemd passes are used when present, next to any --listen/--unix");
  cli.add_flag("--stats", print_stats, "Print the teardown statistics on exit (stdout)");
  cli.add_option("--stats-format", stats_format, "Format of --stats")
      ->check(CLI::IsMember({"json", "prometheus"}))
      ->capture_default_str();
}

server_options server_flags::to_options() const {
  server_options o;
  o.listen = listen;
  o.unix_paths = unix_paths;
  for (const auto& l : o.listen) {
    try {
      (void)parse_endpoint(l);
    } catch (const std::invalid_argument& e) {
      throw CLI::ValidationError("--listen", e.what());
    }
  }
  o.inherited_listeners = systemd_listeners();
  if (systemd && o.inherited_listeners.empty())
    throw std::runtime_error("--systemd: no listening sockets passed by systemd (LISTEN_FDS/LISTEN_PID)");
  if (o.listen.empty() && o.unix_paths.empty() && o.inherited_listeners.empty()) o.listen = {"127.0.0.1:0"};
  o.threads = threads;
  if (!parse(teardown, o.policy)) throw CLI::ValidationError("--teardown", "unknown policy " + teardown);
  o.stream.linger_timeout = seconds(linger_timeout_s);
  o.stream.linger_max = seconds(linger_max_s);
  o.stream.idle_timeout = seconds(idle_timeout_s);
  o.stream.read_timeout = seconds(read_timeout_s);
  o.stream.write_timeout = seconds(write_timeout_s);
  o.stream.probe_final_state = final_state;
  o.drain_timeout = seconds(drain_timeout_s);
  o.drain_idle_grace = seconds(drain_idle_grace_s);
  o.max_connections = max_connections;
  o.overflow = overflow == "reject" ? overflow_action::reject : overflow_action::pause_accept;
  o.handle_signals = true;
  o.reuse_port = reuse_port;
  if (tls_cert.empty() != tls_key.empty())
    throw CLI::ValidationError("--tls-cert", "--tls-cert and --tls-key go together");
  o.tls_limits.handshake_timeout = seconds(handshake_timeout_s);
  if (!tls_cert.empty()) {
    tls_context_options t;
    t.session_tickets = !tls_no_tickets;
    o.tls = std::make_shared<asio::ssl::context>(make_server_context_from_files(tls_cert, tls_key, t));
  }
  return o;
}

std::vector<int> systemd_listeners() {
  const int n = sd_listen_fds(1);
  if (n < 0) throw std::system_error(-n, std::generic_category(), "sd_listen_fds");
  std::vector<int> fds;
  for (int i = 0; i < n; ++i) fds.push_back(SD_LISTEN_FDS_START + i);
  return fds;
}

void add_common_flags(CLI::App& cli, std::string& log_level) {
  cli.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}))
      ->capture_default_str();
  cli.set_version_flag("--version", cli.get_name() + " " + version());
}

void setup_logging(const std::string& level) {
  auto logger = spdlog::get("closewise");
  if (!logger) {
    logger = spdlog::stderr_color_mt("closewise");
  }
  logger->set_level(spdlog::level::from_str(level));
  closewise::set_logger(logger);
}

void print_listening(const server& s) {
  for (const auto& e : s.local_endpoints()) std::printf("listening on %s\n", e.c_str());
  std::fflush(stdout);
}

void ignore_sigpipe() { std::signal(SIGPIPE, SIG_IGN); }

int fail(const std::string& name, const std::string& message, int code) {
  std::cerr << name << ": error: " << message << '\n';
  return code;
}

int parse(CLI::App& cli, int argc, char** argv) {
  try {
    cli.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return cli.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return cli.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return cli.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << cli.get_name() << ": error: " << e.what() << " (see " << cli.get_name() << " --help)\n";
    return exit_usage;
  }
  return -1;
}

}  // namespace closewise::app
