// closewise-reqresp over TLS (--tls-cert/--tls-key) against TLS
// implementations that are not ours: curl, openssl s_client, Python's ssl
// module, and nginx as a TLS client in front of it (proxy_pass https://).
// Each test makes a throwaway ECDSA P-256 certificate in a directory of its
// own, starts the real binary on 127.0.0.1 port 0, drives the tool as a
// subprocess with a bounded wait, then stops the server with SIGTERM and
// reads what its --stats say about how each connection ended (close_notify
// or truncated). A test whose tool is missing is skipped with the reason.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "../support/child_process.hpp"
#include "../support/external_tools.hpp"
#include "../support/loopback.hpp"
#include "../support/netns.hpp"
#include "closewise/tls.hpp"

using namespace closewise::test;
using namespace std::chrono_literals;
using json = nlohmann::json;

namespace {

namespace fs = std::filesystem;

constexpr std::size_t five_mb = 5u * 1024 * 1024;

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

// Where two equally long strings first differ (npos: nowhere), for a message
// that says more than "not equal" about a 5 MB body.
std::size_t first_difference(const std::string& a, const std::string& b) {
  const std::size_t n = std::min(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return i;
  }
  return a.size() == b.size() ? std::string::npos : n;
}

// A body compared by content with the pattern closewise-reqresp serves.
::testing::AssertionResult is_pattern(const std::string& body, std::size_t n) {
  if (body.size() != n) {
    return ::testing::AssertionFailure() << "body of " << body.size() << " bytes, expected " << n;
  }
  const std::string want = pattern(n);
  if (const auto at = first_difference(body, want); at != std::string::npos) {
    return ::testing::AssertionFailure() << "body differs from the pattern at byte " << at << " of " << n;
  }
  return ::testing::AssertionSuccess();
}

// A tool run to its end, bounded: its exit status (nullopt: killed at the
// limit), stdout and stderr. Large outputs go to files (curl -o), not to
// these pipes, which are read only once the tool has exited.
struct tool_result {
  std::optional<int> status;
  std::string out, err;
};

tool_result run_tool(const std::vector<std::string>& args, std::chrono::milliseconds limit,
                     const std::string& stdin_file = {}) {
  child c(args, {}, stdin_file);
  tool_result r;
  if (!c.started()) return r;
  r.status = c.wait(limit);
  r.out = c.out();
  r.err = c.err();
  return r;
}

std::string describe(const tool_result& r) {
  return "exit " + (r.status ? std::to_string(*r.status) : std::string("(none: killed at its time limit)")) +
         "\nstdout:\n" + r.out.substr(0, 2000) + "\nstderr:\n" + r.err.substr(0, 2000);
}

// A counter of the server's --stats JSON; `group` empty for a top-level one.
// A missing key reads as a value no assertion accepts, never as a quiet 0.
constexpr std::uint64_t missing_counter = ~std::uint64_t{0};
std::uint64_t counter(const json& stats, const std::string& group, const std::string& key) {
  const json* at = &stats;
  if (!group.empty()) {
    if (!stats.contains(group) || !stats[group].is_object()) return missing_counter;
    at = &stats[group];
  }
  if (!at->contains(key) || !(*at)[key].is_number_unsigned()) return missing_counter;
  return (*at)[key].get<std::uint64_t>();
}

// closewise-reqresp serving HTTPS with a throwaway certificate, its files
// (certificate, key, its log, the tools' inputs and outputs) in a directory
// of its own.
class tls_server {
 public:
  // closewise-reqresp by default; `binary` and `args` run another server
  // (closewise-echo) with the same certificate and flags.
  explicit tls_server(std::string binary = CLOSEWISE_REQRESP_BINARY,
                      std::vector<std::string> args = {"--max-bytes", std::to_string(2 * five_mb)})
      : binary_(std::move(binary)), args_(std::move(args)) {
    const auto pem = closewise::make_self_signed_certificate("localhost");
    write_file(file("cert.pem"), pem.certificate);
    write_file(file("key.pem"), pem.private_key);
  }

  const std::string& dir() const { return dir_.path(); }
  std::string file(const std::string& name) const { return dir_.file(name); }
  std::uint16_t port() const { return port_; }
  std::string authority() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string url(const std::string& path) const { return "https://" + authority() + path; }

  // Starts the server on 127.0.0.1 port 0 and reads its "listening on" line.
  ::testing::AssertionResult start() {
    std::vector<std::string> argv{binary_,      "--listen",       "127.0.0.1:0", "--threads",
                                  "1",          "--stats",        "--log-level", "warn",
                                  "--tls-cert", file("cert.pem"), "--tls-key",   file("key.pem")};
    argv.insert(argv.end(), args_.begin(), args_.end());
    proc_ = std::make_unique<child>(argv, file("reqresp.log"));
    if (!proc_->started()) return ::testing::AssertionFailure() << "cannot start " << binary_;
    const auto line = proc_->read_line(15s);
    if (!line || line->rfind("listening on 127.0.0.1:", 0) != 0) {
      proc_->wait(5s);
      return ::testing::AssertionFailure() << "no 'listening on' line (got '" << line.value_or("") << "'); its log:\n"
                                           << read_file(file("reqresp.log"));
    }
    port_ = port_of_listening_line(*line);
    if (port_ == 0) return ::testing::AssertionFailure() << "no port in '" << *line << "'";
    return ::testing::AssertionSuccess();
  }

  // SIGTERM: the drain ends what is still open, the process exits 0 and
  // prints its --stats, which are returned (null if they are not JSON).
  json stop() {
    proc_->signal(SIGTERM);
    const auto st = proc_->wait(30s);
    EXPECT_EQ(st, 0) << binary_ << " did not exit 0 after SIGTERM; its log:\n" << log();
    std::string last;
    std::istringstream lines(proc_->out());
    for (std::string l; std::getline(lines, l);) {
      if (!l.empty()) last = l;
    }
    json stats = json::parse(last, nullptr, false);
    if (stats.is_discarded()) {
      ADD_FAILURE() << "--stats output is not JSON: '" << proc_->out() << "'";
      return json();
    }
    return stats;
  }

  std::string log() const { return read_file(file("reqresp.log")); }

 private:
  std::string binary_;
  std::vector<std::string> args_;
  temp_dir dir_;
  std::unique_ptr<child> proc_;
  std::uint16_t port_ = 0;
};

// ---- curl ------------------------------------------------------------------

#define CLOSEWISE_NEED_TOOL(var, name) \
  const auto var = find_program(name); \
  if (!var) GTEST_SKIP() << name << " is not installed (Debian: scripts/deps.sh test installs it)"

// curl with its common flags before `args`: HTTPS against our own throwaway
// certificate (-k), HTTP/1.1 over ALPN, errors to stderr, a bounded run.
tool_result run_curl(const std::string& curl, const std::vector<std::string>& args) {
  std::vector<std::string> all = {curl, "-k", "-sS", "--http1.1", "--fail", "--max-time", "90", "--connect-timeout",
                                  "20"};
  all.insert(all.end(), args.begin(), args.end());
  return run_tool(all, 120s);
}

// Two requests given to one curl run: the second goes over the first's
// connection (%{num_connects} is 1, then 0), both bodies exact, and the
// server saw one connection, one handshake.
TEST(tls_interop_curl, keep_alive_two_requests_on_one_connection) {
  CLOSEWISE_NEED_TOOL(curl, "curl");
  tls_server srv;
  ASSERT_TRUE(srv.start());
  const auto r =
      run_curl(*curl, {"--write-out", "%{http_code} %{num_connects} %{http_version}\\n", "-o", srv.file("first"),
                       srv.url("/bytes/1000"), "-o", srv.file("second"), srv.url("/bytes/70000")});
  ASSERT_EQ(r.status, 0) << describe(r);
  EXPECT_EQ(r.out, "200 1 1.1\n200 0 1.1\n") << describe(r);
  EXPECT_TRUE(is_pattern(read_file(srv.file("first")), 1000));
  EXPECT_TRUE(is_pattern(read_file(srv.file("second")), 70000));
  const json stats = srv.stop();
  EXPECT_EQ(counter(stats, "", "connections_accepted"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_handshakes", "ok"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "truncated"), 0u) << stats.dump();
}

// Connection: close: the response says so, the body is whole, and curl saw
// the connection end without an error (curl reports a truncated TLS stream
// as "unexpected eof while reading" and exits non-zero).
TEST(tls_interop_curl, connection_close) {
  CLOSEWISE_NEED_TOOL(curl, "curl");
  tls_server srv;
  ASSERT_TRUE(srv.start());
  const auto r = run_curl(
      *curl, {"-H", "Connection: close", "-D", srv.file("head"), "-o", srv.file("body"), srv.url("/bytes/4000")});
  ASSERT_EQ(r.status, 0) << describe(r);
  const std::string head = read_file(srv.file("head"));
  EXPECT_EQ(head.rfind("HTTP/1.1 200", 0), 0u) << head;
  EXPECT_NE(head.find("Connection: close"), std::string::npos) << head;
  EXPECT_TRUE(is_pattern(read_file(srv.file("body")), 4000));
  const json stats = srv.stop();
  EXPECT_EQ(counter(stats, "", "connections_accepted"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_close_notify", "sent"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "truncated"), 0u) << stats.dump();
}

// 5 MB over TLS (hundreds of records), compared byte by byte with the pattern,
// with TLS 1.2 and with TLS 1.3.
TEST(tls_interop_curl, five_megabytes_byte_exact_over_tls12_and_tls13) {
  CLOSEWISE_NEED_TOOL(curl, "curl");
  tls_server srv;
  ASSERT_TRUE(srv.start());
  for (const auto& [flags, version] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--tlsv1.2", "--tls-max", "1.2"}, "TLSv1.2"}, {{"--tlsv1.3"}, "TLSv1.3"}}) {
    SCOPED_TRACE(version);
    const std::string out = srv.file("big-" + version);
    // -v to a file: it says more than a pipe read after the exit may hold.
    const std::string verbose = srv.file("verbose-" + version);
    auto args = flags;
    args.insert(args.end(), {"-v", "--stderr", verbose, "--write-out", "%{http_code} %{size_download}\\n", "-o", out,
                             srv.url("/bytes/" + std::to_string(five_mb))});
    const auto r = run_curl(*curl, args);
    const std::string said = read_file(verbose);
    ASSERT_EQ(r.status, 0) << describe(r) << said.substr(0, 4000);
    EXPECT_EQ(r.out, "200 " + std::to_string(five_mb) + "\n") << describe(r);
    // curl -v names the negotiated version and ALPN's choice.
    EXPECT_NE(said.find("SSL connection using " + version), std::string::npos) << said.substr(0, 4000);
    EXPECT_NE(said.find("ALPN: server accepted http/1.1"), std::string::npos) << said.substr(0, 4000);
    EXPECT_TRUE(is_pattern(read_file(out), five_mb));
  }
  const json stats = srv.stop();
  EXPECT_EQ(counter(stats, "", "connections_accepted"), 2u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_sessions", "TLSv1.2"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_sessions", "TLSv1.3"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "truncated"), 0u) << stats.dump();
}

// ---- openssl s_client ------------------------------------------------------

// s_client -quiet sends the request from stdin, keeps reading after stdin's
// end, and prints the response; Connection: close makes the server end the
// connection, with close_notify, and s_client exit.
class tls_interop_s_client : public ::testing::TestWithParam<std::string> {};

TEST_P(tls_interop_s_client, request_response_and_the_server_sends_close_notify) {
  CLOSEWISE_NEED_TOOL(openssl, "openssl");
  const std::string version = GetParam();  // "1_2" or "1_3"
  tls_server srv;
  ASSERT_TRUE(srv.start());
  write_file(srv.file("request"), "GET /bytes/3000 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
  const auto r = run_tool({*openssl, "s_client", "-connect", srv.authority(), "-servername", "localhost", "-alpn",
                           "http/1.1", "-tls" + version, "-brief", "-quiet"},
                          60s, srv.file("request"));
  ASSERT_TRUE(r.status.has_value()) << describe(r);
  EXPECT_EQ(r.status, 0) << describe(r);
  const std::string want_version = version == "1_2" ? "TLSv1.2" : "TLSv1.3";
  EXPECT_NE(r.err.find("Protocol version: " + want_version), std::string::npos) << describe(r);
  const auto end_of_head = r.out.find("\r\n\r\n");
  ASSERT_NE(end_of_head, std::string::npos) << describe(r);
  const std::string head = r.out.substr(0, end_of_head);
  EXPECT_EQ(head.rfind("HTTP/1.1 200", 0), 0u) << head;
  EXPECT_NE(head.find("Connection: close"), std::string::npos) << head;
  EXPECT_TRUE(is_pattern(r.out.substr(end_of_head + 4), 3000));
  const json stats = srv.stop();
  EXPECT_EQ(counter(stats, "", "connections_accepted"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_close_notify", "sent"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_sessions", want_version), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "truncated"), 0u) << stats.dump();
}

INSTANTIATE_TEST_SUITE_P(versions, tls_interop_s_client, ::testing::Values("1_2", "1_3"),
                         [](const auto& info) { return "tls" + info.param; });

// ---- Python's ssl module ---------------------------------------------------

// The client side in Python: `close_notify` sends a request, reads the whole
// response, checks the body against the pattern, then unwrap()s (sends
// close_notify and waits for the server's) and closes; `truncate` sends
// half a POST body and ends TCP with a bare FIN, no close_notify, then reads
// until the server's FIN (so that its close meets no unread byte, which
// would turn it into a RST). It prints `key value` lines.
constexpr const char* python_client = R"py(
import socket, ssl, sys

def pattern(n):
    return bytes(ord('a') + (i * 7 + i // 251) % 26 for i in range(n))

def read_response(s):
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit('end of stream in the response head: %r' % data)
        data += chunk
    head, _, body = data.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(':')
        if name.strip().lower() == 'content-length':
            length = int(value.strip())
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit('end of stream after %d of %d body bytes' % (len(body), length))
        body += chunk
    return int(lines[0].split(' ')[1]), body

mode, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(['http/1.1'])
raw = socket.create_connection(('127.0.0.1', port), timeout=20)
s = ctx.wrap_socket(raw, server_hostname='localhost')
print('version', s.version())
print('alpn', s.selected_alpn_protocol())
if mode == 'close_notify':
    s.sendall(b'GET /bytes/100000 HTTP/1.1\r\nHost: localhost\r\n\r\n')
    status, body = read_response(s)
    print('status', status)
    print('body_ok', int(body == pattern(100000)))
    plain = s.unwrap()
    print('unwrapped', 1)
    plain.close()
elif mode == 'truncate':
    s.sendall(b'POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n' + b'x' * 1000)
    # Drops the TLS layer without close_notify, then a FIN.
    s.shutdown(socket.SHUT_WR)
    got = 0
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    print('server_closed', 1)
    s.close()
sys.stdout.flush()
)py";

struct python_run {
  tool_result r;
  std::string value(const std::string& key) const {
    std::istringstream lines(r.out);
    for (std::string l; std::getline(lines, l);) {
      if (l.rfind(key + " ", 0) == 0) return l.substr(key.size() + 1);
    }
    return {};
  }
};

python_run run_python(const std::string& python, const tls_server& srv, const std::string& mode) {
  write_file(srv.file("client.py"), python_client);
  return {run_tool({python, srv.file("client.py"), mode, std::to_string(srv.port())}, 60s)};
}

// A request, its response, then close_notify both ways: the server counts a
// close_notify ending and nothing truncated.
TEST(tls_interop_python, unwrap_after_the_response_is_a_close_notify_ending) {
  CLOSEWISE_NEED_TOOL(python, "python3");
  tls_server srv;
  ASSERT_TRUE(srv.start());
  const auto p = run_python(*python, srv, "close_notify");
  ASSERT_EQ(p.r.status, 0) << describe(p.r);
  EXPECT_EQ(p.value("status"), "200") << describe(p.r);
  EXPECT_EQ(p.value("body_ok"), "1") << describe(p.r);
  EXPECT_EQ(p.value("alpn"), "http/1.1") << describe(p.r);
  EXPECT_EQ(p.value("version"), "TLSv1.3") << describe(p.r);
  EXPECT_EQ(p.value("unwrapped"), "1") << describe(p.r);
  const json stats = srv.stop();
  EXPECT_EQ(counter(stats, "", "connections_accepted"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "close_notify"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "truncated"), 0u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_close_notify", "received"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_close_notify", "sent"), 1u) << stats.dump();
}

// Half a request body, then a FIN without close_notify: the server counts a
// truncated ending, not a close_notify one.
TEST(tls_interop_python, a_fin_without_close_notify_mid_request_is_truncated) {
  CLOSEWISE_NEED_TOOL(python, "python3");
  tls_server srv;
  ASSERT_TRUE(srv.start());
  const auto p = run_python(*python, srv, "truncate");
  ASSERT_EQ(p.r.status, 0) << describe(p.r);
  EXPECT_EQ(p.value("server_closed"), "1") << describe(p.r);
  const json stats = srv.stop();
  EXPECT_EQ(counter(stats, "", "connections_accepted"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "truncated"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "close_notify"), 0u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_close_notify", "received"), 0u) << stats.dump();
}

// ---- plain HTTP to the TLS port --------------------------------------------

// closewise-echo over TLS, against Python's ssl module: 64 KiB sent (what
// the socket buffers hold while the client is not reading yet), then a TCP
// half-close without close_notify; every byte comes back, then the server's
// close_notify and FIN. An echo stream is framed by the end of the
// connection, so the server counts the bare FIN as truncated.
constexpr const char* python_echo_client = R"py(
import socket, ssl, sys
data = bytes(ord('a') + (i * 7 + i // 251) % 26 for i in range(65536))
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
raw = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=30)
s = ctx.wrap_socket(raw, server_hostname='localhost')
s.sendall(data)
# A bare FIN under TLS: SSLSocket.shutdown would drop the TLS object, so
# the FIN goes through a duplicate of the descriptor.
dup = socket.fromfd(s.fileno(), socket.AF_INET, socket.SOCK_STREAM)
dup.shutdown(socket.SHUT_WR)
dup.close()
got = b''
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print('echoed', len(got))
print('match', 1 if got == data else 0)
)py";

TEST(tls_interop_echo, python_gets_every_byte_back_from_closewise_echo) {
  CLOSEWISE_NEED_TOOL(python, "python3");
  tls_server srv(CLOSEWISE_ECHO_BINARY, {});
  ASSERT_TRUE(srv.start());
  write_file(srv.file("echo.py"), python_echo_client);
  const python_run run{run_tool({*python, srv.file("echo.py"), std::to_string(srv.port())}, 60s)};
  ASSERT_TRUE(run.r.status.has_value()) << describe(run.r);
  EXPECT_EQ(run.r.status, 0) << describe(run.r);
  EXPECT_EQ(run.value("echoed"), "65536") << describe(run.r);
  EXPECT_EQ(run.value("match"), "1") << describe(run.r);
  const json stats = srv.stop();
  EXPECT_EQ(counter(stats, "tls_handshakes", "ok"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_close_notify", "sent"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "truncated"), 1u) << stats.dump();
}

// A plain HTTP request where a ClientHello belongs: the server answers a
// plaintext 400 the client can read, then ends with a FIN (EOF, not a reset).
TEST(tls_interop_plaintext, plain_http_to_the_tls_port_gets_a_400_then_eof) {
  tls_server srv;
  ASSERT_TRUE(srv.start());
  auto p = connect_to(srv.port());
  ASSERT_GE(p.fd(), 0);
  ASSERT_GT(p.send(std::string("GET /bytes/10 HTTP/1.1\r\nHost: localhost\r\n\r\n")), 0);
  std::string got;
  const auto end = p.drain(&got);
  EXPECT_EQ(got.rfind("HTTP/1.1 400", 0), 0u) << got;
  EXPECT_TRUE(end.eof) << "errno " << end.error << " after '" << got << "'";
  EXPECT_EQ(end.error, 0);
  p.close();
  const json stats = srv.stop();
  EXPECT_EQ(counter(stats, "", "connections_accepted"), 1u) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_handshakes", "plaintext_http"), 1u) << stats.dump();
}

// ---- nginx as the TLS client -----------------------------------------------

// nginx in the foreground, one process, every file in `dir`, proxying to
// closewise-reqresp over TLS with upstream keep-alive (HTTP/1.1 and an empty
// Connection header are what make nginx reuse upstream connections) and
// TLS session reuse. It does not verify our throwaway certificate
// (proxy_ssl_verify is off by default).
std::string nginx_tls_config(const std::string& dir, std::uint16_t listen, std::uint16_t upstream) {
  std::string conf = R"(daemon off;
master_process off;
worker_processes 1;
pid @DIR@/nginx.pid;
error_log @DIR@/error.log warn;
events { worker_connections 256; }
http {
  log_format probe '$status $upstream_status $body_bytes_sent';
  access_log @DIR@/access.log probe;
  client_body_temp_path @DIR@/body;
  proxy_temp_path @DIR@/proxy;
  fastcgi_temp_path @DIR@/fastcgi;
  uwsgi_temp_path @DIR@/uwsgi;
  scgi_temp_path @DIR@/scgi;
  upstream closewise_tls {
    server 127.0.0.1:@UPSTREAM@ max_fails=0;
    keepalive 8;
  }
  server {
    listen 127.0.0.1:@LISTEN@;
    location / {
      proxy_pass https://closewise_tls;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_session_reuse on;
      proxy_ssl_protocols TLSv1.2 TLSv1.3;
    }
  }
}
)";
  for (const auto& [name, value] : std::vector<std::pair<std::string, std::string>>{
           {"@DIR@", dir}, {"@LISTEN@", std::to_string(listen)}, {"@UPSTREAM@", std::to_string(upstream)}}) {
    for (auto at = conf.find(name); at != std::string::npos; at = conf.find(name, at + value.size())) {
      conf.replace(at, name.size(), value);
    }
  }
  return conf;
}

// Requests through nginx to closewise-reqresp over TLS: small and 5 MB
// responses and a 1 MB POST echoed back, all byte-exact, with nginx's
// upstream connections kept alive (fewer connections than requests) and
// nothing logged by nginx as an error. nginx binds a port found free in a
// private network namespace, as tests/proxy does.
TEST(tls_interop_nginx, requests_through_nginx_over_tls_upstream_are_byte_exact) {
  CLOSEWISE_NEED_TOOL(nginx, "nginx");
  CLOSEWISE_NEED_TOOL(curl, "curl");
  CLOSEWISE_IN_PRIVATE_NETNS(180s);
  tls_server srv;
  ASSERT_TRUE(srv.start());
  const std::uint16_t listen = free_port();
  ASSERT_NE(listen, 0);
  write_file(srv.file("nginx.conf"), nginx_tls_config(srv.dir(), listen, srv.port()));
  auto px = std::make_unique<child>(
      std::vector<std::string>{*nginx, "-e", srv.file("error.log"), "-p", srv.dir(), "-c", srv.file("nginx.conf")},
      srv.file("nginx.stderr"));
  ASSERT_TRUE(px->started() && wait_accepting(listen, 15s))
      << "nginx did not start; its error log:\n"
      << read_file(srv.file("error.log")) << read_file(srv.file("nginx.stderr"));
  const std::string base = "http://127.0.0.1:" + std::to_string(listen);

  // Four GETs on one client connection to nginx.
  const std::vector<std::size_t> sizes = {1, 100000, five_mb, 1000};
  std::vector<std::string> args = {*curl, "-sS", "--fail", "--max-time", "120", "--write-out", "%{http_code}\\n"};
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    args.insert(args.end(), {"-o", srv.file("get-" + std::to_string(i)), base + "/bytes/" + std::to_string(sizes[i])});
  }
  const auto gets = run_tool(args, 180s);
  ASSERT_EQ(gets.status, 0) << describe(gets) << "\nnginx error log:\n" << read_file(srv.file("error.log"));
  EXPECT_EQ(gets.out, "200\n200\n200\n200\n") << describe(gets);
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_TRUE(is_pattern(read_file(srv.file("get-" + std::to_string(i))), sizes[i])) << "GET " << i;
  }

  // A POST whose body goes to the server and back through both TLS hops.
  const std::size_t post_size = 1024 * 1024;
  write_file(srv.file("post-body"), pattern(post_size));
  const auto post =
      run_tool({*curl, "-sS", "--fail", "--max-time", "120", "--data-binary", "@" + srv.file("post-body"), "-H",
                "Content-Type: application/octet-stream", "-o", srv.file("post-out"), base + "/echo"},
               180s);
  ASSERT_EQ(post.status, 0) << describe(post) << "\nnginx error log:\n" << read_file(srv.file("error.log"));
  EXPECT_TRUE(is_pattern(read_file(srv.file("post-out")), post_size));

  // SIGQUIT: nginx finishes and closes its kept-alive upstream connections.
  px->signal(SIGQUIT);
  EXPECT_EQ(px->wait(20s), 0);
  const std::string access = read_file(srv.file("access.log"));
  std::size_t logged = 0;
  std::istringstream lines(access);
  for (std::string l; std::getline(lines, l);) {
    ++logged;
    EXPECT_EQ(l.rfind("200 200 ", 0), 0u) << "nginx access log line: " << l;
  }
  EXPECT_EQ(logged, sizes.size() + 1) << access;
  const std::string errors = read_file(srv.file("error.log"));
  EXPECT_EQ(errors.find("[error]"), std::string::npos) << errors;
  EXPECT_EQ(errors.find("[crit]"), std::string::npos) << errors;

  const json stats = srv.stop();
  const auto accepted = counter(stats, "", "connections_accepted");
  EXPECT_GE(accepted, 1u) << stats.dump();
  EXPECT_LT(accepted, sizes.size() + 1) << "nginx reused no upstream connection; " << stats.dump();
  EXPECT_EQ(counter(stats, "tls_handshakes", "ok"), accepted) << stats.dump();
  EXPECT_EQ(counter(stats, "tls_peer_end", "truncated"), 0u) << stats.dump();
}

}  // namespace
