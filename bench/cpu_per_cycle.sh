#!/usr/bin/env bash
# Server CPU per cycle of any server command, from the process's own
# utime + stime (/proc/<pid>/stat) across a fixed number of closewise-bench
# cycles on loopback: the figure docs/performance.md quotes for `--threads 2`
# and for preloaded allocators. Runs the server, warms it with 5,000 cycles,
# measures COUNT more, prints one line, stops the server.
#
#   bench/cpu_per_cycle.sh PORT SERVER-COMMAND...
#   e.g. bench/cpu_per_cycle.sh 18081 build/release/apps/reqresp/closewise-reqresp \
#          --listen 127.0.0.1:18081 --threads 2 --teardown graceful
#        bench/cpu_per_cycle.sh 18081 env LD_PRELOAD=libjemalloc.so.2 build/release/apps/reqresp/closewise-reqresp ...
#
# Environment: MODE (closewise-bench --mode; default server-close), COUNT
# (measured cycles; default 60000), BENCH (closewise-bench; default
# build/release/bench/closewise-bench). The server must listen on
# 127.0.0.1:PORT. Output:
#   closewise-reqresp server-close: user 13.00 us, sys 36.17 us, total 49.17 us per cycle; 18,672 conn/s
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bench=${BENCH:-$root/build/release/bench/closewise-bench}
mode=${MODE:-server-close}
count=${COUNT:-60000}
port=$1
shift

"$@" >/dev/null 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
"$bench" --target "127.0.0.1:$port" --mode "$mode" --count 5000 --warmup 0 --no-progress >/dev/null
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
out=$("$bench" --target "127.0.0.1:$port" --mode "$mode" --count "$count" --warmup 0 --connections 64 --threads 2 \
  --no-progress)
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
rate=$(grep -oE '[0-9,]+ (conn|req)/s' <<<"$out" | head -n 1)
# The server's name: the first word of the command that is not env or an assignment.
name=
for word in "$@"; do
  [[ $word == env || $word == *=* ]] && continue
  name=${word##*/}
  break
done
awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v n="$count" -v t="$(getconf CLK_TCK)" -v name="$name" -v mode="$mode" \
  -v rate="$rate" 'BEGIN { printf "%s %s: user %.2f us, sys %.2f us, total %.2f us per cycle; %s\n",
    name, mode, u / t / n * 1e6, s / t / n * 1e6, (u + s) / t / n * 1e6, rate }'
