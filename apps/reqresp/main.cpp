// closewise-reqresp: an HTTP/1.1 server (keep-alive, pipelining) over
// closewise streams, whose server-initiated closes follow --teardown.
//
// Routes: GET / , GET /bytes/N, POST /echo, GET /stats (JSON), GET /metrics
// (Prometheus), GET /ready (200, or 503 once shutting down). SIGTERM/SIGINT:
// /ready answers 503 at once; after --drain-delay (a second signal skips it)
// the drain: stop accepting, answer requests in progress with Connection:
// close, close idle keep-alive connections between requests, exit. Listening
// sockets passed by systemd (socket activation) are used when present.
//
// Exit status: 0 after a drain, 1 on a setup failure, 2 on a usage error.

#include <cstdint>
#include <iostream>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "common/app.hpp"
#include "reqresp/http_session.hpp"

namespace {

constexpr const char* name = "closewise-reqresp";

}  // namespace

int main(int argc, char** argv) {
  namespace app = closewise::app;
  namespace rr = closewise::reqresp;
  app::ignore_sigpipe();

  CLI::App cli{
      "HTTP/1.1 request/response server over closewise: keep-alive, pipelining, limits with answers, "
      "and a --teardown policy for every close it initiates.",
      name};
  app::server_flags flags;
  flags.add_to(cli);
  std::string log_level = "info";
  app::add_common_flags(cli, log_level);
  rr::http_options http;
  double request_timeout_s = 10.0;
  double drain_delay_s = 0.0;
  double first_input_timeout_s = 0.0;
  cli.add_option("--max-bytes", http.max_response_bytes, "Largest N that GET /bytes/N serves")->capture_default_str();
  cli.add_option("--max-header-bytes", http.max_header_bytes,
                 "Request line and header fields at most; over it: 431 (414 or 501 for the request line)")
      ->check(CLI::Range(std::size_t{256}, std::size_t{1} << 24))
      ->capture_default_str();
  cli.add_option("--max-body-bytes", http.max_body_bytes, "Request body at most; over it: 413")->capture_default_str();
  cli.add_option("--request-timeout", request_timeout_s,
                 "Seconds from a request's first byte to its last, not moved by a trickle of bytes; over it: 408 "
                 "(0: none)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--first-input-timeout", first_input_timeout_s,
                 "Seconds a new connection may stay silent before it is closed, when that should differ from "
                 "--idle-timeout between requests (nginx's client_header_timeout beside keepalive_timeout; 0: "
                 "--idle-timeout)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--drain-delay", drain_delay_s,
                 "On SIGTERM/SIGINT: seconds during which GET /ready answers 503 while every other request is "
                 "served normally (keep-alive included), so that the load balancer stops sending new requests "
                 "before the drain starts; a second SIGTERM/SIGINT during the delay starts the drain at once")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  if (const int rc = app::parse(cli, argc, argv); rc >= 0) return rc;

  closewise::server_options options;
  try {
    options = flags.to_options();
  } catch (const CLI::ValidationError& e) {
    std::cerr << name << ": error: " << e.what() << " (see " << name << " --help)\n";
    return app::exit_usage;
  } catch (const std::exception& e) {
    return app::fail(name, e.what());  // a certificate or key that cannot be loaded
  }
  http.request_timeout = app::seconds(request_timeout_s);
  options.drain_delay = app::seconds(drain_delay_s);
  options.first_input_timeout = app::seconds(first_input_timeout_s);
  rr::configure_server(options, http);
  app::setup_logging(log_level);

  auto service = std::make_shared<rr::http_service>(http);
  try {
    closewise::server srv(options, rr::make_session_handler(service));
    service->set_stats(&srv.stats());
    srv.start();
    app::print_listening(srv);
    srv.run();
    if (flags.print_stats) {
      const auto snap = srv.stats().snapshot();
      std::cout << (flags.stats_format == "prometheus" ? closewise::to_prometheus(snap)
                                                       : closewise::to_json(snap) + "\n");
      std::cout.flush();
    }
  } catch (const std::exception& e) {
    return app::fail(name, e.what());
  }
  return app::exit_ok;
}
