#pragma once
// A test-only NextLayer for closewise::basic_stream: a tcp::socket whose n-th
// I/O operation completes with a chosen error instead of doing I/O (Beast's
// fail_count idea, for a real socket). Everything else is forwarded.
//
// Counted operations: async_read_some and async_write_some, whoever starts
// them (the application's reads and writes, the graceful close's drain reads).
// The synchronous calls (shutdown, close, set_option) are not counted: the
// stream ignores their errors by design (a failed shutdown after a reset
// changes nothing), so failing them would test nothing.
//
// Thread-safety: like the socket, one executor at a time. The plan is shared
// with the test so that it can read the counters after the stream is gone.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include <boost/asio/append.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>

namespace closewise::test {

namespace asio = boost::asio;

/// Which operation fails, with what, and what happened.
struct fault_plan {
  std::size_t fail_at = 0;          ///< 1-based number of the operation to fail; 0: none
  boost::system::error_code error;  ///< what it completes with
  std::size_t operations = 0;       ///< operations started so far
  std::size_t reads = 0;            ///< of which async_read_some
  std::size_t writes = 0;           ///< of which async_write_some
  bool injected = false;            ///< the failure happened
  bool injected_on_write = false;   ///< ... on a write (else on a read)

  // Counts one operation; returns the error it must complete with, if any.
  boost::system::error_code next(bool write) {
    ++operations;
    ++(write ? writes : reads);
    if (operations != fail_at) return {};
    injected = true;
    injected_on_write = write;
    return error;
  }
};

class faulty_socket {
 public:
  using socket_type = asio::ip::tcp::socket;
  using executor_type = socket_type::executor_type;
  using native_handle_type = socket_type::native_handle_type;
  using lowest_layer_type = socket_type::lowest_layer_type;

  faulty_socket(socket_type&& s, std::shared_ptr<fault_plan> plan) : socket_(std::move(s)), plan_(std::move(plan)) {}
  faulty_socket(faulty_socket&&) noexcept = default;
  faulty_socket& operator=(faulty_socket&&) noexcept = default;

  executor_type get_executor() noexcept { return socket_.get_executor(); }
  socket_type& next_layer() noexcept { return socket_; }
  lowest_layer_type& lowest_layer() noexcept { return socket_.lowest_layer(); }
  const fault_plan& plan() const noexcept { return *plan_; }

  bool is_open() const noexcept { return socket_.is_open(); }
  native_handle_type native_handle() { return socket_.native_handle(); }
  void shutdown(asio::socket_base::shutdown_type what, boost::system::error_code& ec) { socket_.shutdown(what, ec); }
  void close(boost::system::error_code& ec) { socket_.close(ec); }
  void cancel(boost::system::error_code& ec) { socket_.cancel(ec); }
  template <class Option>
  void set_option(const Option& o, boost::system::error_code& ec) {
    socket_.set_option(o, ec);
  }
  template <class Option>
  void get_option(Option& o, boost::system::error_code& ec) const {
    socket_.get_option(o, ec);
  }
  asio::ip::tcp::endpoint local_endpoint(boost::system::error_code& ec) const { return socket_.local_endpoint(ec); }
  asio::ip::tcp::endpoint remote_endpoint(boost::system::error_code& ec) const { return socket_.remote_endpoint(ec); }

  template <class MutableBufferSequence, class ReadToken>
  auto async_read_some(const MutableBufferSequence& buffers, ReadToken&& token) {
    return asio::async_initiate<ReadToken, void(boost::system::error_code, std::size_t)>(
        [this](auto handler, const MutableBufferSequence& b) {
          if (const auto ec = plan_->next(false)) return fail(std::move(handler), ec);
          socket_.async_read_some(b, std::move(handler));
        },
        token, buffers);
  }

  template <class ConstBufferSequence, class WriteToken>
  auto async_write_some(const ConstBufferSequence& buffers, WriteToken&& token) {
    return asio::async_initiate<WriteToken, void(boost::system::error_code, std::size_t)>(
        [this](auto handler, const ConstBufferSequence& b) {
          if (const auto ec = plan_->next(true)) return fail(std::move(handler), ec);
          socket_.async_write_some(b, std::move(handler));
        },
        token, buffers);
  }

 private:
  // Completes like the socket would: never inside the initiating call, on
  // the handler's executor, with no byte transferred.
  template <class Handler>
  void fail(Handler&& handler, boost::system::error_code ec) {
    asio::post(socket_.get_executor(), asio::append(std::forward<Handler>(handler), ec, std::size_t{0}));
  }

  socket_type socket_;
  std::shared_ptr<fault_plan> plan_;
};

}  // namespace closewise::test
