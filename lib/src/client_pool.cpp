// closewise::client_pool: idle connections watched for the peer's FIN, a
// connection limit per target with a FIFO of waiters, close reports.
//
// Everything here runs on the pool's one executor, so the state is plain
// data. An idle connection has one wait for input outstanding
// (basic_stream::async_wait_readable, under the stream's idle timeout set to
// the connection's idle limit). Taking it cancels that wait and waits for
// its completion before anything else is started on the stream: a wait that
// completed first (the FIN arrived as the connection was taken) says the
// connection is gone, and a non-blocking read then checks the socket once
// more (would_block: healthy).
//
// A TLS connection ("tls:" targets) waits idle with a one-byte read through
// TLS instead (basic_tls_stream::async_read_some, which itself waits for
// readability holding no buffer): OpenSSL consumes the records that carry no
// application data (TLS 1.3 NewSessionTicket) and goes on waiting, and the
// read completes only for the server's close_notify (eof), a FIN without it
// (stream_truncated), a RST, application data, the idle limit or a
// cancellation. Its check at reuse cannot read from the socket (that would
// take records from under TLS): it asks OpenSSL for held input and polls.

#include "closewise/client_pool.hpp"

#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>
#include <poll.h>

#include <algorithm>
#include <array>
#include <deque>
#include <iterator>
#include <map>
#include <string_view>

#include <fmt/format.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

namespace closewise {

namespace {
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
using clock = std::chrono::steady_clock;
constexpr std::string_view tls_prefix = "tls:";
}  // namespace

namespace internal {

struct pooled {
  explicit pooled(const asio::any_io_executor& ex) : handoff(ex) { handoff.expires_at(clock::time_point::max()); }
  // A TLS connection's context, declared first so that it outlives the stream.
  std::shared_ptr<asio::ssl::context> ctx;
  std::optional<stream> s;      // a plain connection
  std::optional<tls_stream> t;  // a TLS connection
  char idle_byte = 0;           // the TLS idle read's buffer
  std::string target;
  std::uint64_t uses = 0;
  bool reused = false;
  bool watching = false;  // the idle wait is outstanding
  bool taking = false;    // an acquire cancelled the wait and waits for its completion
  bool idle = false;
  error_code watch_ec;  // how the idle wait completed (for the taker)
  asio::cancellation_signal watch_cancel;
  asio::steady_timer handoff;  // cancelled when the wait completes while `taking`
  std::optional<close_report> report;

  bool live() const noexcept { return s || t; }
  // The TCP (or Unix) stream: the connection's own, or the one under TLS.
  stream& tcp() noexcept { return t ? t->tcp() : *s; }
  // Ends the connection with `policy` (through TLS: close_notify as the policy says).
  template <class Token>
  auto async_close(close_policy policy, Token&& token) {
    if (t) return t->async_close(policy, std::forward<Token>(token));
    return s->async_close(policy, std::forward<Token>(token));
  }
};

struct waiter {
  explicit waiter(const asio::any_io_executor& ex) : timer(ex) {}
  asio::steady_timer timer;
  bool done = false;         // woken with a connection or a slot
  bool may_connect = false;  // woken with a slot: connect
  std::shared_ptr<pooled> handed;
};

struct target_state {
  std::deque<std::shared_ptr<pooled>> idle;  // back: the most recently used
  std::deque<std::shared_ptr<waiter>> waiters;
  std::size_t total = 0;  // slots: connecting, leased or idle
  std::optional<std::chrono::milliseconds> hint;
  // The session the next new TLS connection offers (taken by it: used once).
  std::shared_ptr<SSL_SESSION> tls_session;
};

struct counters {
  std::atomic<std::uint64_t> connects{0}, connect_failures{0}, reuses{0}, fins_seen_idle{0}, resets_seen_idle{0},
      bytes_seen_idle{0}, idle_expired{0}, dropped_at_reuse{0}, retries{0}, wait_timeouts{0}, overloaded{0}, closed{0},
      failed_connect{0}, failed_pool{0}, failed_timeout{0}, failed_stale{0}, failed_connection{0}, failed_protocol{0},
      tls_resumed{0};
};

void bump(std::atomic<std::uint64_t>& c) noexcept { c.fetch_add(1, std::memory_order_relaxed); }

struct pool_state : std::enable_shared_from_this<pool_state> {
  pool_state(asio::any_io_executor e, pool_options o) : ex(std::move(e)), opts(std::move(o)) {}
  asio::any_io_executor ex;
  pool_options opts;
  std::map<std::string, target_state, std::less<>> targets;
  pool_close_observer observer;
  counters n;
  bool closed = false;
  std::shared_ptr<asio::ssl::context> default_tls;  // made on first use when opts.tls.context is null

  // The context of the TLS connections.
  std::shared_ptr<asio::ssl::context> tls_context() {
    if (opts.tls.context) return opts.tls.context;
    if (!default_tls) {
      auto ctx = std::make_shared<asio::ssl::context>(make_client_context());
      error_code ec;
      ctx->set_default_verify_paths(ec);  // without a trust store, every verification fails: safe
      ctx->set_verify_mode(asio::ssl::verify_peer);
      default_tls = std::move(ctx);
    }
    return default_tls;
  }

  std::chrono::milliseconds idle_limit(const target_state& t) const {
    auto limit = opts.idle_timeout;
    if (t.hint) {
      const auto h = *t.hint > opts.hint_margin ? *t.hint - opts.hint_margin : *t.hint / 2;
      limit = std::min(limit, h);
    }
    return std::max(limit, std::chrono::milliseconds(1));
  }

  // A slot was freed: the first waiter takes it and connects.
  void grant_slot(target_state& t) {
    if (t.waiters.empty()) return;
    auto w = std::move(t.waiters.front());
    t.waiters.pop_front();
    w->done = true;
    w->may_connect = true;
    ++t.total;
    w->timer.cancel();
  }

  // A TLS connection given back or closed by its user leaves its session
  // with its target, for the next new connection (pool_tls_options::resume_sessions).
  void keep_session(pooled& c) {
    if (!c.t || !opts.tls.resume_sessions) return;
    // The latest session: OpenSSL replaces it with each TLS 1.3 ticket it reads.
    // Kept already (a kept-alive connection given back again): nothing to do.
    SSL_SESSION* session = ::SSL_get_session(c.t->native_handle());
    auto& kept = targets[c.target].tls_session;
    if (!session || session == kept.get() || ::SSL_SESSION_is_resumable(session) != 1) return;
    ::SSL_SESSION_up_ref(session);
    kept.reset(session, ::SSL_SESSION_free);
  }

  // Ends `c` with `policy`; its slot goes to the first waiter unless `keep_slot`.
  void retire(const std::shared_ptr<pooled>& c, close_policy policy, bool keep_slot = false) {
    auto& t = targets[c->target];
    if (!keep_slot) {
      --t.total;
      grant_slot(t);
    }
    if (!c->live()) return;
    // The handler holds the connection until its close completed.
    c->async_close(policy, [c](const close_report&) {});
  }

  void start_watch(const std::shared_ptr<pooled>& c) {
    c->watching = true;
    c->taking = false;
    if (c->t) {
      c->t->async_read_some(
          asio::buffer(&c->idle_byte, 1),
          asio::bind_cancellation_slot(c->watch_cancel.slot(),
                                       [self = shared_from_this(), c](const error_code& ec, std::size_t bytes) {
                                         self->on_watch(c, ec, bytes);
                                       }));
      return;
    }
    c->s->async_wait_readable(asio::bind_cancellation_slot(
        c->watch_cancel.slot(), [self = shared_from_this(), c](const error_code& ec) { self->on_watch(c, ec, 0); }));
  }

  // What a TLS connection's idle read completed with, counted.
  void count_tls_idle_end(const error_code& ec, std::size_t bytes) {
    if (bytes > 0) {
      bump(n.bytes_seen_idle);
    } else if (ec == asio::error::timed_out) {
      bump(n.idle_expired);
    } else if (ec == asio::error::eof || ec == asio::ssl::error::stream_truncated) {
      bump(n.fins_seen_idle);  // close_notify (its FIN follows), or a FIN without it
    } else if (ec == asio::error::connection_reset) {
      bump(n.resets_seen_idle);
    }
  }

  // The idle wait completed: the peer's FIN, a RST, bytes, the idle limit, or
  // a cancellation (an acquire is taking the connection, or the pool ends).
  void on_watch(const std::shared_ptr<pooled>& c, const error_code& ec, std::size_t bytes) {
    c->watching = false;
    if (c->taking) {
      // Application data read by a TLS wait that completed as it was
      // cancelled: not a healthy connection.
      c->watch_ec = bytes > 0 ? error_code(asio::error::message_size) : ec;
      c->handoff.cancel();
      return;
    }
    auto& t = targets[c->target];
    const auto it = std::find(t.idle.begin(), t.idle.end(), c);
    if (it == t.idle.end()) return;  // not idle any more (cannot happen: taking covers it)
    t.idle.erase(it);
    c->idle = false;
    if (c->t) {
      count_tls_idle_end(ec, bytes);
    } else if (ec == asio::error::timed_out) {
      bump(n.idle_expired);
    } else if (!ec) {
      char byte = 0;
      error_code rec;
      c->s->read_some_now(asio::buffer(&byte, 1), rec);
      if (rec == asio::error::eof) {
        bump(n.fins_seen_idle);
      } else if (rec == asio::error::connection_reset) {
        bump(n.resets_seen_idle);
      } else if (!rec) {
        bump(n.bytes_seen_idle);
      }
    } else if (ec == asio::error::connection_reset) {
      bump(n.resets_seen_idle);
    }
    // A RST already finished the stream; its close completes at once with the report.
    retire(c, opts.policy);
  }

  // Whether a connection just taken from idle can carry a request: its wait
  // was cancelled (not completed by input), and the socket has nothing to read.
  bool healthy_at_reuse(pooled& c) {
    if (c.watch_ec != asio::error::operation_aborted) return false;
    if (c.tcp().state().closing() || c.tcp().state().finished()) return false;
    if (c.t) {
      // Nothing held in OpenSSL (a partial record, decrypted bytes), and
      // nothing (bytes, FIN, error) waiting on the socket.
      if (::SSL_has_pending(c.t->native_handle()) == 1) return false;
      pollfd p{c.tcp().lowest_layer().native_handle(), POLLIN | POLLRDHUP, 0};
      return ::poll(&p, 1, 0) == 0;
    }
    char byte = 0;
    error_code ec;
    c.s->read_some_now(asio::buffer(&byte, 1), ec);
    return ec == asio::error::would_block;
  }

  pool_lease lease(std::shared_ptr<pooled> c) { return pool_lease(shared_from_this(), std::move(c)); }

  void record(const std::string& target, const close_report& r) {
    bump(n.closed);
    if (observer) observer(target, r);
  }
};

}  // namespace internal

namespace {

// Every counter of pool_stats: its name and the atomic the pool counts it
// in, in declaration order. stats(), describe() and operator+= walk this one
// list, and the static_assert below fails the build when a counter is added
// to the struct but not here.
struct pool_counter {
  std::string_view name;
  std::uint64_t pool_stats::*value;
  std::atomic<std::uint64_t> internal::counters::*count;
};
constexpr std::array<pool_counter, 19> pool_counters{{
    {"connects", &pool_stats::connects, &internal::counters::connects},
    {"connect_failures", &pool_stats::connect_failures, &internal::counters::connect_failures},
    {"reuses", &pool_stats::reuses, &internal::counters::reuses},
    {"fins_seen_idle", &pool_stats::fins_seen_idle, &internal::counters::fins_seen_idle},
    {"resets_seen_idle", &pool_stats::resets_seen_idle, &internal::counters::resets_seen_idle},
    {"bytes_seen_idle", &pool_stats::bytes_seen_idle, &internal::counters::bytes_seen_idle},
    {"idle_expired", &pool_stats::idle_expired, &internal::counters::idle_expired},
    {"dropped_at_reuse", &pool_stats::dropped_at_reuse, &internal::counters::dropped_at_reuse},
    {"retries", &pool_stats::retries, &internal::counters::retries},
    {"wait_timeouts", &pool_stats::wait_timeouts, &internal::counters::wait_timeouts},
    {"overloaded", &pool_stats::overloaded, &internal::counters::overloaded},
    {"closed", &pool_stats::closed, &internal::counters::closed},
    {"failed_connect", &pool_stats::failed_connect, &internal::counters::failed_connect},
    {"failed_pool", &pool_stats::failed_pool, &internal::counters::failed_pool},
    {"failed_timeout", &pool_stats::failed_timeout, &internal::counters::failed_timeout},
    {"failed_stale_reuse_not_retried", &pool_stats::failed_stale_reuse_not_retried, &internal::counters::failed_stale},
    {"failed_connection", &pool_stats::failed_connection, &internal::counters::failed_connection},
    {"failed_protocol", &pool_stats::failed_protocol, &internal::counters::failed_protocol},
    {"tls_resumed", &pool_stats::tls_resumed, &internal::counters::tls_resumed},
}};
static_assert(sizeof(pool_stats) == pool_counters.size() * sizeof(std::uint64_t),
              "a pool_stats counter is missing from pool_counters");
static_assert(sizeof(internal::counters) == pool_counters.size() * sizeof(std::atomic<std::uint64_t>),
              "a pool counter is missing from pool_counters");

}  // namespace

namespace {

using internal::pool_state;
using internal::pooled;
using internal::waiter;

stream_options leased_options(stream_options o) {
  // The protocol layer bounds its exchange with its own deadline.
  o.idle_timeout = std::chrono::milliseconds(0);
  o.read_timeout = std::chrono::milliseconds(0);
  return o;
}

std::chrono::milliseconds until(clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
  return std::max(left, std::chrono::milliseconds(0));
}

// The name a TLS target's server goes by: pool_tls_options::server_names,
// else the target's host ("localhost" for a Unix socket).
std::string tls_server_name(const pool_options& o, const std::string& target) {
  if (const auto it = o.tls.server_names.find(target); it != o.tls.server_names.end()) return it->second;
  std::string_view rest(target);
  rest.remove_prefix(tls_prefix.size());
  if (rest.starts_with("unix:")) return "localhost";
  std::string host(rest.substr(0, rest.rfind(':')));
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return host;
}

// SNI (for a host name) and the name the certificate must carry.
void set_server_name(SSL* ssl, const std::string& name) {
  error_code ec;
  static_cast<void>(asio::ip::make_address(name, ec));
  if (!ec) {
    ::X509_VERIFY_PARAM_set1_ip_asc(::SSL_get0_param(ssl), name.c_str());
    return;
  }
  ::SSL_set_tlsext_host_name(ssl, name.c_str());
  ::SSL_set1_host(ssl, name.c_str());
}

// Opens a connection in a slot already counted in `total`; for a TLS target,
// shakes hands within what is left of the connect timeout.
asio::awaitable<std::pair<error_code, pool_lease>> open_connection(std::shared_ptr<pool_state> st, std::string target,
                                                                   clock::time_point deadline,
                                                                   std::chrono::milliseconds connect_timeout) {
  const auto limit = connect_timeout.count() > 0 ? connect_timeout : st->opts.connect_timeout;
  const auto timeout = std::min(limit, until(deadline));
  const auto connect_deadline = clock::now() + timeout;
  const bool tls = target.starts_with(tls_prefix);
  // A named argument: g++ 12 destroys a conditional temporary given to a
  // coroutine twice.
  std::string endpoint = tls ? target.substr(tls_prefix.size()) : target;
  auto [ec, s] = co_await connect(st->ex, std::move(endpoint), timeout, leased_options(st->opts.stream));
  auto c = std::make_shared<pooled>(st->ex);
  c->target = target;
  if (!ec && !st->closed) {
    // The observer runs inside the completion that finished the connection;
    // weak: a connection outliving its pool reports to nobody.
    std::weak_ptr<pool_state> weak = st;
    std::weak_ptr<pooled> weak_c = c;
    auto observer = [weak, weak_c, target](const close_report& r) {
      if (auto conn = weak_c.lock()) conn->report = r;
      if (auto p = weak.lock()) p->record(target, r);
    };
    if (!tls) {
      c->s.emplace(std::move(*s));
      c->s->on_close(std::move(observer));
    } else {
      tls_options to = st->opts.tls.stream;
      to.handshake_timeout = std::max(std::chrono::milliseconds(1), until(connect_deadline));
      try {
        c->ctx = st->tls_context();
        c->t.emplace(std::move(*s), *c->ctx, to);
      } catch (const boost::system::system_error& e) {
        ec = e.code();
      }
      if (!ec) {
        // A failed handshake ends the connection too, with a report.
        c->t->on_close(std::move(observer));
        SSL* ssl = c->t->native_handle();
        set_server_name(ssl, tls_server_name(st->opts, target));
        // Taken, not copied: a ticket is offered once (pool_tls_options::resume_sessions).
        if (const auto offered = std::move(st->targets[target].tls_session); offered && st->opts.tls.resume_sessions) {
          ::SSL_set_session(ssl, offered.get());  // OpenSSL keeps its own reference
        }
        auto [hec] = co_await c->t->async_handshake(asio::ssl::stream_base::client, use_tuple);
        ec = hec;
        if (!ec && ::SSL_session_reused(c->t->native_handle()) == 1) internal::bump(st->n.tls_resumed);
        // A server silent past the deadline gets a RST, not a drain that waits for it.
        if (ec || st->closed) {
          const auto policy = ec == asio::error::timed_out ? close_policy::abortive
                              : ec                         ? close_policy::graceful
                                                           : st->opts.policy;
          c->async_close(policy, [c](const close_report&) {});
        }
      }
    }
  }
  auto& t = st->targets[target];
  if (ec || st->closed) {
    internal::bump(st->n.connect_failures);
    --t.total;
    st->grant_slot(t);
    if (!ec) ec = errc::pool_closed;
    co_return std::pair{ec, pool_lease{}};
  }
  internal::bump(st->n.connects);
  co_return std::pair{error_code{}, st->lease(std::move(c))};
}

asio::awaitable<std::pair<error_code, pool_lease>> acquire_on(std::shared_ptr<pool_state> st, std::string target,
                                                              clock::time_point deadline, bool fresh,
                                                              std::chrono::milliseconds connect_timeout) {
  for (;;) {
    if (st->closed) co_return std::pair{error_code(errc::pool_closed), pool_lease{}};
    auto& t = st->targets[target];
    std::shared_ptr<pooled> c;
    bool may_connect = false;
    if (t.waiters.empty()) {
      if (!fresh && !t.idle.empty()) {
        c = std::move(t.idle.back());
        t.idle.pop_back();
      } else if (t.total < st->opts.max_connections_per_target) {
        ++t.total;
        may_connect = true;
      } else if (fresh && !t.idle.empty()) {
        // Room for a fresh connection: the least recently used idle one goes.
        // Its slot is ours; the close takes over its idle wait, whose
        // handler then finds it `taking` and leaves it alone.
        auto old = std::move(t.idle.front());
        t.idle.pop_front();
        old->idle = false;
        old->taking = true;
        st->retire(old, st->opts.policy, true);
        may_connect = true;
      }
    }
    if (!c && !may_connect) {
      if (t.waiters.size() >= st->opts.max_waiters) {
        internal::bump(st->n.overloaded);
        co_return std::pair{error_code(errc::pool_overloaded), pool_lease{}};
      }
      auto w = std::make_shared<waiter>(st->ex);
      w->timer.expires_at(std::min(deadline, clock::now() + st->opts.wait_timeout));
      t.waiters.push_back(w);
      co_await w->timer.async_wait(use_tuple);
      auto& tw = st->targets[target];
      if (!w->done) {
        tw.waiters.erase(std::remove(tw.waiters.begin(), tw.waiters.end(), w), tw.waiters.end());
        if (st->closed) co_return std::pair{error_code(errc::pool_closed), pool_lease{}};
        internal::bump(st->n.wait_timeouts);
        co_return std::pair{error_code(errc::pool_wait_timeout), pool_lease{}};
      }
      c = std::move(w->handed);
      may_connect = w->may_connect;
      if (c && fresh) {
        st->retire(c, st->opts.policy, true);  // its slot is ours to connect in
        c.reset();
        may_connect = true;
      }
    }
    if (may_connect) co_return co_await open_connection(st, target, deadline, connect_timeout);
    c->idle = false;
    if (c->watching) {
      c->taking = true;
      c->watch_cancel.emit(asio::cancellation_type::terminal);
      co_await c->handoff.async_wait(use_tuple);
      c->handoff.expires_at(clock::time_point::max());
      c->taking = false;
    } else {
      c->watch_ec = asio::error::operation_aborted;  // handed over directly, never watched
    }
    if (!st->healthy_at_reuse(*c)) {
      internal::bump(st->n.dropped_at_reuse);
      st->retire(c, st->opts.policy);
      continue;
    }
    internal::bump(st->n.reuses);
    c->reused = true;
    c->tcp().set_options(leased_options(st->opts.stream));
    co_return std::pair{error_code{}, st->lease(std::move(c))};
  }
}

asio::awaitable<close_report> close_on(std::shared_ptr<pool_state> st, std::shared_ptr<pooled> c, close_policy policy) {
  auto& t = st->targets[c->target];
  --t.total;
  st->grant_slot(t);
  st->keep_session(*c);
  co_return co_await c->async_close(policy, asio::use_awaitable);
}

}  // namespace

// ---- pool_lease ------------------------------------------------------------

pool_lease& pool_lease::operator=(pool_lease&& other) noexcept {
  if (this != &other) {
    pool_lease dropped(std::move(*this));
    pool_ = std::move(other.pool_);
    conn_ = std::move(other.conn_);
  }
  return *this;
}

pool_lease::~pool_lease() {
  if (conn_ && pool_) pool_->retire(conn_, close_policy::abortive);
}

stream& pool_lease::io() noexcept { return conn_->tcp(); }
tls_stream* pool_lease::tls() noexcept { return conn_->t ? &*conn_->t : nullptr; }
bool pool_lease::reused() const noexcept { return conn_->reused; }
std::uint64_t pool_lease::uses() const noexcept { return conn_->uses; }
const std::string& pool_lease::target() const noexcept { return conn_->target; }
const std::optional<close_report>& pool_lease::report() const noexcept { return conn_->report; }

// ---- client_pool -----------------------------------------------------------

client_pool::client_pool(asio::any_io_executor ex, pool_options opts)
    : st_(std::make_shared<pool_state>(std::move(ex), std::move(opts))) {}

client_pool::~client_pool() {
  st_->closed = true;
  for (auto& [name, t] : st_->targets) {
    for (auto& w : t.waiters) w->timer.cancel();
    t.waiters.clear();
    // Each idle wait completes with operation_aborted and its handler closes the connection.
    for (auto& c : t.idle) {
      if (c->watching) c->watch_cancel.emit(asio::cancellation_type::terminal);
    }
  }
}

asio::awaitable<std::pair<error_code, pool_lease>> client_pool::acquire(std::string target,
                                                                        std::chrono::steady_clock::time_point deadline,
                                                                        bool fresh,
                                                                        std::chrono::milliseconds connect_timeout) {
  return acquire_on(st_, std::move(target), deadline, fresh, connect_timeout);
}

void client_pool::release(pool_lease lease, std::optional<std::chrono::milliseconds> keep_alive_hint) {
  auto c = std::move(lease.conn_);
  lease.pool_.reset();
  if (!c) return;
  auto& t = st_->targets[c->target];
  if (keep_alive_hint) t.hint = *keep_alive_hint;
  stream& s = c->tcp();
  const bool clean = !st_->closed && !s.state().closing() && !s.state().finished() && s.read_ahead_left() == 0 &&
                     (!c->t || ::SSL_has_pending(c->t->native_handle()) == 0);
  if (!clean) return st_->retire(c, st_->opts.policy);
  ++c->uses;
  st_->keep_session(*c);
  // The exchange is over: the next read waits for a new one (idle clock).
  s.mark_exchange_complete();
  if (!t.waiters.empty()) {
    auto w = std::move(t.waiters.front());
    t.waiters.pop_front();
    w->done = true;
    w->handed = std::move(c);
    w->timer.cancel();
    return;
  }
  auto o = st_->opts.stream;
  o.idle_timeout = st_->idle_limit(t);
  o.read_timeout = o.idle_timeout;
  s.set_options(o);
  c->idle = true;
  t.idle.push_back(c);
  st_->start_watch(c);
}

asio::awaitable<close_report> client_pool::close(pool_lease lease, close_policy policy) {
  auto c = std::move(lease.conn_);
  lease.pool_.reset();
  return close_on(st_, std::move(c), policy);
}

void client_pool::on_close(pool_close_observer f) { st_->observer = std::move(f); }

pool_stats client_pool::stats() const {
  pool_stats s;
  for (const auto& c : pool_counters) s.*c.value = (st_->n.*c.count).load(std::memory_order_relaxed);
  return s;
}

std::size_t client_pool::idle(const std::string& target) const {
  const auto it = st_->targets.find(target);
  return it == st_->targets.end() ? 0 : it->second.idle.size();
}

std::size_t client_pool::open(const std::string& target) const {
  const auto it = st_->targets.find(target);
  return it == st_->targets.end() ? 0 : it->second.total;
}

const pool_options& client_pool::options() const noexcept { return st_->opts; }
asio::any_io_executor client_pool::get_executor() const noexcept { return st_->ex; }

void client_pool::record_retry() noexcept { internal::bump(st_->n.retries); }

void client_pool::record_failure(failure_class c) noexcept {
  auto& n = st_->n;
  switch (c) {
    case failure_class::connect:
      return internal::bump(n.failed_connect);
    case failure_class::pool:
      return internal::bump(n.failed_pool);
    case failure_class::timeout:
      return internal::bump(n.failed_timeout);
    case failure_class::stale_reuse_not_retried:
      return internal::bump(n.failed_stale);
    case failure_class::connection:
      return internal::bump(n.failed_connection);
    case failure_class::protocol:
      return internal::bump(n.failed_protocol);
  }
}

pool_stats& pool_stats::operator+=(const pool_stats& other) noexcept {
  for (const auto& c : pool_counters) this->*c.value += other.*c.value;
  return *this;
}

std::string pool_stats::describe() const {
  std::string out;
  for (const auto& c : pool_counters) {
    fmt::format_to(std::back_inserter(out), "{}{}={}", out.empty() ? "" : " ", c.name, this->*c.value);
  }
  return out;
}

}  // namespace closewise
