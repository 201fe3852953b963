#include "closewise/sock_diag.hpp"

#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <initializer_list>

namespace closewise {

namespace {

struct fd_guard {
  int fd;
  ~fd_guard() {
    if (fd >= 0) ::close(fd);
  }
};

// One dump request for one address family and the sockets in `states`;
// appends those on `port` to `out`.
bool dump_family(int nl, std::uint8_t family, tcp_state_set states, std::uint16_t port, std::vector<diag_socket>& out,
                 error_code& ec) {
  struct {
    nlmsghdr nlh;
    inet_diag_req_v2 req;
  } msg{};
  msg.nlh.nlmsg_len = sizeof(msg);
  msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  msg.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  msg.nlh.nlmsg_seq = family;
  msg.req.sdiag_family = family;
  msg.req.sdiag_protocol = IPPROTO_TCP;
  msg.req.idiag_states = states;  // all_tcp_states: TIME_WAIT included

  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(nl, &msg, sizeof(msg), 0, reinterpret_cast<sockaddr*>(&kernel), sizeof(kernel)) < 0) {
    ec = error_code(errno, boost::system::system_category());
    return false;
  }
  alignas(nlmsghdr) std::array<char, 32768> buf;
  for (;;) {
    const ssize_t n = ::recv(nl, buf.data(), buf.size(), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      ec = error_code(errno, boost::system::system_category());
      return false;
    }
    int left = static_cast<int>(n);
    for (auto* h = reinterpret_cast<nlmsghdr*>(buf.data()); NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
      if (h->nlmsg_type == NLMSG_DONE) return true;
      if (h->nlmsg_type == NLMSG_ERROR) {
        const auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(h));
        ec = error_code(-err->error, boost::system::system_category());
        return false;
      }
      const auto* m = static_cast<const inet_diag_msg*>(NLMSG_DATA(h));
      diag_socket s;
      s.state = m->idiag_state <= 11 ? static_cast<tcp_state>(m->idiag_state) : tcp_state::unknown;
      s.local_port = ntohs(m->id.idiag_sport);
      s.remote_port = ntohs(m->id.idiag_dport);
      s.ipv6 = m->idiag_family == AF_INET6;
      s.rqueue = m->idiag_rqueue;
      if (port == 0 || s.local_port == port || s.remote_port == port) out.push_back(s);
    }
  }
}

// Dumps `families` in turn on one netlink socket, stopping at the first failure.
std::vector<diag_socket> list(std::initializer_list<std::uint8_t> families, tcp_state_set states, std::uint16_t port,
                              error_code& ec) {
  ec.clear();
  std::vector<diag_socket> out;
  fd_guard nl{::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG)};
  if (nl.fd < 0) {
    ec = error_code(errno, boost::system::system_category());
    return out;
  }
  for (const std::uint8_t family : families) {
    if (!dump_family(nl.fd, family, states, port, out, ec)) break;
  }
  return out;
}

}  // namespace

std::vector<diag_socket> list_tcp_sockets(std::uint16_t port, error_code& ec) {
  return list({AF_INET, AF_INET6}, all_tcp_states, port, ec);
}

std::vector<diag_socket> list_tcp_sockets(std::uint16_t port, int family, tcp_state_set states, error_code& ec) {
  return list({static_cast<std::uint8_t>(family)}, states, port, ec);
}

state_count count_tcp_state(std::uint16_t port, tcp_state state, error_code& ec) {
  state_count c;
  for (const auto& s : list_tcp_sockets(port, ec)) {
    if (s.state != state) continue;
    if (s.local_port == port) ++c.local_side;
    if (s.remote_port == port) ++c.remote_side;
  }
  return c;
}

}  // namespace closewise
