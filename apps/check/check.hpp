#pragma once
// closewise-check: points scripted, misbehaving HTTP/1.1 clients at a running
// server and reports what that server did when its connections ended: one
// row per check, what a correct server does, what this one did (bytes
// received of those expected, how the stream ended, timings) and a verdict.
//
// The checks observe; they assume nothing about the server but HTTP/1.1. Every
// wait is bounded by `options::wait_limit` or a check's own, smaller bound.
// The clients are the demo's raw sockets (demo/client.hpp): each check decides
// byte by byte when to send, read, stop reading, half-close, close or reset.
//
// Thread-safety: checks run one at a time; each owns its sockets.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace closewise::check {

/// How closewise-check runs.
struct options {
  std::string target;  ///< "HOST:PORT", numeric
  bool tls = false;    ///< speak TLS to the target (the TLS checks run only then)
  /// Path of a response of at least `large_size` bytes; "{size}" is replaced
  /// by the size. The default is closewise-reqresp's convention.
  std::string large_path = "/bytes/{size}";
  std::uint64_t large_size = std::uint64_t{4} << 20;
  std::string host = "localhost";  ///< the Host header
  std::vector<std::string> only;   ///< run only these checks (by name); empty: all
  /// Bound of every single wait (a recv, a TCP state). A check as a whole
  /// has its own bound, documented with it.
  std::chrono::milliseconds wait_limit{10000};
  /// How long the idle keep-alive check waits for the server to close an
  /// idle connection before it calls the server's idle timeout absent. Past
  /// the 60 to 75 s that servers ship with (nginx's keepalive_timeout 75s,
  /// closewise-reqresp's 75 s): a shorter limit would fail them for a timeout
  /// they do have. A server with short timeouts ends the card sooner.
  std::chrono::milliseconds idle_limit{90000};
  /// How long the slow-reader and slowloris checks wait for the server to
  /// end a slow client before they call it unbounded; past the common 60 s
  /// header and send timeouts, for the same reason.
  std::chrono::milliseconds slow_limit{70000};
};

enum class verdict : std::uint8_t {
  pass,  ///< the server did what a correct server does
  fail,  ///< it did not: data lost, a desync, a socket left behind, no bound
  skip,  ///< could not be checked here (the reason says why)
};
std::string_view to_string(verdict) noexcept;

/// One row of the card (or one case of a battery, in `cases`).
struct row {
  std::string name;      ///< stable, short, kebab-case: "pipelined-close"
  std::string title;     ///< a few words for the table
  std::string expected;  ///< what a correct server does
  std::string observed;  ///< what this server did, in words with the figures
  verdict result = verdict::skip;
  std::string reason;  ///< why it failed or was skipped; a leniency note on a pass
  /// The figures behind `observed`, machine-readable (bytes, "end": "eof" /
  /// "reset" / "timeout", milliseconds, status codes, ...).
  nlohmann::ordered_json facts = nlohmann::ordered_json::object();
  std::vector<row> cases;  ///< sub-results (the framing battery's cases)
};

/// A check: its name, its one-line description for --help and --only, and
/// the function that runs it.
struct check_info {
  std::string_view name;
  std::string_view description;
  row (*run)(const options&);
};
/// Every check, in the card's order.
const std::vector<check_info>& all_checks();

/// Runs the checks `opts.only` names (all when empty), in the card's order.
/// Throws std::invalid_argument for an unknown name in `only`.
std::vector<row> run_card(const options& opts);

/// The whole card as JSON (what --json writes).
nlohmann::ordered_json to_json(const std::vector<row>& card, const options& opts);

/// Whether `target` is on this machine (a loopback address or one of the
/// machine's own): the sock_diag checks need that.
bool is_local_target(const std::string& target);

}  // namespace closewise::check
