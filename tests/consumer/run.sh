#!/usr/bin/env bash
# Installs the library of the build tree into a temporary prefix, then
# configures, builds and runs tests/consumer against it: find_package(closewise)
# as a user does it.
set -euo pipefail
build=$1 source=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log=$work/log
run() { "$@" >>"$log" 2>&1 || { echo "failed: $*" >&2; cat "$log" >&2; exit 1; }; }
# The library's components only: the tools are not the consumer's business
# (and need not be built for this test).
for component in runtime development; do
  run cmake --install "$build" --prefix "$work/prefix" --component "$component"
done
run cmake -S "$source/tests/consumer" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix"
run cmake --build "$work/build"
"$work/build/consumer"
