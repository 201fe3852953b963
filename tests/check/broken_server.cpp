#include "broken_server.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <optional>
#include <string_view>
#include <system_error>

#include "reqresp/http_rules.hpp"

namespace closewise::test {

namespace {

using clock = std::chrono::steady_clock;

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(clock::now().time_since_epoch()).count();
}

bool send_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

// Waits for input: 1 readable, 0 timeout, -1 error. `limit` < 0: forever.
int wait_input(int fd, std::chrono::milliseconds limit) {
  pollfd p{fd, POLLIN, 0};
  for (;;) {
    const int r = ::poll(&p, 1, limit.count() < 0 ? -1 : static_cast<int>(limit.count()));
    if (r < 0 && errno == EINTR) continue;
    return r;
  }
}

void abort_close(int fd) {
  const linger l{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

struct request {
  std::string method, path;
  bool close = false;
  std::uint64_t content_length = 0;
};

enum class head_end : std::uint8_t { ok, eof_before_request, eof, timeout, too_large, bad_line };

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.back() == '\r' || s.back() == ' ')) {
    if (s.front() == ' ')
      s.remove_prefix(1);
    else
      s.remove_suffix(1);
  }
  return s;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) return false;
  }
  return true;
}

bool parse(std::string_view head, request& r) {
  const auto eol = head.find("\r\n");
  const std::string_view line = head.substr(0, eol);
  const auto sp1 = line.find(' ');
  const auto sp2 = line.rfind(' ');
  if (sp1 == std::string_view::npos || sp1 == sp2 || !line.substr(sp2 + 1).starts_with("HTTP/1.")) return false;
  r.method = std::string(line.substr(0, sp1));
  r.path = std::string(line.substr(sp1 + 1, sp2 - sp1 - 1));
  std::string_view rest = head.substr(eol + 2);
  while (!rest.empty()) {
    const auto end = rest.find("\r\n");
    const std::string_view field = rest.substr(0, end);
    rest = end == std::string_view::npos ? std::string_view{} : rest.substr(end + 2);
    const auto colon = field.find(':');
    if (colon == std::string_view::npos) continue;
    const auto name = field.substr(0, colon);
    const auto value = trim(field.substr(colon + 1));
    if (iequals(name, "connection") && iequals(value, "close")) r.close = true;
    if (iequals(name, "content-length")) std::from_chars(value.data(), value.data() + value.size(), r.content_length);
  }
  return true;
}

}  // namespace

broken_server::broken_server(broken_knobs knobs) : knobs_(knobs) {
  listener_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listener_ < 0) throw std::system_error(errno, std::generic_category(), "socket");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (::bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listener_, 64) != 0 ||
      ::getsockname(listener_, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const int e = errno;
    ::close(listener_);
    throw std::system_error(e, std::generic_category(), "bind/listen");
  }
  port_ = ntohs(a.sin_port);
  acceptor_ = std::thread([this] { accept_loop(); });
}

broken_server::~broken_server() {
  stopping_ = true;
  ::shutdown(listener_, SHUT_RDWR);  // wakes accept()
  acceptor_.join();
  {
    std::lock_guard lock(mutex_);
    for (const int fd : open_) ::shutdown(fd, SHUT_RDWR);  // wakes poll() and send()
  }
  for (auto& t : threads_) t.join();
  ::close(listener_);
}

void broken_server::accept_loop() {
  while (!stopping_) {
    const int fd = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;
    }
    std::lock_guard lock(mutex_);
    if (stopping_) {
      ::close(fd);
      return;
    }
    open_.insert(fd);
    threads_.emplace_back([this, fd] { serve(fd); });
  }
}

// True to go on; false when the server stops meanwhile.
bool broken_server::wait_stall() {
  while (now_ms() < stalled_until_ms_.load()) {
    if (stopping_) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // the bug under test: a stalled server
  }
  return true;
}

void broken_server::serve(int fd) {
  const auto timeout = knobs_.no_timeouts ? std::chrono::milliseconds(-1) : knobs_.timeout;
  if (!knobs_.no_timeouts) {
    timeval tv{static_cast<time_t>(timeout.count() / 1000), static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  }
  // How the connection ends: graceful (FIN, drain until the client's FIN,
  // close), plain close, or abortive.
  enum class ending : std::uint8_t { graceful, plain, abortive, leak };
  ending how = ending::graceful;
  bool first = true;
  for (;;) {
    // The head, byte by byte: whatever follows it stays in the kernel.
    std::string head;
    head_end got = head_end::ok;
    const auto header_deadline = clock::now() + 2 * knobs_.timeout;
    while (!head.ends_with("\r\n\r\n")) {
      std::chrono::milliseconds wait = timeout;
      if (!head.empty() && !knobs_.no_timeouts) {
        wait = std::chrono::duration_cast<std::chrono::milliseconds>(header_deadline - clock::now());
        if (wait.count() <= 0) {
          got = head_end::timeout;
          break;
        }
      }
      const int r = wait_input(fd, wait);
      if (r == 0) {
        got = head_end::timeout;
        break;
      }
      char ch = 0;
      const ssize_t n = r < 0 ? -1 : ::recv(fd, &ch, 1, 0);
      if (n <= 0) {
        got = head.empty() && first ? head_end::eof_before_request : head_end::eof;
        break;
      }
      head.push_back(ch);
      if (head.size() > 8192) {
        got = head_end::too_large;
        break;
      }
    }
    request req;
    if (got == head_end::ok && !parse(head, req)) got = head_end::bad_line;
    if (got == head_end::ok && req.content_length > (1u << 20)) got = head_end::too_large;
    if (got == head_end::eof_before_request && knobs_.leak_on_eof) {
      how = ending::leak;
      break;
    }
    if (got == head_end::eof || got == head_end::eof_before_request) break;
    if (got == head_end::timeout) {
      // An idle keep-alive connection, or a header that took too long.
      if (!head.empty())
        (void)send_all(fd, "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
      how = head.empty() && knobs_.idle_close_by_rst ? ending::abortive : ending::graceful;
      break;
    }
    if (got != head_end::ok) {
      const std::string_view status = got == head_end::bad_line ? "400 Bad Request"
                                      : head.size() > 8192      ? "431 Too Large"
                                                                : "413 Too Large";
      const std::string body = std::string(status) + "\n";
      (void)send_all(fd, "HTTP/1.1 " + std::string(status) + "\r\nContent-Length: " + std::to_string(body.size()) +
                             "\r\nConnection: close\r\n\r\n" + body);
      how = knobs_.rst_after_error           ? ending::abortive
            : knobs_.close_with_unread_input ? ending::plain
                                             : ending::graceful;
      break;
    }
    first = false;
    if (knobs_.refuse_pipelined_after_close && req.close) {
      char ch = 0;
      if (wait_input(fd, std::chrono::milliseconds(200)) == 1 && ::recv(fd, &ch, 1, MSG_PEEK) == 1) {
        (void)send_all(fd, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        how = ending::graceful;
        break;
      }
    }
    if (knobs_.half_close_is_end) {
      // The bug: a FIN right behind the request is taken for "nothing to answer".
      char ch = 0;
      if (wait_input(fd, std::chrono::milliseconds(1000)) == 1 && ::recv(fd, &ch, 1, MSG_PEEK) == 0) {
        how = ending::plain;
        break;
      }
    }
    // The body (discarded), bounded by the read timeout.
    for (std::uint64_t left = req.content_length; left > 0;) {
      char buf[4096];
      if (wait_input(fd, timeout) != 1) break;
      const ssize_t n = ::recv(fd, buf, std::min<std::uint64_t>(left, sizeof buf), 0);
      if (n <= 0) break;
      left -= static_cast<std::uint64_t>(n);
    }
    if (!wait_stall()) break;
    std::uint64_t size = 3;
    const bool bytes = req.path.starts_with("/bytes/");
    if (bytes) std::from_chars(req.path.data() + 7, req.path.data() + req.path.size(), size);
    bool ok = send_all(fd, "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(size) +
                               (req.close ? "\r\nConnection: close" : "") + "\r\n\r\n");
    for (std::uint64_t off = 0; ok && off < size;) {
      const std::size_t n = std::min<std::uint64_t>(reqresp::pattern_span, size - off);
      ok = bytes ? send_all(fd, std::string_view(reqresp::pattern_at(off), n)) : send_all(fd, "ok\n");
      off += n;
    }
    if (!ok) {
      if (knobs_.stall_after_reset && (errno == ECONNRESET || errno == EPIPE)) {
        stalled_until_ms_ = now_ms() + knobs_.stall.count();
      }
      how = errno == EAGAIN ? ending::abortive : ending::plain;  // the write timeout aborts
      break;
    }
    if (req.close) {
      how = knobs_.close_with_unread_input ? ending::plain : ending::graceful;
      break;
    }
  }
  if (how == ending::leak) {
    while (!stopping_) std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the bug: nobody closes
  } else if (how == ending::abortive) {
    abort_close(fd);
  } else if (how == ending::graceful) {
    ::shutdown(fd, SHUT_WR);
    char buf[4096];
    const auto end = clock::now() + 5 * knobs_.timeout;
    while (clock::now() < end && wait_input(fd, knobs_.timeout) == 1 && ::recv(fd, buf, sizeof buf, 0) > 0) {
    }
  }
  std::lock_guard lock(mutex_);
  open_.erase(fd);
  ::close(fd);
}

}  // namespace closewise::test
