// closewise-pool-sweep: the idle race sweep against any HTTP/1.1 server.
//
// Users of one closewise::client_pool send requests to --target, each
// waiting a gap drawn uniformly from [--gap-min, --gap-max] seconds between
// its requests (set the window around the server's idle timeout), until the
// pool reused connections --reuses times. Prints one line: requests, reuses,
// retries, FINs and RSTs seen while idle, drops at reuse, failures that
// reached the callers and how many of those were stale_reuse_not_retried.
//
// --one-way-delay MS runs the sweep through a delay_relay (delay_relay.hpp)
// that delays each direction by MS milliseconds, FIN and RST included: the
// path with latency where a request and the server's FIN cross on the wire.
// The window's lower edge then moves down by 2 x MS unless --gap-min is
// given (a request crosses the FIN when the connection idled between X - 2D
// and X, X the server's idle timeout; see docs/client.md). It prints the
// relay's counts on a line of its own.
//
// Exit status: 0 when the sweep finished and no failure other than
// stale_reuse_not_retried reached a caller, 1 otherwise, 2 on a usage error.

#include <exception>
#include <iostream>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "common/app.hpp"
#include "poolsweep/delay_relay.hpp"
#include "poolsweep/sweep.hpp"

int main(int argc, char** argv) {
  namespace app = closewise::app;
  namespace ps = closewise::poolsweep;
  app::ignore_sigpipe();
  CLI::App cli{"The idle race sweep: requests through closewise::client_pool with gaps around a server's idle timeout.",
               "closewise-pool-sweep"};
  ps::sweep_config c;
  std::string method = "get";
  double gap_min_s = 0.18;
  double gap_max_s = 0.22;
  double request_timeout_s = 20.0;
  double pool_idle_s = 30.0;
  double limit_s = 600.0;
  double one_way_delay_ms = 0.0;
  std::string log_level = "warn";
  cli.add_option("--target", c.target, "HOST:PORT (numeric) or unix:PATH")->required();
  cli.add_option("--method", method, "get or post (a POST's body is a unique id)")
      ->check(CLI::IsMember({"get", "post"}))
      ->capture_default_str();
  cli.add_option("--path", c.path, "Request target")->capture_default_str();
  cli.add_flag("--pool-per-user", c.pool_per_user,
               "One pool of one connection per user (each connection idles for the user's whole gap) instead of one "
               "shared pool");
  cli.add_option("--users", c.users, "Concurrent pool users")->check(CLI::Range(1u, 100000u))->capture_default_str();
  cli.add_option("--gap-min", gap_min_s, "Shortest gap between a user's requests, seconds")->capture_default_str();
  cli.add_option("--gap-max", gap_max_s, "Longest gap between a user's requests, seconds")->capture_default_str();
  cli.add_option("--reuses", c.reuses, "Run until the pool reused connections this often")->capture_default_str();
  cli.add_option("--request-timeout", request_timeout_s, "Each request's whole deadline, seconds")
      ->capture_default_str();
  cli.add_option("--pool-idle-timeout", pool_idle_s,
                 "The pool closes connections idle this long (the server's Keep-Alive hint may lower it), seconds")
      ->capture_default_str();
  cli.add_option("--one-way-delay", one_way_delay_ms,
                 "Run through a relay on 127.0.0.1 that delays each direction (bytes, FIN, RST) by this many "
                 "milliseconds; TCP targets only. Lowers the default --gap-min by twice the delay")
      ->check(CLI::Range(0.0, 10000.0))
      ->capture_default_str();
  cli.add_option("--limit", limit_s, "Give up after this long, seconds")->capture_default_str();
  app::add_common_flags(cli, log_level);
  if (const int rc = app::parse(cli, argc, argv); rc >= 0) return rc;
  app::setup_logging(log_level);
  c.method = method == "post" ? closewise::http::verb::post : closewise::http::verb::get;
  const auto delay = std::chrono::milliseconds(static_cast<long>(one_way_delay_ms + 0.5));
  if (delay.count() > 0 && cli.count("--gap-min") == 0) gap_min_s -= 2.0 * static_cast<double>(delay.count()) / 1000.0;
  c.gap_min = app::seconds(gap_min_s);
  c.gap_max = app::seconds(gap_max_s);
  c.request_timeout = app::seconds(request_timeout_s);
  c.pool.idle_timeout = app::seconds(pool_idle_s);
  c.limit = app::seconds(limit_s);
  std::unique_ptr<ps::delay_relay> relay;
  if (delay.count() > 0) {
    if (c.target.rfind("unix:", 0) == 0) {
      std::cerr << "--one-way-delay needs a TCP target (HOST:PORT)\n";
      return app::exit_usage;
    }
    ps::delay_relay_options ro;
    ro.delay = delay;
    try {
      relay = std::make_unique<ps::delay_relay>(c.target, ro);
    } catch (const std::exception& e) {
      std::cerr << e.what() << "\n";
      return app::exit_usage;
    }
    c.target = relay->endpoint();
  }
  const ps::sweep_result r = ps::run_pool_sweep(c);
  std::cout << "pool: " << r.line() << "\n";
  if (relay) std::cout << "relay: one_way_delay_ms=" << delay.count() << " " << relay->stats().line() << "\n";
  if (!r.errors.empty()) std::cout << "errors: " << r.describe_errors() << "\n";
  if (!r.finished) std::cout << "not finished within --limit\n";
  return r.finished && r.other_failures == 0 ? app::exit_ok : app::exit_failure;
}
