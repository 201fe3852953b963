#!/usr/bin/env bash
# System calls per server-close connection and per kept-alive request of
# closewise-reqresp (one I/O thread, --teardown graceful), counted by the
# kernel's raw_syscalls:sys_enter tracepoint for the server process only
# (perf stat -p), under closewise-bench on loopback. A count, not a time: it
# does not drift with the machine's speed, only with what the server does.
#
#   bench/syscalls.sh [BUILD_DIR]     # default build/release; built unless SKIP_BUILD=1
#
# Environment:
#   COUNT        cycles per mode (default 60000)
#   CONNECTIONS  concurrent client connections (default 64)
#   THREADS      client threads (default 2)
#   MODES        default "server-close keepalive"
#
# Needs perf (Debian: linux-perf) with tracepoints readable (root, or
# kernel.perf_event_paranoid <= -1). Prints one line per mode:
#   syscalls: server-close: 9.31 per connection (558600 for 60000)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$root/build/release}
count=${COUNT:-60000}
connections=${CONNECTIONS:-64}
threads=${THREADS:-2}
modes=${MODES:-server-close keepalive}

command -v perf >/dev/null || {
  echo "syscalls.sh: perf not found (apt-get install -y linux-perf)" >&2
  exit 2
}
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  [[ -f $build/CMakeCache.txt ]] || cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" --target closewise-reqresp closewise-bench >/dev/null
fi

work=$(mktemp -d)
server_pid=
cleanup() {
  [[ -z $server_pid ]] || kill -TERM "$server_pid" 2>/dev/null || true
  [[ -z $server_pid ]] || wait "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$build/apps/reqresp/closewise-reqresp" --listen 127.0.0.1:0 --threads 1 --teardown graceful --log-level warn \
  >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$work/server.out" | head -n 1)
  [[ -z $port ]] || break
  sleep 0.05
done
[[ -n $port ]] || {
  echo "syscalls.sh: closewise-reqresp did not start: $(cat "$work/server.err")" >&2
  exit 1
}

for mode in $modes; do
  perf stat -e raw_syscalls:sys_enter -x, -o "$work/perf.$mode" -p "$server_pid" &
  perf_pid=$!
  sleep 0.5 # perf attaches before the load starts
  "$build/bench/closewise-bench" --target "127.0.0.1:$port" --mode "$mode" --count "$count" \
    --connections "$connections" --threads "$threads" --warmup 0 --no-progress --fail-on-error >"$work/bench.$mode"
  sleep 0.2 # the last closes finish
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  calls=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' "$work/perf.$mode")
  unit=connection
  [[ $mode != keepalive ]] || unit=request
  awk -v m="$mode" -v c="$calls" -v n="$count" -v u="$unit" \
    'BEGIN { printf "syscalls: %s: %.2f per %s (%d for %d)\n", m, c / n, u, c, n }'
done
