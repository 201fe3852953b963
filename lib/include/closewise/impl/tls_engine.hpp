#pragma once
// closewise's TLS engine: OpenSSL's connection object behind a BIO of our
// own, and the composed operation that moves its records to and from the
// closewise stream under it. Implementation: included by closewise/tls.hpp.
//
// Why not Asio's ssl::stream: it allocates two 17 KiB record buffers per
// stream and its engine's BIO pair two more, for the connection's whole
// life. Here the only buffers are the ones records are passing through:
//
// - input: a record buffer taken when OpenSSL asks for input and given
//   back once it consumed it. The read takes what the socket has now
//   (basic_stream::read_some_now); when it has nothing, the buffer goes back
//   and the operation waits for readability holding none
//   (basic_stream::async_wait_readable, under the read's own clock), so an
//   idle connection holds no buffer.
// - output: what OpenSSL wrote during one call, moved out to be sent and
//   freed when sent; several records (a response's header and body, a
//   handshake flight, close_notify) leave in one write.
// - OpenSSL's own buffers go with SSL_MODE_RELEASE_BUFFERS.

#include <openssl/ssl.h>

#include <cstddef>
#include <memory>
#include <vector>

#include <boost/asio/append.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/stream_base.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include "closewise/error.hpp"
#include "closewise/export.hpp"

namespace closewise {
namespace asio = boost::asio;
}  // namespace closewise

namespace closewise::detail {

// Exported although in detail: the inline I/O operations of closewise/tls.hpp
// call it from the user's code.
class CLOSEWISE_API tls_engine {
 public:
  // A new connection object of `ctx`, with our BIO in front. Throws
  // boost::system::system_error when OpenSSL cannot make one.
  explicit tls_engine(SSL_CTX* ctx);
  ~tls_engine();
  tls_engine(const tls_engine&) = delete;
  tls_engine& operator=(const tls_engine&) = delete;

  SSL* native_handle() const noexcept { return ssl_; }

  // What one OpenSSL call came to: done (with `ec` and the plaintext bytes
  // `n`), or it wants more input first.
  struct step {
    bool want_input = false;
    error_code ec{};
    std::size_t n = 0;
  };
  step handshake(asio::ssl::stream_base::handshake_type type);
  step read(void* data, std::size_t size);
  step write(const void* data, std::size_t size);
  // Sends our close_notify (once; it does not wait for the peer's).
  step close_notify();

  // Records OpenSSL wrote and nobody took yet.
  bool has_output() const noexcept { return !out_.empty(); }
  // Takes them to be sent (the vector's storage does not move with it).
  std::vector<unsigned char> take_output() noexcept;

  // The buffer the next network read fills (taken now if none is held).
  asio::mutable_buffer input_space();
  // The network read brought `n` bytes.
  void input_arrived(std::size_t n) noexcept;
  // Records read from the network that OpenSSL has not taken yet.
  std::size_t input_left() const noexcept { return in_end_ - in_begin_; }
  // Gives the record buffer back if nothing is left in it.
  void release_input() noexcept;
  // Bytes held back from the application: decrypted (SSL_pending) or records not yet processed.
  std::size_t unread() const noexcept;
  // The network read met the peer's FIN: an end authenticated by close_notify
  // (asio::error::eof) or not (asio::ssl::error::stream_truncated).
  error_code end_of_stream() const noexcept;

 private:
  // What OpenSSL's call said (`result`), with the bytes it moved on success.
  step perform(int result, std::size_t moved = 0) noexcept;
  static int bio_write(BIO* b, const char* data, int size);
  static int bio_read(BIO* b, char* data, int size);
  static long bio_ctrl(BIO* b, int cmd, long num, void* ptr);
  static BIO_METHOD* bio_method();

  SSL* ssl_ = nullptr;
  std::vector<unsigned char> out_;
  std::unique_ptr<unsigned char[]> in_;
  std::size_t in_begin_ = 0;
  std::size_t in_end_ = 0;
  bool role_set_ = false;
};

// Runs one engine call to its end: writes what it wrote, reads what it
// asks for, and calls again. `Impl` has `tcp` (a closewise basic_stream),
// `engine`, `flushing` and `flush_done` (a timer that never expires,
// cancelled when a flush ends). One op writes to the TCP stream at a time:
// another that has records to send waits for it, and sends its own after,
// in the order OpenSSL wrote them.
template <class Impl, class Call>
struct tls_io_op {
  Impl* impl;  // kept alive by the operation that started this one
  Call call;
  enum { calling, flushing, waiting_flush, waiting_input, posted } stage = calling;
  bool started = false;
  tls_engine::step last{};
  std::vector<unsigned char> sending{};

  template <class Self>
  void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
    // The first call runs inside the initiating function: a result reached
    // without waiting is posted, never delivered from there.
    const bool initiating = !started;
    started = true;
    auto& i = *impl;
    auto& e = i.engine;
    for (;;) {
      switch (stage) {
        case calling:
          last = call(e);
          [[fallthrough]];
        case waiting_flush:
          if (e.has_output()) {
            if (i.flushing) {
              // Woken (or cancelled) when the other op's flush ends; a
              // cancellation meanwhile waits for that flush too.
              stage = waiting_flush;
              i.flush_done.async_wait(std::move(self));
              return;
            }
            i.flushing = true;
            sending = e.take_output();
            stage = flushing;
            const auto b = asio::buffer(sending);  // the storage stays put when `self` moves
            asio::async_write(i.tcp, b, std::move(self));
            return;
          }
          if (!last.want_input) return finish(self, initiating, last.ec, last.n);
          break;
        case flushing:
          i.flushing = false;
          i.flush_done.cancel();
          sending = {};
          if (ec) return finish(self, initiating, ec, 0);
          if (!last.want_input) return finish(self, initiating, last.ec, last.n);
          break;
        case waiting_input:
          if (ec) return finish(self, initiating, ec, 0);
          break;
        case posted:
          return self.complete(ec, n);
      }
      // OpenSSL wants input: read what the socket has; wait for more
      // holding no buffer.
      const auto b = e.input_space();
      error_code rec;
      const std::size_t got = i.tcp.read_some_now(b, rec);
      if (rec == asio::error::would_block || (!rec && got == 0)) {  // (never 0 bytes without an error)
        e.release_input();
        stage = waiting_input;
        i.tcp.async_wait_readable(std::move(self));
        return;
      }
      if (rec) {
        e.release_input();
        return finish(self, initiating, rec == asio::error::eof ? e.end_of_stream() : rec, 0);
      }
      e.input_arrived(got);
      stage = calling;
    }
  }

 private:
  template <class Self>
  void finish(Self& self, bool initiating, error_code ec, std::size_t n) {
    impl->engine.release_input();  // if OpenSSL took all of it
    if (!initiating) return self.complete(ec, n);
    stage = posted;
    asio::post(asio::append(std::move(self), ec, n));
  }
};

}  // namespace closewise::detail
