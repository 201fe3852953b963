// Fail the n-th I/O operation: an echo exchange and a graceful close over
// basic_stream<faulty_socket>, for every n up to the number of operations the
// clean run needs (+1, which fails nothing) and for each error a socket can
// report. Both ends are closewise streams on one io_context; one of them (the
// client or the echo server) is the faulty one.
//
// Every run must end with exactly one close report on each side, a cause that
// matches the injected error, and an io_context that ran out of work by
// itself (a lost completion or a leaked wait would keep it busy, or destroy a
// coroutine that never finishes).

#include <gtest/gtest.h>

#include <array>
#include <exception>
#include <optional>
#include <ostream>
#include <set>
#include <string>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "../support/faulty_socket.hpp"
#include "../support/loopback.hpp"
#include "closewise/stream.hpp"

using namespace closewise;
using namespace closewise::test;
using namespace std::chrono_literals;

namespace {

constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
using faulty_stream = basic_stream<faulty_socket>;

// What one end of the exchange saw.
struct end_result {
  error_code app_error;                  // the first error its application code saw (eof counts for the client)
  bool corrupt = false;                  // an echo came back different
  std::optional<close_report> closed;    // async_close's result
  int reports = 0;                       // on_close calls
  std::optional<close_report> reported;  // the on_close report
  bool done = false;                     // the coroutine ran to its end
  std::exception_ptr failure;            // an exception escaped it
};

// Rounds of the exchange: one byte, a segment or so, then more than a socket
// read takes at once, so reads and writes split.
constexpr std::array<std::size_t, 3> rounds{1, 1000, 100'000};

template <class Stream>
asio::awaitable<void> client_exchange(Stream& s, end_result& out) {
  for (const std::size_t size : rounds) {
    const std::string msg = pattern(size);
    auto [wec, wn] = co_await asio::async_write(s, asio::buffer(msg), use_tuple);
    if (wec) {
      out.app_error = wec;
      break;
    }
    std::string back(size, '\0');
    auto [rec, rn] = co_await asio::async_read(s, asio::buffer(back), use_tuple);
    if (rec) {
      out.app_error = rec;
      break;
    }
    out.corrupt = out.corrupt || back != msg;
  }
  // Whatever went wrong, the application ends the connection the same way.
  auto [r] = co_await s.async_close(close_policy::graceful, use_tuple);
  out.closed = r;
  out.done = true;
}

template <class Stream>
asio::awaitable<void> echo_server(Stream& s, end_result& out) {
  std::array<char, 16 * 1024> buf;
  for (;;) {
    auto [ec, n] = co_await s.async_read_some(asio::buffer(buf), use_tuple);
    if (n > 0) {
      auto [wec, wn] = co_await asio::async_write(s, asio::buffer(buf.data(), n), use_tuple);
      if (wec) {
        out.app_error = wec;
        break;
      }
    }
    if (ec) {
      if (ec != asio::error::eof) out.app_error = ec;
      break;
    }
  }
  auto [r] = co_await s.async_close(close_policy::graceful, use_tuple);
  out.closed = r;
  out.done = true;
}

enum class faulty_end { client, server };

struct injected_error {
  const char* name;
  error_code ec;
};

// For gtest's messages: the names, not the bytes.
void PrintTo(faulty_end e, std::ostream* os) { *os << (e == faulty_end::client ? "client" : "server"); }
void PrintTo(const injected_error& e, std::ostream* os) { *os << e.name; }

// One run of the exchange with operation `fail_at` of the faulty end failing.
struct run_outcome {
  fault_plan plan;
  end_result faulty;
  end_result other;
  bool out_of_work = false;
};

stream_options teardown_limits() {
  stream_options o;
  // Bounds a close that cannot complete (e.g. a FIN that never goes out).
  o.linger_timeout = 1s;
  o.linger_max = 2s;
  return o;
}

template <class Client, class Server>
void run_exchange(asio::io_context& ioc, Client& client, Server& server, end_result& c, end_result& s,
                  bool& out_of_work) {
  client.on_close([&c](const close_report& r) {
    ++c.reports;
    c.reported = r;
  });
  server.on_close([&s](const close_report& r) {
    ++s.reports;
    s.reported = r;
  });
  asio::co_spawn(ioc, client_exchange(client, c), [&c](std::exception_ptr e) { c.failure = e; });
  asio::co_spawn(ioc, echo_server(server, s), [&s](std::exception_ptr e) { s.failure = e; });
  // The watchdog: a clean run takes milliseconds, a close that has to wait
  // for its linger timeout about a second.
  ioc.run_for(5s);
  out_of_work = ioc.stopped();
}

run_outcome run_once(faulty_end which, std::size_t fail_at, error_code error) {
  run_outcome out;
  asio::io_context ioc;
  auto plan = std::make_shared<fault_plan>();
  plan->fail_at = fail_at;
  plan->error = error;
  {
    tcp::acceptor acceptor(ioc, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
    tcp::socket client_socket(ioc);
    client_socket.connect(acceptor.local_endpoint());
    tcp::socket server_socket = acceptor.accept();
    if (which == faulty_end::client) {
      faulty_stream client(faulty_socket(std::move(client_socket), plan), teardown_limits());
      tcp_stream server(std::move(server_socket), teardown_limits());
      run_exchange(ioc, client, server, out.faulty, out.other, out.out_of_work);
    } else {
      tcp_stream client(std::move(client_socket), teardown_limits());
      faulty_stream server(faulty_socket(std::move(server_socket), plan), teardown_limits());
      run_exchange(ioc, client, server, out.other, out.faulty, out.out_of_work);
    }
    // The streams are gone here: a stream destroyed before it finished would
    // have reported now (local_error), which the report counts catch.
  }
  out.plan = *plan;
  return out;
}

std::string describe(const end_result& e) {
  std::string s = "reports=" + std::to_string(e.reports) + " done=" + std::to_string(e.done);
  if (e.app_error) s += " app_error=" + e.app_error.message();
  if (e.reported) s += " report: " + e.reported->describe();
  return s;
}

// The causes the faulty end may report once `error` hit one of its operations.
std::set<close_cause> expected_causes(const error_code& error) {
  if (error == asio::error::connection_reset)
    return {close_cause::peer_reset_idle, close_cause::peer_reset_mid_exchange};
  if (error == asio::error::broken_pipe) return {close_cause::broken_pipe};
  // EOF is the peer's FIN, whichever FIN went first.
  if (error == asio::error::eof) return {close_cause::peer_fin_then_ours, close_cause::ours_then_peer_fin};
  // core.hpp: timed_out (ETIMEDOUT: keepalive, TCP_USER_TIMEOUT) is an error on
  // our side; close_cause::local_error covers "timeout, descriptor error".
  if (error == asio::error::timed_out) return {close_cause::local_error};
  // core.hpp: aborted "was cancelled locally (not a connection event)": the
  // application sees the error and its graceful close ends the connection.
  return {close_cause::peer_fin_then_ours, close_cause::ours_then_peer_fin};
}

class fail_nth : public ::testing::TestWithParam<std::tuple<faulty_end, injected_error>> {};

TEST_P(fail_nth, every_operation_failing_ends_with_one_consistent_report_and_no_leak) {
  const auto [which, injected] = GetParam();
  const run_outcome clean = run_once(which, 0, {});
  ASSERT_TRUE(clean.out_of_work);
  ASSERT_EQ(clean.faulty.reports, 1) << describe(clean.faulty);
  ASSERT_FALSE(clean.faulty.corrupt || clean.other.corrupt);
  const close_cause clean_cause =
      which == faulty_end::client ? close_cause::ours_then_peer_fin : close_cause::peer_fin_then_ours;
  ASSERT_EQ(clean.faulty.reported->cause, clean_cause) << describe(clean.faulty);
  const std::size_t operations = clean.plan.operations;
  ASSERT_GE(operations, 4u) << "the exchange should need several reads and writes";

  const std::set<close_cause> expected = expected_causes(injected.ec);
  for (std::size_t n = 1; n <= operations + 1; ++n) {
    SCOPED_TRACE("failing operation " + std::to_string(n) + " of " + std::to_string(operations) + " with " +
                 injected.name);
    const run_outcome r = run_once(which, n, injected.ec);
    const std::string where = r.plan.injected ? (r.plan.injected_on_write ? " (a write)" : " (a read)") : "";
    SCOPED_TRACE("injected=" + std::to_string(r.plan.injected) + where + "\n  faulty: " + describe(r.faulty) +
                 "\n  other:  " + describe(r.other));
    EXPECT_TRUE(r.out_of_work) << "the io_context still had work after 5 s: a leaked operation or timer";
    EXPECT_FALSE(r.faulty.failure || r.other.failure) << "an exception escaped a coroutine";
    EXPECT_TRUE(r.faulty.done && r.other.done) << "a coroutine never finished: a completion was lost";
    EXPECT_EQ(r.faulty.reports, 1) << "close reports on the faulty end";
    EXPECT_EQ(r.other.reports, 1) << "close reports on the other end";
    if (!r.faulty.reported) continue;
    if (r.faulty.closed) {
      EXPECT_EQ(r.faulty.closed->cause, r.faulty.reported->cause) << "async_close and on_close disagree";
    }
    if (!r.plan.injected) {
      // Past the last operation nothing fails: the clean outcome, echo intact.
      EXPECT_EQ(r.faulty.reported->cause, clean_cause);
      EXPECT_FALSE(r.faulty.corrupt || r.other.corrupt);
      continue;
    }
    EXPECT_TRUE(expected.count(r.faulty.reported->cause))
        << "cause " << to_string(r.faulty.reported->cause) << " after an injected " << injected.name;
    if (injected.ec == asio::error::connection_reset) {
      EXPECT_TRUE(r.faulty.reported->rst_received);
    }
    // Nothing that arrived was wrong: a fault may cut the echo short, never corrupt it.
    EXPECT_FALSE(r.faulty.corrupt || r.other.corrupt);
  }
}

std::string param_name(const ::testing::TestParamInfo<fail_nth::ParamType>& info) {
  return std::string(std::get<0>(info.param) == faulty_end::client ? "client_" : "server_") +
         std::get<1>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(
    errors, fail_nth,
    ::testing::Combine(::testing::Values(faulty_end::client, faulty_end::server),
                       ::testing::Values(injected_error{"connection_reset", asio::error::connection_reset},
                                         injected_error{"broken_pipe", asio::error::broken_pipe},
                                         injected_error{"eof", asio::error::eof},
                                         injected_error{"timed_out", asio::error::timed_out},
                                         injected_error{"operation_aborted", asio::error::operation_aborted})),
    param_name);

}  // namespace
