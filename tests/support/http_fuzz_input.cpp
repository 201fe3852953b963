#include "http_fuzz_input.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

namespace closewise::test {

using std::chrono::microseconds;

http_fuzz_plan decode_http_input(const std::uint8_t* data, std::size_t size) {
  std::size_t at = 0;
  // Bytes past the end read as 0, so every input is valid.
  auto next = [&]() -> std::uint8_t { return at < size ? data[at++] : 0; };
  http_fuzz_plan p;
  switch (next() % 4) {
    case 2:
      p.ending = http_fuzz_ending::read_then_reset;
      break;
    case 3:
      p.ending = http_fuzz_ending::reset;
      break;
    default:  // two of four: the ending whose responses must all be complete
      p.ending = http_fuzz_ending::half_close;
      break;
  }
  const std::size_t k = next() % (max_http_fuzz_splits + 1);
  struct raw_split {
    std::size_t offset;
    std::uint8_t pause;
  };
  std::vector<raw_split> raw;
  for (std::size_t i = 0; i < k; ++i) {
    const std::size_t hi = next();
    const std::size_t lo = next();
    raw.push_back({hi << 8 | lo, next()});
  }
  if (at < size) p.payload.assign(reinterpret_cast<const char*>(data + at), std::min(size - at, max_http_fuzz_payload));
  microseconds budget = max_http_fuzz_pause;
  for (const auto& r : raw) {
    // < 128: a split with no pause (two sends); 128..253: 50 us steps up to
    // 6.3 ms; 254, 255: 25 ms, longer than the request timeout (408).
    microseconds pause{0};
    if (r.pause >= 254) {
      pause = microseconds(25000);
    } else if (r.pause >= 128) {
      pause = microseconds((r.pause - 127) * 50);
    }
    pause = std::min(pause, budget);
    budget -= pause;
    p.splits.push_back({r.offset % (p.payload.size() + 1), pause});
  }
  std::stable_sort(p.splits.begin(), p.splits.end(), [](const auto& a, const auto& b) { return a.at < b.at; });
  return p;
}

reqresp::http_options http_fuzz_options() {
  reqresp::http_options o;
  o.max_header_bytes = 512;
  o.max_body_bytes = 1024;
  o.max_response_bytes = 4096;
  o.request_timeout = std::chrono::milliseconds(20);
  return o;
}

server_options http_fuzz_server_options() {
  // Idle/read/write timeouts far longer than an input's pauses (40 ms at
  // most) and than the 500 ms the client waits for a FIN after a closing
  // response (so a timeout cannot hide a server that forgot to close), yet
  // within the 2 s the client waits for the end of a connection. No input
  // waits for them: the client ends every connection itself. The 408 comes
  // from the 20 ms request timeout, not from these.
  // And as closewise-reqresp runs: sessions start once a header is complete,
  // so the pieces of a cut header are read while the connection waits parked.
  server_options o = fuzz_server_options(std::chrono::milliseconds(1000), std::chrono::milliseconds(100),
                                         std::chrono::milliseconds(300));
  reqresp::configure_server(o, http_fuzz_options());
  return o;
}

namespace {

bool documented(unsigned status) {
  switch (status) {
    case 100:
    case 200:
    case 400:
    case 404:
    case 405:
    case 408:
    case 413:
    case 414:
    case 417:
    case 431:
    case 501:
      return true;
    default:
      return false;
  }
}

// Statuses only a refusal sends: the connection must close after them.
bool refusal_only(unsigned status) {
  return status == 408 || status == 413 || status == 414 || status == 417 || status == 431;
}

const char* ending_name(http_fuzz_ending e) {
  switch (e) {
    case http_fuzz_ending::half_close:
      return "half-close";
    case http_fuzz_ending::read_then_reset:
      return "read-then-reset";
    case http_fuzz_ending::reset:
      return "reset";
  }
  return "?";
}

std::string statuses(const response_sequence& s) {
  std::string out;
  for (const auto& r : s.responses) {
    if (!out.empty()) out += ' ';
    out += std::to_string(r.status);
    if (!r.keep_alive) out += "(close)";
  }
  return out.empty() ? "none" : out;
}

struct counters_seen {
  std::uint64_t requests, refused, responses;
};

counters_seen read_counters(const reqresp::http_counters& c) {
  return {c.requests.load(std::memory_order_relaxed), c.refused.load(std::memory_order_relaxed),
          c.responses.load(std::memory_order_relaxed)};
}

}  // namespace

http_fuzz_target::http_fuzz_target() : http_fuzz_target(session_handler{}) {}

http_fuzz_target::http_fuzz_target(session_handler h)
    : svc_(std::make_shared<reqresp::http_service>(http_fuzz_options())),
      srv_(http_fuzz_server_options(), h ? std::move(h) : reqresp::make_session_handler(svc_)) {
  svc_->set_stats(&srv_.get().stats());
}

std::optional<std::string> http_fuzz_target::run(const std::uint8_t* data, std::size_t size) {
  last_statuses_.clear();
  const http_fuzz_plan plan = decode_http_input(data, size);
  const counters_seen before = read_counters(svc_->counters());
  const std::string where = std::string(" [ending ") + ending_name(plan.ending) + ", " +
                            std::to_string(plan.payload.size()) + " bytes in " +
                            std::to_string(plan.splits.size() + 1) + " pieces]";

  client_socket s = client_socket::connect_to(srv_.port());
  if (!s.valid()) return "connect failed: " + std::string(std::strerror(errno)) + where;
  ++connections_;

  std::string got;
  std::size_t from = 0;
  bool server_gone = false;
  auto send_piece = [&](std::size_t to) -> std::optional<std::string> {
    if (server_gone || to <= from) return std::nullopt;
    const int err = s.send_all(std::string_view(plan.payload).substr(from, to - from),
                               steady_clock::now() + std::chrono::seconds(1), nullptr, &got);
    from = to;
    if (err == ETIMEDOUT) return "the server stopped reading for 1 s" + where;
    // EPIPE / ECONNRESET: the server closed (a refusal's drain ended); what it sent before still counts.
    if (err != 0) server_gone = true;
    return std::nullopt;
  };
  for (const auto& sp : plan.splits) {
    if (auto f = send_piece(sp.at)) return f;
    if (sp.pause.count() > 0 && !server_gone) {
      // Pausing is part of the input; keep reading so the server never waits on us.
      s.read(got, steady_clock::now() + sp.pause);
    }
  }
  if (auto f = send_piece(plan.payload.size())) return f;

  read_end end = read_end::quiet;
  switch (plan.ending) {
    case http_fuzz_ending::half_close:
      s.shutdown_write();
      end = s.read(got, steady_clock::now() + std::chrono::seconds(2));
      if (end == read_end::deadline) return "the server did not end the connection within 2 s of our FIN" + where;
      s.close();
      break;
    case http_fuzz_ending::read_then_reset: {
      end = s.read(got, steady_clock::now() + std::chrono::milliseconds(100), std::chrono::milliseconds(2));
      // A response that closes the connection must be followed by the
      // server's FIN (or a RST) without our FIN. Wait for it far longer than
      // the 2 ms quiet (a 2-core machine under load once kept it back more
      // than 100 ms), but less than the 1 s idle timeout, which would close
      // for a server that forgot to.
      const auto so_far = parse_responses(got, parse_requests(plan.payload, svc_->options().max_header_bytes).head);
      const bool closing = std::any_of(so_far.responses.begin(), so_far.responses.end(),
                                       [](const parsed_response& r) { return !r.keep_alive; });
      if (closing && (end == read_end::quiet || end == read_end::deadline)) {
        end = s.read(got, steady_clock::now() + std::chrono::milliseconds(500));
        if (end == read_end::deadline) {
          return "no FIN within 500 ms of a response that closed the connection (responses: " + statuses(so_far) + ")" +
                 where;
        }
      }
      s.reset();
      break;
    }
    case http_fuzz_ending::reset:
      s.reset();
      break;
  }
  if (!srv_.wait_all_closed(connections_, std::chrono::seconds(2)))
    return "the server kept the connection open 2 s after the client ended it" + where;

  const request_sequence reqs = parse_requests(plan.payload, svc_->options().max_header_bytes);
  const response_sequence seq = parse_responses(got, reqs.head);
  for (const auto& r : seq.responses)
    if (r.status >= 200) last_statuses_.push_back(r.status);
  const std::string seen = " (responses: " + statuses(seq) + ")" + where;
  if (seq.error) return *seq.error + seen;
  if (plan.ending == http_fuzz_ending::half_close && seq.leftover > 0) {
    return std::to_string(seq.leftover) + " bytes of an incomplete response before the " + std::string(to_string(end)) +
           seen;
  }
  for (std::size_t i = 0; i < seq.responses.size(); ++i) {
    const auto& r = seq.responses[i];
    if (!documented(r.status)) return "undocumented status " + std::to_string(r.status) + seen;
    if (refusal_only(r.status) && r.keep_alive)
      return "status " + std::to_string(r.status) + " without Connection: close" + seen;
    if (!r.keep_alive && (i + 1 < seq.responses.size() || seq.leftover > 0)) {
      return "bytes after a response that closed the connection" + seen;
    }
  }
  // At most one answer to a request that is incomplete or malformed (its refusal).
  if (seq.final_count > reqs.complete + 1) {
    return std::to_string(seq.final_count) + " responses to " + std::to_string(reqs.complete) + " complete requests" +
           seen;
  }

  const counters_seen after = read_counters(svc_->counters());
  const std::uint64_t requests = after.requests - before.requests;
  const std::uint64_t refused = after.refused - before.refused;
  const std::uint64_t responses = after.responses - before.responses;
  if (responses > requests + refused) {
    return "counters: " + std::to_string(responses) + " responses for " + std::to_string(requests) + " requests and " +
           std::to_string(refused) + " refusals" + seen;
  }
  if (requests > reqs.complete) {
    return "counters: the server accepted " + std::to_string(requests) + " requests of " +
           std::to_string(reqs.complete) + " complete ones sent" + seen;
  }
  if (plan.ending == http_fuzz_ending::half_close && end == read_end::eof && responses != seq.final_count) {
    return "counters: the server wrote " + std::to_string(responses) + " responses, the client read " +
           std::to_string(seq.final_count) + seen;
  }
  return std::nullopt;
}

}  // namespace closewise::test
