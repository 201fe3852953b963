// closewise-demo: runs the nine teardown scenarios against closewise-reqresp
// started in-process (or --target HOST:PORT) and prints one table: who closes
// and how, the response bytes expected and received, what the client saw,
// what the server saw, who holds TIME_WAIT (measured with sock_diag), and
// whether data was lost. --tls runs the TLS scenarios instead, against an
// in-process server with a throwaway certificate.
//
// Exit status: 0 when every observation matches its expectation, 1 when one
// does not (each mismatch is printed), 2 on a usage error.

#include <algorithm>
#include <chrono>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/app.hpp"
#include "common/table.hpp"
#include "demo/scenarios.hpp"

namespace {

namespace demo = closewise::demo;
constexpr const char* name = "closewise-demo";

void print_table(std::ostream& out, const std::vector<demo::scenario_result>& rows) {
  const std::vector<closewise::app::table_column> cols{{"#", 1},
                                                       {"scenario", 22},
                                                       {"who closes, how", 24},
                                                       {"response bytes expected / received", 17},
                                                       {"client saw", 22},
                                                       {"server saw (close_cause)", 26},
                                                       {"TIME_WAIT (measured)", 10},
                                                       {"verdict", 9},
                                                       {"as expected", 8}};
  std::vector<std::vector<std::string>> texts;
  for (const auto& r : rows) {
    if (r.skipped) {
      texts.push_back(
          {std::to_string(r.number), r.title, r.closer, "", "skipped: " + r.skip_reason, "", "", "skipped", "-"});
    } else {
      texts.push_back({std::to_string(r.number), r.title, r.closer,
                       demo::human_bytes(r.expected_bytes) + " / " + demo::human_bytes(r.received_bytes), r.client_saw,
                       r.server_saw, r.time_wait_detail, r.verdict(), r.matches ? "yes" : "NO"});
    }
  }
  closewise::app::print_table(out, cols, texts);
}

nlohmann::ordered_json to_json(const std::vector<demo::scenario_result>& rows, const demo::options& o) {
  nlohmann::ordered_json out;
  out["version"] = closewise::app::version();
  out["target"] = o.target ? nlohmann::ordered_json(*o.target) : nlohmann::ordered_json("in-process");
  if (o.tls) out["tls"] = true;
  out["size"] = o.size;
  out["scenarios"] = nlohmann::ordered_json::array();
  std::size_t matching = 0, skipped = 0;
  for (const auto& r : rows) {
    matching += r.matches && !r.skipped ? 1 : 0;
    skipped += r.skipped ? 1 : 0;
    nlohmann::ordered_json j{{"number", r.number}, {"scenario", r.title}, {"closer", r.closer}};
    if (r.skipped) {
      j["skipped"] = r.skip_reason;
      out["scenarios"].push_back(j);
      continue;
    }
    j["expected_bytes"] = r.expected_bytes;
    j["received_bytes"] = r.received_bytes;
    j["status"] = r.status;
    j["intact"] = r.intact;
    j["client_end"] = std::string(demo::to_string(r.client_end));
    j["client_saw"] = r.client_saw;
    if (r.server_report) {
      const auto& s = *r.server_report;
      j["server"] = {{"close_cause", std::string(closewise::to_string(s.cause))},
                     {"policy", std::string(closewise::to_string(s.policy))},
                     {"bytes_out", s.bytes_out},
                     {"bytes_discarded", s.bytes_discarded},
                     {"rst_sent", s.rst_sent},
                     {"rst_received", s.rst_received},
                     {"kernel_reset", s.kernel_reset()},
                     {"unread_at_close", s.unread_at_close},
                     {"unacked_at_close", s.unacked_at_close},
                     {"error", s.error}};
      if (s.tls) {
        j["server"]["drain_seconds"] = std::chrono::duration<double>(s.drain_time).count();
        j["server"]["tls"] = {{"version", s.tls->version},
                              {"alpn", s.tls->alpn},
                              {"peer_end", std::string(closewise::to_string(s.tls->peer_end))},
                              {"close_notify_sent", s.tls->close_notify_sent},
                              {"close_notify_received", s.tls->close_notify_received},
                              {"app_bytes_discarded", s.tls->app_bytes_discarded}};
      }
    }
    if (r.after_close_notify) j["client_after_close_notify"] = std::string(demo::to_string(*r.after_close_notify));
    j["server_saw"] = r.server_saw;
    j["time_wait"] = std::string(demo::to_string(r.time_wait));
    j["time_wait_detail"] = r.time_wait_detail;
    j["verdict"] = r.verdict();
    j["expected"] = r.expected;
    j["matches"] = r.matches;
    j["mismatch"] = r.mismatch;
    out["scenarios"].push_back(j);
  }
  out["summary"] = {{"scenarios", rows.size()},
                    {"skipped", skipped},
                    {"matching", matching},
                    {"all_match", matching + skipped == rows.size()}};
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  namespace app = closewise::app;
  app::ignore_sigpipe();

  CLI::App cli{
      "Shows when closing a TCP connection loses data: nine HTTP teardown scenarios against closewise-reqresp "
      "(in-process) or --target, observed from both ends and from the kernel.",
      name};
  demo::options opts;
  bool json = false;
  int only = 0;
  std::string target;
  std::string log_level = "warn";
  cli.add_flag("--json", json, "Machine output: one JSON object (scenarios and summary)");
  cli.add_option("--target", target,
                 "Run against this server (numeric HOST:PORT, e.g. nginx) instead of an in-process closewise-reqresp; "
                 "scenarios 4, 6 and 7 need the server's teardown policy and are skipped")
      ->type_name("HOST:PORT");
  cli.add_option("--target-path", opts.target_path,
                 "With --target: path of the large response ({size} is replaced by --size)")
      ->capture_default_str();
  cli.add_option("--size", opts.size, "Size of the multi-megabyte response (at least 1 MiB; suffixes k, M, G)")
      ->transform(CLI::AsSizeValue(false))
      ->check(CLI::Range(std::uint64_t{1} << 20, std::uint64_t{1} << 34))
      ->capture_default_str();
  cli.add_option("--only", only, "Run only scenario N")->check(CLI::Range(1, demo::scenario_count))->type_name("N");
  cli.add_flag("--tls", opts.tls,
               "Run the TLS scenarios instead: the in-process server speaks TLS with a throwaway self-signed "
               "certificate (close_notify, truncation, the same RST rules one layer down)");
  app::add_common_flags(cli, log_level);
  if (const int rc = app::parse(cli, argc, argv); rc >= 0) return rc;
  if (!target.empty()) {
    try {
      (void)closewise::parse_endpoint(target);
    } catch (const std::invalid_argument& e) {
      std::cerr << name << ": error: --target: " << e.what() << " (see " << name << " --help)\n";
      return app::exit_usage;
    }
    opts.target = target;
  }
  if (opts.tls && opts.target) {
    std::cerr << name << ": error: --tls runs against the in-process server only (see " << name << " --help)\n";
    return app::exit_usage;
  }
  if (only > demo::scenarios_in(opts)) {
    std::cerr << name << ": error: --only: with --tls, N is at most " << demo::tls_scenario_count << '\n';
    return app::exit_usage;
  }
  app::setup_logging(log_level);

  std::vector<demo::scenario_result> rows;
  if (only > 0) {
    rows.push_back(demo::run_scenario(only, opts));
  } else {
    rows = demo::run_all(opts);
  }
  std::size_t matching = 0, skipped = 0;
  for (const auto& r : rows) {
    matching += r.matches && !r.skipped ? 1 : 0;
    skipped += r.skipped ? 1 : 0;
  }

  std::ostream& notes = json ? std::cerr : std::cout;
  if (json) {
    std::cout << to_json(rows, opts).dump(2) << '\n';
  } else {
    if (opts.tls) {
      std::cout << "closewise-demo " << app::version()
                << " over TLS against closewise-reqresp in-process (a fresh server per scenario, a throwaway "
                   "self-signed certificate), response "
                << demo::human_bytes(opts.size) << " (" << demo::human_bytes(demo::unbufferable_size(opts.size))
                << " in scenarios 4 to 6: more than the kernel's socket buffers hold)\n\n";
    } else {
      std::cout << "closewise-demo " << app::version() << " against "
                << (opts.target ? *opts.target
                                : std::string("closewise-reqresp in-process (a fresh server per scenario)"))
                << ", response " << demo::human_bytes(opts.size) << " ("
                << demo::human_bytes(demo::unbufferable_size(opts.size))
                << " in scenarios 3 to 6: more than the kernel's socket buffers hold)\n\n";
    }
    print_table(std::cout, rows);
    std::cout << matching << " of " << rows.size() - skipped << " scenarios as expected";
    if (skipped > 0) std::cout << " (" << skipped << " skipped)";
    std::cout << '\n';
  }
  for (const auto& r : rows) {
    if (!r.matches) notes << "scenario " << r.number << " (" << r.title << ") does not match: " << r.mismatch << '\n';
  }
  return matching + skipped == rows.size() ? app::exit_ok : app::exit_failure;
}
