#include "lab/experiments.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <utility>

#include <fmt/format.h>
#include <boost/asio/buffer.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/socket_base.hpp>
#include <boost/asio/write.hpp>

#include "closewise/core.hpp"
#include "closewise/probe.hpp"
#include "closewise/report.hpp"
#include "closewise/sock_diag.hpp"
#include "closewise/stream.hpp"

namespace closewise::lab {

std::string_view to_string(party p) noexcept { return p == party::ours ? "ours" : "peer"; }

const observation* row::find(std::string_view key) const noexcept {
  for (const auto* list : {&observed, &states}) {
    for (const auto& o : *list) {
      if (o.key == key) return &o;
    }
  }
  return nullptr;
}

std::string row::value(std::string_view key) const {
  const observation* o = find(key);
  return o ? o->value : std::string{};
}

std::optional<std::uint64_t> row::count(std::string_view key) const noexcept {
  const observation* o = find(key);
  if (!o) return std::nullopt;
  // Byte counts are recorded as "<n> B" (or a bare "<n>" for a raw recv()).
  std::uint64_t n = 0;
  const char* end = o->value.data() + o->value.size();
  const auto [p, ec] = std::from_chars(o->value.data(), end, n);
  if (ec != std::errc{} || p == o->value.data()) return std::nullopt;
  const std::string_view rest(p, static_cast<std::size_t>(end - p));
  if (!rest.empty() && rest != " B") return std::nullopt;
  return n;
}

std::string errno_name(int error) {
  if (const char* name = ::strerrorname_np(error)) return name;
  return fmt::format("errno {}", error);
}

namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using tcp_stream = basic_stream<tcp::socket>;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

// ---------------------------------------------------------------------------
// What each row is about (the text of the table in docs/design.md, 'Kernel
// experiments').

struct row_text {
  std::string_view name;
  std::string_view done;
  std::string_view expected;
};

constexpr std::array<row_text, row_count> texts{{
    {"socketpair, reader closed", "socketpair(AF_UNIX); close the reader end; send() one byte",
     "EPIPE at once (kernel knows the peer)"},
    {"pipe, reader closed", "pipe(); close the read end; write() one byte with SIGPIPE ignored", "EPIPE at once"},
    {"TCP peer close(), we send twice",
     "peer close(); we send through the stream; wait for the peer's RST (our state CLOSE); send again",
     "1st send succeeds (we are CLOSE_WAIT, peer FIN_WAIT2); peer answers RST; 2nd send EPIPE; socket state CLOSE"},
    {"TCP peer shutdown(SHUT_WR)",
     "peer sends 8 B then shutdown(SHUT_WR); we read through the stream to EOF, then send 9 B; peer reads",
     "read returns 0 (= peer FIN); send succeeds and the peer still receives it; states stay CLOSE_WAIT / "
     "FIN_WAIT2"},
    {"we shutdown(SHUT_WR), then send", "stream.async_shutdown_write(); then a write through the stream",
     "EPIPE at once"},
    {"peer SO_LINGER {1,0} + close",
     "two connections, peer RSTs both; (a) we send first, then send again; (b) we read first, then send; "
     "then list both connections' sockets",
     "RST at once; our send gets ECONNRESET (not EPIPE); no TIME_WAIT anywhere"},
    {"close with unread input",
     "server stream reads a request; client sends another after that; server writes 4 MiB, then closes: "
     "(a) plain close (stream destroyed), (b) fin_close = shutdown(SHUT_WR) + close, (c) graceful; "
     "the client reads only after the close",
     "kernel sends RST instead of FIN; unsent response bytes are discarded; client gets a truncated body and "
     "ECONNRESET. shutdown(SHUT_WR) before close() does not help; draining the receive side first (lingering "
     "close) does"},
    {"peer RST after data, unread",
     "peer sends 1000 B, we do not read; peer SO_LINGER {1,0} + close; then (a) we read through the stream "
     "3 times, (b) the same on a raw socket",
     "Linux still delivers the queued bytes, then ECONNRESET once, then reads return 0. A later 0 after a reset "
     "is not a FIN"},
}};

// ---------------------------------------------------------------------------
// Recording what happened, and every deviation from what should have.

class recorder {
 public:
  explicit recorder(row& r) noexcept : r_(r) {}

  void saw(party by, std::string key, std::string label, std::string value) {
    r_.observed.push_back({by, std::move(key), std::move(label), std::move(value)});
  }
  void state(party by, std::string key, std::string label, std::string value) {
    r_.states.push_back({by, std::move(key), std::move(label), std::move(value)});
  }

  // Records a deviation when `ok` is false; returns `ok` so that a step the
  // rest of the experiment depends on can end it early.
  bool expect(bool ok, std::string_view what) {
    if (ok) return true;
    if (!r_.mismatch.empty()) r_.mismatch += "; ";
    r_.mismatch += what;
    return false;
  }
  std::string value(std::string_view key) const { return r_.value(key); }

  // Checks the value recorded under `key`.
  bool expect_value(std::string_view key, std::string_view want) {
    const observation* o = r_.find(key);
    const std::string got = o ? o->value : std::string{"(nothing recorded)"};
    const std::string_view label = o ? std::string_view{o->label} : key;
    return expect(got == want, fmt::format("{}: got {}, expected {}", label, got, want));
  }

 private:
  row& r_;
};

std::string bytes_text(std::uint64_t n) { return fmt::format("{} B", n); }

// "EOF" for Asio's end of stream, the errno name for system errors.
std::string error_name(const error_code& ec) {
  if (!ec) return "ok";
  if (ec == asio::error::eof) return "EOF";
  if (ec.category() == boost::system::system_category()) return errno_name(ec.value());
  return ec.message();
}

// A raw syscall result: bytes, 0, or -errno.
std::string raw_result(long r) {
  if (r < 0) return errno_name(static_cast<int>(-r));
  if (r == 0) return "0";
  return bytes_text(static_cast<std::uint64_t>(r));
}

// ---------------------------------------------------------------------------
// Raw descriptors: the misbehaving peer, and our own end in rows 1, 2 and 8b.

class raw_fd {
 public:
  raw_fd() = default;
  explicit raw_fd(int fd) noexcept : fd_(fd) {}
  raw_fd(raw_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  raw_fd& operator=(raw_fd&& o) noexcept {
    std::swap(fd_, o.fd_);
    return *this;
  }
  raw_fd(const raw_fd&) = delete;
  raw_fd& operator=(const raw_fd&) = delete;
  ~raw_fd() { close(); }

  int get() const noexcept { return fd_; }
  void close() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // SO_LINGER {1,0} + close: the other end gets RST, nobody keeps TIME_WAIT.
  void reset() noexcept {
    if (fd_ < 0) return;
    const linger l{1, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    close();
  }

 private:
  int fd_ = -1;
};

long send_raw(int fd, const void* data, std::size_t n, int flags = MSG_NOSIGNAL) noexcept {
  const ssize_t r = ::send(fd, data, n, flags);
  return r < 0 ? -errno : static_cast<long>(r);
}

long send_all_raw(int fd, std::string_view data) noexcept {
  std::size_t done = 0;
  while (done < data.size()) {
    const long r = send_raw(fd, data.data() + done, data.size() - done);
    if (r == -EINTR) continue;
    if (r < 0) return r;
    done += static_cast<std::size_t>(r);
  }
  return static_cast<long>(done);
}

// One recv() that waits at most `limit` for the descriptor to become readable.
long recv_within(int fd, void* data, std::size_t n, std::chrono::milliseconds limit) noexcept {
  pollfd p{fd, POLLIN, 0};
  for (;;) {
    const int ready = ::poll(&p, 1, static_cast<int>(limit.count()));
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) return -ETIMEDOUT;
    if (ready < 0) return -errno;
    const ssize_t r = ::recv(fd, data, n, 0);
    if (r < 0 && errno == EINTR) continue;
    return r < 0 ? -errno : static_cast<long>(r);
  }
}

struct drained {
  std::string data;
  std::string end;  // "EOF" or the errno name that ended it
};

// Reads until EOF or an error; each recv() waits at most `limit`.
drained drain_raw(int fd, std::chrono::milliseconds limit) {
  drained d;
  std::vector<char> buf(256 * 1024);
  for (;;) {
    const long r = recv_within(fd, buf.data(), buf.size(), limit);
    if (r == 0) {
      d.end = "EOF";
      return d;
    }
    if (r < 0) {
      d.end = errno_name(static_cast<int>(-r));
      return d;
    }
    d.data.append(buf.data(), static_cast<std::size_t>(r));
  }
}

std::string pattern(std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>('a' + (i * 7 + i / 251) % 26);
  return s;
}

// ---------------------------------------------------------------------------
// Driving the io_context: bounded, polling the condition every millisecond.

template <class Pred>
bool run_until(asio::io_context& ioc, std::chrono::milliseconds limit, Pred done) {
  const auto end = clock_type::now() + limit;
  for (;;) {
    ioc.restart();
    ioc.poll();
    if (done()) return true;
    if (clock_type::now() >= end) return false;
    ioc.restart();
    ioc.run_for(1ms);
    // Out of work, run_for returns at once: the condition is then a kernel
    // one (a TCP state, a queue size), so wait the millisecond ourselves.
    if (ioc.stopped()) std::this_thread::sleep_for(1ms);
  }
}

struct op_result {
  bool done = false;
  error_code ec;
  std::size_t bytes = 0;
};

// Shared with the handler: an operation that misses its deadline may still
// complete later, and must not write into a dead stack frame.
using pending = std::shared_ptr<op_result>;

auto completion(const pending& r) {
  return [r](error_code ec, std::size_t n) {
    r->done = true;
    r->ec = ec;
    r->bytes = n;
  };
}

op_result await(asio::io_context& ioc, const pending& r, std::chrono::milliseconds limit) {
  run_until(ioc, limit, [&] { return r->done; });
  return *r;
}

// "<n> B" on success, the error's name, or that it never completed.
std::string outcome(const op_result& r, std::chrono::milliseconds limit) {
  if (!r.done) return fmt::format("no completion within {} ms", limit.count());
  if (r.ec) return error_name(r.ec);
  return bytes_text(r.bytes);
}

op_result write_some(asio::io_context& ioc, tcp_stream& s, std::string_view data, std::chrono::milliseconds limit) {
  auto r = std::make_shared<op_result>();
  s.async_write_some(asio::buffer(data), completion(r));
  return await(ioc, r, limit);
}

op_result write_all(asio::io_context& ioc, tcp_stream& s, std::string_view data, std::chrono::milliseconds limit) {
  auto r = std::make_shared<op_result>();
  asio::async_write(s, asio::buffer(data), completion(r));
  return await(ioc, r, limit);
}

op_result read_some(asio::io_context& ioc, tcp_stream& s, std::vector<char>& buf, std::chrono::milliseconds limit) {
  auto r = std::make_shared<op_result>();
  s.async_read_some(asio::buffer(buf), completion(r));
  return await(ioc, r, limit);
}

// Reads until the buffer is full, EOF or an error (asio::async_read).
op_result read_all(asio::io_context& ioc, tcp_stream& s, std::vector<char>& buf, std::chrono::milliseconds limit) {
  auto r = std::make_shared<op_result>();
  asio::async_read(s, asio::buffer(buf), completion(r));
  return await(ioc, r, limit);
}

op_result shutdown_write(asio::io_context& ioc, tcp_stream& s, std::chrono::milliseconds limit) {
  auto r = std::make_shared<op_result>();
  s.async_shutdown_write([r](error_code ec) {
    r->done = true;
    r->ec = ec;
  });
  return await(ioc, r, limit);
}

using pending_close = std::shared_ptr<std::optional<close_report>>;

pending_close start_close(tcp_stream& s, close_policy policy) {
  auto r = std::make_shared<std::optional<close_report>>();
  s.async_close(policy, [r](close_report rep) { *r = std::move(rep); });
  return r;
}

// ---------------------------------------------------------------------------
// Loopback connections: our end accepted as an Asio socket, the peer raw.

struct connection {
  tcp::socket ours;
  raw_fd peer;
  std::uint16_t our_port = 0;
  std::uint16_t peer_port = 0;
};

class loopback_server {
 public:
  loopback_server(asio::io_context& ioc, const options& opts)
      : ioc_(ioc),
        opts_(opts),
        acceptor_(ioc, tcp::endpoint(opts.ipv6 ? asio::ip::address(asio::ip::address_v6::loopback())
                                               : asio::ip::address(asio::ip::address_v4::loopback()),
                                     0)) {}

  // Connects a raw peer (with `peer_rcvbuf` set before connect when non-zero)
  // and accepts our end. Setup failures throw: they end the row, not the lab.
  connection connect(int peer_rcvbuf = 0) {
    const tcp::endpoint to = acceptor_.local_endpoint();
    raw_fd peer(::socket(opts_.ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (peer.get() < 0) throw std::system_error(errno, std::generic_category(), "socket");
    if (peer_rcvbuf > 0) ::setsockopt(peer.get(), SOL_SOCKET, SO_RCVBUF, &peer_rcvbuf, sizeof(peer_rcvbuf));
    if (::connect(peer.get(), to.data(), static_cast<socklen_t>(to.size())) != 0)
      throw std::system_error(errno, std::generic_category(), "connect");
    // Bounded accept: the handshake is done, but wait for the queue to say so.
    pollfd p{acceptor_.native_handle(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(opts_.wait_limit.count())) != 1)
      throw std::runtime_error("accept: no connection queued within the wait limit");
    tcp::socket ours(ioc_);
    acceptor_.accept(ours);
    sockaddr_storage a{};
    socklen_t len = sizeof(a);
    ::getsockname(peer.get(), reinterpret_cast<sockaddr*>(&a), &len);
    const std::uint16_t peer_port = a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port)
                                                            : ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
    const std::uint16_t our_port = ours.local_endpoint().port();
    return {std::move(ours), std::move(peer), our_port, peer_port};
  }

 private:
  asio::io_context& ioc_;
  const options& opts_;
  tcp::acceptor acceptor_;
};

// The kernel's state of the socket (local, remote), asked through sock_diag:
// it also sees sockets that no descriptor reaches any more (an orphan in
// FIN_WAIT2, TIME_WAIT). "gone" when the kernel lists none.
std::string diag_state(std::uint16_t local, std::uint16_t remote) {
  closewise::error_code ec;
  const auto list = list_tcp_sockets(local, ec);
  if (ec) return "sock_diag failed: " + ec.message();
  for (const auto& s : list) {
    if (s.local_port == local && s.remote_port == remote) return std::string(to_string(s.state));
  }
  return "gone";
}

// Every socket of the connection between ports a and b, both ends, as
// "STATE STATE" ("none" when the kernel lists none).
std::string diag_connection(std::uint16_t a, std::uint16_t b) {
  closewise::error_code ec;
  const auto list = list_tcp_sockets(a, ec);
  if (ec) return "sock_diag failed: " + ec.message();
  std::string out;
  for (const auto& s : list) {
    if ((s.local_port == a && s.remote_port == b) || (s.local_port == b && s.remote_port == a)) {
      if (!out.empty()) out += ' ';
      out += to_string(s.state);
    }
  }
  return out.empty() ? std::string{"none"} : out;
}

std::string state_of(int fd) { return std::string(to_string(closewise::probe(fd).state)); }

bool is_reset_cause(std::string_view cause) {
  return cause == to_string(close_cause::peer_reset_idle) || cause == to_string(close_cause::peer_reset_mid_exchange);
}

// ---------------------------------------------------------------------------
// The experiments.

void socketpair_body(recorder& rec, const options&) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    throw std::system_error(errno, std::generic_category(), "socketpair");
  raw_fd ours(sv[0]);
  raw_fd reader(sv[1]);
  reader.close();
  rec.saw(party::peer, "reader", "reader end", "closed");
  // MSG_DONTWAIT: "at once" means this send must not be able to block.
  const char byte = 'x';
  rec.saw(party::ours, "send", "send", raw_result(send_raw(ours.get(), &byte, 1, MSG_NOSIGNAL | MSG_DONTWAIT)));
  rec.expect_value("send", "EPIPE");
}

// Ignores SIGPIPE for its lifetime and restores the previous disposition.
class sigpipe_ignored {
 public:
  sigpipe_ignored() noexcept {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    ok_ = ::sigaction(SIGPIPE, &ign, &old_) == 0;
  }
  ~sigpipe_ignored() {
    if (ok_) ::sigaction(SIGPIPE, &old_, nullptr);
  }
  sigpipe_ignored(const sigpipe_ignored&) = delete;
  sigpipe_ignored& operator=(const sigpipe_ignored&) = delete;
  bool ok() const noexcept { return ok_; }

 private:
  struct sigaction old_ {};
  bool ok_ = false;
};

void pipe_body(recorder& rec, const options&) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) throw std::system_error(errno, std::generic_category(), "pipe2");
  raw_fd reader(fds[0]);
  raw_fd writer(fds[1]);
  reader.close();
  rec.saw(party::peer, "reader", "read end", "closed");
  const sigpipe_ignored guard;
  if (!rec.expect(guard.ok(), "could not ignore SIGPIPE")) return;
  rec.saw(party::ours, "sigpipe", "SIGPIPE", "ignored");
  // O_NONBLOCK: "at once" means this write must not be able to block.
  const char byte = 'x';
  const ssize_t r = ::write(writer.get(), &byte, 1);
  rec.saw(party::ours, "write", "write", raw_result(r < 0 ? -errno : static_cast<long>(r)));
  rec.expect_value("write", "EPIPE");
}

void peer_close_body(recorder& rec, const options& opts) {
  const auto limit = opts.wait_limit;
  asio::io_context ioc;
  const std::string first = "first\n";
  const std::string second = "second\n";
  loopback_server server(ioc, opts);
  connection c = server.connect();
  tcp_stream s(std::move(c.ours));

  c.peer.close();
  rec.saw(party::peer, "close", "close()", "FIN");
  // The peer's FIN moves us to CLOSE_WAIT; its socket, without a descriptor
  // now, waits in FIN_WAIT2 where only sock_diag can see it.
  run_until(ioc, limit, [&] { return s.probe().state == tcp_state::close_wait; });
  run_until(ioc, limit, [&] { return diag_state(c.peer_port, c.our_port) == "FIN_WAIT2"; });
  rec.state(party::ours, "ours_before", "we, before 1st send", state_of(s.next_layer().native_handle()));
  rec.state(party::peer, "peer_before", "peer, before", diag_state(c.peer_port, c.our_port));
  rec.expect_value("ours_before", "CLOSE_WAIT");
  rec.expect_value("peer_before", "FIN_WAIT2");

  rec.saw(party::ours, "send_1", "1st send", outcome(write_some(ioc, s, first, limit), limit));
  if (!rec.expect_value("send_1", bytes_text(first.size()))) return;

  // A socket that cannot read any more answers data with RST (TCPAbortOnData).
  // Wait for it to land before the 2nd send, so the 2nd send sees it.
  const bool rst = run_until(ioc, limit, [&] { return s.probe().state == tcp_state::close; });
  rec.saw(party::peer, "answer", "answers our data with", rst ? "RST" : "nothing within the wait limit");
  rec.state(party::ours, "ours_after_rst", "we, after its RST", state_of(s.next_layer().native_handle()));
  rec.state(party::peer, "peer_after_rst", "peer, after its RST", diag_state(c.peer_port, c.our_port));
  rec.expect_value("answer", "RST");
  rec.expect_value("ours_after_rst", "CLOSE");

  const op_result w2 = write_some(ioc, s, second, limit);
  rec.saw(party::ours, "send_2", "2nd send", outcome(w2, limit));
  rec.expect_value("send_2", "EPIPE");
  rec.expect(w2.ec == asio::error::broken_pipe, "2nd send: the error is not asio::error::broken_pipe");

  const auto& rep = s.report();
  rec.saw(party::ours, "report_cause", "close_report cause", rep ? std::string(to_string(rep->cause)) : "no report");
  rec.expect_value("report_cause", "broken_pipe");
  if (rep) {
    rec.state(party::ours, "final_state", "we, at close (report)", std::string(to_string(rep->final_state)));
    rec.expect_value("final_state", "CLOSE");
  }
}

void peer_shutdown_body(recorder& rec, const options& opts) {
  const auto limit = opts.wait_limit;
  asio::io_context ioc;
  const std::string request = "request\n";
  const std::string response = "response\n";
  loopback_server server(ioc, opts);
  connection c = server.connect();
  tcp_stream s(std::move(c.ours));
  const int peer_fd = c.peer.get();

  rec.saw(party::peer, "sent", "sent, then shutdown(SHUT_WR)", raw_result(send_all_raw(peer_fd, request)));
  ::shutdown(peer_fd, SHUT_WR);

  // asio::async_read ends at EOF: every byte first, then the FIN as eof.
  std::vector<char> buf(64);
  const op_result rd = read_all(ioc, s, buf, limit);
  rec.saw(party::ours, "read_bytes", "read", rd.done ? bytes_text(rd.bytes) : outcome(rd, limit));
  rec.saw(party::ours, "read_end", "then", rd.done ? error_name(rd.ec) : "-");
  rec.saw(party::ours, "read_state", "stream read side", std::string(to_string(s.state().read())));
  rec.saw(party::ours, "phase", "stream phase", std::string(to_string(s.state().current_phase())));
  rec.expect_value("read_bytes", bytes_text(request.size()));
  rec.expect_value("read_end", "EOF");
  rec.expect_value("read_state", "peer_fin");
  rec.expect_value("phase", "remote_half_closed");

  run_until(ioc, limit, [&] { return closewise::probe(peer_fd).state == tcp_state::fin_wait2; });
  rec.state(party::ours, "ours_before", "we, before send", state_of(s.next_layer().native_handle()));
  rec.state(party::peer, "peer_before", "peer, before", state_of(peer_fd));
  rec.expect_value("ours_before", "CLOSE_WAIT");
  rec.expect_value("peer_before", "FIN_WAIT2");

  rec.saw(party::ours, "send", "send", outcome(write_all(ioc, s, response, limit), limit));
  rec.expect_value("send", bytes_text(response.size()));

  std::vector<char> got(64);
  const long n = recv_within(peer_fd, got.data(), got.size(), limit);
  rec.saw(party::peer, "received", "peer receives", raw_result(n));
  rec.expect_value("received", bytes_text(response.size()));
  if (n > 0) {
    rec.expect(std::string_view(got.data(), static_cast<std::size_t>(n)) == response,
               "peer receives: the bytes differ from what we sent");
  }

  rec.state(party::ours, "ours_after", "we, after", state_of(s.next_layer().native_handle()));
  rec.state(party::peer, "peer_after", "peer, after", state_of(peer_fd));
  rec.expect_value("ours_after", "CLOSE_WAIT");
  rec.expect_value("peer_after", "FIN_WAIT2");

  // Ending it: our FIN answers the peer's, so the peer keeps TIME_WAIT.
  auto closed = start_close(s, close_policy::graceful);
  run_until(ioc, limit, [&] { return closed->has_value(); });
  rec.saw(party::ours, "report_cause", "then graceful close, cause",
          *closed ? std::string(to_string((*closed)->cause)) : "no report within the wait limit");
  rec.expect_value("report_cause", "peer_fin_then_ours");
}

void our_shutdown_body(recorder& rec, const options& opts) {
  const auto limit = opts.wait_limit;
  asio::io_context ioc;
  const std::string late = "late\n";
  loopback_server server(ioc, opts);
  connection c = server.connect();
  tcp_stream s(std::move(c.ours));
  const int peer_fd = c.peer.get();

  const op_result sh = shutdown_write(ioc, s, limit);
  rec.saw(party::ours, "shutdown", "async_shutdown_write", sh.done ? error_name(sh.ec) : outcome(sh, limit));
  if (!rec.expect_value("shutdown", "ok")) return;

  // The stream hands the write to the kernel, which answers EPIPE at once.
  rec.saw(party::ours, "send", "then send", outcome(write_some(ioc, s, late, limit), limit));
  rec.expect_value("send", "EPIPE");

  std::vector<char> got(64);
  rec.saw(party::peer, "recv", "recv", raw_result(recv_within(peer_fd, got.data(), got.size(), limit)));
  rec.expect_value("recv", "0");

  run_until(ioc, limit, [&] { return s.probe().state == tcp_state::fin_wait2; });
  rec.state(party::ours, "ours", "we", state_of(s.next_layer().native_handle()));
  rec.state(party::peer, "peer", "peer", state_of(peer_fd));
  rec.expect_value("ours", "FIN_WAIT2");
  rec.expect_value("peer", "CLOSE_WAIT");
}

void peer_abort_body(recorder& rec, const options& opts) {
  const auto limit = opts.wait_limit;
  asio::io_context ioc;
  const std::string data = "x";
  loopback_server server(ioc, opts);

  // (a) The first thing we do after the RST landed is a send: the kernel
  // hands the pending ECONNRESET to it. (A read first would consume it, and
  // the send after would get EPIPE: that is why the read side stays idle.)
  connection a = server.connect();
  tcp_stream sa(std::move(a.ours));
  a.peer.reset();
  // Only a RST takes an ESTABLISHED socket straight to CLOSE.
  const bool rst_a = run_until(ioc, limit, [&] { return sa.probe().state == tcp_state::close; });
  rec.saw(party::peer, "a_close", "(a) peer sends", rst_a ? "RST" : "no RST within the wait limit");
  rec.state(party::ours, "a_ours", "(a) we, at once", state_of(sa.next_layer().native_handle()));
  rec.state(party::peer, "a_peer", "(a) peer, at once", diag_state(a.peer_port, a.our_port));
  rec.expect_value("a_close", "RST");
  rec.expect_value("a_ours", "CLOSE");
  rec.expect_value("a_peer", "gone");

  rec.saw(party::ours, "a_send", "(a) send", outcome(write_some(ioc, sa, data, limit), limit));
  rec.expect_value("a_send", "ECONNRESET");
  rec.saw(party::ours, "a_send_again", "(a) send again", outcome(write_some(ioc, sa, data, limit), limit));
  rec.expect_value("a_send_again", "EPIPE");
  rec.saw(party::ours, "a_cause", "(a) close_report cause",
          sa.report() ? std::string(to_string(sa.report()->cause)) : "no report");
  // Which reset cause is the library's call: it counts a write that met the
  // RST as output in flight (mid-exchange). Either way it must be a reset.
  rec.expect(is_reset_cause(rec.value("a_cause")), "(a) close_report cause is " + rec.value("a_cause"));

  // (b) A read first: it gets ECONNRESET; the stream is over after that, so
  // a write fails with broken_pipe without reaching the kernel.
  connection b = server.connect();
  tcp_stream sb(std::move(b.ours));
  b.peer.reset();
  const bool rst_b = run_until(ioc, limit, [&] { return sb.probe().state == tcp_state::close; });
  rec.saw(party::peer, "b_close", "(b) peer sends", rst_b ? "RST" : "no RST within the wait limit");
  rec.expect_value("b_close", "RST");
  std::vector<char> buf(64);
  rec.saw(party::ours, "b_read", "(b) read", outcome(read_some(ioc, sb, buf, limit), limit));
  rec.expect_value("b_read", "ECONNRESET");
  rec.saw(party::ours, "b_send", "(b) then send", outcome(write_some(ioc, sb, data, limit), limit));
  rec.expect_value("b_send", "EPIPE");

  // Both streams closed their descriptors when the reset finished them.
  rec.state(party::ours, "a_sockets", "(a) sockets left", diag_connection(a.our_port, a.peer_port));
  rec.state(party::ours, "b_sockets", "(b) sockets left", diag_connection(b.our_port, b.peer_port));
  for (const char* key : {"a_sockets", "b_sockets"}) {
    const std::string left = rec.value(key);
    rec.expect(left.find("TIME_WAIT") == std::string::npos, fmt::format("{}: TIME_WAIT found ({})", key, left));
  }
}

enum class close_variant : std::uint8_t { plain, fin_close, graceful };

// One server close of row 7. The order is the one that loses data in the
// field (docs/design.md, 'Beast's teardown and the data-loss case'): the
// server has read the first request when the next one arrives, so those bytes
// sit unread in its kernel while it writes a large response; the client reads
// only after the server's close.
void close_with_unread_run(recorder& rec, const options& opts, close_variant v, const std::string& response) {
  const auto limit = opts.wait_limit;
  const std::string tag = v == close_variant::plain       ? "plain"
                          : v == close_variant::fin_close ? "fin_close"
                                                          : "graceful";
  // The table's "done" column says what (a), (b) and (c) are.
  const std::string label = v == close_variant::plain ? "(a)" : v == close_variant::fin_close ? "(b)" : "(c)";
  const std::string request = "GET /big HTTP/1.1\r\nHost: lab\r\n\r\n";
  const std::string next_request = "GET /next HTTP/1.1\r\nHost: lab\r\n\r\n";
  asio::io_context ioc;
  loopback_server server(ioc, opts);
  connection c = server.connect();
  const int client = c.peer.get();
  // The whole response must fit in the kernel: the client reads nothing before
  // the close, and a write still waiting in user space would hold the close
  // back. (The kernel doubles SO_SNDBUF and caps it at net.core.wmem_max.)
  error_code ignored;
  c.ours.set_option(asio::socket_base::send_buffer_size(static_cast<int>(response.size())), ignored);

  // Declared before the stream: the plain close reports from its destructor.
  std::optional<close_report> report;
  std::optional<tcp_stream> s(std::in_place, std::move(c.ours));
  s->on_close([&report](const close_report& r) { report = r; });

  if (!rec.expect(send_all_raw(client, request) == static_cast<long>(request.size()),
                  label + " the client could not send its request"))
    return;
  std::vector<char> buf(1024);
  for (std::size_t got = 0; got < request.size();) {
    const op_result r = read_some(ioc, *s, buf, limit);
    if (!rec.expect(r.done && !r.ec, fmt::format("{} reading the request: {}", label, outcome(r, limit)))) return;
    got += r.bytes;
  }
  if (!rec.expect(send_all_raw(client, next_request) == static_cast<long>(next_request.size()),
                  label + " the client could not send its next request"))
    return;
  run_until(ioc, limit, [&] { return s->probe().unread.value_or(0) >= next_request.size(); });
  rec.saw(party::ours, tag + "_unread", label + " unread before close", bytes_text(s->probe().unread.value_or(0)));
  rec.expect_value(tag + "_unread", bytes_text(next_request.size()));

  const op_result w = write_all(ioc, *s, response, limit);
  if (!rec.expect(w.done && !w.ec && w.bytes == response.size(),
                  fmt::format("{} the kernel did not take the {} B response ({}); net.core.wmem_max too small?", label,
                              response.size(), outcome(w, limit))))
    return;

  switch (v) {
    case close_variant::plain:
      s.reset();  // the destructor's plain close()
      break;
    case close_variant::fin_close: {
      const pending_close closed = start_close(*s, close_policy::fin_close);
      run_until(ioc, limit, [&] { return closed->has_value(); });
      break;
    }
    case close_variant::graceful: {
      const pending_close closed = start_close(*s, close_policy::graceful);
      // The drain has taken the unread request once it counts as discarded.
      run_until(ioc, limit, [&] { return s->state().bytes_discarded() >= next_request.size(); });
      break;
    }
  }

  const drained d = drain_raw(client, limit);
  rec.saw(party::peer, tag + "_client_bytes", label + " client got", bytes_text(d.data.size()));
  rec.saw(party::peer, tag + "_client_end", label + " then", d.end);
  rec.expect(response.compare(0, d.data.size(), d.data) == 0, label + " the client's bytes differ from the response");
  if (v == close_variant::graceful) {
    c.peer.close();  // the client's FIN ends the server's drain
    run_until(ioc, limit, [&] { return report.has_value(); });
  } else {
    rec.state(party::peer, tag + "_client_after", label + " client", state_of(client));
  }
  if (!rec.expect(report.has_value(), label + " no close report within the wait limit")) return;

  rec.saw(party::ours, tag + "_cause", label + " close_report cause", std::string(to_string(report->cause)));
  rec.saw(party::ours, tag + "_unread_at_close", label + " unread_at_close", bytes_text(report->unread_at_close));
  rec.saw(party::ours, tag + "_kernel_reset", label + " kernel_reset()", report->kernel_reset() ? "yes" : "no");
  rec.state(party::ours, tag + "_server_at_close", label + " server at close",
            std::string(to_string(report->final_state)));
  if (v != close_variant::graceful) {
    rec.expect_value(tag + "_cause", v == close_variant::plain ? "local_error" : "local_fin_close");
    rec.expect_value(tag + "_unread_at_close", bytes_text(next_request.size()));
    rec.expect_value(tag + "_kernel_reset", "yes");
    rec.expect(d.data.size() < response.size(),
               fmt::format("{} the client got the whole body ({} B), not a truncated one", label, d.data.size()));
    rec.expect_value(tag + "_client_end", "ECONNRESET");
    rec.expect_value(tag + "_client_after", "CLOSE");
    return;
  }
  rec.saw(party::ours, "graceful_discarded", label + " bytes_discarded", bytes_text(report->bytes_discarded));
  run_until(ioc, limit, [&] { return diag_state(c.our_port, c.peer_port) == "TIME_WAIT"; });
  rec.state(party::ours, "graceful_server_after", label + " server after", diag_state(c.our_port, c.peer_port));
  rec.expect_value("graceful_cause", "ours_then_peer_fin");
  rec.expect_value("graceful_discarded", bytes_text(next_request.size()));
  rec.expect_value("graceful_unread_at_close", "0 B");
  rec.expect_value("graceful_kernel_reset", "no");
  rec.expect_value("graceful_client_bytes", bytes_text(response.size()));
  rec.expect_value("graceful_client_end", "EOF");
  rec.expect_value("graceful_server_after", "TIME_WAIT");
}

void close_with_unread_body(recorder& rec, const options& opts) {
  const std::string response = pattern(opts.response_bytes);
  close_with_unread_run(rec, opts, close_variant::plain, response);
  close_with_unread_run(rec, opts, close_variant::fin_close, response);
  close_with_unread_run(rec, opts, close_variant::graceful, response);
}

void reset_after_data_body(recorder& rec, const options& opts) {
  const auto limit = opts.wait_limit;
  const std::string data = pattern(1000);
  asio::io_context ioc;
  loopback_server server(ioc, opts);

  // (a) Through the stream.
  connection a = server.connect();
  tcp_stream s(std::move(a.ours));
  rec.saw(party::peer, "a_sent", "(a) peer sent, then RST", raw_result(send_all_raw(a.peer.get(), data)));
  run_until(ioc, limit, [&] { return s.probe().unread.value_or(0) >= data.size(); });
  a.peer.reset();
  run_until(ioc, limit, [&] { return s.probe().state == tcp_state::close; });
  const socket_probe after = s.probe();
  rec.state(party::ours, "a_ours", "(a) we, after RST", std::string(to_string(after.state)));
  rec.saw(party::ours, "a_queued", "(a) unread after RST", bytes_text(after.unread.value_or(0)));
  rec.expect_value("a_ours", "CLOSE");
  rec.expect_value("a_queued", bytes_text(data.size()));

  std::vector<char> buf(64 * 1024);
  std::string got;
  op_result r;
  for (int i = 0; i < 16; ++i) {  // bounded: the data arrived in one segment
    r = read_some(ioc, s, buf, limit);
    if (!r.done || r.ec) break;
    got.append(buf.data(), r.bytes);
  }
  rec.saw(party::ours, "a_read_bytes", "(a) reads deliver", bytes_text(got.size()));
  rec.saw(party::ours, "a_read_end", "(a) then", outcome(r, limit));
  rec.expect_value("a_read_bytes", bytes_text(data.size()));
  rec.expect(got == data.substr(0, got.size()), "(a) the bytes read differ from the bytes sent");
  rec.expect_value("a_read_end", "ECONNRESET");
  // The kernel would answer 0 now; the stream must not call that a FIN.
  rec.saw(party::ours, "a_read_again", "(a) read again", outcome(read_some(ioc, s, buf, limit), limit));
  rec.expect_value("a_read_again", "ECONNRESET");
  rec.saw(party::ours, "a_read_state", "(a) stream read side", std::string(to_string(s.state().read())));
  rec.expect_value("a_read_state", "reset");
  const std::string eof_cause(to_string(classify(io_error::eof, s.state())));
  rec.saw(party::ours, "a_classify_eof", "(a) classify(eof) now", eof_cause);
  rec.expect(is_reset_cause(eof_cause), "(a) classify(eof) after the reset is " + eof_cause + ", not a reset cause");
  const auto& rep = s.report();
  rec.saw(party::ours, "a_cause", "(a) close_report cause", rep ? std::string(to_string(rep->cause)) : "no report");
  rec.expect(is_reset_cause(rec.value("a_cause")), "(a) close_report cause is " + rec.value("a_cause"));
  rec.saw(party::ours, "a_fin", "(a) FIN reported",
          rep && rep->first_fin != side::none ? std::string(to_string(rep->first_fin)) : "never");
  rec.expect_value("a_fin", "never");

  // (b) The kernel itself, on a raw socket.
  connection b = server.connect();
  const raw_fd ours(b.ours.release());
  rec.saw(party::peer, "b_sent", "(b) peer sent, then RST", raw_result(send_all_raw(b.peer.get(), data)));
  run_until(ioc, limit, [&] { return closewise::probe(ours.get()).unread.value_or(0) >= data.size(); });
  b.peer.reset();
  run_until(ioc, limit, [&] { return closewise::probe(ours.get()).state == tcp_state::close; });
  rec.state(party::ours, "b_ours", "(b) we, after RST", state_of(ours.get()));
  rec.expect_value("b_ours", "CLOSE");
  for (const char* key : {"b_recv_1", "b_recv_2", "b_recv_3"}) {
    rec.saw(party::ours, key, fmt::format("(b) recv #{}", key[7]),
            raw_result(recv_within(ours.get(), buf.data(), buf.size(), limit)));
  }
  rec.expect_value("b_recv_1", bytes_text(data.size()));
  rec.expect_value("b_recv_2", "ECONNRESET");
  rec.expect_value("b_recv_3", "0");
}

using body_fn = void (*)(recorder&, const options&);

// Runs one experiment; a setup failure (an exception) ends the row as a mismatch.
row run_guarded(int number, const options& opts, body_fn body) {
  row r;
  r.number = number;
  const row_text& t = texts.at(static_cast<std::size_t>(number - 1));
  r.name = t.name;
  r.done = t.done;
  r.expected = t.expected;
  recorder rec(r);
  try {
    body(rec, opts);
  } catch (const std::exception& e) {
    rec.expect(false, fmt::format("setup failed: {}", e.what()));
  }
  r.matches = r.mismatch.empty();
  return r;
}

}  // namespace

row socketpair_closed_reader(const options& opts) { return run_guarded(1, opts, socketpair_body); }
row pipe_closed_reader(const options& opts) { return run_guarded(2, opts, pipe_body); }
row peer_close_then_send_twice(const options& opts) { return run_guarded(3, opts, peer_close_body); }
row peer_shutdown_then_read_and_send(const options& opts) { return run_guarded(4, opts, peer_shutdown_body); }
row our_shutdown_then_send(const options& opts) { return run_guarded(5, opts, our_shutdown_body); }
row peer_abortive_close(const options& opts) { return run_guarded(6, opts, peer_abort_body); }
row close_with_unread_input(const options& opts) { return run_guarded(7, opts, close_with_unread_body); }
row reset_after_unread_data(const options& opts) { return run_guarded(8, opts, reset_after_data_body); }

row run_one(int number, const options& opts) {
  switch (number) {
    case 1:
      return socketpair_closed_reader(opts);
    case 2:
      return pipe_closed_reader(opts);
    case 3:
      return peer_close_then_send_twice(opts);
    case 4:
      return peer_shutdown_then_read_and_send(opts);
    case 5:
      return our_shutdown_then_send(opts);
    case 6:
      return peer_abortive_close(opts);
    case 7:
      return close_with_unread_input(opts);
    case 8:
      return reset_after_unread_data(opts);
    default:
      break;
  }
  row r;
  r.number = number;
  r.name = "unknown";
  r.mismatch = fmt::format("there is no experiment {} (rows are 1..{})", number, row_count);
  return r;
}

std::vector<row> run_all(const options& opts) {
  std::vector<row> rows;
  rows.reserve(row_count);
  for (int n = 1; n <= row_count; ++n) rows.push_back(run_one(n, opts));
  return rows;
}

}  // namespace closewise::lab
