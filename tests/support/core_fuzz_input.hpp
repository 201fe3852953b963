#pragma once
// Bytes -> a sequence of core events: the input format of the fuzz_core
// target, shared with the GoogleTest that replays fuzz/corpus/ and
// fuzz/regressions/ without libFuzzer (so a crash once found stays fixed).
//
// Every byte string decodes to a valid sequence (missing bytes read as 0), so
// the fuzzer never wastes executions on rejected inputs; whether the *events*
// make sense is exactly what the machine must cope with. The format is
// documented in fuzz/README.md; changing it invalidates the corpus.

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "closewise/core.hpp"
#include "core_invariants.hpp"

namespace closewise::test {

// At most this many events per input: bounds the time per execution (and
// the byte counters, which must not wrap).
inline constexpr std::size_t max_fuzz_events = 4096;

// The opcodes: one byte each, taken modulo 16, followed by its operands.
enum class fuzz_op : std::uint8_t {
  peer_data,          // size                     bytes_read
  peer_fin,           //                          eof
  peer_rst,           //                          read_error(reset)
  read_error,         // error                    read_error(any io_error, illegal ones included)
  write_started,      // size                     write_started
  write_done,         // size                     write_done (any size: may exceed what was started)
  partial_write,      // fraction                 write_done of a part of the last write_started
  write_error,        // error                    write_error(any io_error)
  write_broken,       // selector                 write_error(broken_pipe or reset): the peer went away mid-write
  shutdown_write,     //                          shutdown_write
  graceful_close,     // budget                   close(graceful)
  abort,              //                          close(abortive)
  close_any,          // policy probe... budget   close(any policy, any probe)
  timer_fired,        //                          linger_timeout (stale once finished or before any close)
  exchange_complete,  //                          exchange_complete
  local_error,        // cause                    local_error(any cause, none included)
};
inline constexpr std::size_t fuzz_op_count = 16;

// Reads the input one byte at a time; past the end it yields zeros.
class fuzz_reader {
 public:
  fuzz_reader(const std::uint8_t* data, std::size_t size) noexcept : data_(data), size_(size) {}
  bool done() const noexcept { return pos_ >= size_; }
  std::uint8_t next() noexcept { return pos_ < size_ ? data_[pos_++] : 0; }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

// Sizes that matter to the machine: 0, 1, a few bytes, a segment, KiB and
// MiB amounts (the discard budget), up to 2^31 (the counters add them up).
inline std::uint64_t decode_size(fuzz_reader& r) noexcept {
  const std::uint8_t b = r.next();
  const std::uint64_t low = b & 0x3fu;
  switch (b >> 6) {
    case 0:
      return low;
    case 1:
      return low * 1024;
    case 2:
      return low << 20;
    default:
      return std::uint64_t{1} << (low & 0x1fu);
  }
}

// Discard budgets: none, tiny, small, and the default.
inline drain_limits decode_limits(fuzz_reader& r) noexcept {
  static constexpr std::array<std::uint64_t, 4> budgets{0, 100, 4096, drain_limits{}.max_discard_bytes};
  drain_limits l;
  l.max_discard_bytes = budgets[r.next() % budgets.size()];
  return l;
}

inline std::vector<event> decode_events(const std::uint8_t* data, std::size_t size) {
  fuzz_reader r(data, size);
  std::vector<event> out;
  std::uint64_t last_started = 0;
  while (!r.done() && out.size() < max_fuzz_events) {
    switch (static_cast<fuzz_op>(r.next() % fuzz_op_count)) {
      case fuzz_op::peer_data:
        out.push_back(event::read(decode_size(r)));
        break;
      case fuzz_op::peer_fin:
        out.push_back(event::read_eof());
        break;
      case fuzz_op::peer_rst:
        out.push_back(event::read_failed(io_error::reset));
        break;
      case fuzz_op::read_error:
        out.push_back(event::read_failed(static_cast<io_error>(r.next() % 7)));
        break;
      case fuzz_op::write_started:
        last_started = decode_size(r);
        out.push_back(event::write_start(last_started));
        break;
      case fuzz_op::write_done:
        out.push_back(event::wrote(decode_size(r)));
        break;
      case fuzz_op::partial_write:
        out.push_back(event::wrote(last_started * r.next() / 255));
        break;
      case fuzz_op::write_error:
        out.push_back(event::write_failed(static_cast<io_error>(r.next() % 7)));
        break;
      case fuzz_op::write_broken:
        out.push_back(event::write_failed(r.next() % 2 == 0 ? io_error::broken_pipe : io_error::reset));
        break;
      case fuzz_op::shutdown_write:
        out.push_back(event::shutdown());
        break;
      case fuzz_op::graceful_close:
        out.push_back(event::close_with(close_policy::graceful, {}, decode_limits(r)));
        break;
      case fuzz_op::abort:
        out.push_back(event::close_with(close_policy::abortive));
        break;
      case fuzz_op::close_any: {
        const auto policy = static_cast<close_policy>(r.next() % 4);
        queue_probe q;
        q.valid = r.next() % 4 != 0;
        q.unread = decode_size(r);
        q.unacked = decode_size(r);
        out.push_back(event::close_with(policy, q, decode_limits(r)));
        break;
      }
      case fuzz_op::timer_fired:
        out.push_back(event::timer_fired());
        break;
      case fuzz_op::exchange_complete:
        out.push_back(event::complete());
        break;
      case fuzz_op::local_error:
        out.push_back(event::failed_locally(static_cast<close_cause>(r.next() % 13)));
        break;
    }
  }
  return out;
}

// Decodes and runs one input through the invariant checker.
template <typename Machine>
run_result run_fuzz_input(const std::uint8_t* data, std::size_t size) {
  return run_events<Machine>(decode_events(data, size));
}

}  // namespace closewise::test
