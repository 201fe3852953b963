#pragma once
// SHA-256 (FIPS 180-4), incremental, no dependencies: the echo client and the
// tests compare what went out with what came back by digest, so that a
// 1 GiB transfer needs neither a copy of the data nor OpenSSL.
//
// Thread-safety: none; one object per stream of bytes.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace closewise::echo {

class sha256 {
 public:
  using digest = std::array<std::uint8_t, 32>;

  sha256() noexcept { reset(); }
  void reset() noexcept;
  /// Adds bytes; may be called any number of times.
  void update(const void* data, std::size_t n) noexcept;
  void update(std::string_view s) noexcept { update(s.data(), s.size()); }
  /// Pads and returns the digest. The object must be reset() before reuse.
  digest finish() noexcept;

  /// The digest of `s` in one call.
  static digest of(std::string_view s) noexcept;

 private:
  void compress(const std::uint8_t* block) noexcept;

  std::array<std::uint32_t, 8> h_{};
  std::array<std::uint8_t, 64> buffer_{};
  std::size_t buffered_ = 0;
  std::uint64_t length_ = 0;  // bytes hashed so far
};

/// Lower-case hex, 64 characters.
std::string to_hex(const sha256::digest& d);

}  // namespace closewise::echo
