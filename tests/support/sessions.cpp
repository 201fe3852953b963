#include "sessions.hpp"

#include <array>

namespace closewise::test {

boost::asio::awaitable<void> echo_session(connection& c) {
  std::array<char, 16 * 1024> buf;
  for (;;) {
    auto [ec, n] = co_await c.read_some(boost::asio::buffer(buf));
    if (n > 0 && co_await c.write(boost::asio::buffer(buf.data(), n))) co_return;
    if (ec) co_return;
  }
}

}  // namespace closewise::test
