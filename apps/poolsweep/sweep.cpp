#include "poolsweep/sweep.hpp"

#include <algorithm>
#include <memory>
#include <random>
#include <vector>

#include <fmt/format.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace closewise::poolsweep {

namespace {

constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

struct sweep_run {
  const sweep_config* config = nullptr;
  std::vector<std::unique_ptr<client_pool>> pools;  // one, or one per user
  std::vector<std::unique_ptr<http_client>> clients;
  sweep_result* result = nullptr;
  std::uint64_t next_id = 0;
  unsigned running = 0;
  bool stop = false;

  std::uint64_t reuses() const {
    std::uint64_t n = 0;
    for (const auto& p : pools) n += p->stats().reuses;
    return n;
  }
};

// The pools' counters, added up.
pool_stats sum(const std::vector<std::unique_ptr<client_pool>>& pools) {
  pool_stats t;
  for (const auto& p : pools) t += p->stats();
  return t;
}

void count_failure(sweep_result& r, const http_result& h) {
  ++r.failures;
  ++r.errors[h.ec ? h.ec.message() : fmt::format("status {}", h.response.result_int())];
  if (h.ec == errc::stale_reuse_not_retried) {
    ++r.stale;
    if (h.request_fully_written) ++r.stale_written;
  } else {
    ++r.other_failures;
  }
}

// One pool user: a request, then a gap drawn from the window, until the pool
// reused enough (or the run stops).
asio::awaitable<void> sweep_user(sweep_run* run, unsigned user) {
  const sweep_config& c = *run->config;
  const unsigned seed = 1000 + user;
  http_client& client = *run->clients[run->clients.size() == 1 ? 0 : user];
  std::mt19937 rng(seed);
  std::uniform_int_distribution<std::int64_t> gap_ms(c.gap_min.count(), std::max(c.gap_min, c.gap_max).count());
  asio::steady_timer gap(co_await asio::this_coro::executor);
  while (!run->stop && run->reuses() < c.reuses) {
    http_request req{c.method, c.path, 11};
    if (c.method == http::verb::post) req.body() = std::to_string(++run->next_id);
    request_timeouts t;
    t.whole = c.request_timeout;
    http_result h = co_await client.request(c.target, std::move(req), t);
    ++run->result->requests;
    if (h.ec || h.response.result() != http::status::ok) count_failure(*run->result, h);
    gap.expires_after(std::chrono::milliseconds(gap_ms(rng)));
    co_await gap.async_wait(use_tuple);
  }
  --run->running;
}

}  // namespace

sweep_result run_pool_sweep(const sweep_config& config) {
  using clock = std::chrono::steady_clock;
  sweep_result result;
  asio::io_context ioc;
  const auto start = clock::now();
  {
    pool_options po = config.pool;
    po.max_connections_per_target =
        config.pool_per_user ? 1 : std::max<std::size_t>(po.max_connections_per_target, config.users);
    sweep_run run;
    run.config = &config;
    run.result = &result;
    run.running = config.users;
    for (unsigned i = 0; i < (config.pool_per_user ? config.users : 1u); ++i) {
      run.pools.push_back(std::make_unique<client_pool>(ioc.get_executor(), po));
      run.clients.push_back(std::make_unique<http_client>(*run.pools.back()));
    }
    for (unsigned i = 0; i < config.users; ++i) asio::co_spawn(ioc, sweep_user(&run, i), asio::detached);
    const auto end = start + config.limit;
    while (run.running > 0 && clock::now() < end) ioc.run_for(std::chrono::milliseconds(50));
    result.finished = run.running == 0;
    if (!result.finished) {
      // Let the users see the stop; a request in flight ends by its own deadline.
      run.stop = true;
      const auto grace = clock::now() + config.request_timeout + std::chrono::seconds(1);
      while (run.running > 0 && clock::now() < grace) ioc.run_for(std::chrono::milliseconds(50));
    }
    result.stats = sum(run.pools);
  }
  // The pool is gone: its idle connections close; let them finish.
  ioc.restart();
  for (int i = 0; i < 200 && !ioc.stopped(); ++i) ioc.run_for(std::chrono::milliseconds(50));
  result.elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - start);
  return result;
}

std::string sweep_result::line() const {
  return fmt::format(
      "requests={} reuses={} retries={} fins_seen_idle={} resets_seen_idle={} bytes_seen_idle={} dropped_at_reuse={} "
      "idle_expired={} connects={} failures={} stale_reuse_not_retried={} (fully written {}) other_failures={} "
      "seconds={:.1f}",
      requests, stats.reuses, stats.retries, stats.fins_seen_idle, stats.resets_seen_idle, stats.bytes_seen_idle,
      stats.dropped_at_reuse, stats.idle_expired, stats.connects, failures, stale, stale_written, other_failures,
      static_cast<double>(elapsed.count()) / 1000.0);
}

std::string sweep_result::describe_errors() const {
  std::string out;
  for (const auto& [what, n] : errors) out.append(fmt::format("{}: {}; ", what, n));
  return out;
}

}  // namespace closewise::poolsweep
