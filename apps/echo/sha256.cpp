#include "echo/sha256.hpp"

#include <openssl/err.h>
#include <openssl/evp.h>

#include <stdexcept>

namespace closewise::echo {

namespace {

[[noreturn]] void fail(const char* what) {
  const unsigned long e = ::ERR_get_error();
  char buf[256] = {};
  if (e != 0) ::ERR_error_string_n(e, buf, sizeof(buf));
  throw std::runtime_error(std::string("sha256: ") + what + (e != 0 ? std::string(": ") + buf : std::string()));
}

}  // namespace

void sha256::ctx_free::operator()(evp_md_ctx_st* c) const noexcept { ::EVP_MD_CTX_free(c); }

sha256::sha256() : ctx_(::EVP_MD_CTX_new()) {
  if (!ctx_) fail("EVP_MD_CTX_new");
  reset();
}

void sha256::reset() {
  if (::EVP_DigestInit_ex(ctx_.get(), ::EVP_sha256(), nullptr) != 1) fail("EVP_DigestInit_ex");
}

void sha256::update(const void* data, std::size_t n) {
  if (n == 0) return;
  if (::EVP_DigestUpdate(ctx_.get(), data, n) != 1) fail("EVP_DigestUpdate");
}

sha256::digest sha256::finish() {
  digest out{};
  unsigned int len = 0;
  if (::EVP_DigestFinal_ex(ctx_.get(), out.data(), &len) != 1 || len != out.size()) fail("EVP_DigestFinal_ex");
  return out;
}

sha256::digest sha256::of(std::string_view s) {
  sha256 h;
  h.update(s);
  return h.finish();
}

std::string to_hex(const sha256::digest& d) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out(d.size() * 2, '0');
  for (std::size_t i = 0; i < d.size(); ++i) {
    out[2 * i] = digits[d[i] >> 4];
    out[2 * i + 1] = digits[d[i] & 0xf];
  }
  return out;
}

}  // namespace closewise::echo
