#include "closewise/stats.hpp"

#include "stats_recorder.hpp"

#include <fmt/format.h>

namespace closewise {

std::string_view to_string(accept_error e) noexcept {
  static constexpr std::array<std::string_view, accept_error_count> names{"emfile",  "enfile",   "nobufs",
                                                                          "aborted", "protocol", "other"};
  const auto i = static_cast<std::size_t>(e);
  return i < names.size() ? names[i] : std::string_view{"?"};
}

void internal::stats_recorder::record(const close_report& r) noexcept {
  add(closed_);
  open_.fetch_sub(1, std::memory_order_relaxed);
  add(by_cause_[static_cast<std::size_t>(r.cause) % close_cause_count]);
  if (r.first_fin == side::local) add(fin_first_local_);
  if (r.first_fin == side::peer) add(fin_first_peer_);
  if (r.time_wait == side::local) add(time_wait_local_);
  if (r.time_wait == side::peer) add(time_wait_peer_);
  if (r.rst_sent) add(rst_sent_);
  if (r.rst_received) add(rst_received_);
  if (r.kernel_reset()) add(kernel_resets_);
  add(bytes_in_, r.bytes_in);
  add(bytes_out_, r.bytes_out);
  add(bytes_discarded_, r.bytes_discarded);
  if (r.timeout != timeout_kind::none) add(timeouts_[static_cast<std::size_t>(r.timeout) % timeout_kind_count]);
  if (r.drain == drain_end::timeout) add(linger_timeouts_);
  if (r.drain == drain_end::byte_limit) add(linger_limits_);
  if (r.tls) {
    const tls_facts& t = *r.tls;
    add(tls_handshakes_[static_cast<std::size_t>(t.handshake) % tls_handshake_count]);
    if (t.handshake == tls_handshake::ok) {
      add(tls_handshake_us_,
          static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(t.handshake_time).count()));
      if (t.version == "TLSv1.2") add(tls_v12_);
      if (t.version == "TLSv1.3") add(tls_v13_);
      add(tls_peer_end_[static_cast<std::size_t>(t.peer_end) % tls_ending_count]);
    }
    if (t.close_notify_sent) add(tls_close_notify_sent_);
    if (t.close_notify_received) add(tls_close_notify_received_);
  }
}

stats_snapshot server_stats::snapshot() const noexcept {
  const auto get = [](const counter& c) { return c.load(std::memory_order_relaxed); };
  stats_snapshot s;
  s.accepted = get(accepted_);
  s.open = get(open_);
  s.waiting_for_input = get(waiting_);
  s.closed = get(closed_);
  for (std::size_t i = 0; i < close_cause_count; ++i) s.closed_by_cause[i] = get(by_cause_[i]);
  s.fin_first_local = get(fin_first_local_);
  s.fin_first_peer = get(fin_first_peer_);
  s.time_wait_local = get(time_wait_local_);
  s.time_wait_peer = get(time_wait_peer_);
  s.rst_sent = get(rst_sent_);
  s.rst_received = get(rst_received_);
  s.kernel_resets = get(kernel_resets_);
  s.bytes_in = get(bytes_in_);
  s.bytes_out = get(bytes_out_);
  s.bytes_discarded = get(bytes_discarded_);
  for (std::size_t i = 0; i < timeout_kind_count; ++i) s.timeouts[i] = get(timeouts_[i]);
  s.linger_timeouts = get(linger_timeouts_);
  s.linger_limits = get(linger_limits_);
  s.limit_rejected = get(limit_rejected_);
  s.limit_paused = get(limit_paused_);
  for (std::size_t i = 0; i < accept_error_count; ++i) s.accept_errors[i] = get(accept_errors_[i]);
  s.drain_closed = get(drain_closed_);
  s.drain_forced = get(drain_forced_);
  for (std::size_t i = 0; i < tls_handshake_count; ++i) s.tls_handshakes[i] = get(tls_handshakes_[i]);
  s.tls_handshake_us = get(tls_handshake_us_);
  s.tls_v12 = get(tls_v12_);
  s.tls_v13 = get(tls_v13_);
  s.tls_close_notify_sent = get(tls_close_notify_sent_);
  s.tls_close_notify_received = get(tls_close_notify_received_);
  for (std::size_t i = 0; i < tls_ending_count; ++i) s.tls_peer_end[i] = get(tls_peer_end_[i]);
  return s;
}

namespace {

// Visits every counter as (name, labels, value, help) so JSON and Prometheus
// are written from one list and cannot drift apart.
template <class F>
void each_counter(const stats_snapshot& s, F&& f) {
  f("connections_accepted", "", "", s.accepted, "Connections accepted");
  f("connections_open", "", "", s.open, "Connections open now");
  f("connections_waiting_for_input", "", "", s.waiting_for_input,
    "Connections open now with no session yet: their input is not ready");
  f("connections_closed", "", "", s.closed, "Connections closed");
  for (std::size_t i = 1; i < close_cause_count; ++i)
    f("closed_by_cause", "cause", to_string(static_cast<close_cause>(i)), s.closed_by_cause[i],
      "Connections closed, by close_cause");
  f("fin_first", "side", "local", s.fin_first_local, "Connections whose first FIN was sent by this side or the peer");
  f("fin_first", "side", "peer", s.fin_first_peer, "");
  f("time_wait", "side", "local", s.time_wait_local, "Connections that left TIME_WAIT on this side or the peer's");
  f("time_wait", "side", "peer", s.time_wait_peer, "");
  f("rst_sent", "", "", s.rst_sent, "RSTs sent (abortive, rst_if_safe, drain limits)");
  f("rst_received", "", "", s.rst_received, "RSTs received from peers");
  f("kernel_resets", "", "", s.kernel_resets, "Closes the kernel turned into RST because input was unread");
  f("bytes_in", "", "", s.bytes_in, "Bytes delivered to sessions");
  f("bytes_out", "", "", s.bytes_out, "Bytes written");
  f("bytes_discarded", "", "", s.bytes_discarded, "Bytes read and discarded while draining");
  for (std::size_t i = 1; i < timeout_kind_count; ++i)
    f("timeouts", "kind", to_string(static_cast<timeout_kind>(i)), s.timeouts[i], "Operation timeouts, by kind");
  f("linger_timeouts", "", "", s.linger_timeouts, "Graceful drains ended by the linger timeout");
  f("linger_limits", "", "", s.linger_limits, "Graceful drains ended by the discard budget");
  f("limit_rejected", "", "", s.limit_rejected, "Connections refused over the connection limit");
  f("limit_paused", "", "", s.limit_paused, "Times accepting paused at the connection limit");
  for (std::size_t i = 0; i < accept_error_count; ++i)
    f("accept_errors", "kind", to_string(static_cast<accept_error>(i)), s.accept_errors[i], "Accept errors, by kind");
  f("drain_closed", "", "", s.drain_closed, "Idle connections closed gracefully by a drain");
  f("drain_forced", "", "", s.drain_forced, "Connections reset at the drain deadline");
  for (std::size_t i = 1; i < tls_handshake_count; ++i)
    f("tls_handshakes", "outcome", to_string(static_cast<tls_handshake>(i)), s.tls_handshakes[i],
      "TLS handshakes, by outcome");
  f("tls_handshake_microseconds", "", "", s.tls_handshake_us, "Time spent in successful TLS handshakes");
  f("tls_sessions", "version", "TLSv1.2", s.tls_v12, "TLS sessions, by protocol version");
  f("tls_sessions", "version", "TLSv1.3", s.tls_v13, "");
  f("tls_close_notify", "direction", "sent", s.tls_close_notify_sent, "close_notify alerts sent and received");
  f("tls_close_notify", "direction", "received", s.tls_close_notify_received, "");
  for (std::size_t i = 0; i < tls_ending_count; ++i)
    f("tls_peer_end", "ending", to_string(static_cast<tls_ending>(i)), s.tls_peer_end[i],
      "TLS sessions by how the peer ended them (none: this side ended it first)");
}

}  // namespace

std::string to_json(const stats_snapshot& s) {
  std::string out = "{";
  std::string_view open_group;  // name of the labelled object being written
  each_counter(
      s, [&](std::string_view name, std::string_view label, std::string_view value, std::uint64_t v, std::string_view) {
        if (!open_group.empty() && open_group != name) {
          out += "}";
          open_group = {};
        }
        if (out.size() > 1 && open_group.empty()) out += ",";
        if (label.empty()) {
          out += fmt::format("\"{}\":{}", name, v);
          return;
        }
        if (open_group.empty()) {
          out += fmt::format("\"{}\":{{", name);
          open_group = name;
        } else {
          out += ",";
        }
        out += fmt::format("\"{}\":{}", value, v);
      });
  if (!open_group.empty()) out += "}";
  out += "}";
  return out;
}

std::string to_prometheus(const stats_snapshot& s) {
  std::string out;
  std::string_view last;
  each_counter(s, [&](std::string_view name, std::string_view label, std::string_view value, std::uint64_t v,
                      std::string_view help) {
    const bool gauge = name == "connections_open" || name == "connections_waiting_for_input";
    const std::string metric = fmt::format("closewise_{}{}", name, gauge ? "" : "_total");
    if (name != last) {
      out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", metric, help, metric, gauge ? "gauge" : "counter");
      last = name;
    }
    if (label.empty())
      out += fmt::format("{} {}\n", metric, v);
    else
      out += fmt::format("{}{{{}=\"{}\"}} {}\n", metric, label, value, v);
  });
  return out;
}

}  // namespace closewise
