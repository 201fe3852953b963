#pragma once
// The server side of the TLS matrix and handshake tests: a closewise TLS
// stream accepted on 127.0.0.1 port 0, driven on the test's thread by
// run_until, against a blocking tls_peer running its script on a thread of
// its own (every one of its calls bounded, so joining it is bounded too).

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <thread>

#include <boost/asio/ssl.hpp>

#include "../support/loopback.hpp"
#include "closewise/tls.hpp"
#include "tls_peer.hpp"

namespace closewise::test {

using tls_stream = basic_tls_stream<tcp::socket>;

/// Repetitions per cell: `fallback`, or fewer if CLOSEWISE_TEST_REPS says
/// fewer (never more: the sanitizer presets set 100, meant to lower the
/// 1,000 of the stream tests).
inline int tls_reps(int fallback) {
  if (const char* env = std::getenv("CLOSEWISE_TEST_REPS")) return std::clamp(std::atoi(env), 1, fallback);
  return fallback;
}

/// One throwaway certificate for the whole process.
inline const certificate_pem& test_pem() {
  static const certificate_pem p = make_self_signed_certificate("localhost");
  return p;
}

inline tls_versions only(peer_version v) {
  return v == peer_version::tls12 ? tls_versions::tls12_only : tls_versions::tls13_only;
}
inline const char* name(peer_version v) { return v == peer_version::tls12 ? "tls12" : "tls13"; }

/// A listening TLS server for one protocol version.
class tls_server_side {
 public:
  tls_server_side(asio::io_context& ioc, tls_versions v, tls_options topts = {})
      : ioc_(ioc),
        ctx_(make_server_context(test_pem(), {v, true})),
        acceptor_(ioc, tcp::endpoint(asio::ip::address_v4::loopback(), 0)),
        topts_(topts) {}

  std::uint16_t port() const { return acceptor_.local_endpoint().port(); }
  asio::ssl::context& context() { return ctx_; }
  tcp::acceptor& acceptor() { return acceptor_; }

  /// Accepts the connection a peer has made (its connect returned, so the
  /// kernel holds it complete: the accept does not wait).
  tls_stream accept(stream_options o = {}) {
    tcp::socket s(ioc_);
    acceptor_.accept(s);
    return tls_stream(std::move(s), ctx_, o, topts_);
  }

 private:
  asio::io_context& ioc_;
  asio::ssl::context ctx_;
  tcp::acceptor acceptor_;
  tls_options topts_;
};

/// A peer's script on a thread of its own, joined on destruction.
class peer_thread {
 public:
  explicit peer_thread(std::function<void()> script) : t_(std::move(script)) {}
  void join() {
    if (t_.joinable()) t_.join();
  }
  ~peer_thread() { join(); }

 private:
  std::thread t_;
};

/// The server's handshake, run until it completes (nullopt: it did not within `limit`).
inline std::optional<error_code> server_handshake(asio::io_context& ioc, tls_stream& s,
                                                  std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  std::optional<error_code> done;
  s.async_handshake(asio::ssl::stream_base::server, [&](error_code ec) { done = ec; });
  run_until(
      ioc, [&] { return done.has_value(); }, limit);
  return done;
}

/// async_close run until it completes (nullopt: it did not within `limit`).
inline std::optional<close_report> close_and_wait(asio::io_context& ioc, tls_stream& s, close_policy p,
                                                  std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  std::optional<close_report> r;
  s.async_close(p, [&](close_report rep) { r = std::move(rep); });
  run_until(
      ioc, [&] { return r.has_value(); }, limit);
  return r;
}

}  // namespace closewise::test
