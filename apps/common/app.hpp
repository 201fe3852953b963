#pragma once
// What every closewise app shares: the common flags, their translation into
// server options, logging set-up, the "listening on" lines and exit codes.
//
// Exit status: 0 success, 1 failure, 2 usage error (bad flag or value).

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "closewise/server.hpp"

namespace closewise::app {

inline constexpr int exit_ok = 0;
inline constexpr int exit_failure = 1;
inline constexpr int exit_usage = 2;

/// The version every app prints with --version.
std::string version();

/// The flags shared by the servers (closewise-echo, closewise-reqresp).
struct server_flags {
  std::vector<std::string> listen;
  std::vector<std::string> unix_paths;
  unsigned threads = 0;
  std::string teardown = "graceful";
  double linger_timeout_s = 5.0;
  double linger_max_s = 30.0;
  double idle_timeout_s = 75.0;
  double read_timeout_s = 30.0;
  double write_timeout_s = 30.0;
  double drain_timeout_s = 10.0;
  double drain_idle_grace_s = 1.0;
  std::size_t max_connections = 10000;
  std::string overflow = "pause";
  bool reuse_port = false;
  bool final_state = false;
  bool print_stats = false;
  std::string stats_format = "json";
  std::string tls_cert;         ///< PEM certificate chain: serve TLS (with tls_key)
  std::string tls_key;          ///< PEM private key
  bool tls_no_tickets = false;  ///< no session tickets: every handshake full
  double handshake_timeout_s = 10.0;
  bool systemd = false;  ///< --systemd: require listening sockets from systemd (LISTEN_FDS)

  /// Registers the flags on `cli`.
  void add_to(CLI::App& cli);
  /// Builds server options; throws CLI::ValidationError on bad values. With
  /// --tls-cert/--tls-key the TLS context is built here (a certificate or key
  /// that cannot be loaded throws std::exception: a setup failure). Listening
  /// sockets passed by systemd (socket activation) become inherited
  /// listeners, next to any --listen/--unix; with --systemd and none passed
  /// it throws std::runtime_error (a setup failure).
  server_options to_options() const;
};

/// The listening sockets systemd passed (LISTEN_FDS/LISTEN_PID, socket
/// activation), from descriptor 3 on; none when the variables are absent or
/// meant for another process. Unsets the variables, so that children do not
/// take them for theirs. Throws std::system_error if sd_listen_fds fails.
std::vector<int> systemd_listeners();

/// Adds --log-level and --version (which prints "NAME VERSION" and exits 0).
void add_common_flags(CLI::App& cli, std::string& log_level);
/// Creates and registers the "closewise" logger on stderr at `level`
/// (trace, debug, info, warn, error, off). The app owns spdlog; the library
/// only looks the logger up.
void setup_logging(const std::string& level);

/// Prints "listening on HOST:PORT" for each endpoint on stdout and flushes,
/// so that scripts can start the server on port 0 and read the real port.
void print_listening(const server& s);

/// Ignores SIGPIPE (pipes still raise it; sockets use MSG_NOSIGNAL).
void ignore_sigpipe();

/// Prints "NAME: error: MESSAGE" on stderr, one line, and returns `code`.
int fail(const std::string& name, const std::string& message, int code = exit_failure);

/// Runs `cli.parse` with CLI11's error handling mapped to our exit codes:
/// returns -1 to continue, or the exit status to return from main.
int parse(CLI::App& cli, int argc, char** argv);

/// Seconds (fractional) to milliseconds.
std::chrono::milliseconds seconds(double s);

}  // namespace closewise::app
