#pragma once
// SHA-256, incremental, through OpenSSL's EVP interface: the echo client and
// the tests compare what went out with what came back by digest, so that a
// 1 GiB transfer needs no copy of the data.
//
// Thread-safety: none; one object per stream of bytes.

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

struct evp_md_ctx_st;

namespace closewise::echo {

class sha256 {
 public:
  using digest = std::array<std::uint8_t, 32>;

  /// Throws std::runtime_error if OpenSSL cannot set up the digest.
  sha256();
  sha256(sha256&&) noexcept = default;
  sha256& operator=(sha256&&) noexcept = default;
  ~sha256() = default;

  /// Starts over, whether or not finish() was called.
  void reset();
  /// Adds bytes; may be called any number of times.
  void update(const void* data, std::size_t n);
  void update(std::string_view s) { update(s.data(), s.size()); }
  /// Returns the digest. The object must be reset() before reuse.
  digest finish();

  /// The digest of `s` in one call.
  static digest of(std::string_view s);

 private:
  struct ctx_free {
    void operator()(evp_md_ctx_st* c) const noexcept;
  };
  std::unique_ptr<evp_md_ctx_st, ctx_free> ctx_;
};

/// Lower-case hex, 64 characters.
std::string to_hex(const sha256::digest& d);

}  // namespace closewise::echo
