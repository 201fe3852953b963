#pragma once
// Ask the kernel (netlink SOCK_DIAG_BY_FAMILY, what `ss` uses) about TCP
// sockets, including TIME_WAIT mini-sockets that no descriptor can reach.
//
// Thread-safety: reentrant; each call opens its own netlink socket.

#include <cstdint>
#include <vector>

#include "closewise/error.hpp"
#include "closewise/export.hpp"
#include "closewise/probe.hpp"

namespace closewise {

/// One TCP socket as the kernel lists it.
struct diag_socket {
  tcp_state state = tcp_state::unknown;
  std::uint16_t local_port = 0;
  std::uint16_t remote_port = 0;
  bool ipv6 = false;
  /// inet_diag_msg's idiag_rqueue: for a listener, the length of its accept
  /// queue; otherwise the bytes in its receive queue.
  std::uint32_t rqueue = 0;
};

/// The set of TCP states a query asks about: bit `s` for tcp_state `s`.
using tcp_state_set = std::uint32_t;
inline constexpr tcp_state_set all_tcp_states = ~tcp_state_set{0};
constexpr tcp_state_set tcp_states(tcp_state s) noexcept { return tcp_state_set{1} << static_cast<unsigned>(s); }

/// Lists the IPv4 and IPv6 TCP sockets whose local or remote port is `port`
/// (0: all). On failure returns what it has and sets `ec`.
CLOSEWISE_API std::vector<diag_socket> list_tcp_sockets(std::uint16_t port, error_code& ec);

/// The same for one address family (AF_INET or AF_INET6), and only the
/// sockets whose state is in `states` (the kernel filters them: cheaper than
/// listing every socket). On failure returns what it has and sets `ec`.
CLOSEWISE_API std::vector<diag_socket> list_tcp_sockets(std::uint16_t port, int family, tcp_state_set states,
                                                        error_code& ec);

/// How many sockets of a port are in one state, by side.
struct state_count {
  std::size_t local_side = 0;   ///< local port == port (the server's side of its connections)
  std::size_t remote_side = 0;  ///< remote port == port (the clients' side)
};
/// Counts the sockets in `state` among `list_tcp_sockets(port)`; sockets
/// whose local port is `port` count as the listener's side.
CLOSEWISE_API state_count count_tcp_state(std::uint16_t port, tcp_state state, error_code& ec);

}  // namespace closewise
