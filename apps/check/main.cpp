// closewise-check: points misbehaving HTTP/1.1 clients at a running server
// (--target HOST:PORT) and prints one row per check: what a correct server
// does, what this one did, and the verdict. --json FILE writes the card as
// JSON too ("-": stdout, instead of the table).
//
// Exit status: 0 when no check failed, 1 when one did, 2 on a usage error.

#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "check/check.hpp"
#include "closewise/server.hpp"
#include "common/app.hpp"
#include "common/table.hpp"

namespace {

namespace check = closewise::check;
constexpr const char* name = "closewise-check";

// A battery's cases are listed when they say more than "pass" (a failure, a
// skip, a leniency's reason), or all of them with --all-cases: the framing
// battery alone has 36.
void print_card(std::ostream& out, const std::vector<check::row>& card, bool all_cases) {
  const std::vector<closewise::app::table_column> cols{
      {"check", 25}, {"a correct server", 32}, {"this server", 44}, {"verdict", 24}};
  std::vector<std::vector<std::string>> texts;
  const auto verdict_cell = [](const check::row& r) {
    std::string v(check::to_string(r.result));
    if (!r.reason.empty()) v.append(": ").append(r.reason);
    return v;
  };
  for (const auto& r : card) {
    texts.push_back({r.name, r.expected, r.observed, verdict_cell(r)});
    for (const auto& c : r.cases) {
      if (all_cases || c.result != check::verdict::pass || !c.reason.empty())
        texts.push_back({"- " + c.name, c.title, c.observed, verdict_cell(c)});
    }
  }
  closewise::app::print_table(out, cols, texts);
}

std::string check_list() {
  std::string s = "Checks (in the card's order):";
  for (const auto& c : check::all_checks()) s.append("\n  ").append(c.name).append(": ").append(c.description);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  namespace app = closewise::app;
  app::ignore_sigpipe();

  CLI::App cli{
      "Checks how a running HTTP/1.1 server ends its connections: scripted clients that pipeline behind a "
      "close, half-close, send oversized or malformed requests, read slowly or never, idle, reset and "
      "trickle headers; one row per check with what a correct server does, what this one did, and a verdict.",
      name};
  cli.footer(check_list());
  check::options opts;
  std::string json_file;
  bool all_cases = false;
  std::string log_level = "warn";
  double wait_s = 10, idle_s = 90, slow_s = 70;
  cli.add_option("--target", opts.target, "The server (numeric HOST:PORT)")->required()->type_name("HOST:PORT");
  cli.add_flag("--tls", opts.tls, "Speak TLS to the target (the TLS checks run only then)");
  cli.add_option("--large-path", opts.large_path,
                 "Path of a response of at least 4 MiB ({size} is replaced by the size); the large-response checks "
                 "are skipped when it does not answer 200 with that much")
      ->capture_default_str();
  cli.add_option("--host", opts.host, "The Host header")->capture_default_str();
  cli.add_option("--json", json_file, "Write the card as JSON to FILE ('-': stdout, instead of the table)")
      ->type_name("FILE");
  cli.add_flag("--all-cases", all_cases,
               "List every case of a battery, not only those that failed, were skipped or were lenient");
  cli.add_option("--only", opts.only, "Run only these checks (by name; repeatable)")->type_name("NAME");
  cli.add_option("--wait-limit", wait_s, "Seconds: the bound of every single wait")
      ->check(CLI::Range(0.1, 600.0))
      ->capture_default_str();
  cli.add_option("--idle-limit", idle_s, "Seconds the idle check waits for the server to close an idle connection")
      ->check(CLI::Range(0.1, 600.0))
      ->capture_default_str();
  cli.add_option("--slow-limit", slow_s, "Seconds the slow-reader and slowloris checks wait for the server to cut")
      ->check(CLI::Range(0.1, 600.0))
      ->capture_default_str();
  app::add_common_flags(cli, log_level);
  if (const int rc = app::parse(cli, argc, argv); rc >= 0) return rc;
  try {
    (void)closewise::parse_endpoint(opts.target);
  } catch (const std::invalid_argument& e) {
    return app::fail(name, std::string("--target: ").append(e.what()), app::exit_usage);
  }
  for (const auto& o : opts.only) {
    bool known = false;
    for (const auto& c : check::all_checks()) known = known || c.name == o;
    if (!known) return app::fail(name, "--only: unknown check " + o + " (see --help)", app::exit_usage);
  }
  opts.wait_limit = app::seconds(wait_s);
  opts.idle_limit = app::seconds(idle_s);
  opts.slow_limit = app::seconds(slow_s);
  app::setup_logging(log_level);

  const std::vector<check::row> card = check::run_card(opts);
  std::size_t failed = 0, skipped = 0;
  for (const auto& r : card) {
    failed += r.result == check::verdict::fail ? 1 : 0;
    skipped += r.result == check::verdict::skip ? 1 : 0;
  }
  if (!json_file.empty()) {
    const auto j = check::to_json(card, opts);
    if (json_file == "-") {
      std::cout << j.dump(2) << '\n';
    } else {
      std::ofstream f(json_file);
      f << j.dump(2) << '\n';
      if (!f) return app::fail(name, "cannot write " + json_file);
    }
  }
  if (json_file != "-") {
    std::cout << name << ' ' << app::version() << " against " << opts.target << (opts.tls ? " (TLS)" : "") << "\n\n";
    print_card(std::cout, card, all_cases);
    std::cout << card.size() - failed - skipped << " passed, " << failed << " failed, " << skipped << " skipped\n";
  }
  return failed == 0 ? app::exit_ok : app::exit_failure;
}
