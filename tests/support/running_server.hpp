#pragma once
// A closewise::server on its own threads for the length of a test, with every
// close report kept (with the peer it belongs to and when it arrived) and a
// bounded wait for one. Used by the fault-injection and soak suites.

#include <pthread.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "closewise/server.hpp"

namespace closewise::test {

struct timed_report {
  std::string peer;  ///< "127.0.0.1:PORT" of the client
  close_report report;
  std::chrono::steady_clock::time_point at;
};

class running_server {
 public:
  running_server(server_options o, session_handler h) : srv_(std::move(o), std::move(h)) {
    srv_.on_close([this](const connection& c, const close_report& r) {
      {
        std::lock_guard lock(mu_);
        reports_.push_back({c.peer(), r, std::chrono::steady_clock::now()});
      }
      cv_.notify_all();
    });
    srv_.start();
    const std::string first = srv_.local_endpoints().front();
    if (first.rfind("unix:", 0) != 0) port_ = parse_endpoint(first).port();  // a Unix listener has no port
    thread_ = std::thread([this] {
      srv_.run();
      {
        std::lock_guard lock(mu_);
        run_returned_ = true;
      }
      cv_.notify_all();
    });
  }
  ~running_server() { stop(); }
  running_server(const running_server&) = delete;
  running_server& operator=(const running_server&) = delete;

  void stop() {
    srv_.stop();
    if (thread_.joinable()) thread_.join();
  }

  server& get() { return srv_; }

  /// CPU time used so far by the thread that calls server::run(): with
  /// `threads = 1`, the server's only I/O thread (accept loop included), and
  /// no other thread of the test process. nullopt if the clock is unavailable.
  std::optional<std::chrono::nanoseconds> run_thread_cpu_time() {
    clockid_t id{};
    timespec ts{};
    if (::pthread_getcpuclockid(thread_.native_handle(), &id) != 0 || ::clock_gettime(id, &ts) != 0)
      return std::nullopt;
    return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
  }
  std::uint16_t port() const { return port_; }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }

  std::vector<timed_report> reports() {
    std::lock_guard lock(mu_);
    return reports_;
  }

  /// Waits (bounded) for the report of the client on local port `client_port`.
  std::optional<timed_report> wait_report(std::uint16_t client_port, std::chrono::milliseconds limit) {
    const std::string peer = "127.0.0.1:" + std::to_string(client_port);
    std::unique_lock lock(mu_);
    const auto find = [&] {
      return std::find_if(reports_.begin(), reports_.end(), [&](const timed_report& r) { return r.peer == peer; });
    };
    if (!cv_.wait_for(lock, limit, [&] { return find() != reports_.end(); })) return std::nullopt;
    return *find();
  }

  /// Waits (bounded) until `n` reports arrived.
  bool wait_reports(std::size_t n, std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return reports_.size() >= n; });
  }

  /// Waits (bounded) until the server counted `n` closed connections.
  bool wait_closed(std::uint64_t n, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return srv_.stats().snapshot().closed >= n; });
  }

  /// Waits (bounded) for run() to return by itself, as it does after a drain.
  bool wait_run_returned(std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return run_returned_; });
  }

 private:
  // Declared before the server so that they outlive it: its destructor may
  // still finish connections.
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<timed_report> reports_;
  bool run_returned_ = false;
  server srv_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};

}  // namespace closewise::test
