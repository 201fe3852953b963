// closewise-lab: runs the eight teardown experiments of docs/design.md
// ('Kernel experiments') and says whether this kernel (and this library)
// still behave as the table says.
//
// Exit status: 0 when every row matches, 1 when one does not (each mismatch
// is printed), 2 on a usage error.

#include <csignal>
#include <cstddef>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "closewise/version.hpp"
#include "common/app.hpp"
#include "common/table.hpp"
#include "lab/experiments.hpp"

namespace {

namespace lab = closewise::lab;

std::string join(const std::vector<lab::observation>& list, lab::party by, bool with_party) {
  std::string out;
  for (const auto& o : list) {
    if (o.by != by) continue;
    out += out.empty() ? (with_party ? (by == lab::party::ours ? "we: " : "peer: ") : "") : "; ";
    out += o.label + ": " + o.value;
  }
  return out;
}

std::string observed_cell(const lab::row& r) {
  std::string ours = join(r.observed, lab::party::ours, true);
  const std::string peer = join(r.observed, lab::party::peer, true);
  if (!peer.empty()) ours += (ours.empty() ? "" : "\n") + peer;
  return ours;
}

std::string states_cell(const lab::row& r) {
  if (r.states.empty()) return "n/a (not TCP)";
  std::string out;
  for (const auto& o : r.states) out += (out.empty() ? "" : "; ") + o.label + ": " + o.value;
  return out;
}

void print_table(std::ostream& out, const std::vector<lab::row>& rows) {
  const std::vector<closewise::app::table_column> cols{
      {"#", 2},           {"experiment", 20}, {"what was done", 34}, {"observed (our side / peer side)", 46},
      {"TCP states", 32}, {"expected", 32},   {"match", 5}};
  std::vector<std::vector<std::string>> texts;
  for (const auto& r : rows) {
    texts.push_back({std::to_string(r.number), r.name, r.done, observed_cell(r), states_cell(r), r.expected,
                     r.matches ? "yes" : "NO"});
  }
  closewise::app::print_table(out, cols, texts);
}

nlohmann::ordered_json to_json(const std::vector<lab::observation>& list) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const auto& o : list) {
    out.push_back({{"by", std::string(lab::to_string(o.by))}, {"key", o.key}, {"label", o.label}, {"value", o.value}});
  }
  return out;
}

nlohmann::ordered_json to_json(const std::vector<lab::row>& rows, std::size_t matching, bool ipv6) {
  nlohmann::ordered_json out;
  out["version"] = closewise::version_string;
  out["address"] = ipv6 ? "::1" : "127.0.0.1";
  out["rows"] = nlohmann::ordered_json::array();
  for (const auto& r : rows) {
    out["rows"].push_back({{"number", r.number},
                           {"name", r.name},
                           {"done", r.done},
                           {"observed", to_json(r.observed)},
                           {"tcp_states", to_json(r.states)},
                           {"expected", r.expected},
                           {"matches", r.matches},
                           {"mismatch", r.mismatch}});
  }
  out["summary"] = {{"rows", rows.size()}, {"matching", matching}, {"all_match", matching == rows.size()}};
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  // Writes to a pipe whose reader is gone (row 2, or our own stdout piped into
  // `head`) must fail with EPIPE, not kill the lab.
  closewise::app::ignore_sigpipe();

  CLI::App app{"Reproduces the eight TCP teardown experiments of closewise's docs/design.md on loopback.",
               "closewise-lab"};
  bool json = false;
  bool ipv6 = false;
  int only = 0;
  std::string log_level = "warn";
  app.add_flag("--json", json, "Machine output: one JSON object per row, plus a summary");
  app.add_option("--only", only, "Run only experiment N")->check(CLI::Range(1, lab::row_count))->type_name("N");
  app.add_flag("--ipv6", ipv6, "Use ::1 instead of 127.0.0.1");
  closewise::app::add_common_flags(app, log_level);
  if (const int code = closewise::app::parse(app, argc, argv); code >= 0) return code;
  closewise::app::setup_logging(log_level);

  lab::options opts;
  opts.ipv6 = ipv6;
  const std::vector<lab::row> rows = only > 0 ? std::vector<lab::row>{lab::run_one(only, opts)} : lab::run_all(opts);
  std::size_t matching = 0;
  for (const auto& r : rows) matching += r.matches ? 1 : 0;

  std::ostream& notes = json ? std::cerr : std::cout;
  if (json) {
    std::cout << to_json(rows, matching, ipv6).dump(2) << '\n';
  } else {
    print_table(std::cout, rows);
    std::cout << matching << " of " << rows.size() << " rows match\n";
  }
  for (const auto& r : rows) {
    if (!r.matches) notes << "row " << r.number << " (" << r.name << ") does not match: " << r.mismatch << '\n';
  }
  return matching == rows.size() ? 0 : 1;
}
