#!/usr/bin/env python3
"""Instructions per connection and per kept-alive request, counted.

CPU time per cycle (bench/compare.py) drifts with the machine: a shared
virtual machine's neighbours, frequency, caches. An instruction count does
not. This script runs each server under valgrind's callgrind (one server
thread, one worker), drives a fixed number of cycles at it with
closewise-bench after a warm-up, and divides the instructions the server
executed in user space over exactly that window (callgrind_control --zero
before it, --dump after) by the cycles completed; and the same for the
calls into libc's allocator (every heap allocation, whoever made it).

    bench/instructions.py [--build-dir build/release] [--cycles 2000]
                          [--servers closewise-reqresp ref nginx]
                          [--modes server-close keepalive client-rst]

It counts user-space instructions only: the kernel's share of a cycle (the
system calls, TCP itself) is not in it, and is the same for every server
that makes the same calls (bench/syscalls.sh counts those). It writes
bench/results/<date>-instructions/report.md and results.json, and prints the
table. Exit status: 0 when every server and mode gave a count, 1 otherwise,
2 on a usage error.

Needs valgrind (installed if missing, as root) and a Release build of
closewise-reqresp, closewise-ref-server and closewise-bench; nginx is
measured where it is installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (its server set-up, body and nginx configuration)

ROOT = compare.ROOT
MODES = ["server-close", "keepalive", "client-rst"]
UNIT = {"server-close": "per connection", "client-rst": "per connection", "keepalive": "per request"}


def say(msg: str) -> None:
    print(f"instructions: {msg}", file=sys.stderr, flush=True)


def ensure_valgrind() -> bool:
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("installing valgrind")
        subprocess.run(["apt-get", "install", "-y", "-q", "valgrind"], check=False, capture_output=True)
    return bool(shutil.which("valgrind") and shutil.which("callgrind_control"))


# libc's allocation entry points: operator new, Asio's aligned_alloc and
# OpenSSL's CRYPTO_malloc all end in one of them, and none calls another.
ALLOCATORS = {"malloc", "calloc", "realloc", "memalign", "aligned_alloc", "posix_memalign", "valloc", "pvalloc"}


def allocation_calls(text: str) -> int:
    """Calls into ALLOCATORS recorded in a callgrind dump (its cfn= / calls= lines; names are
    compressed: a function's name follows its id the first time only)."""
    names: dict[str, str] = {}
    total, callee = 0, None
    for line in text.splitlines():
        m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?$", line)
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3)
            callee = m.group(2) if m.group(1) == "cfn" else None
            continue
        if callee is not None and line.startswith("calls="):
            if names.get(callee, "").split("@")[0] in ALLOCATORS:
                total += int(line.split()[0][len("calls="):])
            callee = None
    return total


class Measured:
    """One server under callgrind, listening on loopback."""

    def __init__(self, kind: str, bins: dict, work: Path, body_file: Path, body: str):
        self.kind = kind
        self.work = work
        grind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/callgrind.out.%p",
                 "--collect-atstart=yes", "--dump-instr=no", "--trace-children=no"]
        if kind == "closewise-reqresp":
            argv = [str(bins["reqresp"]), "--listen", "127.0.0.1:0", "--threads", "1", "--teardown", "graceful",
                    "--log-level", "warn"]
        elif kind == "ref":
            argv = [str(bins["ref"]), "--listen", "127.0.0.1:0", "--body-file", str(body_file), "--close", "linger"]
        elif kind == "nginx":
            # One process that serves (no master): the process callgrind runs.
            self.port = compare.free_port()
            conf = compare.nginx_config(work, self.port, body, 1000).replace("master_process on;",
                                                                               "master_process off;")
            (work / "nginx.conf").write_text(conf)
            argv = [bins["nginx"], "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")]
        else:
            raise ValueError(kind)
        self.proc = subprocess.Popen(grind + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if kind == "nginx":
            compare.wait_port(lambda a: a, self.port, timeout=60)
        else:
            self.port = compare.read_listening(self.proc, timeout=60)

    def control(self, *args: str) -> None:
        r = subprocess.run(["callgrind_control", *args, str(self.proc.pid)], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"callgrind_control {' '.join(args)}: {(r.stdout + r.stderr).strip()[-300:]}")

    def dumped(self) -> tuple[int, int]:
        """The window's instructions and heap allocations, from the newest dump (callgrind.out.PID.N)."""
        dumps = sorted(self.work.glob(f"callgrind.out.{self.proc.pid}.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        text = dumps[-1].read_text(errors="replace")
        m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
        if not m:
            raise RuntimeError(f"no instruction total in {dumps[-1].name}")
        return int(m.group(1)), allocation_calls(text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT if self.kind == "nginx" else signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bench(bins: dict, port: int, mode: str, count: int, out: Path) -> dict:
    argv = [str(bins["bench"]), "--target", f"127.0.0.1:{port}", "--mode", mode, "--count", str(count),
            "--warmup", "0", "--threads", "1", "--connections", "4", "--timeout", "30", "--no-progress",
            "--json", str(out)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and not out.exists():
        raise RuntimeError(f"closewise-bench failed ({r.returncode}): {r.stderr.strip()[-300:]}")
    return json.loads(out.read_text())


def measure_one(kind: str, mode: str, bins: dict, args, body_file: Path, body: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="cwinstr-"))
    srv = None
    try:
        srv = Measured(kind, bins, work, body_file, body)
        bench(bins, srv.port, mode, args.warmup_cycles, work / "warmup.json")
        time.sleep(0.5)  # the warm-up's last teardowns
        srv.control("--zero")
        res = bench(bins, srv.port, mode, args.cycles, work / "measured.json")
        time.sleep(0.5)  # the window's last teardowns finish before the dump
        srv.control("--dump")
        instructions, allocations = srv.dumped()
        completed = res["completed"]
        errors = sum(res["errors"].values()) if isinstance(res.get("errors"), dict) else res.get("errors", 0)
        return {"server": kind, "mode": mode, "cycles": completed, "errors": errors, "instructions": instructions,
                "per_cycle": round(instructions / completed) if completed else None, "allocations": allocations,
                "allocations_per_cycle": round(allocations / completed, 2) if completed else None}
    finally:
        if srv:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)


def markdown(rows: list[dict], meta: dict) -> str:
    def get(server, mode):
        return next((r for r in rows if r["server"] == server and r["mode"] == mode), None)

    out = ["# Instructions per cycle (callgrind)", "",
           f"{meta['date']} · `{meta['command']}` · {meta['git']}", "",
           "User-space instructions the server executed, over a window of a fixed number of cycles driven by "
           "`closewise-bench --threads 1 --connections 4` after a warm-up, divided by the cycles completed. "
           "A count, not a time: two runs of the same build agree within about 1%.",
           "", "| mode | " + " | ".join(compare.LABEL[s] for s in meta["servers"]) + " | closewise / nginx | "
           "closewise / reference |", "|---|" + "---:|" * (len(meta["servers"]) + 2)]
    for mode in meta["modes"]:
        cells = []
        for s in meta["servers"]:
            r = get(s, mode)
            cells.append("–" if not r or r.get("per_cycle") is None else f"{r['per_cycle']:,}")
        cw, ng, ref = get("closewise-reqresp", mode), get("nginx", mode), get("ref", mode)

        def ratio(a, b):
            if not a or not b or not a.get("per_cycle") or not b.get("per_cycle"):
                return "–"
            return f"{a['per_cycle'] / b['per_cycle']:.2f}×"

        out.append(f"| {mode} ({UNIT[mode]}) | " + " | ".join(cells) + f" | {ratio(cw, ng)} | {ratio(cw, ref)} |")
    out += ["", "Heap allocations per cycle in the same window (calls into libc's malloc, calloc, realloc and the "
            "aligned allocators, whoever made them: operator new, Asio's recycling allocator when its cache misses, "
            "nginx's pools):", "", "| mode | " + " | ".join(compare.LABEL[s] for s in meta["servers"]) + " |",
            "|---|" + "---:|" * len(meta["servers"])]
    for mode in meta["modes"]:
        cells = []
        for s in meta["servers"]:
            r = get(s, mode)
            cells.append("–" if not r or r.get("allocations_per_cycle") is None else f"{r['allocations_per_cycle']:.2f}")
        out.append(f"| {mode} ({UNIT[mode]}) | " + " | ".join(cells) + " |")
    bad = [r for r in rows if r.get("why") or r.get("errors")]
    if bad:
        out += ["", "Not measured or with errors:", ""]
        out += [f"- {r['server']} {r['mode']}: {r.get('why') or str(r['errors']) + ' errors'}" for r in bad]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default="build/release", help="Release build with the binaries")
    ap.add_argument("--cycles", type=int, default=2000, help="measured cycles per server and mode")
    ap.add_argument("--warmup-cycles", type=int, default=300, help="cycles before the window")
    ap.add_argument("--servers", nargs="+", choices=compare.SERVERS, default=compare.SERVERS)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.cycles < 100:
        ap.error("--cycles: at least 100")

    if not ensure_valgrind():
        say("valgrind (callgrind_control) is not installed: nothing measured")
        return 1
    bdir = (ROOT / args.build_dir) if not Path(args.build_dir).is_absolute() else Path(args.build_dir)
    bins = {"reqresp": bdir / "apps/reqresp/closewise-reqresp", "ref": bdir / "bench/closewise-ref-server",
            "bench": bdir / "bench/closewise-bench", "nginx": shutil.which("nginx") or "/usr/sbin/nginx"}
    for key in ("reqresp", "bench") + (("ref",) if "ref" in args.servers else ()):
        if not Path(bins[key]).exists():
            say(f"{bins[key].relative_to(ROOT) if bins[key].is_relative_to(ROOT) else bins[key]} is missing: "
                f"build it (cmake --preset release && cmake --build build/release)")
            return 2
    servers = [s for s in args.servers if s != "nginx" or Path(bins["nginx"]).exists()]
    if "nginx" in args.servers and "nginx" not in servers:
        say("nginx is not installed: not measured")

    started = dt.datetime.now()
    body = compare.fetch_body(bins) or compare.DEFAULT_BODY
    outdir = Path(args.out) / (started.strftime("%Y-%m-%d_%H%M%S") + "-instructions")
    outdir.mkdir(parents=True, exist_ok=True)
    body_file = outdir / "body.txt"
    body_file.write_text(body)

    rows, ok = [], True
    for mode in args.modes:
        for kind in servers:
            say(f"{compare.LABEL[kind]}: {mode}, {args.cycles} cycles under callgrind")
            try:
                row = measure_one(kind, mode, bins, args, body_file, body)
                say(f"  {row['per_cycle']:,} instructions and {row['allocations_per_cycle']} allocations "
                    f"{UNIT[mode]} ({row['cycles']} cycles, {row['errors']} errors)")
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                row, ok = {"server": kind, "mode": mode, "per_cycle": None, "why": str(e)}, False
                say(f"  not measured: {e}")
            rows.append(row)

    meta = {"date": started.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "bench/instructions.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])),
            "git": compare.git_describe(), "servers": servers, "modes": args.modes, "cycles": args.cycles,
            "warmup_cycles": args.warmup_cycles,
            "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()}
    (outdir / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    report = markdown(rows, meta)
    (outdir / "report.md").write_text(report)
    print(report)
    say(f"wrote {outdir / 'report.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
