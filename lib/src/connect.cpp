// Endpoints ("HOST:PORT") and the client's connect.
#include <stdexcept>
#include <string_view>

#include <fmt/format.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "closewise/server.hpp"

namespace closewise {

namespace {
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
}  // namespace

asio::ip::tcp::endpoint parse_endpoint(const std::string& text) {
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon + 1 == text.size())
    throw std::invalid_argument("expected HOST:PORT, got '" + text + "'");
  std::string host = text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.empty() || host == "*") host = "0.0.0.0";
  if (host == "localhost") host = "127.0.0.1";
  error_code ec;
  const auto address = asio::ip::make_address(host, ec);
  if (ec) throw std::invalid_argument("not a numeric address: '" + host + "' in '" + text + "'");
  unsigned long port = 0;
  try {
    std::size_t used = 0;
    port = std::stoul(text.substr(colon + 1), &used);
    if (used != text.size() - colon - 1) throw std::invalid_argument("trailing characters");
  } catch (const std::exception&) {
    throw std::invalid_argument("not a port: '" + text.substr(colon + 1) + "' in '" + text + "'");
  }
  if (port > 65535) throw std::invalid_argument("port out of range in '" + text + "'");
  return {address, static_cast<unsigned short>(port)};
}

std::string to_string(const asio::ip::tcp::endpoint& e) {
  if (e.address().is_v6()) return fmt::format("[{}]:{}", e.address().to_string(), e.port());
  return fmt::format("{}:{}", e.address().to_string(), e.port());
}

asio::awaitable<std::pair<error_code, std::optional<stream>>> connect(asio::any_io_executor ex, std::string target,
                                                                      std::chrono::milliseconds timeout,
                                                                      stream_options opts) {
  asio::generic::stream_protocol::endpoint gep;
  constexpr std::string_view unix_prefix = "unix:";
  if (target.starts_with(unix_prefix)) {
    gep = asio::local::stream_protocol::endpoint(target.substr(unix_prefix.size()));
  } else {
    try {
      gep = parse_endpoint(target);
    } catch (const std::invalid_argument&) {
      co_return std::pair{error_code(asio::error::invalid_argument), std::optional<stream>{}};
    }
  }
  socket s(ex);
  error_code ec;
  s.open(gep.protocol(), ec);
  if (ec) co_return std::pair{ec, std::optional<stream>{}};
  asio::steady_timer timer(ex);
  bool timed_out = false;
  timer.expires_after(timeout);
  timer.async_wait([&s, &timed_out](const error_code& e) {
    if (e) return;
    timed_out = true;
    error_code ignored;
    s.cancel(ignored);
  });
  auto [cec] = co_await s.async_connect(gep, use_tuple);
  timer.cancel();
  if (cec) co_return std::pair{timed_out ? error_code(asio::error::timed_out) : cec, std::optional<stream>{}};
  if (!target.starts_with(unix_prefix)) s.set_option(asio::ip::tcp::no_delay(true), ec);
  co_return std::pair{error_code{}, std::optional<stream>{stream(std::move(s), opts)}};
}

}  // namespace closewise
