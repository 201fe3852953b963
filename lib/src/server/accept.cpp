// Listeners and the accept loop: accept4 on the non-blocking listener, the
// connection limit, back-off on EMFILE and friends, and the hand-off of each
// accepted socket to a worker (a session, or a wait for its input).
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>
#include <system_error>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>

#include "server_state.hpp"

namespace closewise::internal {

peer_address to_peer_address(const asio::generic::stream_protocol::endpoint& e) {
  peer_address p;
  if (e.protocol().family() == AF_INET || e.protocol().family() == AF_INET6) {
    std::memcpy(p.tcp.data(), e.data(), std::min<std::size_t>(e.size(), sizeof(sockaddr_in6)));
    p.is_tcp = true;
  }
  return p;
}

namespace {

accept_error classify_accept(const error_code& ec) {
  switch (ec.value()) {
    case EMFILE:
      return accept_error::emfile;
    case ENFILE:
      return accept_error::enfile;
    case ENOBUFS:
    case ENOMEM:
      return accept_error::nobufs;
    case ECONNABORTED:
      return accept_error::aborted;
    // accept(2): "already-pending network errors" to be treated like EAGAIN.
    case EPROTO:
    case ENOPROTOOPT:
    case EHOSTDOWN:
    case ENONET:
    case EHOSTUNREACH:
    case EOPNOTSUPP:
    case ENETUNREACH:
    case ENETDOWN:
    case EPERM:
      return accept_error::protocol;
    default:
      return accept_error::other;
  }
}

// One accept4(2) on the non-blocking listener. The new socket is
// non-blocking and close-on-exec from the start.
int accept_raw(acceptor_type& a, asio::generic::stream_protocol::endpoint& from, error_code& ec) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  const int fd = ::accept4(static_cast<int>(a.native_handle()), reinterpret_cast<sockaddr*>(&addr), &len,
                           SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) {
    ec = error_code(errno, asio::error::get_system_category());
    return -1;
  }
  from.resize(std::min<std::size_t>(len, sizeof addr));
  std::memcpy(from.data(), &addr, from.size());
  ec = {};
  return fd;
}

// Hands an accepted descriptor to Asio, which registers it with the
// reactor. Asio treats an assigned descriptor as one that may be a dup (it
// removes it from the epoll set before closing it) and sets it non-blocking
// at its first operation: two syscalls per connection that only Asio's
// internals could spare, and a library cannot promise that its host never
// dups or forks a descriptor. Closes the descriptor if Asio cannot take it.
error_code adopt(socket& s, int fd, const asio::generic::stream_protocol::endpoint& from) {
  const int family = from.protocol().family();
  const int protocol = family == AF_UNIX ? 0 : static_cast<int>(IPPROTO_TCP);
  error_code ec;
  s.assign(asio::generic::stream_protocol(family, protocol), fd, ec);
  if (ec) ::close(fd);
  return ec;
}

// SO_REUSEPORT, as an option Asio's public SettableSocketOption requirements describe.
struct reuse_port_option {
  int value = 1;
  template <class Protocol>
  int level(const Protocol&) const noexcept {
    return SOL_SOCKET;
  }
  template <class Protocol>
  int name(const Protocol&) const noexcept {
    return SO_REUSEPORT;
  }
  template <class Protocol>
  const void* data(const Protocol&) const noexcept {
    return &value;
  }
  template <class Protocol>
  std::size_t size(const Protocol&) const noexcept {
    return sizeof value;
  }
};

// Waits while the connection limit holds with overflow_action::pause_accept.
// Returns whether it waited (the caller then looks at the world again).
asio::awaitable<bool> wait_below_limit(server_state& srv) {
  const auto& o = srv.opts;
  if (o.overflow != overflow_action::pause_accept || srv.counters.open() < o.max_connections) co_return false;
  srv.paused = true;
  if (srv.counters.open() < o.max_connections) {  // a close raced the check
    srv.paused = false;
    co_return true;
  }
  srv.counters.limit_paused();
  closewise::logger()->info("connection limit {} reached: accepting paused", o.max_connections);
  arm_forever(*srv.slot_free);
  co_await srv.slot_free->async_wait(use_tuple);
  co_return true;
}

enum class after_error : std::uint8_t { retry, back_off };

// An accept that failed: counted. Out of descriptors or memory, retrying at
// once would spin at full CPU, so the loop backs off, as nginx does
// (docs/design.md, 'Accept errors: EMFILE spinning and back-off'). Errors
// of one connection are skipped.
after_error on_accept_error(server_state& srv, const error_code& ec) {
  const accept_error kind = classify_accept(ec);
  srv.counters.accept_failed(kind);
  if (kind == accept_error::aborted || kind == accept_error::protocol) return after_error::retry;
  closewise::logger()->info("accept failed ({}): backing off {} ms", ec.message(), srv.opts.accept_backoff.count());
  return after_error::back_off;
}

// Over the connection limit with overflow_action::reject: a RST tells the
// client at once, and costs no TIME_WAIT.
void reject(server_state& srv, int fd) {
  const ::linger reset{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
  ::close(fd);
  srv.counters.limit_rejected();
}

// Gives an accepted descriptor to the next worker: a session at once, or a
// wait for its input (start_on_input). A client that sent its request with
// the handshake has it waiting: on this thread it is read at once, so that a
// complete request starts its session without a wait or a wake-up.
void hand_off(const std::shared_ptr<server_state>& srv, int fd, const asio::generic::stream_protocol::endpoint& from) {
  const auto& o = srv->opts;
  worker& home = srv->acceptor_home();
  worker& target = *srv->workers[srv->next_worker % srv->workers.size()];
  const bool read_first = o.start_on_input && o.input_limit > 0 && &target == &home;
  const input_read first = read_first ? read_input(*srv, home, fd, 0) : input_read{};
  socket s(target.ioc);
  if (const error_code ec = adopt(s, fd, from)) {
    srv->counters.accept_failed(classify_accept(ec));
    closewise::logger()->info("accepted connection not registered: {}", ec.message());
    return;
  }
  const peer_address peer = to_peer_address(from);
  srv->counters.accepted();
  ++srv->next_worker;
  if (!o.start_on_input) {
    asio::co_spawn(
        target.ioc,
        run_session(srv, &target, make_stream(*srv, std::move(s), peer), peer, session_start::serve, clock::now()),
        asio::detached);
  } else if (&target == &home) {
    park(srv, target, std::move(s), peer, read_first ? &first : nullptr);
  } else {
    // The wait list belongs to the target's thread.
    asio::post(target.ioc, [srv, w = &target, s = std::move(s), peer]() mutable { park(srv, *w, std::move(s), peer); });
  }
}

}  // namespace

asio::awaitable<void> run_accept_loop(std::shared_ptr<server_state> srv, acceptor_type* acceptor) {
  auto& home = srv->acceptor_home();
  asio::steady_timer backoff(home.ioc);
  asio::generic::stream_protocol::endpoint from;
  // Accepts in a row without a wait; after a burst the loop lets the
  // sessions of its thread run, as a completion through the scheduler would.
  constexpr unsigned max_burst = 16;
  unsigned burst = 0;
  while (!srv->draining) {
    if (co_await wait_below_limit(*srv)) continue;
    if (burst == max_burst) {
      burst = 0;
      co_await asio::post(home.ioc, asio::use_awaitable);
      continue;  // the drain, the limit and the listener may have changed meanwhile
    }
    if (!acceptor->is_open()) break;
    error_code ec;
    const int fd = accept_raw(*acceptor, from, ec);
    if (ec == asio::error::would_block || ec == asio::error::try_again) {
      // The backlog is empty: wait for the next connection (a close of the
      // listener by a drain or a stop ends the wait).
      burst = 0;
      const auto [wait_ec] = co_await acceptor->async_wait(asio::socket_base::wait_read, use_tuple);
      if (wait_ec == asio::error::operation_aborted || !acceptor->is_open()) break;
      continue;
    }
    if (ec == asio::error::interrupted) continue;
    ++burst;
    if (ec) {
      if (on_accept_error(*srv, ec) == after_error::back_off) {
        backoff.expires_after(srv->opts.accept_backoff);
        co_await backoff.async_wait(use_tuple);
      }
      continue;
    }
    if (srv->counters.open() >= srv->opts.max_connections) {
      reject(*srv, fd);
      continue;
    }
    hand_off(srv, fd, from);
  }
}

namespace {

// "HOST:PORT" of a bound TCP address (sockaddr_in or sockaddr_in6).
std::string tcp_name(const void* addr, std::size_t len) {
  asio::ip::tcp::endpoint bound;
  std::memcpy(bound.data(), addr, std::min<std::size_t>(len, sizeof(sockaddr_in6)));
  return to_string(bound);
}

[[noreturn]] void throw_errno(int error, const std::string& what) {
  throw std::system_error(error, std::generic_category(), what);
}

// Takes a listening socket someone else opened (server_options::
// inherited_listeners): a TCP or Unix stream socket that listens already.
void adopt_listener(server_state& srv, int fd) {
  const std::string what = "inherited listener fd " + std::to_string(fd);
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) throw_errno(errno, what);
  const int family = addr.ss_family;
  if (family != AF_INET && family != AF_INET6 && family != AF_UNIX)
    throw_errno(EAFNOSUPPORT, what + ": not a TCP or Unix socket");
  int value = 0;
  socklen_t size = sizeof value;
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &value, &size) != 0) throw_errno(errno, what);
  if (value != SOCK_STREAM) throw_errno(ESOCKTNOSUPPORT, what + ": not a stream socket");
  size = sizeof value;
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &value, &size) != 0) throw_errno(errno, what);
  if (value == 0) throw_errno(EINVAL, what + ": not listening");
  auto a = std::make_unique<acceptor_type>(srv.acceptor_home().ioc);
  const int protocol = family == AF_UNIX ? 0 : static_cast<int>(IPPROTO_TCP);
  a->assign(asio::generic::stream_protocol(family, protocol), fd);
  a->native_non_blocking(true);  // accept_raw must not block
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  if (family == AF_UNIX) {
    const auto& un = reinterpret_cast<const sockaddr_un&>(addr);
    const std::size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
    // An abstract socket's name starts with a NUL byte: it is shown after '@'.
    const bool abstract = n > 1 && un.sun_path[0] == '\0';
    std::string name = abstract ? "unix:@" : "unix:";
    if (abstract)
      name.append(un.sun_path + 1, n - 1);
    else
      name.append(un.sun_path, ::strnlen(un.sun_path, n));
    srv.endpoints.push_back(std::move(name));
  } else {
    srv.endpoints.push_back(tcp_name(&addr, len));
  }
  srv.acceptors.push_back(std::move(a));
}

}  // namespace

void open_listeners(server_state& srv) {
  auto& home = srv.acceptor_home();
  for (const int fd : srv.opts.inherited_listeners) adopt_listener(srv, fd);
  for (const auto& text : srv.opts.listen) {
    const auto ep = parse_endpoint(text);
    auto a = std::make_unique<acceptor_type>(home.ioc);
    const asio::generic::stream_protocol::endpoint gep(ep);
    a->open(gep.protocol());
    a->set_option(asio::socket_base::reuse_address(true));
    if (srv.opts.reuse_port) a->set_option(reuse_port_option{});
    if (ep.address().is_v6()) a->set_option(asio::ip::v6_only(true));
    a->bind(gep);
    a->listen(srv.opts.backlog);
    a->native_non_blocking(true);  // accept_raw must not block
    const auto local = a->local_endpoint();
    srv.endpoints.push_back(tcp_name(local.data(), local.size()));
    srv.acceptors.push_back(std::move(a));
  }
  for (const auto& path : srv.opts.unix_paths) {
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
    const asio::generic::stream_protocol::endpoint gep{asio::local::stream_protocol::endpoint(path)};
    auto a = std::make_unique<acceptor_type>(home.ioc);
    a->open(gep.protocol());
    a->bind(gep);
    a->listen(srv.opts.backlog);
    a->native_non_blocking(true);
    srv.unix_files.push_back(path);
    srv.endpoints.push_back("unix:" + path);
    srv.acceptors.push_back(std::move(a));
  }
}

}  // namespace closewise::internal
