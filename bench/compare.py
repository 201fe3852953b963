#!/usr/bin/env python3
"""The teardown-throughput comparison, in one command.

Starts, on loopback, closewise-reqresp (one thread, --teardown graceful),
nginx (Debian nginx-light, one worker, `return 200` of the same body, a
config generated into a temporary folder) and closewise-ref-server (the raw
single-threaded epoll reference in bench/); drives each with closewise-bench
in every mode (client-fin, client-rst, server-close, keepalive), cross-checks
server-close and keepalive with wrk, measures the server's RSS per idle and
per half-request connection, and writes bench/results/<date>/report.md,
results.json, and chart.svg / chart.png (bench/chart.py, matplotlib).

Every run gets a fresh server in a fresh network namespace (as root): its
TIME_WAIT counts, ephemeral ports and TIME_WAIT table are its own, and a
previous run's 100,000 TIME_WAIT sockets cannot slow or fill the next one.
Without root (or without `ip netns`) the runs share the host's namespace and
the report says so.

With --tls: closewise-reqresp (--tls-cert/--tls-key) and nginx (ssl) with
the same ECDSA P-256 certificate, generated once per run into the run's
folder with `openssl ecparam` / `openssl req`, OpenSSL's default cipher
suites and groups on both (the client's order decides, the same for both),
session cache and tickets off on both, one worker/thread each; every cycle
mode over TLS with a full handshake per connection (closewise-bench --tls),
then the server CPU per cycle and the throughput as ratios against nginx,
and the RSS per idle TLS connection; report in report.md as well.

Python 3 standard library, and Debian's python3-matplotlib for the chart
(installed with nginx-light and wrk). Exit status: 0 when every run produced
figures (targets missed are reported, not failures), 1 otherwise, 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ["closewise-reqresp", "nginx", "ref"]
MODES = ["server-close", "client-fin", "client-fin-8src", "client-rst", "keepalive"]
TLS_SERVERS = ["closewise-reqresp", "nginx"]
TLS_MODES = ["server-close", "client-fin", "client-rst", "keepalive"]
TEARDOWN_MODES = ["server-close", "client-fin", "client-fin-8src", "client-rst"]
# client-fin-8src: client-fin from 8 loopback source addresses. With one
# source, client-fin is capped by the client's own TIME_WAIT (each of the
# ~14k ports connect() uses is reusable 1 s after its TIME_WAIT began), the
# same cap for every server; 8 sources lift it and show the server's cost.
BENCH_MODE = {"client-fin-8src": ["--mode", "client-fin", "--sources", "8"]}
WRK_MODES = ["server-close", "keepalive"]
DEFAULT_BODY = ("closewise-reqresp: TCP teardown done right.\n"
                "GET /bytes/N, POST /echo, GET /stats, GET /metrics\n")
LABEL = {"closewise-reqresp": "closewise-reqresp", "nginx": "nginx", "ref": "epoll reference"}
COLOR = {"closewise-reqresp": "#1f77b4", "nginx": "#2ca02c", "ref": "#7f7f7f"}


def say(msg: str) -> None:
    print(f"compare: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- machine

def cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts[:8]), idle


def background_busy(seconds: float = 0.5) -> float:
    """Percent of all cores busy while we run nothing: the other engineers' load."""
    t0, i0 = cpu_times()
    time.sleep(seconds)
    t1, i1 = cpu_times()
    return 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))


def wait_quiet(limit_pct: float, wait_s: float) -> float:
    busy = background_busy()
    deadline = time.monotonic() + wait_s
    while busy > limit_pct and time.monotonic() < deadline:
        say(f"machine busy ({busy:.0f}% of all cores used by others); waiting")
        time.sleep(2)
        busy = background_busy()
    return busy


def proc_cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def machine_info() -> dict:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kernel": platform.release(), "cpu": model, "cores": os.cpu_count(),
            "python": platform.python_version()}


def git_describe() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+changes" if dirty else "") if rev else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


# ---------------------------------------------------------------- namespaces

class Namespaces:
    """A fresh network namespace per run, deleted at the end (deleting one
    right away would purge its TIME_WAIT sockets in a kworker during the next run)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.made: list[str] = []
        self.n = 0

    def new(self) -> str | None:
        if not self.enabled:
            return None
        self.n += 1
        name = f"cwbench-{os.getpid()}-{self.n}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.made.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        # Room for every TIME_WAIT a run leaves (the host default, 131072, is
        # below what 3 s of server-close make): the counts stay true. Per
        # namespace: the host's setting is untouched.
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=4000000"],
                       check=False)
        return name

    def wrap(self, ns: str | None, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv] if ns else argv

    def cleanup(self) -> None:
        for name in self.made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        self.made.clear()


def netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"cwbench-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


# ---------------------------------------------------------------- servers

def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """One server process in one namespace."""

    def __init__(self, kind: str, proc: subprocess.Popen, port: int, work_pid: int, tmp: Path | None):
        self.kind = kind
        self.proc = proc
        self.port = port
        self.work_pid = work_pid  # the process that serves (nginx: the worker)
        self.tmp = tmp

    def cpu_ticks(self) -> int:
        return proc_cpu_ticks(self.proc.pid) + sum(proc_cpu_ticks(c) for c in children_of(self.proc.pid))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=12)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def read_listening(proc: subprocess.Popen, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')}")
        chunk = proc.stdout.read()
        if chunk:
            buf += chunk
            m = re.search(rb"listening on (\S+):(\d+)", buf)
            if m:
                return int(m.group(2))
        time.sleep(0.01)
    raise RuntimeError("server did not print 'listening on' in time")


def wait_port(ns_wrap, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(ns_wrap(["ss", "-Hltn", f"sport = :{port}"]), capture_output=True, text=True).stdout
        if out.strip():
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


def nginx_quote(body: str) -> str:
    out = body.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    out = out.replace("\t", "\\t")
    return out.replace("$", "${cwbench_dollar}")


def nginx_tls_lines(tls: dict | None) -> str:
    if not tls:
        return ""
    protocols = {"1.2": "TLSv1.2", "1.3": "TLSv1.3", "both": "TLSv1.2 TLSv1.3"}[tls["versions"]]
    # OpenSSL's defaults for suites and groups, as closewise-reqresp has
    # them, and the client's order decides on both; no resumption.
    return f"""
        ssl_certificate {tls["cert"]};
        ssl_certificate_key {tls["key"]};
        ssl_protocols {protocols};
        ssl_ciphers DEFAULT;
        ssl_prefer_server_ciphers off;
        ssl_ecdh_curve auto;
        ssl_session_cache off;
        ssl_session_tickets off;"""


def nginx_config(tmp: Path, port: int, body: str, max_conns: int, tls: dict | None = None) -> str:
    return f"""# generated by bench/compare.py
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {max_conns * 2 + 64};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections {max_conns + 64};
}}
http {{
    access_log off;
    # Keep-alive steady state, not the default 1000-requests-then-close.
    keepalive_requests 10000000;
    geo $cwbench_dollar {{ default "$"; }}
    server {{
        listen 127.0.0.1:{port}{" ssl" if tls else ""};{nginx_tls_lines(tls)}
        default_type text/plain;
        location / {{
            return 200 "{nginx_quote(body)}";
        }}
    }}
}}
"""


def start_server(kind: str, bins: dict, ns: Namespaces, ns_name: str | None, body_file: Path, body: str,
                 memory: bool, tls: dict | None = None) -> Server:
    wrap = lambda argv: ns.wrap(ns_name, argv)  # noqa: E731
    if kind == "closewise-reqresp":
        argv = [str(bins["reqresp"]), "--listen", "127.0.0.1:0", "--threads", "1", "--teardown", "graceful",
                "--log-level", "warn"]
        if memory:
            argv += ["--max-connections", "20000", "--idle-timeout", "300", "--read-timeout", "300",
                     "--request-timeout", "300"]
        if tls:
            # No resumption, as nginx below (ssl_session_cache off, ssl_session_tickets off).
            argv += ["--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]), "--tls-no-tickets"]
        proc = subprocess.Popen(wrap(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        port = read_listening(proc)
        return Server(kind, proc, port, proc.pid, None)
    if kind == "ref":
        argv = [str(bins["ref"]), "--listen", "127.0.0.1:0", "--body-file", str(body_file), "--close", "linger"]
        proc = subprocess.Popen(wrap(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        port = read_listening(proc)
        return Server(kind, proc, port, proc.pid, None)
    if kind == "nginx":
        tmp = Path(tempfile.mkdtemp(prefix="cwbench-nginx-"))
        port = 8080 if ns_name else free_port()
        (tmp / "nginx.conf").write_text(nginx_config(tmp, port, body, 20000, tls))
        proc = subprocess.Popen(wrap([bins["nginx"], "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e",
                                      str(tmp / "error.log")]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(wrap, port)
        except RuntimeError:
            proc.kill()
            raise RuntimeError("nginx did not start: " + (tmp / "error.log").read_text(errors="replace")[-500:])
        workers = []
        for _ in range(200):
            workers = children_of(proc.pid)
            if workers:
                break
            time.sleep(0.01)
        return Server(kind, proc, port, workers[0] if workers else proc.pid, tmp)
    raise ValueError(kind)


def fetch_body(bins: dict) -> str | None:
    """GET / from closewise-reqresp, so that nginx and the reference serve the same bytes."""
    proc = subprocess.Popen([str(bins["reqresp"]), "--listen", "127.0.0.1:0", "--threads", "1", "--log-level",
                             "warn"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = read_listening(proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return r.read().decode()
    except Exception as e:  # noqa: BLE001 - any failure: fall back to the default body
        say(f"could not fetch closewise-reqresp's body ({e}); using the default")
        return None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=12)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------- clients

def run_bench(bins: dict, ns: Namespaces, ns_name: str | None, port: int, mode: str, args, out_json: Path,
              extra: list[str] | None = None) -> dict:
    argv = [str(bins["bench"]), "--target", f"127.0.0.1:{port}", *BENCH_MODE.get(mode, ["--mode", mode]),
            "--json", str(out_json), "--no-progress"]
    if mode in ("idle", "half-request"):
        argv += ["--connections", str(args.idle_connections)]
    else:
        argv += ["--threads", str(args.threads), "--connections", str(args.connections), "--duration",
                 str(args.duration), "--warmup", str(args.warmup)]
    if getattr(args, "tls", False):
        argv += ["--tls", "--tls-versions", args.tls_versions]
    argv += extra or []
    r = subprocess.run(ns.wrap(ns_name, argv), capture_output=True, text=True, timeout=args.duration + 120)
    if r.returncode != 0 and not out_json.exists():
        raise RuntimeError(f"closewise-bench failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    return json.loads(out_json.read_text())


def parse_wrk(text: str) -> dict:
    res = {"rate": None, "errors": {}, "non_2xx": 0, "requests": None}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        res["rate"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        res["errors"] = dict(zip(["connect", "read", "write", "timeout"], map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        res["non_2xx"] = int(m.group(1))
    return res


def wrk_seconds(args) -> int:
    return max(1, round(args.warmup + args.duration))


def run_wrk(ns: Namespaces, ns_name: str | None, port: int, mode: str, args) -> dict:
    # wrk takes whole seconds only.
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{wrk_seconds(args)}s"]
    if mode == "server-close":
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    r = subprocess.run(ns.wrap(ns_name, argv), capture_output=True, text=True,
                       timeout=args.warmup + args.duration + 60)
    res = parse_wrk(r.stdout)
    res["command"] = " ".join(argv)
    res["output"] = r.stdout
    return res


# ---------------------------------------------------------------- profiling

def perf_start(pid: int, out: Path) -> subprocess.Popen | None:
    if shutil.which("perf") is None:
        return None
    return subprocess.Popen(["perf", "record", "-F", "1999", "-g", "-p", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_stop(p: subprocess.Popen | None, data: Path, report: Path) -> None:
    if p is None:
        return
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
    with open(report, "w") as f:
        subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--percent-limit", "0.7",
                        "-g", "none", "--sort", "dso,symbol"], stdout=f, stderr=subprocess.DEVNULL, timeout=120)


# ---------------------------------------------------------------- the comparison

class Meter:
    """CPU used during one run: by the server, by the client (our waited
    children), and by everything else on the machine (the interference)."""

    def __init__(self, srv: Server):
        self.srv = srv
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0 = time.monotonic()
        self.machine0 = self.machine_busy()
        self.stat0 = self.stat()
        self.server0 = srv.cpu_ticks()
        self.client0 = self.children_s()

    @staticmethod
    def machine_busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2]  # user + nice + system: what tasks are charged (irq time is apart)

    @staticmethod
    def stat() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]

    @staticmethod
    def children_s() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def stop(self) -> dict:
        wall = max(1e-9, time.monotonic() - self.t0)
        server = (self.srv.cpu_ticks() - self.server0) / self.hz
        client = self.children_s() - self.client0
        machine = (self.machine_busy() - self.machine0) / self.hz
        others = max(0.0, machine - server - client)
        cores = os.cpu_count() or 1
        # Loopback TCP runs largely in softirq, which the kernel charges to no
        # task here: shown apart, with the idle share, to tell "CPU-bound" from
        # "waiting".
        d = [b - a for a, b in zip(self.stat0, self.stat())]
        total = max(1, sum(d))
        return {"server_cpu_pct": round(100 * server / wall, 1), "client_cpu_pct": round(100 * client / wall, 1),
                "others_pct": round(100 * others / (wall * cores), 1),
                "softirq_pct": round(100 * (d[5] + d[6]) / total, 1), "idle_pct": round(100 * (d[3] + d[4]) / total, 1)}


def measure(args, bins: dict, available: list[str], body: str, body_file: Path, outdir: Path) -> dict:
    ns = Namespaces(args.netns)
    runs: list[dict] = []
    memory: list[dict] = []
    rundir = outdir / "runs"
    rundir.mkdir(parents=True, exist_ok=True)

    def attempt(kind: str, mode: str, tool: str) -> dict:
        ns_name = ns.new()
        srv = start_server(kind, bins, ns, ns_name, body_file, body, memory=False, tls=args.tls_files)
        try:
            perf = None
            if args.perf and tool == "closewise-bench" and kind == "closewise-reqresp":
                perf = perf_start(srv.work_pid, rundir / f"perf-{kind}-{mode}.data")
            meter = Meter(srv)
            if tool == "wrk":
                res = run_wrk(ns, ns_name, srv.port, mode, args)
                rate, unit = res["rate"], "req/s"
            else:
                res = run_bench(bins, ns, ns_name, srv.port, mode, args, rundir / f"{kind}-{mode}.json")
                rate, unit = res["rate"], res["unit"]
            usage = meter.stop()
            if perf is not None:
                perf_stop(perf, rundir / f"perf-{kind}-{mode}.data", rundir / f"perf-{kind}-{mode}.txt")
            return {"server": kind, "mode": mode, "tool": tool, "rate": rate, "unit": unit, **usage, "result": res}
        finally:
            srv.stop()

    def best_of(kind: str, mode: str, tool: str) -> dict:
        best = None
        for n in range(1 + args.retries):
            busy = wait_quiet(args.max_busy, args.wait_quiet)
            say(f"{LABEL[kind]}: {mode} ({tool})" + (f", attempt {n + 1}" if n else ""))
            r = attempt(kind, mode, tool)
            r["background_busy_pct"] = round(busy, 1)
            r["attempts"] = n + 1
            extra = ""
            if tool == "closewise-bench":
                res = r["result"]
                extra = (f", errors {res['errors']['total']}, TIME_WAIT client {res['time_wait']['client']:,} "
                         f"server {res['time_wait']['server']:,}")
                if isinstance(res.get("tls"), dict):
                    t = res["tls"]
                    extra += (f", {t['handshakes']:,} handshakes ({t['resumed']} resumed), handshake failures "
                              f"{sum(t['handshake_failures'].values())}")
            say(f"  {r['rate'] or 0:,.0f} {r['unit']}{extra}; CPU: server {r['server_cpu_pct']:.0f}%, client "
                f"{r['client_cpu_pct']:.0f}%, others {r['others_pct']:.0f}% of the machine; softirq {r['softirq_pct']:.0f}%, "
                f"idle {r['idle_pct']:.0f}%")
            if best is None or r["others_pct"] < best["others_pct"]:
                best = r
            if r["others_pct"] <= args.max_interference:
                break
        best["attempts"] = n + 1
        return best

    def median_round(rounds: list[dict]) -> dict:
        # The round with the median rate stands for the server in this mode
        # (its CPU, latency and TIME_WAIT figures come with it); every
        # round's rate is kept beside it.
        ordered = sorted(rounds, key=lambda r: r["rate"] or 0)
        med = dict(ordered[(len(ordered) - 1) // 2])
        med["rounds"] = [r["rate"] for r in rounds]
        med["rounds_server_cpu_us"] = [cpu_us(r) for r in rounds]
        return med

    try:
        for mode in args.modes:
            # Rounds interleave the servers (A B C A B C ...): a slow minute of
            # the machine falls on every server, not on one.
            per_server: dict[str, list[dict]] = {kind: [] for kind in available}
            for rnd in range(args.rounds):
                for kind in available:
                    if args.rounds > 1:
                        say(f"round {rnd + 1} of {args.rounds}")
                    per_server[kind].append(best_of(kind, mode, "closewise-bench"))
            for kind in available:
                runs.append(median_round(per_server[kind]))
                if args.wrk and mode in WRK_MODES:
                    runs.append(best_of(kind, mode, "wrk"))
        if args.memory:
            for kind in available:
                for mode in ("idle",) if args.tls else ("idle", "half-request"):
                    busy = wait_quiet(args.max_busy, args.wait_quiet)
                    ns_name = ns.new()
                    srv = start_server(kind, bins, ns, ns_name, body_file, body, memory=True, tls=args.tls_files)
                    try:
                        say(f"{LABEL[kind]}: {mode} x {args.idle_connections:,} (memory)")
                        try:
                            res = run_bench(bins, ns, ns_name, srv.port, mode, args,
                                            rundir / f"{kind}-{mode}.json", ["--server-pid", str(srv.work_pid)])
                        except RuntimeError as e:
                            memory.append({"server": kind, "mode": mode, "kib_per_connection": None,
                                           "why": str(e)})
                            say(f"  not measured: {e}")
                            continue
                        memory.append({"server": kind, "mode": mode, "kib_per_connection": res["kib_per_connection"],
                                       "background_busy_pct": round(busy, 1), "result": res})
                        say(f"  {res['kib_per_connection']} KiB per connection "
                            f"({res['opened']:,} open, {res['closed_by_server']} closed by the server)")
                    finally:
                        srv.stop()
    finally:
        ns.cleanup()
    return {"runs": runs, "memory": memory}


def rate_of(runs: list[dict], server: str, mode: str, tool: str = "closewise-bench") -> float | None:
    for r in runs:
        if r["server"] == server and r["mode"] == mode and r["tool"] == tool:
            return r["rate"]
    return None


def run_of(runs: list[dict], server: str, mode: str) -> dict | None:
    for r in runs:
        if r["server"] == server and r["mode"] == mode and r["tool"] == "closewise-bench":
            return r
    return None


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def evaluate(data: dict) -> list[dict]:
    runs, mem = data["runs"], data["memory"]
    cw = "closewise-reqresp"
    t = []

    def add(name, value, op, threshold, unit=""):
        ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        t.append({"target": name, "value": value, "op": op, "threshold": threshold, "unit": unit, "met": ok})

    add("server-close: closewise-reqresp / nginx", ratio(rate_of(runs, cw, "server-close"),
                                                         rate_of(runs, "nginx", "server-close")), ">=", 1.0, "x")
    add("server-close: closewise-reqresp / epoll reference", ratio(rate_of(runs, cw, "server-close"),
                                                                  rate_of(runs, "ref", "server-close")), ">=", 0.9, "x")
    add("closewise-reqresp: client-rst / client-fin", ratio(rate_of(runs, cw, "client-rst"),
                                                           rate_of(runs, cw, "client-fin")), ">=", 1.2, "x")
    add("(supplementary) closewise-reqresp: client-rst / client-fin-8src", ratio(
        rate_of(runs, cw, "client-rst"), rate_of(runs, cw, "client-fin-8src")), ">=", 1.2, "x")
    rst = run_of(runs, cw, "client-rst")
    tw = None if rst is None else rst["result"]["time_wait"]["client"] + rst["result"]["time_wait"]["server"]
    add("closewise-reqresp: client-rst TIME_WAIT left (both sides)", tw, "<=", 0)
    add("keepalive: closewise-reqresp / nginx", ratio(rate_of(runs, cw, "keepalive"),
                                                      rate_of(runs, "nginx", "keepalive")), ">=", 1.0, "x")
    # Server CPU per cycle (median of the rounds): the steadier figure on two
    # shared cores, where the client's work compresses the throughput ratios.
    def cpu_ratio(mode, reference):
        return ratio(median_cpu_us(run_of(runs, cw, mode))[0], median_cpu_us(run_of(runs, reference, mode))[0])

    add("server CPU per connection, server-close: closewise-reqresp / nginx", cpu_ratio("server-close", "nginx"),
        "<=", 1.0, "x")
    add("server CPU per connection, server-close: closewise-reqresp / epoll reference",
        cpu_ratio("server-close", "ref"), "<=", 1.1, "x")
    add("server CPU per connection, client-rst: closewise-reqresp / nginx", cpu_ratio("client-rst", "nginx"),
        "<=", 1.0, "x")
    add("server CPU per request, keepalive: closewise-reqresp / nginx", cpu_ratio("keepalive", "nginx"),
        "<=", 0.9, "x")
    for mode, limit in (("idle", 0.6), ("half-request", 0.7)):
        v = next((m["kib_per_connection"] for m in mem if m["server"] == cw and m["mode"] == mode), None)
        add(f"closewise-reqresp: RSS per {mode} connection", None if v is None else round(v, 2), "<=", limit, " KiB")
    return t


def wrk_agreement(runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        if r["tool"] != "closewise-bench" or r["mode"] not in WRK_MODES:
            continue
        w = rate_of(runs, r["server"], r["mode"], "wrk")
        if w:
            out.append({"server": r["server"], "mode": r["mode"], "bench": r["rate"], "wrk": w,
                        "bench_over_wrk": ratio(r["rate"], w), "at_least_0_9": r["rate"] >= 0.9 * w})
    return out


# ---------------------------------------------------------------- output

def fmt_rate(v) -> str:
    return "–" if v is None else f"{v:,.0f}"


def cpu_us(run: dict | None) -> float | None:
    if not run or not run.get("rate"):
        return None
    return 1e6 * run["server_cpu_pct"] / 100 / run["rate"]


def median_cpu_us(run: dict | None) -> tuple[float | None, float | None, float | None]:
    # The median server CPU per cycle over a run's rounds, and their range.
    if not run:
        return None, None, None
    xs = sorted(x for x in run.get("rounds_server_cpu_us", [cpu_us(run)]) if x)
    if not xs:
        return None, None, None
    return xs[(len(xs) - 1) // 2], xs[0], xs[-1]


def fmt_kib(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def chart_python() -> str | None:
    """An interpreter that has matplotlib: this one, or Debian's (python3-matplotlib)."""
    for exe in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        if exe and Path(exe).exists() and subprocess.run([exe, "-c", "import matplotlib"],
                                                         capture_output=True).returncode == 0:
            return exe
    return None


def draw_chart(results_json: Path) -> str:
    """bench/chart.py on the run's results.json: chart.svg and chart.png beside it."""
    exe = chart_python()
    if exe is None:
        return "no chart: matplotlib is missing (apt-get install python3-matplotlib)"
    r = subprocess.run([exe, str(ROOT / "bench" / "chart.py"), str(results_json)], capture_output=True, text=True,
                       timeout=120)
    return "chart.svg, chart.png" if r.returncode == 0 else f"no chart: bench/chart.py failed: {r.stderr[-300:]}"


def markdown(data: dict, meta: dict, servers: list[str], targets: list[dict], agreement: list[dict]) -> str:
    runs, mem = data["runs"], data["memory"]
    a = meta["args"]
    L = []
    L.append(f"# closewise teardown benchmark — {meta['date']}")
    L.append("")
    L.append(f"Command: `{meta['command']}` (tree {meta['git']}).  ")
    m = meta["machine"]
    L.append(f"Machine: Linux {m['kernel']}, {m['cores']} × {m['cpu']}; load average at the start "
             f"{' '.join(f'{x:.2f}' for x in meta['load_start'])}, at the end "
             f"{' '.join(f'{x:.2f}' for x in meta['load_end'])}; during the runs kept, other processes used at most "
             f"{meta['others_max']:.0f}% of the machine (median {meta['others_median']:.0f}%; each run is repeated, "
             f"up to {a['retries']} times, when others used over {a['max_interference']:g}%).  ")
    L.append(f"Client: closewise-bench --threads {a['threads']} --connections {a['connections']}, "
             f"{a['warmup']:g} s warm-up + {a['duration']:g} s measured per run; wrk -t{a['threads']} "
             f"-c{a['connections']} -d{a['wrk_seconds']}s for the cross-check.  ")
    rounds = a.get("rounds", 1)
    if rounds > 1:
        L.append(f"Rounds: every server is measured {rounds} times per mode, the servers in turn (A B C A B C ...); "
                 "the tables show the round with the median rate (its CPU, latency and TIME_WAIT), the throughput "
                 "table the range of the rounds beside it.  ")
    L.append("Isolation: " + ("every run has a fresh server in a fresh network namespace (its own TIME_WAIT table, "
                              "sized for every socket the run leaves)." if a["netns"] else
                              "runs share the host's network namespace (not root or no `ip netns`): TIME_WAIT "
                              "from one run is still there in the next."))
    L.append("")
    L.append("Servers (all on 127.0.0.1, one thread/worker each, the same "
             f"{len(meta['body'].encode())}-byte body):")
    for s in servers:
        L.append(f"- **{LABEL[s]}**: {meta['servers'][s]['describe']}")
    for s, info in meta["servers"].items():
        if not info.get("available"):
            L.append(f"- **{LABEL[s]}**: not measured — {info.get('why', 'unavailable')}")
    L.append("")
    L.append("## Throughput")
    L.append("")
    L.append("| mode | " + " | ".join(LABEL[s] for s in servers) + " | unit |")
    L.append("|---|" + "---:|" * len(servers) + "---|")
    def rate_cell(s: str, mode: str) -> str:
        r = run_of(runs, s, mode)
        if r is None:
            return fmt_rate(None)
        rs = [x for x in r.get("rounds", []) if x]
        if len(rs) < 2:
            return fmt_rate(r["rate"])
        return f"{fmt_rate(r['rate'])} ({fmt_rate(min(rs))}–{fmt_rate(max(rs))})"

    for mode in a["modes"]:
        unit = "req/s" if mode == "keepalive" else "conn/s"
        L.append(f"| {mode} | " + " | ".join(rate_cell(s, mode) for s in servers) + f" | {unit} |")
    L.append("")
    def mode_table(cell, align: str = "---:|") -> None:
        """A row per mode, a column per server: cell(server, mode)."""
        L.append("| mode | " + " | ".join(LABEL[s] for s in servers) + " |")
        L.append("|---|" + align * len(servers))
        for mode in a["modes"]:
            L.append(f"| {mode} | " + " | ".join(cell(s, mode) for s in servers) + " |")

    def of_run(cell):
        """cell(run) where the server ran the mode, – where it did not."""
        return lambda s, mode: "–" if (r := run_of(runs, s, mode)) is None else cell(r)

    L.append("Latency of the whole cycle (keepalive: one request), p50 / p99 in ms:")
    L.append("")
    mode_table(of_run(lambda r: f"{r['result']['latency_us']['p50'] / 1000:.2f} / "
                                f"{r['result']['latency_us']['p99'] / 1000:.2f}"))
    L.append("")
    L.append("Errors (all classes; a response shorter than its Content-Length counts as `truncated`), and CPU "
             "during the run: server / client / other processes (server and client in % of one core, 100% = one "
             "core busy; others in % of the whole machine):")
    L.append("")

    def errors_cpu(r: dict) -> str:
        errs = {k: v for k, v in r["result"]["errors"].items() if v and k != "total"}
        e = ", ".join(f"{k} {v:,}" for k, v in errs.items()) or "0 errors"
        return f"{e}; CPU {r['server_cpu_pct']:.0f} / {r['client_cpu_pct']:.0f} / {r['others_pct']:.0f}%"

    mode_table(of_run(errors_cpu), align="---|")
    L.append("")
    L.append("Server CPU per cycle (µs of the server process per connection, keepalive: per request). On two "
             "shared cores the client's kernel work (connect, and the handshake and teardown packets it sends, "
             "processed in its context) weighs as much as the server's, which compresses the throughput ratios; "
             "this one is the server's own cost (with rounds: the median of the rounds, then their range):")
    L.append("")

    def server_cpu(s: str, mode: str) -> str:
        base_us = median_cpu_us(run_of(runs, "nginx", mode))[0]
        us_, lo, hi = median_cpu_us(run_of(runs, s, mode))
        rel = f" ({us_ / base_us:.2f}× nginx)" if us_ and base_us and s != "nginx" else ""
        spread = f", {lo:.1f}–{hi:.1f}" if lo is not None and hi is not None and hi > lo else ""
        return "–" if us_ is None else f"{us_:.1f}{rel}{spread}"

    mode_table(server_cpu)
    L.append("")
    L.append("## TIME_WAIT left after each run (client side / server side)")
    L.append("")
    mode_table(of_run(lambda r: f"{r['result']['time_wait']['client']:,} / {r['result']['time_wait']['server']:,}"))
    L.append("")
    if mem:
        L.append(f"## Memory per connection ({a['idle_connections']:,} connections, server RSS difference)")
        L.append("")
        L.append("| | " + " | ".join(LABEL[s] for s in servers) + " |")
        L.append("|---|" + "---:|" * len(servers))
        for mode in ("idle", "half-request"):
            cells = []
            for s in servers:
                v = next((x for x in mem if x["server"] == s and x["mode"] == mode), None)
                if v is None:
                    cells.append("–")
                else:
                    r = v["result"]
                    cells.append(f"{fmt_kib(v['kib_per_connection'])} KiB ({r['rss_before_kib']:,} → "
                                 f"{r['rss_after_kib']:,} KiB)")
            L.append(f"| {mode} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Targets (ratios from this run)")
    L.append("")
    L.append("| target | measured | wanted | |")
    L.append("|---|---:|---:|---|")
    for t in targets:
        v = "not measured" if t["value"] is None else (
            f"{t['value']:.2f}{t['unit']}" if isinstance(t["value"], float) else f"{t['value']:,}{t['unit']}")
        mark = "–" if t["met"] is None else ("met" if t["met"] else "**missed**")
        L.append(f"| {t['target']} | {v} | {t['op']} {t['threshold']}{t['unit']} | {mark} |")
    L.append("")
    if agreement:
        L.append("## closewise-bench against wrk (same server, same mode, same -t/-c)")
        L.append("")
        L.append("| server | mode | closewise-bench | wrk | ratio | ≥ 0.9× wrk |")
        L.append("|---|---|---:|---:|---:|---|")
        for g in agreement:
            L.append(f"| {LABEL[g['server']]} | {g['mode']} | {g['bench']:,.0f} | {g['wrk']:,.0f} | "
                     f"{g['bench_over_wrk']:.2f} | {'yes' if g['at_least_0_9'] else 'no'} |")
        L.append("")
    L.append("## Notes")
    L.append("")
    L.append("- client-fin: the client closes first, so each cycle leaves a client TIME_WAIT. connect() uses the "
             "even half of the 32768–60999 range (~14.1k ports) and, with `tcp_tw_reuse=2`, reuses a port only 1 s "
             "after its TIME_WAIT began: this caps client-fin near 14k conn/s per source address and destination "
             "whatever the server does, and the TIME_WAIT count saturates near 14k (a reused 4-tuple recycles its "
             "TIME_WAIT). client-fin-8src connects from 127.0.0.1–8 (`closewise-bench --sources 8`) to show the "
             "server's cost instead. client-rst leaves no TIME_WAIT. The same recycling bounds the server-side "
             "TIME_WAIT count of server-close.")
    L.append("- server-close: the server's FIN goes first (all three servers), so the server keeps the TIME_WAIT. "
             "The reference closes the way a careful minimal server does: shutdown(SHUT_WR) after the response, "
             "read to the client's FIN, close (`--close linger`); nginx closes at once unless input is pending.")
    L.append("- Memory: VmRSS of the serving process (nginx: its worker) before and after opening the "
             "connections, divided by their number, after 200 warm-up exchanges; half-request connections sent "
             "the request line and Host field without the final empty line.")
    L.append("- Figures drift between runs on a shared 2-core machine: compare ratios from the same run.")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- main

def make_certificate(outdir: Path) -> dict:
    """One ECDSA P-256 certificate for every server of the run, in its folder."""
    key, cert = outdir / "tls-key.pem", outdir / "tls-cert.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(key), "-out", str(cert), "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True,
                   capture_output=True)
    return {"cert": cert, "key": key}


def tls_markdown(data: dict, meta: dict, servers: list[str]) -> str:
    """The --tls report: per mode, each server's rate and CPU per cycle, as ratios against nginx."""
    out = [f"# closewise-bench over TLS — {meta['date']}", "",
           f"`{meta['command']}` at `{meta['git']}`; {meta['machine'].get('cpu', '?')}; TLS versions offered: "
           f"{meta['args']['tls_versions']}; a full handshake per connection (no resumption on either side); "
           "ECDSA P-256 certificate; one server thread/worker.", "",
           "| mode | server | rate | server CPU per cycle (µs) | rate / nginx | CPU per cycle / nginx | errors "
           "| handshake failures | resumed | TIME_WAIT client / server |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in meta["args"]["modes"]:
        ref = run_of(data["runs"], "nginx", mode)
        ref_cpu = median_cpu_us(ref)[0]
        for s in servers:
            r = run_of(data["runs"], s, mode)
            if not r:
                out.append(f"| {mode} | {LABEL[s]} | – | – | – | – | – | – | – | – |")
                continue
            cpu = median_cpu_us(r)[0]
            res = r["result"]
            t = res.get("tls") if isinstance(res.get("tls"), dict) else {}
            rr = ratio(r.get("rate"), ref.get("rate") if ref else None)
            cr = ratio(cpu, ref_cpu)
            out.append(f"| {mode} | {LABEL[s]} | {fmt_rate(r.get('rate'))} {r['unit']} | "
                       f"{'–' if cpu is None else f'{cpu:.1f}'} | {'–' if rr is None else f'{rr:.2f}'} | "
                       f"{'–' if cr is None else f'{cr:.2f}'} | {res['errors']['total']} | "
                       f"{sum(t.get('handshake_failures', {}).values())} | {t.get('resumed', '–')} | "
                       f"{res['time_wait']['client']:,} / {res['time_wait']['server']:,} |")
    ref_kib = next((m.get("kib_per_connection") for m in data["memory"] if m["server"] == "nginx"), None)
    out += ["", "## Server RSS per idle TLS connection", "",
            f"{meta['args']['idle_connections']:,} connections held once their handshake is complete, nothing sent "
            "after it; the server's RSS before and after, over the connections held.", "",
            "| server | KiB per connection | / nginx | RSS before → after | held (TLS 1.3 / 1.2) | note |",
            "|---|---:|---:|---:|---:|---|"]
    for m in data["memory"]:
        res = m.get("result") or {}
        t = res.get("tls") if isinstance(res.get("tls"), dict) else {}
        neg = t.get("negotiated", {})
        rr = ratio(m.get("kib_per_connection"), ref_kib)
        rss = (f"{res['rss_before_kib']:,} → {res['rss_after_kib']:,} KiB"
               if res.get("rss_before_kib") is not None and res.get("rss_after_kib") is not None else "–")
        held = f"{res['opened']:,} ({neg.get('TLSv1.3', 0):,} / {neg.get('TLSv1.2', 0):,})" if res else "–"
        note = m.get("why", "") or (f"closed by the server {res['closed_by_server']}, handshakes failed "
                                    f"{t.get('handshake_failed', 0)}" if res else "")
        out.append(f"| {LABEL[m['server']]} | {fmt_kib(m.get('kib_per_connection'))} | "
                   f"{'–' if rr is None else f'{rr:.2f}'} | {rss} | {held} | {note} |")
    out += ["", "Server CPU per cycle is the server's CPU time over the run divided by its cycles (keepalive: "
            "requests); ratios are against nginx in the same run.", ""]
    return "\n".join(out)


def find_reqresp(build: Path) -> tuple[Path | None, str]:
    candidates = [build / "apps" / "reqresp" / "closewise-reqresp"]
    candidates += sorted((ROOT / "build").glob("*/apps/reqresp/closewise-reqresp"))
    for c in candidates:
        if not (c.is_file() and os.access(c, os.X_OK)):
            continue
        cache = c.parents[2] / "CMakeCache.txt"
        kind = ""
        if cache.exists():
            m = re.search(r"^CMAKE_BUILD_TYPE:\w+=(.*)$", cache.read_text(errors="replace"), re.M)
            kind = m.group(1) if m else ""
            san = re.search(r"^CLOSEWISE_SANITIZE:\w+=(.+)$", cache.read_text(errors="replace"), re.M)
            if san and san.group(1).strip():
                continue
        if kind in ("Release", "RelWithDebInfo"):
            return c, ""
    return None, "no Release build of closewise-reqresp (apps/reqresp) was found or could be built"


def nginx_path() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def ensure_tools(args) -> dict:
    missing = ([] if nginx_path() else ["nginx-light"]) + ([] if shutil.which("wrk") else ["wrk"])
    missing += [] if chart_python() else ["python3-matplotlib"]
    if missing and os.geteuid() == 0 and not args.no_install:
        say("installing " + " ".join(missing))
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=False, stdout=subprocess.DEVNULL)
    return {"nginx": nginx_path(), "wrk": shutil.which("wrk")}


def build(args) -> None:
    bdir = Path(args.build_dir)
    if not (bdir / "build.ninja").exists() and not (bdir / "Makefile").exists():
        say(f"configuring {bdir} (Release)")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(bdir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release"],
                       check=True, stdout=subprocess.DEVNULL)
    say("building closewise-bench and closewise-ref-server")
    subprocess.run(["cmake", "--build", str(bdir), "--target", "closewise-bench", "closewise-ref-server"], check=True,
                   stdout=subprocess.DEVNULL)
    if (ROOT / "apps" / "reqresp" / "CMakeLists.txt").exists():
        say("building closewise-reqresp")
        r = subprocess.run(["cmake", "--build", str(bdir), "--target", "closewise-reqresp"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            say("closewise-reqresp did not build; it will be reported as not measured")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-dir", default=str(ROOT / "build" / "bench"), help="Release build directory")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the dated folder goes")
    p.add_argument("--threads", type=int, default=2, help="client threads (closewise-bench and wrk)")
    p.add_argument("--connections", type=int, default=64, help="client concurrency")
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run")
    p.add_argument("--idle-connections", type=int, default=10000, help="connections of the memory runs")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: " + ",".join(SERVERS))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--no-wrk", dest="wrk", action="store_false", help="skip the wrk cross-check")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory runs")
    p.add_argument("--no-build", dest="build", action="store_false", help="use the binaries as they are")
    p.add_argument("--no-netns", dest="netns", action="store_false", help="run in the host's network namespace")
    p.add_argument("--no-install", action="store_true", help="never apt-get install nginx-light / wrk / python3-matplotlib")
    p.add_argument("--reqresp", help="path of a closewise-reqresp binary (default: found in build/)")
    p.add_argument("--max-busy", type=float, default=15.0,
                   help="before each run, wait while other processes use more than this %% of all cores")
    p.add_argument("--wait-quiet", type=float, default=60.0, help="seconds to wait for that at most, per run")
    p.add_argument("--max-interference", type=float, default=10.0,
                   help="rerun a run during which other processes used more than this %% of all cores")
    p.add_argument("--rounds", type=int, default=3,
                   help="measurements per server and mode, the servers in turn; the median round is reported")
    p.add_argument("--retries", type=int, default=2, help="reruns at most per run (the least disturbed is kept)")
    p.add_argument("--perf", action="store_true", help="perf-record closewise-reqresp in server-close and keepalive")
    p.add_argument("--tls", action="store_true",
                   help="HTTPS: closewise-reqresp and nginx with one certificate, every TLS mode, ratios against nginx")
    p.add_argument("--tls-versions", default="both", choices=["1.2", "1.3", "both"],
                   help="--tls: the versions the client offers and nginx allows")
    args = p.parse_args()
    if args.tls:
        # No wrk (it resumes no session but keeps connections) and no epoll reference (it speaks no TLS).
        args.wrk = False
        if args.servers == ",".join(SERVERS):
            args.servers = ",".join(TLS_SERVERS)
        if args.modes == ",".join(MODES):
            args.modes = ",".join(TLS_MODES)
    args.servers = [s for s in args.servers.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [s for s in args.servers if s not in (TLS_SERVERS if args.tls else SERVERS)]
    bad += [m for m in args.modes if m not in MODES]
    if bad:
        p.error("unknown server or mode: " + ", ".join(bad))

    started = dt.datetime.now()
    tools = ensure_tools(args)
    if args.build:
        build(args)
    bdir = Path(args.build_dir)
    bins = {"bench": bdir / "bench" / "closewise-bench", "ref": bdir / "bench" / "closewise-ref-server",
            "nginx": tools["nginx"]}
    for k in ("bench",) if args.tls else ("bench", "ref"):
        if not bins[k].exists():
            say(f"missing {bins[k]} (build it, or drop --no-build)")
            return 1
    if args.wrk and tools["wrk"] is None:
        say("wrk is not installed: no cross-check")
        args.wrk = False
    if args.netns and not netns_usable():
        say("network namespaces unavailable (not root, or no ip netns): running in the host namespace")
        args.netns = False

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.idle_connections + 200:
        say(f"RLIMIT_NOFILE is {hard}: memory runs use {hard - 200} connections")
        args.idle_connections = max(100, hard - 200)

    servers_meta: dict = {}
    if args.reqresp:
        reqresp, why = Path(args.reqresp), ""
    else:
        reqresp, why = find_reqresp(bdir)
    bins["reqresp"] = reqresp
    version = lambda argv: subprocess.run(argv, capture_output=True, text=True).stdout.strip() or "?"  # noqa: E731
    servers_meta["closewise-reqresp"] = (
        {"available": True,
         "path": str(reqresp.relative_to(ROOT) if reqresp.is_relative_to(ROOT) else reqresp),  # no machine paths
         "version": version([str(reqresp), "--version"]),
         "describe": f"`{reqresp.relative_to(ROOT) if reqresp.is_relative_to(ROOT) else reqresp} --threads 1 "
                     "--teardown graceful` (closewise + Beast)"}
        if reqresp else {"available": False, "why": why})
    servers_meta["nginx"] = (
        {"available": True, "version": subprocess.run([bins["nginx"], "-v"], capture_output=True,
                                                      text=True).stderr.strip(),
         "describe": "nginx-light, `worker_processes 1`, `access_log off`, `keepalive_requests 10000000`, "
                     "`location / { return 200 \"<body>\"; }`, config generated into a temporary folder"}
        if bins["nginx"] else {"available": False, "why": "nginx is not installed"})
    servers_meta["ref"] = {"available": not args.tls, "version": "" if args.tls else version([str(bins["ref"]), "--version"]),
                           "describe": "`closewise-ref-server --close linger` (bench/ref_server.cpp: single-threaded "
                                       "epoll, shutdown(SHUT_WR), drain to the client's FIN, close)"}
    available = [s for s in args.servers if servers_meta[s]["available"]]
    if not available:
        say("no server to measure")
        return 1

    body = (fetch_body(bins) if reqresp else None) or DEFAULT_BODY
    stamp = started.strftime("%Y-%m-%d_%H%M%S")
    outdir = Path(args.out) / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    body_file = outdir / "body.txt"
    body_file.write_text(body)
    args.tls_files = None
    if args.tls:
        args.tls_files = make_certificate(outdir)
        args.tls_files["versions"] = args.tls_versions
        say(f"TLS: {args.tls_files['cert'].name} / {args.tls_files['key'].name} (ECDSA P-256) in {outdir}")

    load_start = list(os.getloadavg())
    say(f"results go to {outdir}")
    data = measure(args, bins, available, body, body_file, outdir)
    load_end = list(os.getloadavg())

    others = sorted(r["others_pct"] for r in data["runs"])
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
        "command": "bench/compare.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])),
        "git": git_describe(),
        "machine": machine_info(),
        "load_start": load_start,
        "load_end": load_end,
        "others_max": others[-1] if others else 0,
        "others_median": others[len(others) // 2] if others else 0,
        "args": {k: getattr(args, k) for k in ("threads", "connections", "duration", "warmup", "idle_connections",
                                               "modes", "netns", "wrk", "memory", "retries", "max_interference", "rounds",
                                               "tls", "tls_versions")}
        | {"wrk_seconds": wrk_seconds(args)},
        "servers": servers_meta,
        "body": body,
    }
    if args.tls:
        results = {**meta, **data, "elapsed_s": round((dt.datetime.now() - started).total_seconds(), 1)}
        (outdir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (outdir / "report.md").write_text(tls_markdown(data, meta, available))
        say(f"wrote {outdir / 'report.md'}, results.json in {results['elapsed_s']:.0f} s")
        print(outdir / "report.md")
        return 0
    targets = evaluate(data)
    agreement = wrk_agreement(data["runs"])
    results = {**meta, **data, "targets": targets, "wrk_agreement": agreement,
               "elapsed_s": round((dt.datetime.now() - started).total_seconds(), 1)}
    (outdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (outdir / "report.md").write_text(markdown(data, meta, available, targets, agreement))
    charted = draw_chart(outdir / "results.json")
    say(f"wrote {outdir / 'report.md'}, results.json, {charted} in {results['elapsed_s']:.0f} s")
    print(outdir / "report.md")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
