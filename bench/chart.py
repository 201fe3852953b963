#!/usr/bin/env python3
"""Draws a bench/compare.py run's chart with matplotlib: chart.svg and chart.png.

    bench/chart.py bench/results/<date>/results.json

Three panels: teardown throughput by mode (connections per second), kept-alive
requests per second, and RSS per idle / half-request connection. Each bar is
the median round; its error bar spans the range of the rounds. Under each
teardown bar: the TIME_WAIT sockets the run left on the client (c) and the
server (s) side. bench/compare.py runs this at the end of every plain (not
--tls) run; run it by hand to redraw an older run.

Needs Debian's python3-matplotlib (bench/compare.py installs it as root).
Exit status: 0 when both files were written, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import COLOR, LABEL, TEARDOWN_MODES  # noqa: E402  (the servers' names, colours and modes)
from compare import run_of as bench_run  # noqa: E402  (a server's closewise-bench run in one mode)


def short(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 10000 else f"{n / 1000:.1f}k" if n >= 1000 else str(n)


def bars(ax, groups: list[str], servers: list[str], value, spread=None, note=None, fmt="{:,.0f}") -> None:
    """Grouped bars: value(server, group) -> float | None; spread -> (low, high) of the rounds."""
    width = 0.8 / max(1, len(servers))
    for si, s in enumerate(servers):
        xs, ys, lo, hi = [], [], [], []
        for gi, g in enumerate(groups):
            v = value(s, g)
            if v is None:
                continue
            x = gi - 0.4 + width * (si + 0.5)
            xs.append(x)
            ys.append(v)
            low, high = spread(s, g) if spread else (v, v)
            lo.append(max(0.0, v - low))
            hi.append(max(0.0, high - v))
            ax.annotate(fmt.format(v), (x, high), textcoords="offset points", xytext=(0, 3), ha="center",
                        fontsize=7)
            if note:
                text = note(s, g)
                if text:
                    ax.annotate(text, (x, 0), textcoords="offset points", xytext=(0, -4), ha="center", va="top", fontsize=6,
                                color="#444", annotation_clip=False)
        ax.bar(xs, ys, width * 0.92, color=COLOR.get(s, "#999"), label=LABEL.get(s, s),
               yerr=[lo, hi] if spread else None, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(groups)), groups)
    ax.tick_params(axis="x", pad=22 if note else 4)
    ax.grid(axis="y", color="#ddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.margins(y=0.12)


def draw(results: dict, out_dir: Path) -> list[Path]:
    runs, memory = results["runs"], results.get("memory", [])
    servers = [s for s in LABEL if any(r["server"] == s for r in runs) or any(m["server"] == s for m in memory)]
    rate = lambda s, g: (bench_run(runs, s, g) or {}).get("rate")  # noqa: E731

    def spread(s, g):
        r = bench_run(runs, s, g)
        rounds = [x for x in (r or {}).get("rounds", []) if x] or [r["rate"]]
        return min(rounds), max(rounds)

    def time_wait(s, g):
        r = bench_run(runs, s, g)
        tw = ((r or {}).get("result") or {}).get("time_wait")
        return f"c {short(tw['client'])}\ns {short(tw['server'])}" if tw else None

    modes = [m for m in TEARDOWN_MODES if any(bench_run(runs, s, m) for s in servers)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 5), gridspec_kw={"width_ratios": [max(1, len(modes)) * 1.3, 1, 1.6]})
    ax_td, ax_ka, ax_mem = axes
    bars(ax_td, modes, servers, rate, spread, time_wait)
    ax_td.set_ylabel("connections/s")
    ax_td.set_title("Teardown throughput\n(under each bar: TIME_WAIT left, c client, s server)", fontsize=10)
    if any(bench_run(runs, s, "keepalive") for s in servers):
        bars(ax_ka, ["keepalive"], servers, rate, spread)
        ax_ka.set_ylabel("requests/s")
        ax_ka.set_title("Keep-alive", fontsize=10)
    else:
        ax_ka.set_axis_off()
    if memory:
        kib = {(m["server"], m["mode"]): m.get("kib_per_connection") for m in memory}
        groups = [g for g in ("idle", "half-request") if any(k[1] == g for k in kib)]
        bars(ax_mem, groups, servers, lambda s, g: kib.get((s, g)), fmt="{:.2f}")
        ax_mem.set_ylabel("KiB per connection (RSS)")
        ax_mem.set_title("Memory per connection", fontsize=10)
    else:
        ax_mem.set_axis_off()
    args = results.get("args", {})
    fig.suptitle(f"closewise-bench, loopback, one server thread, client -t{args.get('threads', '?')} "
                 f"-c{args.get('connections', '?')}; bars: median round, whiskers: range of "
                 f"{args.get('rounds', '?')} rounds — {results.get('date', '')}", fontsize=10)
    handles, labels = ax_td.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(servers), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    written = []
    for ext in ("svg", "png"):
        path = out_dir / f"chart.{ext}"
        fig.savefig(path, dpi=110, metadata={"Date": None} if ext == "svg" else None)
        written.append(path)
    plt.close(fig)
    return written


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 1
    src = Path(sys.argv[1])
    written = draw(json.loads(src.read_text()), src.parent)
    print(" ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
