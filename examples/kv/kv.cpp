#include "kv/kv.hpp"

#include <utility>

#include <boost/asio/buffer.hpp>
#include <boost/asio/error.hpp>

namespace closewise::kv {

void store::set(std::string_view key, std::string_view value) {
  std::lock_guard lock(mu_);
  data_.insert_or_assign(std::string(key), std::string(value));
}

std::optional<std::string> store::get(std::string_view key) const {
  std::lock_guard lock(mu_);
  const auto it = data_.find(key);
  if (it == data_.end()) return std::nullopt;
  return it->second;
}

bool store::del(std::string_view key) {
  std::lock_guard lock(mu_);
  const auto it = data_.find(key);
  if (it == data_.end()) return false;
  data_.erase(it);
  return true;
}

std::size_t store::size() const {
  std::lock_guard lock(mu_);
  return data_.size();
}

outcome execute(std::string_view line, store& db, std::string& reply) {
  const auto space = line.find(' ');
  const std::string_view verb = line.substr(0, space);
  const std::string_view args = space == std::string_view::npos ? std::string_view{} : line.substr(space + 1);
  // A key is one non-empty word; a GET or DEL with more than one word is a
  // mistake worth reporting rather than guessing which word was meant.
  const bool one_key = !args.empty() && args.find(' ') == std::string_view::npos;
  if (verb == "SET") {
    const auto key_end = args.find(' ');
    if (key_end == std::string_view::npos || key_end == 0) {
      reply += "ERR usage: SET key value\n";
      return outcome::next;
    }
    db.set(args.substr(0, key_end), args.substr(key_end + 1));
    reply += "OK\n";
  } else if (verb == "GET") {
    if (!one_key) {
      reply += "ERR usage: GET key\n";
      return outcome::next;
    }
    const auto value = db.get(args);
    reply += value ? "VALUE " + *value + "\n" : std::string("NOT_FOUND\n");
  } else if (verb == "DEL") {
    if (!one_key) {
      reply += "ERR usage: DEL key\n";
      return outcome::next;
    }
    reply += db.del(args) ? "DELETED\n" : "NOT_FOUND\n";
  } else if (line == "QUIT") {
    reply += "BYE\n";
    return outcome::quit;
  } else if (line == "QUIT!") {
    return outcome::abort;
  } else {
    reply += line.empty() ? "ERR empty line\n" : "ERR unknown command\n";
  }
  return outcome::next;
}

namespace {

enum class batch_end : std::uint8_t { need_more, quit, abort, too_long };

// Answers every complete line of `pending` and removes it; at the peer's FIN
// (`final`) a last line without newline counts as complete too.
batch_end answer_lines(std::string& pending, bool final, std::size_t max_line, store& db, std::string& replies) {
  std::size_t start = 0;
  for (;;) {
    const auto nl = pending.find('\n', start);
    const bool last = nl == std::string::npos;
    if (last && !(final && start < pending.size())) break;
    std::string_view line(pending.data() + start, (last ? pending.size() : nl) - start);
    start = last ? pending.size() : nl + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.size() > max_line) {
      replies += "ERR line too long\n";
      return batch_end::too_long;
    }
    switch (execute(line, db, replies)) {
      case outcome::next:
        continue;
      case outcome::quit:
        return batch_end::quit;
      case outcome::abort:
        return batch_end::abort;
    }
  }
  pending.erase(0, start);
  // Without this bound a client could make us buffer without limit by never
  // sending a newline.
  if (pending.size() > max_line) {
    replies += "ERR line too long\n";
    return batch_end::too_long;
  }
  return batch_end::need_more;
}

}  // namespace

asio::awaitable<void> kv_session(connection& c, std::shared_ptr<store> db, session_options opts) {
  std::string pending;  // bytes after the last complete line
  std::string buffer(opts.read_size, '\0');
  for (;;) {
    auto [ec, n] = co_await c.read_some(asio::buffer(buffer));
    pending.append(buffer.data(), n);
    // EOF is the peer's FIN, delivered after every byte it sent: no command
    // will follow, but our write side is still open and every command
    // already received gets its reply.
    const bool peer_done = ec == asio::error::eof;

    std::string replies;  // one write per batch of pipelined commands, not one per command
    const batch_end end = answer_lines(pending, peer_done, opts.max_line, *db, replies);
    // Queued, not awaited: the server's writer sends the queue in order, and
    // read_some stops reading while more than the high watermark is queued,
    // so a client that pipelines without reading cannot grow our memory.
    c.send(std::move(replies));

    switch (end) {
      case batch_end::need_more:
        break;
      case batch_end::quit:
        // The server flushes "BYE" and closes with the connection's policy.
        co_return;
      case batch_end::abort:
        // Teardown chosen per connection: a RST at once, no TIME_WAIT on
        // either side. Replies still queued are discarded, and the client
        // sees ECONNRESET, which is what it asked for.
        c.set_close_policy(close_policy::abortive);
        co_return;
      case batch_end::too_long:
        // The error reply must reach the client, whatever the server's
        // default policy: graceful sends it, then our FIN, then reads and
        // discards the rest of the line until the client's FIN. Closing with
        // that input unread would make the kernel send a RST instead.
        c.set_close_policy(close_policy::graceful);
        co_return;
    }

    if (peer_done) {
      // Every command is answered once the queue is written. Marking the
      // exchange complete is what lets an rst_if_safe policy reset without
      // losing a byte; the default (graceful) sends our FIN and closes, and
      // the report says peer_fin_then_ours: the client keeps TIME_WAIT.
      if (co_await c.flush()) co_return;  // the client went away meanwhile: the report says how
      c.mark_exchange_complete();
      co_return;
    }
    // A reset, a timeout, or the server's drain taking over the read side:
    // the server ends the connection and its close report says which.
    if (ec) co_return;
    // A reply failed to go out (the client is gone): nothing more to answer.
    if (c.state().write() != write_state::open) co_return;
    // The server is shutting down: stop between commands, not in the middle of one.
    if (c.draining() && pending.empty()) co_return;
  }
}

session_handler make_session(std::shared_ptr<store> db, session_options opts) {
  // Not a coroutine itself: it only starts the named coroutine, so nothing is
  // captured by a coroutine frame.
  return [db = std::move(db), opts](connection& c) { return kv_session(c, db, opts); };
}

}  // namespace closewise::kv
