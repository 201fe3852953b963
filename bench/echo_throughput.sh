#!/usr/bin/env bash
# Echo throughput of one connection: closewise-echo next to a minimal blocking
# echo (closewise-ref-echo, bench/ref_echo.cpp), driven by the same client
# (closewise-echo --client) in the same run, on loopback. Prints both figures
# in MB/s (10^6 bytes per second, bytes received by the client over the time
# from connect to the server's FIN) and their ratio.
#
#   bench/echo_throughput.sh [BYTES]      # default 1GiB per run
#
# Environment:
#   BUILD_DIR   Release build directory (default build/echo-release); configured
#               and the two targets built there unless SKIP_BUILD=1
#   REPS        runs per server, alternating (default 3); the median is reported
#   VERIFY=1    SHA-256 both ways in the client (default off: the digest would
#               cost the client more CPU than the echo costs the server)
#
# Absolute figures drift between machines and runs; compare the ratio.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build/echo-release}
bytes=${1:-1GiB}
reps=${REPS:-3}

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  if [[ ! -f $build/CMakeCache.txt ]]; then
    cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  fi
  cmake --build "$build" --target closewise-echo closewise-ref-echo >/dev/null
fi
echo_bin=$build/apps/echo/closewise-echo
ref_bin=$build/bench/closewise-ref-echo

work=$(mktemp -d)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME CMD...: starts a server in the background (not in a subshell, so
# that cleanup can stop it), waits (bounded) for its "listening on" line and
# sets `address` to its HOST:PORT.
start() {
  local name=$1 i
  shift
  "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  for ((i = 0; i < 100; i++)); do
    address=$(sed -n 's/^listening on //p' "$work/$name.out" | head -n1)
    [[ -n $address ]] && return 0
    sleep 0.1
  done
  echo "echo_throughput: $name did not start: $(cat "$work/$name.err")" >&2
  return 1
}

address=
start closewise "$echo_bin" --listen 127.0.0.1:0 --threads 1
closewise_at=$address
closewise_pid=${pids[-1]}
start ref "$ref_bin" 127.0.0.1:0
ref_at=$address
ref_pid=${pids[-1]}

# cpu_ticks PID: user + system CPU time the process used so far, in clock ticks.
# Less sensitive to other load on the machine than MB/s: what each byte costs the server.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

client_flags=(--bytes "$bytes" --json)
[[ ${VERIFY:-0} == 1 ]] || client_flags+=(--no-verify)

# measure HOST:PORT: one client run; prints its MB/s, fails unless every byte came back.
measure() {
  local out
  if ! out=$("$echo_bin" --client "$1" "${client_flags[@]}"); then
    echo "echo_throughput: run against $1 failed: $out" >&2
    return 1
  fi
  sed -n 's/.*"mb_per_s":\([0-9.eE+-]*\).*/\1/p' <<<"$out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

closewise_runs=()
ref_runs=()
closewise_cpu0=$(cpu_ticks "$closewise_pid")
ref_cpu0=$(cpu_ticks "$ref_pid")
for ((i = 0; i < reps; i++)); do
  # Alternating, so that a change in the machine's load hits both alike.
  mbs=$(measure "$closewise_at")
  closewise_runs+=("$mbs")
  mbs=$(measure "$ref_at")
  ref_runs+=("$mbs")
done
closewise_cpu=$(($(cpu_ticks "$closewise_pid") - closewise_cpu0))
ref_cpu=$(($(cpu_ticks "$ref_pid") - ref_cpu0))
closewise_mbs=$(printf '%s\n' "${closewise_runs[@]}" | median)
ref_mbs=$(printf '%s\n' "${ref_runs[@]}" | median)

hz=$(getconf CLK_TCK)
echo "echo throughput, one connection, $bytes per run, median of $reps (MB/s = 10^6 bytes/s)"
echo "  (server CPU: user + system seconds the server process spent per run, from /proc/PID/stat)"
report() {
  printf '  %-31s %8.1f MB/s   server CPU %5.2f s/run   runs (MB/s): %s\n' "$1" "$2" \
    "$(awk -v t="$3" -v hz="$hz" -v n="$reps" 'BEGIN { print t / hz / n }')" "$(printf '%.0f ' "${@:4}")"
}
report "closewise-echo (1 I/O thread)" "$closewise_mbs" "$closewise_cpu" "${closewise_runs[@]}"
report "closewise-ref-echo (blocking)" "$ref_mbs" "$ref_cpu" "${ref_runs[@]}"
awk -v a="$closewise_mbs" -v b="$ref_mbs" -v ca="$closewise_cpu" -v cb="$ref_cpu" 'BEGIN {
  printf "  ratio closewise / reference: throughput %.2f, server CPU per byte %.2f\n", a / b, (cb > 0 ? ca / cb : 0)
}'
