#include "closewise/probe.hpp"

#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <array>

namespace closewise {

std::string_view to_string(tcp_state s) noexcept {
  static constexpr std::array<std::string_view, 12> names{"UNKNOWN",    "ESTABLISHED", "SYN_SENT",  "SYN_RECV",
                                                          "FIN_WAIT1",  "FIN_WAIT2",   "TIME_WAIT", "CLOSE",
                                                          "CLOSE_WAIT", "LAST_ACK",    "LISTEN",    "CLOSING"};
  const auto i = static_cast<std::size_t>(s);
  return i < names.size() ? names[i] : std::string_view{"UNKNOWN"};
}

namespace {

std::optional<std::uint64_t> ioctl_count(int fd, unsigned long request) noexcept {
  int value = 0;
  if (::ioctl(fd, request, &value) != 0 || value < 0) return std::nullopt;
  return static_cast<std::uint64_t>(value);
}

}  // namespace

socket_probe probe(int fd, probe_fields fields) noexcept {
  socket_probe p;
  if (fd < 0) return p;
  if (fields.has(probe_field::state)) {
    tcp_info info{};
    socklen_t len = sizeof(info);
    if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) == 0 && len > 0 && info.tcpi_state <= 11) {
      p.state = static_cast<tcp_state>(info.tcpi_state);
    }
  }
  if (fields.has(probe_field::unread)) p.unread = ioctl_count(fd, SIOCINQ);
  if (fields.has(probe_field::unacked)) p.unacked = ioctl_count(fd, SIOCOUTQ);
  // SIOCOUTQNSD exists for TCP only; Unix sockets answer EOPNOTSUPP.
  if (fields.has(probe_field::unsent)) p.unsent = ioctl_count(fd, SIOCOUTQNSD);
  return p;
}

}  // namespace closewise
