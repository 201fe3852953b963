#include "poolsweep/delay_relay.hpp"

#include <sys/socket.h>

#include <array>
#include <atomic>
#include <deque>
#include <map>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

namespace closewise::poolsweep {

namespace {

namespace net = boost::asio;
using error_code = boost::system::error_code;
using tcp = net::ip::tcp;
using clock_type = std::chrono::steady_clock;
constexpr auto use_tuple = net::as_tuple(net::use_awaitable);
constexpr std::size_t chunk_size = 16 * 1024;

enum class item_kind : std::uint8_t { data, fin, rst };

struct item {
  clock_type::time_point due;
  item_kind kind = item_kind::data;
  std::vector<char> bytes;
};

// One direction: what was read from its source and is due at its destination.
struct direction {
  explicit direction(const net::any_io_executor& ex) : wake(ex), room(ex), due(ex) {}
  std::deque<item> queue;
  std::size_t queued_bytes = 0;
  bool fin_queued = false;
  bool fin_delivered = false;
  bool rst_queued = false;
  bool reader_done = false;
  bool watching = false;   // the reader read the FIN and watches its source for a reset
  net::steady_timer wake;  // the writer waits here for an item
  net::steady_timer room;  // the reader waits here for the queue to drain
  net::steady_timer due;   // the writer waits here for the front item's time
};

// Waits on `t` until cancelled (a condition signal on one thread).
net::awaitable<void> wait_signal(net::steady_timer& t) {
  t.expires_at(clock_type::time_point::max());
  co_await t.async_wait(use_tuple);
}

}  // namespace

struct delay_relay::impl {
  struct counters {
    std::atomic<std::uint64_t> accepted{0};
    std::atomic<std::uint64_t> upstream_failures{0};
    std::atomic<std::uint64_t> bytes{0};
    std::atomic<std::uint64_t> fins{0};
    std::atomic<std::uint64_t> resets{0};
    std::atomic<std::uint64_t> paused{0};
    std::atomic<std::uint64_t> crossings{0};
    std::atomic<std::uint64_t> open{0};
  };

  // One relayed connection: `a` the accepted client side, `b` upstream.
  // Direction ab reads a and writes b; ba the reverse. The four coroutines
  // (two readers, two writers) hold it; it closes its sockets when the last
  // one ends.
  struct conn {
    conn(impl* o, tcp::socket accepted)
        : owner(o), a(std::move(accepted)), b(a.get_executor()), ab(a.get_executor()), ba(a.get_executor()) {}
    ~conn() {
      --owner->count.open;
      owner->conns.erase(id);
    }
    conn(const conn&) = delete;
    conn& operator=(const conn&) = delete;
    impl* owner;
    std::uint64_t id = 0;
    tcp::socket a;
    tcp::socket b;
    direction ab;
    direction ba;
    bool closed = false;
    bool crossed = false;
  };

  delay_relay_options opts;
  tcp::endpoint upstream;
  counters count;
  std::map<std::uint64_t, std::weak_ptr<conn>> conns;
  std::uint64_t next_id = 0;
  // Declared after what the connections touch as they are destroyed, so that
  // the io_context (and the coroutine frames it may still hold) goes first.
  net::io_context ioc;
  net::executor_work_guard<net::io_context::executor_type> guard{ioc.get_executor()};
  tcp::acceptor acceptor{ioc};
  std::atomic<bool> stopping{false};
  std::string local;
  std::thread thread;

  // A FIN in flight one way while bytes are in flight the other way: the
  // crossing (counted once per connection).
  static bool crosses(item_kind k, const direction& reverse) {
    if (k == item_kind::data) return reverse.fin_queued && !reverse.fin_delivered;
    if (k != item_kind::fin) return false;
    for (const item& i : reverse.queue) {
      if (i.kind == item_kind::data) return true;
    }
    return false;
  }

  void queue(conn& c, direction& d, item_kind k, std::vector<char> bytes = {}) {
    if (!c.crossed && crosses(k, &d == &c.ab ? c.ba : c.ab)) {
      c.crossed = true;
      ++count.crossings;
    }
    d.queued_bytes += bytes.size();
    d.queue.push_back(item{clock_type::now() + opts.delay, k, std::move(bytes)});
    d.wake.cancel();
  }

  void queue_reset(conn& c, direction& d) {
    if (d.rst_queued) return;
    d.rst_queued = true;
    queue(c, d, item_kind::rst);
  }

  // Ends the connection now: `abort` resets `victim` (SO_LINGER {1, 0}); the
  // other socket is closed as it is (its peer already reset it, or the relay
  // is shutting down).
  static void teardown(conn& c, tcp::socket* victim) {
    if (c.closed) return;
    c.closed = true;
    error_code ignored;
    for (tcp::socket* s : {&c.a, &c.b}) {
      if (!s->is_open()) continue;
      if (s == victim) s->set_option(net::socket_base::linger(true, 0), ignored);
      s->close(ignored);
    }
    for (direction* d : {&c.ab, &c.ba}) {
      d->wake.cancel();
      d->room.cancel();
      d->due.cancel();
    }
  }

  // The socket's pending error (SO_ERROR), read and cleared.
  static int pending_error(tcp::socket& s) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (::getsockopt(s.native_handle(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) return 0;
    return err;
  }

  net::awaitable<void> reader(std::shared_ptr<conn> c, tcp::socket& src, direction& d) {
    std::array<char, chunk_size> buf;
    bool eof = false;
    while (!c->closed && !d.rst_queued) {
      if (d.queued_bytes >= opts.max_queued_bytes) {
        ++count.paused;
        while (d.queued_bytes >= opts.max_queued_bytes && !c->closed) co_await wait_signal(d.room);
        continue;
      }
      auto [ec, n] = co_await src.async_read_some(net::buffer(buf), use_tuple);
      if (c->closed) break;
      if (n > 0) queue(*c, d, item_kind::data, std::vector<char>(buf.data(), buf.data() + n));
      if (!ec) continue;
      if (ec == net::error::eof) {
        d.fin_queued = true;
        queue(*c, d, item_kind::fin);
        eof = true;
      } else {
        queue_reset(*c, d);  // ECONNRESET, or any other error: the source is gone abortively
      }
      break;
    }
    // After the FIN, a reset may still come (a server that closes with a
    // request unread answers it with RST): watch for it until the other
    // direction's FIN reached this socket (its writer cancels the watch).
    direction& other = &d == &c->ab ? c->ba : c->ab;
    if (eof && !c->closed && !other.fin_delivered) {
      if (pending_error(src) != 0) {
        queue_reset(*c, d);
      } else {
        d.watching = true;
        auto [ec] = co_await src.async_wait(net::socket_base::wait_error, use_tuple);
        d.watching = false;
        if (!ec && !c->closed && pending_error(src) != 0) queue_reset(*c, d);
      }
    }
    d.reader_done = true;
    d.wake.cancel();
  }

  net::awaitable<void> writer(std::shared_ptr<conn> c, direction& d, tcp::socket& dst, direction& reverse) {
    while (!c->closed) {
      if (d.queue.empty()) {
        if (d.fin_delivered && d.reader_done) break;
        co_await wait_signal(d.wake);
        continue;
      }
      if (clock_type::now() < d.queue.front().due) {
        d.due.expires_at(d.queue.front().due);
        co_await d.due.async_wait(use_tuple);
        continue;
      }
      item it = std::move(d.queue.front());
      d.queue.pop_front();
      if (it.kind == item_kind::rst) {
        ++count.resets;
        teardown(*c, &dst);
        break;
      }
      if (it.kind == item_kind::fin) {
        error_code ignored;
        dst.shutdown(tcp::socket::shutdown_send, ignored);
        d.fin_delivered = true;
        ++count.fins;
        if (reverse.watching) dst.cancel(ignored);  // both ways closed: no reset to watch for
        continue;
      }
      auto [ec, n] = co_await net::async_write(dst, net::buffer(it.bytes), use_tuple);
      d.queued_bytes -= it.bytes.size();
      d.room.cancel();
      count.bytes += n;
      if (c->closed) break;
      if (ec) {
        // The destination's peer refused the bytes (it reset the connection):
        // its source is told so, a delay later, if it was not already.
        d.queue.clear();
        d.queued_bytes = 0;
        queue_reset(*c, reverse);
        break;
      }
    }
  }

  net::awaitable<void> relay(tcp::socket accepted) {
    auto c = std::make_shared<conn>(this, std::move(accepted));
    c->id = next_id++;
    conns.emplace(c->id, c);
    ++count.open;
    net::steady_timer limit(ioc);
    limit.expires_after(opts.connect_timeout);
    limit.async_wait([c](error_code ec) {
      if (!ec) c->b.close(ec);
    });
    auto [ec] = co_await c->b.async_connect(upstream, use_tuple);
    limit.cancel();
    if (ec || c->closed) {
      ++count.upstream_failures;
      teardown(*c, &c->a);
      co_return;
    }
    error_code ignored;
    c->a.set_option(tcp::no_delay(true), ignored);
    c->b.set_option(tcp::no_delay(true), ignored);
    net::co_spawn(ioc, reader(c, c->a, c->ab), net::detached);
    net::co_spawn(ioc, reader(c, c->b, c->ba), net::detached);
    net::co_spawn(ioc, writer(c, c->ab, c->b, c->ba), net::detached);
    net::co_spawn(ioc, writer(c, c->ba, c->a, c->ab), net::detached);
  }

  net::awaitable<void> accept_loop() {
    net::steady_timer backoff(ioc);
    while (acceptor.is_open()) {
      auto [ec, s] = co_await acceptor.async_accept(use_tuple);
      if (!acceptor.is_open()) break;
      if (ec) {  // out of descriptors, most likely: try again shortly
        backoff.expires_after(std::chrono::milliseconds(10));
        co_await backoff.async_wait(use_tuple);
        continue;
      }
      ++count.accepted;
      net::co_spawn(ioc, relay(std::move(s)), net::detached);
    }
  }

  void close_all() {
    error_code ignored;
    acceptor.close(ignored);
    std::vector<std::shared_ptr<conn>> live;  // a connection's end erases it from `conns`
    for (auto& [id, w] : conns) {
      if (auto c = w.lock()) live.push_back(std::move(c));
    }
    for (auto& c : live) teardown(*c, nullptr);
    guard.reset();
    stopping = true;
  }

  // The relay's thread: until the destructor's close_all, then at most 2 s
  // more for the cancelled operations to end (what is left is abandoned).
  void run() {
    while (!stopping) ioc.run_for(std::chrono::milliseconds(100));
    ioc.run_for(std::chrono::seconds(2));
  }
};

delay_relay::delay_relay(const std::string& upstream, delay_relay_options options) : impl_(std::make_unique<impl>()) {
  impl_->opts = options;
  const auto colon = upstream.rfind(':');
  if (colon == std::string::npos) throw std::runtime_error("delay_relay: the upstream is not HOST:PORT: " + upstream);
  error_code ec;
  const auto host = net::ip::make_address(upstream.substr(0, colon), ec);
  const unsigned long port = ec ? 0 : std::stoul(upstream.substr(colon + 1));
  if (ec || port == 0 || port > 65535) {
    throw std::runtime_error("delay_relay: the upstream is not HOST:PORT (numeric): " + upstream);
  }
  impl_->upstream = tcp::endpoint(host, static_cast<std::uint16_t>(port));
  impl_->acceptor.open(tcp::v4());
  impl_->acceptor.bind(tcp::endpoint(net::ip::address_v4::loopback(), 0));
  impl_->acceptor.listen();
  impl_->local = fmt::format("127.0.0.1:{}", impl_->acceptor.local_endpoint().port());
  net::co_spawn(impl_->ioc, impl_->accept_loop(), net::detached);
  impl_->thread = std::thread([i = impl_.get()] { i->run(); });
}

delay_relay::~delay_relay() {
  net::post(impl_->ioc, [i = impl_.get()] { i->close_all(); });
  impl_->thread.join();
}

std::string delay_relay::endpoint() const { return impl_->local; }

delay_relay_stats delay_relay::stats() const {
  const impl::counters& c = impl_->count;
  delay_relay_stats s;
  s.accepted = c.accepted;
  s.upstream_failures = c.upstream_failures;
  s.bytes = c.bytes;
  s.fins = c.fins;
  s.resets = c.resets;
  s.paused = c.paused;
  s.crossings = c.crossings;
  s.open = c.open;
  return s;
}

std::string delay_relay_stats::line() const {
  return fmt::format("accepted={} upstream_failures={} bytes={} fins={} resets={} crossings={} paused={} open={}",
                     accepted, upstream_failures, bytes, fins, resets, crossings, paused, open);
}

}  // namespace closewise::poolsweep
