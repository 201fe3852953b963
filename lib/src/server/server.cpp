// The public server: its lifetime, start, run, drain and stop. The parts it
// is made of are listed in server_state.hpp.
#include <unistd.h>

#include <thread>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>

#include "server_state.hpp"

namespace closewise {

server::server(server_options opts, session_handler session)
    : impl_(std::make_shared<internal::server_state>(std::move(opts), std::move(session))) {}

server::~server() {
  stop();
  // Pending sessions hold the server's state; destroy them (with their
  // io_contexts) before anything they refer to, listeners first.
  impl_->acceptors.clear();
  impl_->signals.reset();
  impl_->delay_timer.reset();
  impl_->slot_free.reset();
  impl_->workers.clear();
  for (const auto& path : impl_->unix_files) ::unlink(path.c_str());
}

void server::on_close(close_observer f) { impl_->observer = std::move(f); }
const server_stats& server::stats() const noexcept { return impl_->counters; }
std::uint64_t server::forced_in_drain() const noexcept { return impl_->forced.load(); }
std::vector<std::string> server::local_endpoints() const { return impl_->endpoints; }

void server::start() {
  auto& home = impl_->acceptor_home();
  impl_->slot_free.emplace(home.ioc);
  internal::open_listeners(*impl_);
  for (auto& a : impl_->acceptors) {
    asio::co_spawn(home.ioc, internal::run_accept_loop(impl_, a.get()), asio::detached);
  }
  if (impl_->opts.handle_signals) {
    impl_->signals.emplace(home.ioc, SIGINT, SIGTERM);
    impl_->wait_for_signal();
  }
}

void server::run() {
  std::vector<std::thread> threads;
  for (std::size_t i = 1; i < impl_->workers.size(); ++i) {
    threads.emplace_back([w = impl_->workers[i].get()] { w->ioc.run(); });
  }
  impl_->workers.front()->ioc.run();
  for (auto& t : threads) t.join();
}

void server::drain() { impl_->start_drain(); }

bool server::draining() const noexcept { return impl_->draining.load(std::memory_order_relaxed); }
bool server::ready() const noexcept { return impl_->ready.load(std::memory_order_relaxed); }

void server::stop() {
  for (auto& w : impl_->workers) w->ioc.stop();
}

}  // namespace closewise
