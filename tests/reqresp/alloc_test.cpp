// Heap allocations per kept-alive request and per server-close connection in
// closewise-reqresp's server (the same session, options and one I/O thread
// as `closewise-reqresp --threads 1`), counted by replacing the global
// operator new and aligned_alloc (which Asio uses). An allocation is a cost
// paid on every cycle (malloc, free, cache misses), and a count does not
// drift with the machine's load the way a time does: these tests fail when
// a change makes the steady state allocate more than the budgets below,
// which are the counts the code reaches today. Lower them when a change
// saves allocations.
//
// The client is this test's own thread with raw blocking sockets; only the
// allocations made on other threads (the server's) are counted, and only
// over cycles that follow a warm-up (the first cycles fill Asio's and the
// session's recycled buffers).

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <string_view>
#include <thread>

#include "../support/loopback.hpp"
#include "reqresp/http_session.hpp"

// Asio's aligned allocations are counted outside ASan and TSan only (below).
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define CLOSEWISE_COUNT_ALIGNED_ALLOC 1
#endif

namespace {

std::atomic<std::uint64_t> g_allocations{0};
thread_local bool t_not_counted = false;  // set on the client (test) thread

void* counted_new(std::size_t n) {
  if (!t_not_counted) g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc{};
}

void* counted_new_aligned(std::size_t n, std::align_val_t al) {
#ifndef CLOSEWISE_COUNT_ALIGNED_ALLOC  // else the aligned_alloc below counts it
  if (!t_not_counted) g_allocations.fetch_add(1, std::memory_order_relaxed);
#endif
  const auto a = static_cast<std::size_t>(al);
  if (void* p = std::aligned_alloc(a, (n + a - 1) / a * a)) return p;
  throw std::bad_alloc{};
}

}  // namespace

// Asio's own memory (handlers, coroutine frames) comes from a small
// per-thread cache, and from std::aligned_alloc when the cache misses: count
// those too. Not under ASan or TSan, whose allocators a definition here would
// bypass (their free() would then meet memory they never handed out).
#ifdef CLOSEWISE_COUNT_ALIGNED_ALLOC
extern "C" void* __libc_memalign(std::size_t alignment, std::size_t size);  // glibc's, what aligned_alloc is
extern "C" void* aligned_alloc(std::size_t alignment, std::size_t size) noexcept {
  if (!t_not_counted) g_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(alignment, size);
}
#endif

// The replaceable global allocation functions ([new.delete]): every form
// that allocates counts once; the deleting forms only free.
void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void* operator new(std::size_t n, std::align_val_t al) { return counted_new_aligned(n, al); }
void* operator new[](std::size_t n, std::align_val_t al) { return counted_new_aligned(n, al); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;
namespace rr = closewise::reqresp;

// Budgets: allocations per cycle on the server's side, the counts reached
// today (see docs/performance.md, "Instructions and allocations per
// cycle"). A count above one of them is a regression. Counted with Asio's
// aligned allocations, a server-close connection takes 14.0 (Release) to 15.0 (the
// order in which a connection's last events arrive changes which of Asio's
// cached blocks are free; the budget is one above the highest seen); under
// the sanitizers only operator new is counted. `one_offs` allows for
// allocations that happen once in a window, not per cycle (a container of
// the server's growing).
#ifdef CLOSEWISE_COUNT_ALIGNED_ALLOC
constexpr std::uint64_t keepalive_budget = 1;
constexpr std::uint64_t server_close_budget = 16;
#else
// operator new alone: 0 and 7 (the three Beast fields a request took before
// the session's arena are gone from the 2 and 10 counted before it).
constexpr std::uint64_t keepalive_budget = 1;
constexpr std::uint64_t server_close_budget = 8;
#endif
constexpr std::uint64_t one_offs = 20;

constexpr int warmup_cycles = 200;
constexpr int measured_cycles = 2000;

// closewise-reqresp --threads 1 with its defaults, on loopback port 0, with
// no observer of its own (a test's on_close would allocate on the server's
// thread and be counted).
class reqresp_under_count {
 public:
  reqresp_under_count() {
    server_options so;
    so.listen = {"127.0.0.1:0"};
    so.threads = 1;
    rr::http_options ho;
    rr::configure_server(so, ho);
    svc_ = std::make_shared<rr::http_service>(ho);
    srv_ = std::make_unique<server>(so, rr::make_session_handler(svc_));
    svc_->set_stats(&srv_->stats());
    srv_->start();
    port_ = parse_endpoint(srv_->local_endpoints().front()).port();
    thread_ = std::thread([this] { srv_->run(); });
  }
  ~reqresp_under_count() {
    srv_->stop();
    thread_.join();
  }
  std::uint16_t port() const { return port_; }
  std::uint64_t closed() const { return srv_->stats().snapshot().closed; }
  /// Waits (bounded) until the server has reported `n` closes.
  bool wait_closed(std::uint64_t n) const {
    const auto end = std::chrono::steady_clock::now() + 20s;
    while (closed() < n) {
      if (std::chrono::steady_clock::now() > end) return false;
      std::this_thread::sleep_for(1ms);
    }
    return true;
  }

 private:
  std::shared_ptr<rr::http_service> svc_;
  std::unique_ptr<server> srv_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};

// Reads one response with a Content-Length body into `buf`; its size, or 0
// if the stream ended or failed first.
std::size_t read_response(raw_peer& p, std::string& buf) {
  buf.clear();
  char chunk[4096];
  for (;;) {
    const auto head_end = buf.find("\r\n\r\n");
    if (head_end != std::string::npos) {
      const auto cl = buf.find("Content-Length: ");
      if (cl == std::string::npos || cl > head_end) return 0;
      const std::size_t want = head_end + 4 + std::strtoull(buf.c_str() + cl + 16, nullptr, 10);
      if (buf.size() >= want) return want;
    }
    const long r = p.recv_some(chunk, sizeof chunk);
    if (r <= 0) return 0;
    buf.append(chunk, static_cast<std::size_t>(r));
  }
}

void print_figure(const char* what, std::uint64_t allocations, int cycles) {
  std::printf("alloc: %s: %llu allocations over %d cycles, %.2f per cycle\n", what,
              static_cast<unsigned long long>(allocations), cycles, static_cast<double>(allocations) / cycles);
}

TEST(allocations, per_kept_alive_request_within_budget) {
  t_not_counted = true;
  std::string buf;
  buf.reserve(64 * 1024);
  reqresp_under_count s;
  raw_peer p = connect_to(s.port());
  ASSERT_GE(p.fd(), 0);
  const std::string_view request = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  std::uint64_t before = 0;
  for (int i = 0; i < warmup_cycles + measured_cycles; ++i) {
    if (i == warmup_cycles) before = g_allocations.load();
    ASSERT_EQ(p.send_all(request.data(), request.size()), static_cast<long>(request.size())) << "request " << i;
    ASSERT_GT(read_response(p, buf), 0u) << "request " << i;
    ASSERT_TRUE(buf.starts_with("HTTP/1.1 200")) << buf.substr(0, 80);
  }
  const std::uint64_t counted = g_allocations.load() - before;
  print_figure("kept-alive request", counted, measured_cycles);
  EXPECT_LE(counted, keepalive_budget * measured_cycles + one_offs)
      << "allocations per kept-alive request rose above the budget";
}

TEST(allocations, per_server_close_connection_within_budget) {
  t_not_counted = true;
  std::string buf;
  buf.reserve(64 * 1024);
  reqresp_under_count s;
  const std::string_view request = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  std::uint64_t before = 0;
  for (int i = 0; i < warmup_cycles + measured_cycles; ++i) {
    if (i == warmup_cycles) {
      // Every warm-up connection's close counted before the window opens.
      ASSERT_TRUE(s.wait_closed(warmup_cycles));
      before = g_allocations.load();
    }
    raw_peer p = connect_to(s.port());
    ASSERT_GE(p.fd(), 0) << "connection " << i;
    ASSERT_EQ(p.send_all(request.data(), request.size()), static_cast<long>(request.size()));
    ASSERT_GT(read_response(p, buf), 0u) << "connection " << i;
    char c;
    ASSERT_EQ(p.recv_some(&c, 1), 0) << "the server closes after the response";  // its FIN
    p.close();                                                                   // ours ends its drain
  }
  ASSERT_TRUE(s.wait_closed(warmup_cycles + measured_cycles));
  const std::uint64_t counted = g_allocations.load() - before;
  print_figure("server-close connection", counted, measured_cycles);
  EXPECT_LE(counted, server_close_budget * measured_cycles + one_offs)
      << "allocations per server-close connection rose above the budget";
}

}  // namespace
