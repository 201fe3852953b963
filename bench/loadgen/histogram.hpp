#pragma once
// A latency histogram with bounded relative error: 64 linear buckets per
// power of two (under 1.6 % error), nanoseconds up to about 18 minutes, a
// fixed 18 KiB per thread, merged once at the end. Recording is one
// count-leading-zeros and an increment: cheap enough for every cycle.
//
// Thread-safety: one histogram per thread; `merge` after the threads joined.

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>

namespace closewise::bench {

class histogram {
 public:
  static constexpr unsigned sub_bits = 6;
  static constexpr std::uint64_t sub_count = std::uint64_t{1} << sub_bits;
  static constexpr unsigned max_exponent = 40;  // 2^40 ns ~ 18 min; larger values land in the last bucket
  static constexpr std::size_t bucket_count = (max_exponent - sub_bits + 1) * sub_count + sub_count;

  void record(std::uint64_t ns) noexcept {
    ++counts_[index(ns)];
    ++total_;
    sum_ += ns;
    max_ = std::max(max_, ns);
  }

  void merge(const histogram& o) noexcept {
    for (std::size_t i = 0; i < bucket_count; ++i) counts_[i] += o.counts_[i];
    total_ += o.total_;
    sum_ += o.sum_;
    max_ = std::max(max_, o.max_);
  }

  std::uint64_t count() const noexcept { return total_; }
  std::uint64_t max() const noexcept { return max_; }
  double mean() const noexcept { return total_ == 0 ? 0.0 : static_cast<double>(sum_) / static_cast<double>(total_); }

  /// The value at quantile q (0..1): the middle of the bucket holding it,
  /// never above the true maximum.
  std::uint64_t quantile(double q) const noexcept {
    if (total_ == 0) return 0;
    const auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total_ - 1)) + 1;
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < bucket_count; ++i) {
      seen += counts_[i];
      if (seen >= rank) return std::min(middle(i), max_);
    }
    return max_;
  }

 private:
  static std::size_t index(std::uint64_t v) noexcept {
    if (v < sub_count) return static_cast<std::size_t>(v);
    unsigned e = 63u - static_cast<unsigned>(std::countl_zero(v));  // >= sub_bits
    if (e > max_exponent) return bucket_count - 1;
    const std::uint64_t sub = (v >> (e - sub_bits)) & (sub_count - 1);
    return static_cast<std::size_t>((e - sub_bits + 1) * sub_count + sub);
  }
  static std::uint64_t middle(std::size_t i) noexcept {
    if (i < sub_count) return i;
    const std::uint64_t e = i / sub_count + sub_bits - 1;
    const std::uint64_t sub = i % sub_count;
    const std::uint64_t low = (sub_count + sub) << (e - sub_bits);
    const std::uint64_t width = std::uint64_t{1} << (e - sub_bits);
    return low + width / 2;
  }

  std::array<std::uint64_t, bucket_count> counts_{};
  std::uint64_t total_ = 0;
  std::uint64_t sum_ = 0;
  std::uint64_t max_ = 0;
};

}  // namespace closewise::bench
