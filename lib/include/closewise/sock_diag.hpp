#pragma once
// Ask the kernel (netlink SOCK_DIAG_BY_FAMILY, what `ss` uses) about TCP
// sockets, including TIME_WAIT mini-sockets that no descriptor can reach.
//
// Thread-safety: reentrant; each call opens its own netlink socket.

#include <cstdint>
#include <system_error>
#include <vector>

#include "closewise/probe.hpp"

namespace closewise {

/// One TCP socket as the kernel lists it.
struct diag_socket {
  tcp_state state = tcp_state::unknown;
  std::uint16_t local_port = 0;
  std::uint16_t remote_port = 0;
  bool ipv6 = false;
};

/// Lists the IPv4 and IPv6 TCP sockets whose local or remote port is `port`
/// (0: all). On failure returns what it has and sets `ec`.
std::vector<diag_socket> list_tcp_sockets(std::uint16_t port, std::error_code& ec);

/// How many sockets of a port are in one state, by side.
struct state_count {
  std::size_t local_side = 0;   ///< local port == port (the server's side of its connections)
  std::size_t remote_side = 0;  ///< remote port == port (the clients' side)
};
/// Counts the sockets in `state` among `list_tcp_sockets(port)`; sockets
/// whose local port is `port` count as the listener's side.
state_count count_tcp_state(std::uint16_t port, tcp_state state, std::error_code& ec);

}  // namespace closewise
