// closewise-bench's TLS engine: the cycle modes over HTTPS, with
// closewise::basic_tls_stream as the client on one Asio io_context per
// thread. The phases, tickets and counting are the plain engine's
// (coordinator.hpp); how each mode ends TLS is at the top of engine.hpp.
//
// Every connection makes a full handshake: the client context has no
// session cache and asks for no tickets, and no SSL object is ever given a
// session, so `tls_summary::resumed` stays 0.

#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include "closewise/tls.hpp"
#include "coordinator.hpp"
#include "response_parser.hpp"
#include "tls_client.hpp"

namespace closewise::bench {

namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using tls_stream = closewise::basic_tls_stream<tcp::socket>;
using detail::classify_errno;
using detail::control;
using detail::live_counters;
using detail::now_ns;
using detail::phase;

// A connection: the socket until it is connected, then the TLS stream over it.
struct connection {
  explicit connection(asio::io_context& io) : socket(io) {}
  tcp::socket socket;
  std::optional<tls_stream> tls;
  bool closing = false;  // a close was asked: the deadline scan leaves it to the close's own bounds
};

struct tls_slot {
  std::shared_ptr<connection> conn;  // the connection of this slot's cycle (null: none)
  bool ticketed = false;
  bool awaiting_end = false;  // whole response read; waiting for the server to end the connection
  bool sleeping = false;
  std::uint64_t requests_on_conn = 0;
  std::int64_t cycle_start = 0;
  std::int64_t request_start = 0;
  std::int64_t deadline = 0;
  response_parser parser;
  std::unique_ptr<char[]> buffer;  // one per slot: reads of different connections are in flight at once
  std::unique_ptr<asio::steady_timer> backoff;
};

class tls_worker {
 public:
  static constexpr std::size_t read_buffer_size = 16 * 1024;

  tls_worker(const load_config& cfg, asio::ssl::context& ctx, control& ctl, live_counters& live, unsigned connections)
      : cfg_(cfg), ctx_(ctx), ctl_(ctl), live_(live), slots_(connections), tick_(ioc_) {
    std::memcpy(target_.data(), &cfg.target, cfg.target_len);
    target_.resize(cfg.target_len);
    for (auto& s : slots_) s.buffer = std::make_unique_for_overwrite<char[]>(read_buffer_size);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(cfg.timeout);
    stream_opts_.linger_timeout = ms;
    stream_opts_.linger_max = ms;
    stream_opts_.write_timeout = ms;
    stream_opts_.probe_final_state = false;
    // Nagle off from the second write on, as curl and browsers have it: the
    // request follows the handshake's last flight at once, not after the
    // server's ACK of it (which, when the server sends no session ticket,
    // waits for the delayed-ACK timer).
    stream_opts_.no_delay = true;
    tls_opts_.handshake_timeout = ms;
  }
  ~tls_worker() {
    for (auto& s : slots_) s.conn.reset();
  }
  tls_worker(const tls_worker&) = delete;
  tls_worker& operator=(const tls_worker&) = delete;

  load_result& result() noexcept { return res_; }

  void run() {
    const std::int64_t now = now_ns();
    next_scan_ = now + 100'000'000;
    for (std::uint32_t i = 0; i < slots_.size(); ++i) start_cycle(i, now);
    arm_tick();
    ioc_.run();
    res_.bytes_in += bytes_in_;
  }

 private:
  bool counted(const tls_slot& s) const noexcept { return detail::counted(ctl_, s.ticketed); }

  bool may_start(tls_slot& s) noexcept { return detail::may_start(ctl_, s.ticketed); }

  // The run's clock: phase changes, the end, and the deadline scan.
  void arm_tick() {
    tick_.expires_after(std::chrono::milliseconds(ctl_.get() == phase::warmup ? 10 : 20));
    tick_.async_wait([this](const error_code& ec) {
      if (!ec) on_tick();
    });
  }

  void on_tick() {
    const std::int64_t now = now_ns();
    const phase ph = ctl_.get();
    if (ph == phase::stopping) {
      if (stop_deadline_ == 0) stop_deadline_ = now + cfg_.grace.count();
      if (active_ == 0) return ioc_.stop();
      if (now >= stop_deadline_) {
        abort_all();
        return ioc_.stop();
      }
    } else if (ctl_.count_mode && ph == phase::measuring && active_ == 0 &&
               ctl_.tickets.load(std::memory_order_relaxed) <= 0) {
      return ioc_.stop();  // every ticket used and every counted cycle ended
    }
    if (now >= next_scan_) {
      scan_timeouts(now);
      next_scan_ = now + 100'000'000;
    }
    arm_tick();
  }

  void start_cycle(std::uint32_t i, std::int64_t now) {
    tls_slot& s = slots_[i];
    if (!may_start(s)) return;
    s.cycle_start = now;
    s.requests_on_conn = 0;
    open_connection(i, now);
  }

  void open_connection(std::uint32_t i, std::int64_t now) {
    tls_slot& s = slots_[i];
    s.parser.reset();
    s.awaiting_end = false;
    s.deadline = now + cfg_.timeout.count();
    auto c = std::make_shared<connection>(ioc_);
    error_code ec;
    c->socket.open(target_.protocol(), ec);
    if (ec) return connect_failed(i, ec.value());
    if (!cfg_.sources.empty()) {
      const int one = 1;
      ::setsockopt(c->socket.native_handle(), IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
      const sockaddr_storage& src = cfg_.sources[next_source_++ % cfg_.sources.size()];
      const socklen_t len = src.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
      if (::bind(c->socket.native_handle(), reinterpret_cast<const sockaddr*>(&src), len) != 0)
        return connect_failed(i, errno);
    }
    if (counted(s)) ++res_.connections_opened;
    s.conn = c;
    ++active_;
    c->socket.async_connect(target_, [this, i, c](const error_code& e) {
      if (slots_[i].conn != c) return;
      if (e) return fail(i, classify(e), false);
      handshake(i);
    });
  }

  // A connection that could not even be attempted: back off 1 ms, as the plain engine does.
  void connect_failed(std::uint32_t i, int err) {
    tls_slot& s = slots_[i];
    count_error(s, classify_errno(err));
    s.sleeping = true;
    if (!s.backoff) s.backoff = std::make_unique<asio::steady_timer>(ioc_);
    s.backoff->expires_after(std::chrono::milliseconds(1));
    s.backoff->async_wait([this, i](const error_code& ec) {
      tls_slot& sl = slots_[i];
      sl.sleeping = false;
      if (ec || !may_start(sl)) return;
      const std::int64_t t = now_ns();
      if (sl.requests_on_conn == 0) sl.cycle_start = t;
      open_connection(i, t);
    });
  }

  void handshake(std::uint32_t i) {
    auto c = slots_[i].conn;
    c->tls.emplace(std::move(c->socket), ctx_, stream_opts_, tls_opts_);
    if (!cfg_.tls_server_name.empty())
      ::SSL_set_tlsext_host_name(c->tls->native_handle(), cfg_.tls_server_name.c_str());
    c->tls->async_handshake(asio::ssl::stream_base::client, [this, i, c](const error_code& ec) {
      tls_slot& s = slots_[i];
      if (s.conn != c) return;
      if (ec) {
        if (counted(s)) ++res_.tls.handshake_failures[static_cast<std::size_t>(c->tls->tls().handshake)];
        return fail(i, error_class::tls_handshake, true);
      }
      if (counted(s)) {
        ++res_.tls.handshakes;
        if (::SSL_session_reused(c->tls->native_handle()) != 0) ++res_.tls.resumed;
        if (::SSL_version(c->tls->native_handle()) == TLS1_3_VERSION) {
          ++res_.tls.tls13;
        } else {
          ++res_.tls.tls12;
        }
      }
      send_request(i);
    });
  }

  void send_request(std::uint32_t i) {
    tls_slot& s = slots_[i];
    auto c = s.conn;
    s.request_start = now_ns();
    asio::async_write(*c->tls, asio::buffer(cfg_.request), [this, i, c](const error_code& ec, std::size_t) {
      if (slots_[i].conn != c) return;
      if (ec) return fail(i, classify(ec), true);
      read(i);
    });
  }

  void read(std::uint32_t i) {
    tls_slot& s = slots_[i];
    auto c = s.conn;
    c->tls->async_read_some(asio::buffer(s.buffer.get(), read_buffer_size),
                            [this, i, c](const error_code& ec, std::size_t n) {
                              if (slots_[i].conn != c) return;
                              on_read(i, ec, n);
                            });
  }

  void on_read(std::uint32_t i, const error_code& ec, std::size_t n) {
    tls_slot& s = slots_[i];
    const std::int64_t now = now_ns();
    if (n > 0) {
      bytes_in_ += n;
      if (s.awaiting_end) return fail(i, error_class::protocol, true);
      const auto r = s.parser.feed(s.buffer.get(), n);
      if (r.st == response_parser::status::error) return fail(i, error_class::protocol, true);
      if (r.st == response_parser::status::complete) {
        if (r.consumed != n) return fail(i, error_class::protocol, true);
        return response_complete(i, now);
      }
    }
    if (!ec) return read(i);
    if (s.awaiting_end) {
      if (ec == asio::error::eof) {
        if (counted(s)) ++res_.tls.peer_close_notify;
      } else if (ec == asio::ssl::error::stream_truncated) {
        if (counted(s)) ++res_.tls.peer_fin_no_close_notify;
      } else if (ec == asio::error::connection_reset) {
        if (counted(s)) ++res_.server_reset_after_response;
      } else {
        return fail(i, classify(ec), true);
      }
      return ended_by_server(i);
    }
    if (ec == asio::error::eof && s.parser.on_eof() == response_parser::status::complete) {
      // A body delimited by the end of the connection, ended by close_notify: whole and authenticated.
      if (counted(s)) ++res_.tls.peer_close_notify;
      const int code = s.parser.status_code();
      if (code < 200 || code > 299) return fail(i, error_class::bad_status, true);
      if (cfg_.run_mode == mode::keepalive) success(s, now - s.request_start);
      return close(i, cfg_.run_mode == mode::client_rst ? close_policy::abortive : close_policy::graceful,
                   cfg_.run_mode != mode::keepalive);
    }
    if (ec == asio::error::eof || ec == asio::ssl::error::stream_truncated) {
      if (ec == asio::ssl::error::stream_truncated && counted(s)) ++res_.tls.truncated;
      return fail(i, error_class::truncated, true);
    }
    fail(i, classify(ec), true);
  }

  void response_complete(std::uint32_t i, std::int64_t now) {
    tls_slot& s = slots_[i];
    auto c = s.conn;
    const int code = s.parser.status_code();
    if (code < 200 || code > 299) return fail(i, error_class::bad_status, true);
    c->tls->mark_message_complete();
    switch (cfg_.run_mode) {
      case mode::client_fin:
        return close(i, close_policy::graceful, true);
      case mode::client_rst:
        return close(i, close_policy::abortive, true);
      case mode::server_close:
        s.awaiting_end = true;
        return read(i);
      case mode::keepalive: {
        success(s, now - s.request_start);
        ++s.requests_on_conn;
        if (!s.parser.keep_alive()) {
          s.awaiting_end = true;  // the server closes (e.g. its keep-alive request limit)
          return read(i);
        }
        const bool enough = cfg_.requests_per_conn > 0 && s.requests_on_conn >= cfg_.requests_per_conn;
        if (enough || !may_start(s)) return close(i, close_policy::graceful, false);
        s.parser.reset();
        s.deadline = now + cfg_.timeout.count();
        return send_request(i);
      }
    }
  }

  // The server's close_notify, bare FIN or RST after a whole response: our FIN alone.
  void ended_by_server(std::uint32_t i) {
    auto c = slots_[i].conn;
    c->closing = true;
    c->tls->tcp().async_close(close_policy::graceful, [this, i, c](const close_report&) {
      if (slots_[i].conn != c) return;
      cycle_done(i, cfg_.run_mode == mode::server_close);
    });
  }

  // Our close of a cycle that succeeded; the cycle ends with the close.
  void close(std::uint32_t i, close_policy p, bool count_cycle) {
    auto c = slots_[i].conn;
    c->closing = true;
    c->tls->async_close(p, [this, i, c, count_cycle](const close_report& r) {
      if (slots_[i].conn != c) return;
      if (r.tls && r.tls->close_notify_sent && counted(slots_[i])) ++res_.tls.close_notify_sent;
      cycle_done(i, count_cycle);
    });
  }

  void cycle_done(std::uint32_t i, bool count_cycle) {
    tls_slot& s = slots_[i];
    const std::int64_t now = now_ns();
    release(i);
    if (count_cycle) success(s, now - s.cycle_start);
    start_cycle(i, now);
  }

  void release(std::uint32_t i) {
    if (!slots_[i].conn) return;
    slots_[i].conn.reset();
    --active_;
  }

  // Ends the cycle with an error; `abort` resets the connection, so that a
  // failed cycle leaves no TIME_WAIT. The close finishes on its own.
  void fail(std::uint32_t i, error_class e, bool abort) {
    tls_slot& s = slots_[i];
    count_error(s, e);
    if (auto c = s.conn) {
      release(i);
      end_quietly(c, abort);
    }
    start_cycle(i, now_ns());
  }

  static void end_quietly(const std::shared_ptr<connection>& c, bool abort) {
    if (!c->tls) {
      error_code ignored;
      c->socket.close(ignored);
      return;
    }
    c->closing = true;
    c->tls->async_close(abort ? close_policy::abortive : close_policy::fin_close, [c](const close_report&) {});
  }

  void scan_timeouts(std::int64_t now) {
    for (std::uint32_t i = 0; i < slots_.size(); ++i) {
      tls_slot& s = slots_[i];
      if (s.conn && !s.conn->closing && s.deadline <= now) fail(i, error_class::timeout, true);
    }
  }

  void abort_all() {
    for (std::uint32_t i = 0; i < slots_.size(); ++i) {
      if (auto c = slots_[i].conn) {
        release(i);
        end_quietly(c, true);
        ++res_.aborted_at_end;
      }
      if (slots_[i].backoff) slots_[i].backoff->cancel();
    }
  }

  // An error of the TCP or TLS layer, by class.
  error_class classify(const error_code& ec) {
    if (ec == asio::error::timed_out) return error_class::timeout;
    if (ec == asio::error::eof || ec == asio::ssl::error::stream_truncated) return error_class::truncated;
    if (ec.category() == asio::error::get_ssl_category()) {
      const int reason = ERR_GET_REASON(static_cast<unsigned long>(ec.value()));
      // Alerts the peer sent arrive as reason SSL_AD_REASON_OFFSET + the alert.
      if (reason >= SSL_AD_REASON_OFFSET && reason < SSL_AD_REASON_OFFSET + 256) {
        ++pending_tls_.alerts;
      } else {
        ++pending_tls_.ssl_errors;
      }
      return error_class::tls;
    }
    if (ec.category() == asio::error::get_system_category()) return classify_errno(ec.value());
    return error_class::other;
  }

  void success(tls_slot& s, std::int64_t latency_ns) {
    if (!counted(s)) return;
    res_.latency.record(static_cast<std::uint64_t>(latency_ns > 0 ? latency_ns : 0));
    ++res_.completed;
    live_.completed.fetch_add(1, std::memory_order_relaxed);
  }

  void count_error(tls_slot& s, error_class e) {
    const tls_summary pending = std::exchange(pending_tls_, {});
    if (!counted(s)) return;
    res_.tls.alerts += pending.alerts;
    res_.tls.ssl_errors += pending.ssl_errors;
    ++res_.errors[static_cast<std::size_t>(e)];
    live_.errors.fetch_add(1, std::memory_order_relaxed);
  }

  asio::io_context ioc_{1};
  const load_config& cfg_;
  asio::ssl::context& ctx_;
  control& ctl_;
  live_counters& live_;
  std::vector<tls_slot> slots_;
  asio::steady_timer tick_;
  tcp::endpoint target_;
  stream_options stream_opts_;
  tls_options tls_opts_;
  tls_summary pending_tls_;  // the TLS detail of the error being classified, counted with it
  std::int64_t next_scan_ = 0;
  std::int64_t stop_deadline_ = 0;
  std::size_t active_ = 0;  // slots with a connection
  std::size_t next_source_ = 0;
  std::uint64_t bytes_in_ = 0;
  load_result res_;
};

}  // namespace

asio::ssl::context make_bench_client_context(tls_version_choice versions) {
  tls_context_options o;
  o.versions = versions == tls_version_choice::tls12   ? tls_versions::tls12_only
               : versions == tls_version_choice::tls13 ? tls_versions::tls13_only
                                                       : tls_versions::tls12_and_13;
  asio::ssl::context ctx = make_client_context({}, o);
  ::SSL_CTX_set_session_cache_mode(ctx.native_handle(), SSL_SESS_CACHE_OFF);
  ::SSL_CTX_set_options(ctx.native_handle(), SSL_OP_NO_TICKET);
  return ctx;
}

load_result run_tls_load(const load_config& cfg, const progress_fn& progress) {
  asio::ssl::context ctx =
      make_bench_client_context(cfg.tls_versions);  // SSL_CTX is shared safely by the threads' SSL objects
  return detail::coordinate(cfg, progress, [&](control& ctl, live_counters& live, unsigned share) {
    return std::make_unique<tls_worker>(cfg, ctx, ctl, live, share);
  });
}

}  // namespace closewise::bench
