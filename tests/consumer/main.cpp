// Built against an installed closewise: the umbrella header, the core and a
// server on loopback port 0 with one real connection.
#include <closewise/closewise.hpp>

#include <cstdio>
#include <thread>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace asio = boost::asio;

namespace {

asio::awaitable<void> hello(closewise::connection& c) { co_await c.write(asio::buffer(std::string_view("hello\n"))); }

asio::awaitable<void> fetch(std::string target, std::string& got) {
  auto [ec, s] = co_await closewise::connect(co_await asio::this_coro::executor, target, std::chrono::seconds(2));
  if (ec) co_return;
  char buf[16];
  auto [rec, n] = co_await s->async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
  got.assign(buf, n);
  co_await s->async_close(closewise::close_policy::graceful, asio::as_tuple(asio::use_awaitable));
}

}  // namespace

int main() {
  closewise::connection_state core;
  if (!core.on(closewise::event::shutdown()).todo.has(closewise::action::send_fin)) return 1;

  closewise::server_options o;
  o.listen = {"127.0.0.1:0"};
  o.threads = 1;
  closewise::server srv(o, hello);
  srv.start();
  std::thread io([&] { srv.run(); });
  asio::io_context ioc;
  std::string got;
  asio::co_spawn(ioc, fetch(srv.local_endpoints().front(), got), asio::detached);
  ioc.run_for(std::chrono::seconds(5));
  srv.drain();
  io.join();
  std::printf("closewise %s: got %s", closewise::version_string, got.c_str());
  return got == "hello\n" ? 0 : 1;
}
