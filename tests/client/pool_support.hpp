#pragma once
// What pool_test.cpp and pool_tls_test.cpp share: how big the sweeps may be
// (CLOSEWISE_POOL_REUSES, a sanitizer or a slow build), the socket count each
// test checks after itself, one request run under a watchdog, letting pending
// closes finish once a pool is gone, a closewise::server on a thread of its
// own, a loopback listener that runs each connection on a thread (for the
// raw misbehaving servers), and the POST sweeps' server that counts each
// request's executions, plain or over TLS.

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>

#include "../support/descriptors.hpp"
#include "../support/loopback.hpp"
#include "closewise/http_client.hpp"
#include "closewise/server.hpp"
#include "closewise/tls.hpp"

namespace closewise::test {

inline constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
using clock_type = std::chrono::steady_clock;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool sanitized = true;
#else
inline constexpr bool sanitized = false;
#endif

// CLOSEWISE_POOL_REUSES, the TCP sweep's reuses (at least 1), if set; each
// sweep derives its own count from it.
inline std::optional<std::uint64_t> pool_reuses_from_env() {
  if (const char* env = std::getenv("CLOSEWISE_POOL_REUSES")) return std::max(1L, std::atol(env));
  return std::nullopt;
}

// Under a sanitizer, or when CLOSEWISE_TEST_REPS says the build is slow (the
// sanitizer presets set it): the sweeps shrink to stay within the suite's budget.
inline bool slow_build() { return sanitized || std::getenv("CLOSEWISE_TEST_REPS") != nullptr; }

inline std::size_t sockets_open() { return count_sockets(open_descriptors()); }

// Lets pending closes and cancelled waits finish once the pool is gone.
inline void settle(asio::io_context& ioc) {
  ioc.restart();
  for (int i = 0; i < 100 && !ioc.stopped(); ++i) ioc.run_for(std::chrono::milliseconds(50));
}

inline http_request make_request(http::verb method, std::string target, std::string body = {}) {
  http_request req{method, target, 11};
  req.body() = std::move(body);
  return req;
}

// One request on `ioc`, to completion under a watchdog.
inline http_result run_request(asio::io_context& ioc, http_client& client, const std::string& target, http_request req,
                               request_timeouts t = {}) {
  http_result out;
  bool done = false;
  asio::co_spawn(ioc, client.request(target, std::move(req), t), [&](std::exception_ptr, http_result r) {
    out = std::move(r);
    done = true;
  });
  EXPECT_TRUE(run_until(
      ioc, [&] { return done; }, std::chrono::seconds(20)));
  return out;
}

inline constexpr std::string_view ok_response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

// closewise::server with `handler`, running on a thread of its own from
// construction to destruction.
class threaded_server {
 public:
  threaded_server(server_options so, session_handler handler)
      : srv_(std::make_unique<server>(std::move(so), std::move(handler))) {
    srv_->start();
    endpoint_ = srv_->local_endpoints().front();
    thread_ = std::thread([this] { srv_->run(); });
  }
  ~threaded_server() {
    srv_->stop();
    thread_.join();
  }
  threaded_server(const threaded_server&) = delete;
  threaded_server& operator=(const threaded_server&) = delete;
  const std::string& endpoint() const { return endpoint_; }

 private:
  std::unique_ptr<server> srv_;
  std::string endpoint_;
  std::thread thread_;
};

// A listener on 127.0.0.1:0 (SO_REUSEADDR if `reuse_address`) whose
// connections each run `serve` (the accepted descriptor, its index from 0)
// on a thread of their own: blocking sockets, for the misbehaving servers.
// Destruction waits for those threads, then closes the listener.
class threaded_acceptor {
 public:
  using serve_fn = std::function<void(int fd, int index)>;
  threaded_acceptor(serve_fn serve, bool reuse_address) : serve_(std::move(serve)) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (reuse_address) {
      const int one = 1;
      ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    }
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || ::listen(fd_, 16) != 0) std::abort();
    socklen_t len = sizeof(a);
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~threaded_acceptor() {
    stop_ = true;
    acceptor_.join();
    for (auto& t : peers_) t.join();
    ::close(fd_);
  }
  threaded_acceptor(const threaded_acceptor&) = delete;
  threaded_acceptor& operator=(const threaded_acceptor&) = delete;
  std::uint16_t port() const { return port_; }
  int accepted() const { return accepted_.load(); }

 private:
  void accept_loop() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      const int index = accepted_++;
      peers_.emplace_back([this, c, index] { serve_(c, index); });
    }
  }
  serve_fn serve_;
  int fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::thread acceptor_;
  std::vector<std::thread> peers_;
};

// ---- POST: a server that counts each request's executions ------------------

struct execution_counter {
  std::mutex mu;
  std::map<std::string, unsigned> by_id;
  unsigned duplicates() {
    std::lock_guard lock(mu);
    unsigned n = 0;
    for (const auto& [id, count] : by_id) n += count > 1 ? count - 1 : 0;
    return n;
  }
  std::size_t executed() {
    std::lock_guard lock(mu);
    return by_id.size();
  }
};

// The exchanges of counting_session on `io`: the connection's own stream, or
// its TLS stream (told when each request was read whole, so that a close
// after it is not a truncation).
template <class Stream>
asio::awaitable<void> counted_exchanges(connection& c, Stream& io, execution_counter& counter) {
  boost::beast::flat_buffer buffer;
  for (;;) {
    http::request<http::string_body> req;
    auto [ec, n] = co_await http::async_read(io, buffer, req, use_tuple);
    if (ec) co_return;
    if constexpr (std::is_same_v<Stream, tls_stream>) io.mark_message_complete();
    {
      std::lock_guard lock(counter.mu);
      ++counter.by_id[req.body()];
    }
    http::response<http::string_body> res{http::status::ok, 11};
    res.body() = "done";
    res.keep_alive(req.keep_alive());
    res.prepare_payload();
    auto [wec, wn] = co_await http::async_write(io, res, use_tuple);
    if (wec) co_return;
    c.mark_exchange_complete();
    if (!res.keep_alive()) co_return;
  }
}

// The test's HTTP session, plain or over TLS: every request body is an id,
// executed (counted) once it was read whole, then answered with keep-alive.
inline asio::awaitable<void> counting_session(connection c, std::shared_ptr<execution_counter> counter) {
  if (tls_stream* tls = c.tls()) {
    co_await counted_exchanges(c, *tls, *counter);
  } else {
    co_await counted_exchanges(c, c.io(), *counter);
  }
}

// A server with the counting session and `so`'s options.
class counting_server {
 public:
  explicit counting_server(server_options so)
      : counter_(std::make_shared<execution_counter>()),
        srv_(std::move(so), [c = counter_](connection& conn) { return counting_session(conn, c); }) {}
  const std::string& endpoint() const { return srv_.endpoint(); }
  execution_counter& counter() { return *counter_; }

 private:
  std::shared_ptr<execution_counter> counter_;
  threaded_server srv_;
};

}  // namespace closewise::test
