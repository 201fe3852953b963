#include <gtest/gtest.h>

#include <thread>

#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include "../support/loopback.hpp"

using namespace closewise;
using namespace closewise::test;

TEST(smoke, half_close_then_graceful) {
  asio::io_context ioc;
  loopback_pair_factory f(ioc);
  auto peer = f.connect();
  auto s = f.accept();
  peer.send(std::string("hello"));
  peer.shutdown_write();
  std::string got(16, '\0');
  error_code rec;
  std::size_t n = 0;
  bool done = false;
  asio::async_read(s, asio::buffer(got), [&](error_code ec, std::size_t k) { rec = ec; n = k; done = true; });
  ASSERT_TRUE(run_until(ioc, [&] { return done; }));
  EXPECT_EQ(rec, asio::error::eof);
  EXPECT_EQ(n, 5u);
  EXPECT_EQ(s.state().current_phase(), phase::remote_half_closed);
  std::optional<close_report> rep;
  s.async_close(close_policy::graceful, [&](close_report r) { rep = r; });
  ASSERT_TRUE(run_until(ioc, [&] { return rep.has_value(); }));
  EXPECT_EQ(rep->cause, close_cause::peer_fin_then_ours) << rep->describe();
  auto d = peer.drain();
  EXPECT_TRUE(d.eof);
}
