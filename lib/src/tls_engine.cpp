// closewise's TLS engine: OpenSSL behind a BIO whose buffers exist only
// while records pass through (closewise/impl/tls_engine.hpp).

#include <openssl/err.h>

#include <algorithm>
#include <cstring>

#include <boost/asio/ssl/error.hpp>
#include <boost/system/system_error.hpp>

#include "closewise/impl/tls_engine.hpp"

namespace closewise::detail {

namespace {

// One whole record of the largest kind (TLS 1.2 allows 2^14 + 2048 bytes of
// ciphertext) and its header: a full-sized read takes a record at once.
constexpr std::size_t input_capacity = 16384 + 2048 + 5;

}  // namespace

BIO_METHOD* tls_engine::bio_method() {
  static BIO_METHOD* const method = [] {
    BIO_METHOD* m = ::BIO_meth_new(::BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "closewise records");
    if (m == nullptr || ::BIO_meth_set_write(m, &tls_engine::bio_write) != 1 ||
        ::BIO_meth_set_read(m, &tls_engine::bio_read) != 1 || ::BIO_meth_set_ctrl(m, &tls_engine::bio_ctrl) != 1)
      return static_cast<BIO_METHOD*>(nullptr);
    return m;
  }();
  return method;
}

tls_engine::tls_engine(SSL_CTX* ctx) {
  BIO_METHOD* m = bio_method();
  ssl_ = m ? ::SSL_new(ctx) : nullptr;
  BIO* bio = ssl_ ? ::BIO_new(m) : nullptr;
  if (bio == nullptr) {
    if (ssl_) ::SSL_free(ssl_);
    const unsigned long err = ::ERR_get_error();
    throw boost::system::system_error(error_code(static_cast<int>(err), asio::error::get_ssl_category()),
                                      "closewise: making a TLS connection object");
  }
  ::BIO_set_data(bio, this);
  ::BIO_set_init(bio, 1);
  ::SSL_set_bio(ssl_, bio, bio);  // one BIO both ways; the SSL object owns it
  ::SSL_set_mode(ssl_, SSL_MODE_RELEASE_BUFFERS);
}

tls_engine::~tls_engine() { ::SSL_free(ssl_); }

int tls_engine::bio_write(BIO* b, const char* data, int size) {
  auto* e = static_cast<tls_engine*>(::BIO_get_data(b));
  ::BIO_clear_retry_flags(b);
  if (size <= 0) return 0;
  const auto* p = reinterpret_cast<const unsigned char*>(data);
  e->out_.insert(e->out_.end(), p, p + size);
  return size;
}

int tls_engine::bio_read(BIO* b, char* data, int size) {
  auto* e = static_cast<tls_engine*>(::BIO_get_data(b));
  ::BIO_clear_retry_flags(b);
  const std::size_t n = std::min<std::size_t>(e->input_left(), size > 0 ? static_cast<std::size_t>(size) : 0);
  if (n == 0) {
    ::BIO_set_retry_read(b);  // more comes from the network: SSL_ERROR_WANT_READ
    return -1;
  }
  std::memcpy(data, e->in_.get() + e->in_begin_, n);
  e->in_begin_ += n;
  return static_cast<int>(n);
}

long tls_engine::bio_ctrl(BIO* b, int cmd, long, void*) {
  auto* e = static_cast<tls_engine*>(::BIO_get_data(b));
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      return 1;  // the op that made the call sends what was written
    case BIO_CTRL_PENDING:
      return static_cast<long>(e->input_left());
    case BIO_CTRL_WPENDING:
      return static_cast<long>(e->out_.size());
    default:
      return 0;
  }
}

tls_engine::step tls_engine::perform(int result, std::size_t moved) noexcept {
  const int err = ::SSL_get_error(ssl_, result);
  const unsigned long sys = ::ERR_get_error();
  step s;
  switch (err) {
    case SSL_ERROR_NONE:
      s.n = moved;
      return s;
    case SSL_ERROR_WANT_READ:
      s.want_input = true;
      return s;
    case SSL_ERROR_ZERO_RETURN:
      s.ec = asio::error::eof;  // the peer's close_notify
      return s;
    default:  // SSL_ERROR_SSL, SSL_ERROR_SYSCALL, and SSL_ERROR_WANT_WRITE, which our BIO never asks for
      s.ec = sys != 0 ? error_code(static_cast<int>(sys), asio::error::get_ssl_category())
                      : error_code(asio::ssl::error::unspecified_system_error);
      return s;
  }
}

tls_engine::step tls_engine::handshake(asio::ssl::stream_base::handshake_type type) {
  if (!role_set_) {  // once: setting it again would start the handshake over
    role_set_ = true;
    if (type == asio::ssl::stream_base::server)
      ::SSL_set_accept_state(ssl_);
    else
      ::SSL_set_connect_state(ssl_);
  }
  ::ERR_clear_error();
  return perform(::SSL_do_handshake(ssl_));
}

tls_engine::step tls_engine::read(void* data, std::size_t size) {
  ::ERR_clear_error();
  std::size_t got = 0;
  const int r = ::SSL_read_ex(ssl_, data, size, &got);
  return perform(r, got);
}

tls_engine::step tls_engine::write(const void* data, std::size_t size) {
  ::ERR_clear_error();
  std::size_t put = 0;
  const int r = ::SSL_write_ex(ssl_, data, size, &put);
  return perform(r, put);
}

tls_engine::step tls_engine::close_notify() {
  ::ERR_clear_error();
  const int r = ::SSL_shutdown(ssl_);
  if (r >= 0) return {};  // 0: ours sent, theirs not yet seen; 1: both
  return perform(r);
}

std::vector<unsigned char> tls_engine::take_output() noexcept {
  std::vector<unsigned char> v;
  v.swap(out_);
  return v;
}

asio::mutable_buffer tls_engine::input_space() {
  if (!in_) in_ = std::make_unique_for_overwrite<unsigned char[]>(input_capacity);
  if (in_begin_ == in_end_) in_begin_ = in_end_ = 0;
  return asio::buffer(in_.get() + in_end_, input_capacity - in_end_);
}

void tls_engine::input_arrived(std::size_t n) noexcept { in_end_ += n; }

void tls_engine::release_input() noexcept {
  if (input_left() != 0) return;
  in_.reset();
  in_begin_ = in_end_ = 0;
}

std::size_t tls_engine::unread() const noexcept {
  return static_cast<std::size_t>(std::max(0, ::SSL_pending(ssl_))) + input_left();
}

error_code tls_engine::end_of_stream() const noexcept {
  if ((::SSL_get_shutdown(ssl_) & SSL_RECEIVED_SHUTDOWN) != 0) return asio::error::eof;
  return asio::ssl::error::stream_truncated;
}

}  // namespace closewise::detail
