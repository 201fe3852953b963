#include "net_fuzz.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>
#include <utility>

#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include "closewise/sock_diag.hpp"

namespace closewise::test {

namespace http = boost::beast::http;

// ---- fuzz_server -----------------------------------------------------------

server_options fuzz_server_options(milliseconds timeouts, milliseconds linger, milliseconds linger_max) {
  server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = 1;
  o.stream.idle_timeout = timeouts;
  o.stream.read_timeout = timeouts;
  o.stream.write_timeout = timeouts;
  o.stream.linger_timeout = linger;
  o.stream.linger_max = linger_max;
  o.stream.safe_reset_wait = std::min(linger, milliseconds(50));
  o.drain_timeout = std::max(timeouts, linger_max);
  return o;
}

fuzz_server::fuzz_server(server_options o, session_handler h) : srv_(std::move(o), std::move(h)) {
  srv_.on_close([this](const connection&, const close_report&) {
    // Taking the lock orders the notification after a waiter's predicate check.
    { std::lock_guard lock(mu_); }
    cv_.notify_all();
  });
  srv_.start();
  port_ = parse_endpoint(srv_.local_endpoints().front()).port();
  thread_ = std::thread([this] { srv_.run(); });
}

fuzz_server::~fuzz_server() {
  srv_.stop();
  if (thread_.joinable()) thread_.join();
}

bool fuzz_server::wait_all_closed(std::uint64_t connections, milliseconds limit) {
  const auto done = [&] {
    const stats_snapshot s = srv_.stats().snapshot();
    const std::uint64_t taken = s.accepted + s.accept_errors[static_cast<std::size_t>(accept_error::aborted)];
    return taken >= connections && s.open == 0;
  };
  const auto end = steady_clock::now() + limit;
  std::unique_lock lock(mu_);
  // A close wakes us; an accept does not, hence the short slices.
  while (!done()) {
    if (steady_clock::now() >= end) return false;
    cv_.wait_for(lock, milliseconds(1));
  }
  return true;
}

// ---- client_socket ---------------------------------------------------------

std::string_view to_string(read_end e) noexcept {
  switch (e) {
    case read_end::eof:
      return "EOF";
    case read_end::reset:
      return "reset";
    case read_end::error:
      return "error";
    case read_end::deadline:
      return "deadline";
    case read_end::quiet:
      return "quiet";
  }
  return "?";
}

client_socket::client_socket(client_socket&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}

client_socket& client_socket::operator=(client_socket&& o) noexcept {
  std::swap(fd_, o.fd_);
  return *this;
}

client_socket client_socket::connect_to(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return {};
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&a), sizeof a) != 0) {
    // A signal (libFuzzer's -timeout alarm ticks every second) interrupts a
    // blocking connect without stopping it: the handshake goes on, and its
    // outcome is read once the socket is writable (connect(2), EINTR).
    bool connected = false;
    if (errno == EINTR) {
      for (int i = 0; i < 2000 && !connected; ++i) {
        pollfd p{fd, POLLOUT, 0};
        const int r = ::poll(&p, 1, 1);
        if (r < 0 && errno != EINTR) break;
        if (r <= 0) continue;
        int err = 0;
        socklen_t len = sizeof err;
        connected = ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
        break;
      }
    }
    if (!connected) {
      ::close(fd);
      return {};
    }
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  return client_socket(fd);
}

namespace {

// Waits for `events` on `fd` until `deadline`: true if ready (or in error).
bool wait_for(int fd, short events, steady_clock::time_point deadline) {
  for (;;) {
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - steady_clock::now()).count();
    if (left < 0) return false;
    pollfd p{fd, events, 0};
    // +1: poll rounds down, and a 0 ms poll at the last moment would spin.
    const int r = ::poll(&p, 1, static_cast<int>(left) + 1);
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return true;  // let the next syscall report it
  }
}

}  // namespace

long client_socket::send_now(std::string_view data) noexcept {
  std::size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::send(fd_, data.data() + done, data.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (done == 0) return n < 0 ? -errno : 0;
    break;
  }
  return static_cast<long>(done);
}

int client_socket::send_all(std::string_view data, steady_clock::time_point deadline, std::size_t* sent,
                            std::string* sink) {
  std::size_t done = 0;
  int err = 0;
  bool readable = sink != nullptr;
  while (done < data.size()) {
    const long n = send_now(data.substr(done));
    if (n < 0) {
      err = static_cast<int>(-n);
      break;
    }
    done += static_cast<std::size_t>(n);
    if (done == data.size()) break;
    if (!wait_for(fd_, readable ? POLLOUT | POLLIN : POLLOUT, deadline)) {
      err = ETIMEDOUT;
      break;
    }
    // After EOF or a reset there is nothing more to read; the send reports the rest.
    if (readable) readable = read_now(*sink) == read_end::quiet;
  }
  if (sent) *sent = done;
  return err;
}

read_end client_socket::read_now(std::string& sink) {
  char buf[16384];
  for (;;) {
    const ssize_t n = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) {
      sink.append(buf, static_cast<std::size_t>(n));
      continue;
    }
    if (n == 0) return read_end::eof;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return read_end::quiet;
    return errno == ECONNRESET ? read_end::reset : read_end::error;
  }
}

read_end client_socket::read(std::string& sink, steady_clock::time_point deadline, milliseconds quiet) {
  for (;;) {
    const read_end e = read_now(sink);
    if (e != read_end::quiet) return e;
    const auto now = steady_clock::now();
    const bool by_quiet = quiet.count() > 0 && now + quiet < deadline;
    if (!wait_for(fd_, POLLIN, by_quiet ? now + quiet : deadline))
      return by_quiet ? read_end::quiet : read_end::deadline;
  }
}

void client_socket::shutdown_write() noexcept {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_WR);
}

void client_socket::reset() noexcept {
  if (fd_ < 0) return;
  const linger l{1, 0};
  ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  close();
}

void client_socket::close() noexcept {
  if (fd_ >= 0) ::close(std::exchange(fd_, -1));
}

// ---- HTTP framing ----------------------------------------------------------

namespace {

// Feeds `bytes` to `p` until the message is done, the parser fails, or it
// needs more than there is (ec = need_more); returns the bytes consumed. One
// put() may stop after the header, hence the loop.
template <class Parser>
std::size_t put_all(Parser& p, std::string_view bytes, boost::system::error_code& ec) {
  p.eager(true);
  p.body_limit(boost::none);
  std::size_t used = 0;
  while (!ec && !p.is_done() && used < bytes.size()) {
    const std::size_t n = p.put(boost::asio::buffer(bytes.data() + used, bytes.size() - used), ec);
    used += n;
    if (n == 0 && !ec) break;
  }
  return used;
}

}  // namespace

response_sequence parse_responses(std::string_view bytes, const std::vector<bool>& head) {
  response_sequence out;
  std::size_t at = 0;
  while (at < bytes.size()) {
    http::response_parser<http::string_body> p;
    p.header_limit(64 * 1024);
    if (out.final_count < head.size() && head[out.final_count]) p.skip(true);
    boost::system::error_code ec;
    const std::size_t used = put_all(p, bytes.substr(at), ec);
    if (ec && ec != http::error::need_more) {
      out.error = "not an HTTP response at byte " + std::to_string(at) + ": " + ec.message();
      return out;
    }
    if (p.is_header_done() && !p.is_done() && p.need_eof()) {
      // A body framed by the end of the stream (no Content-Length, not chunked).
      out.error = "the response at byte " + std::to_string(at) + " has no Content-Length and is not chunked";
      return out;
    }
    if (!p.is_done()) {
      out.leftover = bytes.size() - at;
      return out;
    }
    at += used;
    const auto& m = p.get();
    const unsigned status = m.result_int();
    out.responses.push_back({status, m.keep_alive()});
    if (status >= 200) ++out.final_count;
  }
  return out;
}

request_sequence parse_requests(std::string_view bytes, std::size_t header_limit) {
  request_sequence out;
  std::size_t at = 0;
  while (at < bytes.size()) {
    http::request_parser<http::string_body> p;
    p.header_limit(static_cast<std::uint32_t>(std::min<std::size_t>(header_limit, UINT32_MAX)));
    boost::system::error_code ec;
    const std::size_t used = put_all(p, bytes.substr(at), ec);
    if (!p.get().method_string().empty()) out.head.push_back(p.get().method() == http::verb::head);
    if (ec || !p.is_done()) return out;
    ++out.complete;
    at += used;
  }
  return out;
}

// ---- resources -------------------------------------------------------------

std::optional<std::string> stuck_server_sockets(std::uint16_t port, milliseconds settle) {
  const auto end = steady_clock::now() + settle;
  for (;;) {
    closewise::error_code ec;
    std::size_t close_wait = 0, fin_wait2 = 0;
    for (const auto& s : list_tcp_sockets(port, ec)) {
      if (s.local_port != port) continue;
      if (s.state == tcp_state::close_wait) ++close_wait;
      if (s.state == tcp_state::fin_wait2) ++fin_wait2;
    }
    if (ec) return "sock_diag failed: " + ec.message();
    if (close_wait == 0 && fin_wait2 == 0) return std::nullopt;
    if (steady_clock::now() >= end) {
      return "server port " + std::to_string(port) + " still has " + std::to_string(close_wait) +
             " socket(s) in CLOSE_WAIT and " + std::to_string(fin_wait2) + " in FIN_WAIT2 after " +
             std::to_string(settle.count()) + " ms";
    }
    // No event tells us when the kernel moves a socket on: look again shortly.
    std::this_thread::sleep_for(milliseconds(1));
  }
}

}  // namespace closewise::test
