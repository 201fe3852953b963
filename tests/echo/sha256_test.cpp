// SHA-256 (OpenSSL's, behind the echo client's interface) against the FIPS 180-2 / NIST vectors, across block and
// padding boundaries, and independent of how the input is cut; the seeded payload independent of how it is cut.

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "echo/client.hpp"
#include "echo/sha256.hpp"

using closewise::echo::seeded_bytes;
using closewise::echo::sha256;
using closewise::echo::to_hex;

namespace {

std::string hex_of(const std::string& s) { return to_hex(sha256::of(s)); }

TEST(sha256, known_vectors) {
  EXPECT_EQ(hex_of(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex_of("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(hex_of("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrs"
                   "mnopqrstnopqrstu"),
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
  EXPECT_EQ(hex_of(std::string(1'000'000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// The padding needs a second block from 56 bytes on (mod 64): each side of
// that edge and of the block edge (values from Python's hashlib).
TEST(sha256, padding_and_block_boundaries) {
  const std::vector<std::pair<std::size_t, std::string>> cases{
      {55, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318"},
      {56, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a"},
      {63, "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34"},
      {64, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"},
      {65, "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0"},
      {119, "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb"},
      {120, "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c"},
  };
  for (const auto& [n, want] : cases) EXPECT_EQ(hex_of(std::string(n, 'a')), want) << n << " bytes";
}

TEST(sha256, any_split_of_the_input_gives_the_same_digest) {
  const std::string input(1'000'000, 'a');
  std::mt19937 rng(42);
  for (int round = 0; round < 5; ++round) {
    std::uniform_int_distribution<std::size_t> piece(0, round == 0 ? 1 : 200 * round);
    sha256 h;
    std::size_t at = 0;
    while (at < input.size()) {
      const std::size_t n = std::min(piece(rng), input.size() - at);
      h.update(input.data() + at, n);
      at += n;
    }
    EXPECT_EQ(to_hex(h.finish()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") << round;
  }
}

TEST(sha256, reset_starts_over) {
  sha256 h;
  h.update("garbage");
  (void)h.finish();
  h.reset();
  h.update("abc");
  EXPECT_EQ(to_hex(h.finish()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(sha256, reset_without_finish_and_moves_keep_the_state) {
  sha256 h;
  h.update("garbage");
  h.reset();
  h.update("a");
  sha256 moved = std::move(h);
  moved.update("bc");
  EXPECT_EQ(to_hex(moved.finish()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(seeded_bytes, stream_does_not_depend_on_chunking_and_seeds_differ) {
  std::string whole(100'003, '\0');
  seeded_bytes(9).fill(whole.data(), whole.size());
  std::mt19937 rng(1);
  std::uniform_int_distribution<std::size_t> piece(0, 17);
  std::string cut(whole.size(), '\0');
  seeded_bytes g(9);
  for (std::size_t at = 0; at < cut.size();) {
    const std::size_t n = std::min(piece(rng), cut.size() - at);
    g.fill(cut.data() + at, n);
    at += n;
  }
  EXPECT_TRUE(cut == whole);
  std::string other(whole.size(), '\0');
  seeded_bytes(10).fill(other.data(), other.size());
  EXPECT_FALSE(other == whole);
}

}  // namespace
