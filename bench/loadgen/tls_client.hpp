#pragma once
// The client side of closewise-bench's TLS runs, shared by the cycle modes
// (tls_engine.cpp) and the memory modes (hold.cpp).

#include <boost/asio/ssl/context.hpp>

#include "engine.hpp"

namespace closewise::bench {

/// The client context of every --tls run: OpenSSL's default suites and
/// groups, the versions asked, no certificate verification, and no session
/// cache and no tickets, so that every handshake is a full one.
boost::asio::ssl::context make_bench_client_context(tls_version_choice versions);

}  // namespace closewise::bench
