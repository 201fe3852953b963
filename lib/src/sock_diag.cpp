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

namespace closewise {

namespace {

struct fd_guard {
  int fd;
  ~fd_guard() {
    if (fd >= 0) ::close(fd);
  }
};

// One dump request for one address family; appends matching sockets to `out`.
bool dump_family(int nl, std::uint8_t family, std::uint16_t port, std::vector<diag_socket>& out, std::error_code& ec) {
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
  msg.req.idiag_states = ~0u;  // every state, TIME_WAIT included

  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(nl, &msg, sizeof(msg), 0, reinterpret_cast<sockaddr*>(&kernel), sizeof(kernel)) < 0) {
    ec = std::error_code(errno, std::system_category());
    return false;
  }
  alignas(nlmsghdr) std::array<char, 32768> buf;
  for (;;) {
    const ssize_t n = ::recv(nl, buf.data(), buf.size(), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      ec = std::error_code(errno, std::system_category());
      return false;
    }
    int left = static_cast<int>(n);
    for (auto* h = reinterpret_cast<nlmsghdr*>(buf.data()); NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
      if (h->nlmsg_type == NLMSG_DONE) return true;
      if (h->nlmsg_type == NLMSG_ERROR) {
        const auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(h));
        ec = std::error_code(-err->error, std::system_category());
        return false;
      }
      const auto* m = static_cast<const inet_diag_msg*>(NLMSG_DATA(h));
      diag_socket s;
      s.state = m->idiag_state <= 11 ? static_cast<tcp_state>(m->idiag_state) : tcp_state::unknown;
      s.local_port = ntohs(m->id.idiag_sport);
      s.remote_port = ntohs(m->id.idiag_dport);
      s.ipv6 = m->idiag_family == AF_INET6;
      if (port == 0 || s.local_port == port || s.remote_port == port) out.push_back(s);
    }
  }
}

}  // namespace

std::vector<diag_socket> list_tcp_sockets(std::uint16_t port, std::error_code& ec) {
  ec.clear();
  std::vector<diag_socket> out;
  fd_guard nl{::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG)};
  if (nl.fd < 0) {
    ec = std::error_code(errno, std::system_category());
    return out;
  }
  if (dump_family(nl.fd, AF_INET, port, out, ec)) dump_family(nl.fd, AF_INET6, port, out, ec);
  return out;
}

state_count count_tcp_state(std::uint16_t port, tcp_state state, std::error_code& ec) {
  state_count c;
  for (const auto& s : list_tcp_sockets(port, ec)) {
    if (s.state != state) continue;
    if (s.local_port == port) ++c.local_side;
    if (s.remote_port == port) ++c.remote_side;
  }
  return c;
}

}  // namespace closewise
