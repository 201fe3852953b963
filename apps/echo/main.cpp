// closewise-echo: an echo server that stays correct across half-close, and a
// client that proves it byte for byte.
//
// Exit status: server: 0 after a drain (SIGTERM/SIGINT), 1 on a setup error.
// Client: 0 when every byte came back (same count, same SHA-256), 1 otherwise.
// Both: 2 on a usage error.

#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <system_error>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "closewise/server.hpp"
#include "closewise/stats.hpp"
#include "common/app.hpp"
#include "echo/client.hpp"
#include "echo/session.hpp"

namespace {

namespace app = closewise::app;
namespace echo = closewise::echo;

constexpr const char* name = "closewise-echo";

struct client_flags {
  std::string target;
  std::string file;
  std::uint64_t bytes = 0;
  std::uint64_t seed = 1;
  std::uint64_t chunk = 64 * 1024;
  double timeout_s = 30.0;
  bool json = false;
  bool no_verify = false;
};

int run_server(const app::server_flags& flags) {
  closewise::server_options opts;
  try {
    opts = flags.to_options();
  } catch (const CLI::ValidationError& e) {
    return app::fail(name, e.what(), app::exit_usage);
  } catch (const std::exception& e) {
    return app::fail(name, e.what());  // a certificate or key that cannot be loaded
  }
  closewise::server srv(opts, echo::make_session(echo::session_options_for(opts)));
  try {
    srv.start();
  } catch (const std::exception& e) {
    return app::fail(name, e.what());
  }
  app::print_listening(srv);
  srv.run();  // returns once a SIGTERM/SIGINT drain finished
  if (flags.print_stats) {
    const auto snap = srv.stats().snapshot();
    const std::string text =
        flags.stats_format == "prometheus" ? closewise::to_prometheus(snap) : closewise::to_json(snap) + "\n";
    std::fputs(text.c_str(), stdout);
    std::fflush(stdout);
  }
  return app::exit_ok;
}

int run_client(const client_flags& f) {
  echo::client_options o;
  o.target = f.target;
  o.file = f.file;
  o.bytes = f.bytes;
  o.seed = f.seed;
  o.chunk_size = static_cast<std::size_t>(f.chunk);
  o.verify = !f.no_verify;
  o.timeout = app::seconds(f.timeout_s);
  const echo::client_result r = echo::run_client(o);
  if (f.json) {
    nlohmann::ordered_json j;
    j["target"] = f.target;
    j["bytes_sent"] = r.bytes_sent;
    j["bytes_received"] = r.bytes_received;
    j["sha256_sent"] = r.sent_sha256;
    j["sha256_received"] = r.received_sha256;
    j["verified"] = o.verify;
    j["end"] = echo::to_string(r.end);
    j["seconds"] = r.seconds;
    j["mb_per_s"] = r.mb_per_s();
    j["match"] = r.match();
    if (!r.error.empty()) j["error"] = r.error;
    std::cout << j.dump() << '\n';
  } else {
    std::cout << "sent " << r.bytes_sent << " bytes" << (o.verify ? ", sha256 " + r.sent_sha256 : "") << '\n'
              << "received " << r.bytes_received << " bytes" << (o.verify ? ", sha256 " + r.received_sha256 : "")
              << ", ended by " << echo::to_string(r.end) << '\n'
              << "time " << r.seconds << " s, " << r.mb_per_s() << " MB/s\n"
              << (o.verify ? "digests match: " : "byte counts match: ") << (r.match() ? "yes" : "NO") << '\n';
    if (!r.error.empty()) std::cerr << name << ": error: " << r.error << '\n';
  }
  return r.match() ? app::exit_ok : app::exit_failure;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App cli(
      "Echo server, correct across half-close: every byte comes back; after the peer's FIN it finishes "
      "echoing, sends its own FIN and closes with the --teardown policy. It prints 'listening on HOST:PORT' "
      "(or 'listening on unix:PATH') for each endpoint first, on stdout.\n"
      "With --client it is the client instead: it sends a file or seeded random bytes, half-closes after the "
      "last byte, receives concurrently and compares SHA-256 digests (exit 0 on a match, 1 otherwise).",
      name);
  cli.footer(
      "Examples:\n"
      "  closewise-echo --listen 127.0.0.1:0 --stats          # prints 'listening on 127.0.0.1:PORT'\n"
      "  closewise-echo --client 127.0.0.1:PORT --bytes 100MB --json\n"
      "  closewise-echo --client unix:/tmp/echo.sock --file big.iso\n"
      "Server exit: SIGTERM/SIGINT drain (stop accepting, finish exchanges) and exit 0.");

  app::server_flags server;
  server.add_to(cli);
  std::string log_level = "warn";
  app::add_common_flags(cli, log_level);
  for (CLI::Option* opt : cli.get_options()) {
    if (opt != cli.get_help_ptr() && opt->get_name() != "--version" && opt->get_name() != "--log-level")
      opt->group("Server (default mode)");
  }

  client_flags client;
  const std::string group = "Client (--client)";
  auto* target = cli.add_option("--client", client.target,
                                "Run as a client of the echo server at HOST:PORT (numeric host) or unix:PATH")
                     ->type_name("HOST:PORT")
                     ->group(group);
  target->excludes(cli.get_option("--listen"))->excludes(cli.get_option("--unix"));
  auto* file = cli.add_option("--file", client.file, "Send this file")
                   ->check(CLI::ExistingFile)
                   ->type_name("FILE")
                   ->needs(target)
                   ->group(group);
  auto* bytes = cli.add_option("--bytes", client.bytes, "Send this many seeded random bytes (e.g. 100MB, 1GiB)")
                    ->transform(CLI::AsSizeValue(true))
                    ->needs(target)
                    ->excludes(file)
                    ->group(group);
  cli.add_option("--seed", client.seed, "Seed of the random bytes")->capture_default_str()->needs(bytes)->group(group);
  cli.add_option("--chunk", client.chunk, "Bytes per send and per receive")
      ->capture_default_str()
      ->transform(CLI::AsSizeValue(true))
      ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{64} << 20))
      ->needs(target)
      ->group(group);
  cli.add_option("--timeout", client.timeout_s, "Give up after this many seconds without progress")
      ->capture_default_str()
      ->check(CLI::PositiveNumber)
      ->needs(target)
      ->group(group);
  cli.add_flag("--json", client.json, "Print the result as one JSON object")->needs(target)->group(group);
  cli.add_flag("--no-verify", client.no_verify, "Count bytes only, no SHA-256 (for throughput runs)")
      ->needs(target)
      ->group(group);

  if (const int rc = app::parse(cli, argc, argv); rc >= 0) return rc;
  if (!client.target.empty() && file->count() == 0 && bytes->count() == 0) {
    return app::fail(name, "--client needs --file FILE or --bytes N (see closewise-echo --help)", app::exit_usage);
  }
  app::setup_logging(log_level);
  app::ignore_sigpipe();
  try {
    return client.target.empty() ? run_server(server) : run_client(client);
  } catch (const std::exception& e) {
    return app::fail(name, e.what());
  }
}
