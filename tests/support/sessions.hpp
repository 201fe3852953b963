#pragma once
// Sessions the server tests share.

#include <boost/asio/awaitable.hpp>

#include "closewise/server.hpp"

namespace closewise::test {

/// Echoes every byte until the peer's FIN (or an error), then returns: the
/// server closes with its policy. The write side stays open after the FIN,
/// so everything the peer sent comes back before our FIN.
boost::asio::awaitable<void> echo_session(connection& c);

}  // namespace closewise::test
