#include "replay_fuzz_input.hpp"

#include <poll.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string_view>
#include <thread>

#include "echo/session.hpp"
#include "reqresp/http_session.hpp"

namespace closewise::test {

std::vector<replay_step> decode_replay_input(const std::uint8_t* data, std::size_t size) {
  std::vector<replay_step> out;
  std::size_t at = 0;
  while (at < size && out.size() < max_replay_steps) {
    const std::uint8_t b = data[at++];
    replay_step s;
    s.op = static_cast<replay_op>(b % replay_op_count);
    s.slot = static_cast<std::uint8_t>(b / replay_op_count % replay_slots);
    if (s.op == replay_op::open || s.op == replay_op::send || s.op == replay_op::wait) {
      // Bytes past the end read as 0, so every input is valid.
      s.operand = at < size ? data[at++] : 0;
    }
    out.push_back(s);
  }
  return out;
}

std::size_t replay_send_size(std::uint8_t b) noexcept {
  if (b < 64) return b;
  if (b < 128) return std::size_t(b & 63) * 256;
  return std::size_t(b & 127) * 4096;
}

namespace {

// The echo payload: byte i of a connection's stream, so what comes back is
// checked without keeping what was sent. Every byte value occurs.
char echo_byte(std::uint64_t i) noexcept { return static_cast<char>((i * 131 + i / 4093) & 0xff); }

// What an HTTP slot sends: whole requests, halves of one, garbage, a body
// over the limit. No HEAD and no Expect, so a plain response parse applies.
constexpr std::array<std::string_view, 8> http_pieces{
    "GET / HTTP/1.1\r\nHost: f\r\n\r\n",
    "GET /bytes/200000 HTTP/1.1\r\nHost: f\r\n\r\n",
    "POST /echo HTTP/1.1\r\nHost: f\r\nContent-Length: 5\r\n\r\nhello",
    "GET / HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n",
    "GET /bytes/10 HTTP/1.1\r\nHo",
    "st: f\r\n\r\n",
    "\x01\x02 not a request\r\n\r\n",
    "POST /echo HTTP/1.1\r\nHost: f\r\nContent-Length: 100000\r\n\r\n0123456789",
};

server_options replay_server_options() {
  // Timeouts longer than a whole input (64 steps of at most 4 ms, then the
  // finish), so none cuts an echo short; a linger timeout short enough that a
  // refused HTTP client that never sends its FIN is reset within the input.
  return fuzz_server_options(std::chrono::seconds(2), std::chrono::milliseconds(200), std::chrono::milliseconds(500));
}

reqresp::http_options replay_http_options() {
  reqresp::http_options h;
  h.max_body_bytes = 4096;
  h.max_response_bytes = 256 * 1024;
  h.request_timeout = std::chrono::milliseconds(100);
  return h;
}

session_handler real_http_session() {
  return reqresp::make_session_handler(std::make_shared<reqresp::http_service>(replay_http_options()));
}

// The HTTP server as closewise-reqresp runs it: sessions start once a header is complete.
server_options replay_http_server_options() {
  server_options o = replay_server_options();
  reqresp::configure_server(o, replay_http_options());
  return o;
}

struct slot {
  client_socket s;
  bool http = false;
  bool reading = true;
  bool shut = false;
  bool ended = false;  // the read side saw EOF, a reset or an error
  read_end end = read_end::quiet;
  std::uint64_t sent = 0;
  std::uint64_t echoed = 0;  // echo: bytes back, checked as they arrive
  std::string http_sent;     // HTTP: what went out
  std::string http_got;      // HTTP: what came back
};

class replay_run {
 public:
  explicit replay_run(replay_fuzz_target& t, std::uint64_t& echo_conns, std::uint64_t& http_conns)
      : t_(t), echo_conns_(echo_conns), http_conns_(http_conns) {}

  std::optional<std::string> step(const replay_step& st) {
    slot& sl = slots_[st.slot];
    const bool open = sl.s.valid();
    switch (st.op) {
      case replay_op::open:
        if (open) break;
        sl = slot{};
        sl.http = st.operand % 2 == 1;
        sl.s = client_socket::connect_to(sl.http ? t_.http_port() : t_.echo_port());
        if (!sl.s.valid()) return "connect failed: " + std::string(std::strerror(errno));
        ++(sl.http ? http_conns_ : echo_conns_);
        break;
      case replay_op::send:
        if (open && !sl.shut) return send(sl, st.operand);
        break;
      case replay_op::shut_wr:
        if (open && !sl.shut) {
          sl.s.shutdown_write();
          sl.shut = true;
        }
        break;
      case replay_op::reset:
        sl.s.reset();
        break;
      case replay_op::close:
        sl.s.close();
        break;
      case replay_op::pause_reading:
        sl.reading = false;
        break;
      case replay_op::resume_reading:
        sl.reading = true;
        break;
      case replay_op::wait:
        return serve_for(std::chrono::milliseconds(st.operand % 5));
      case replay_op::finish:
        if (open) return finish(sl);
        break;
    }
    return serve_now();
  }

  std::optional<std::string> finish_all() {
    for (auto& sl : slots_) {
      if (!sl.s.valid()) continue;
      if (auto f = finish(sl)) return f;
    }
    return std::nullopt;
  }

 private:
  std::optional<std::string> send(slot& sl, std::uint8_t operand) {
    long n = 0;
    if (sl.http) {
      const std::string_view piece = http_pieces[operand % http_pieces.size()];
      n = sl.s.send_now(piece);
      if (n > 0) sl.http_sent.append(piece.substr(0, static_cast<std::size_t>(n)));
    } else {
      const std::size_t want =
          static_cast<std::size_t>(std::min<std::uint64_t>(replay_send_size(operand), max_replay_bytes - total_));
      std::string bytes(want, '\0');
      for (std::size_t i = 0; i < want; ++i) bytes[i] = echo_byte(sl.sent + i);
      n = sl.s.send_now(bytes);
      if (n > 0) total_ += static_cast<std::uint64_t>(n);
    }
    // EPIPE / ECONNRESET: the server ended the connection; the reads tell how.
    if (n > 0) sl.sent += static_cast<std::uint64_t>(n);
    return serve_now();
  }

  // Reads what a slot has now and checks the echo as it arrives.
  std::optional<std::string> take(slot& sl) {
    if (!sl.s.valid() || sl.ended) return std::nullopt;
    std::string got;
    const read_end e = sl.s.read_now(got);
    if (sl.http) {
      sl.http_got += got;
    } else {
      for (std::size_t i = 0; i < got.size(); ++i) {
        const std::uint64_t at = sl.echoed + i;
        if (at >= sl.sent) {
          return "the echo returned more than was sent (" + std::to_string(at + 1) + " of " + std::to_string(sl.sent) +
                 " bytes)";
        }
        if (got[i] != echo_byte(at)) return "the echo returned a wrong byte at offset " + std::to_string(at);
      }
      sl.echoed += got.size();
    }
    if (e != read_end::quiet) {
      sl.ended = true;
      sl.end = e;
    }
    return std::nullopt;
  }

  std::optional<std::string> serve_now() {
    for (auto& sl : slots_) {
      if (!sl.reading) continue;
      if (auto f = take(sl)) return f;
    }
    return std::nullopt;
  }

  // Serves every reading slot as bytes arrive, until `d` has passed.
  std::optional<std::string> serve_for(std::chrono::milliseconds d) {
    const auto end = steady_clock::now() + d;
    for (;;) {
      if (auto f = serve_now()) return f;
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - steady_clock::now()).count();
      if (left <= 0) return std::nullopt;
      std::array<pollfd, replay_slots> p{};
      nfds_t n = 0;
      for (auto& sl : slots_) {
        if (sl.reading && sl.s.valid() && !sl.ended) p[n++] = pollfd{sl.s.fd(), POLLIN, 0};
      }
      // Nothing to read: the wait is still part of the script.
      ::poll(p.data(), n, static_cast<int>(left));
    }
  }

  std::optional<std::string> finish(slot& sl) {
    sl.reading = true;
    if (!sl.shut) {
      sl.s.shutdown_write();
      sl.shut = true;
    }
    const auto deadline = steady_clock::now() + std::chrono::seconds(2);
    while (!sl.ended) {
      if (auto f = take(sl)) return f;
      if (sl.ended) break;
      if (steady_clock::now() >= deadline) {
        return std::string(sl.http ? "the HTTP" : "the echo") +
               " server did not end the connection within 2 s of our FIN";
      }
      pollfd p{sl.s.fd(), POLLIN, 0};
      ::poll(&p, 1, 10);
    }
    if (sl.end == read_end::eof) {
      if (!sl.http && sl.echoed != sl.sent) {
        return "the echo ended with EOF after " + std::to_string(sl.echoed) + " of " + std::to_string(sl.sent) +
               " bytes";
      }
      if (sl.http) {
        const response_sequence r = parse_responses(sl.http_got, {});
        if (r.error) return "HTTP: " + *r.error;
        if (r.leftover > 0)
          return "HTTP: " + std::to_string(r.leftover) + " bytes of an incomplete response before EOF";
      }
    }
    sl.s.close();
    return std::nullopt;
  }

  replay_fuzz_target& t_;
  std::uint64_t& echo_conns_;
  std::uint64_t& http_conns_;
  std::array<slot, replay_slots> slots_;
  std::uint64_t total_ = 0;
};

}  // namespace

replay_fuzz_target::replay_fuzz_target(unsigned diag_every)
    : replay_fuzz_target(session_handler{}, session_handler{}, diag_every) {}

replay_fuzz_target::replay_fuzz_target(session_handler echo, session_handler http, unsigned diag_every)
    : echo_(replay_server_options(),
            echo ? std::move(echo) : echo::make_session(echo::session_options_for(replay_server_options()))),
      http_(replay_http_server_options(), http ? std::move(http) : real_http_session()),
      diag_every_(std::max(diag_every, 1u)) {}

std::optional<std::string> replay_fuzz_target::run(const std::uint8_t* data, std::size_t size) {
  const auto fds_before = open_descriptors();
  const auto script = decode_replay_input(data, size);
  {
    replay_run r(*this, echo_connections_, http_connections_);
    for (std::size_t i = 0; i < script.size(); ++i) {
      if (auto f = r.step(script[i])) return "step " + std::to_string(i) + ": " + *f;
    }
    if (auto f = r.finish_all()) return "finishing: " + *f;
  }
  if (!echo_.wait_all_closed(echo_connections_, std::chrono::seconds(2))) {
    return "the echo server still has open connections 2 s after the input ended";
  }
  if (!http_.wait_all_closed(http_connections_, std::chrono::seconds(2))) {
    return "the HTTP server still has open connections 2 s after the input ended";
  }
  if (++inputs_ % diag_every_ == 0) {
    for (const std::uint16_t port : {echo_.port(), http_.port()}) {
      if (auto f = stuck_server_sockets(port, std::chrono::milliseconds(500))) return *f;
    }
  }
  // Sockets only: the sanitizers' runtime opens and closes pipes of its own
  // in any thread (UBSan's vptr check probes memory through a pipe), which a
  // listing may catch. The server's counters are read without a lock, so a
  // socket accepted or closed just now may be counted a moment before its
  // descriptor shows it: look again for up to 500 ms.
  const auto settle_end = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  for (;;) {
    const auto fds_after = open_descriptors();
    const std::size_t before = count_sockets(fds_before), after = count_sockets(fds_after);
    if (before == after) break;
    if (std::chrono::steady_clock::now() >= settle_end) {
      return "sockets: " + std::to_string(before) + " before the input, " + std::to_string(after) +
             " 500 ms after it ended; new descriptors: " + new_descriptors(fds_before, fds_after);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return std::nullopt;
}

}  // namespace closewise::test
