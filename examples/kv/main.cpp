// closewise-kv: a line-based key/value server (see kv.hpp for the protocol).
//
//   $ closewise-kv --listen 127.0.0.1:0
//   listening on 127.0.0.1:40123
//   $ printf 'SET a 1\nGET a\nDEL a\nGET a' | nc -N 127.0.0.1 40123
//   OK
//   VALUE 1
//   DELETED
//   NOT_FOUND
//
// `nc -N` half-closes after its input: the server answers everything it
// received, then closes gracefully, and logs one close report per connection.
//
// Exit status: 0 after a drain (SIGTERM/SIGINT), 1 on a setup error, 2 on a
// usage error.

#include <cstdio>
#include <exception>
#include <memory>
#include <string>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include "closewise/server.hpp"
#include "closewise/stats.hpp"
#include "common/app.hpp"
#include "kv/kv.hpp"

namespace {

namespace app = closewise::app;
constexpr const char* name = "closewise-kv";

}  // namespace

int main(int argc, char** argv) {
  CLI::App cli(
      "Line-based key/value server: SET key value, GET key, DEL key, QUIT, QUIT! (reset), one reply line per "
      "command. A client that half-closes gets every reply, then the server's FIN. Each close is logged with "
      "its report. It prints 'listening on HOST:PORT' for each endpoint first, on stdout.",
      name);
  app::server_flags flags;
  flags.add_to(cli);
  std::size_t max_line = closewise::kv::session_options{}.max_line;
  cli.add_option("--max-line", max_line,
                 "Longest command line in bytes; a longer one is refused and ends the connection (gracefully)")
      ->check(CLI::Range(std::size_t{16}, std::size_t{1} << 20))
      ->capture_default_str();
  std::string log_level = "info";  // info: the close reports are the point of this example
  app::add_common_flags(cli, log_level);
  if (const int rc = app::parse(cli, argc, argv); rc >= 0) return rc;

  closewise::server_options opts;
  try {
    opts = flags.to_options();  // --teardown sets the default policy of every connection
  } catch (const CLI::ValidationError& e) {
    return app::fail(name, e.what(), app::exit_usage);
  }
  app::setup_logging(log_level);
  app::ignore_sigpipe();
  auto log = spdlog::stderr_color_mt("kv");
  log->set_level(spdlog::level::from_str(log_level));

  try {
    closewise::kv::session_options session;
    session.max_line = max_line;
    closewise::server srv(opts, closewise::kv::make_session(std::make_shared<closewise::kv::store>(), session));
    // Every connection ends with exactly one report: why it ended, bytes in
    // and out, who keeps TIME_WAIT, whether a RST was sent or received. The
    // observer runs on the connection's I/O thread; spdlog's _mt loggers are
    // safe to call from several.
    srv.on_close([log](const closewise::connection& c, const closewise::close_report& r) {
      const bool loud = r.rst_sent || r.rst_received || r.kernel_reset();
      log->log(loud ? spdlog::level::warn : spdlog::level::info, "{} closed: {}", c.peer(), r.describe());
    });
    srv.start();
    app::print_listening(srv);
    srv.run();  // returns once a SIGTERM/SIGINT drain finished
    if (flags.print_stats) {
      const auto snap = srv.stats().snapshot();
      std::fputs((flags.stats_format == "prometheus" ? closewise::to_prometheus(snap) : closewise::to_json(snap) + "\n")
                     .c_str(),
                 stdout);
    }
  } catch (const std::exception& e) {
    return app::fail(name, e.what());
  }
  return app::exit_ok;
}
