# Shared by scripts/demo and scripts/test (sourced, not run): finds the repo
# root, loads the package check, and configures and builds presets quietly.

# shellcheck disable=SC2034 # used by the scripts that source this
CLOSEWISE_CALLER_DIR=$PWD
CLOSEWISE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$CLOSEWISE_ROOT"

# shellcheck source=scripts/deps.sh
source scripts/deps.sh

# Builds use every core unless the caller chose otherwise.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

closewise_say() { printf 'closewise: %s\n' "$*" >&2; }

# Prints the part of a build log that explains a failure: from ninja's first
# FAILED: line on, or else its tail.
closewise_show_failure() {
  local log=$1 first
  first=$(grep -n -m1 '^FAILED: ' "$log" | cut -d: -f1 || true)
  if [[ -n $first ]]; then
    tail -n "+$first" "$log" | head -n 150 >&2
  else
    tail -n 60 "$log" >&2
  fi
}

# closewise_configure PRESET
# Configures build/PRESET unless it is configured already and newer than the
# presets. Ninja re-runs CMake by itself when a CMakeLists.txt changes, so the
# second run of a Quick-start command costs no configure.
closewise_configure() {
  local preset=$1 dir=build/$1
  if [[ -f $dir/build.ninja && -f $dir/CMakeCache.txt && $dir/CMakeCache.txt -nt CMakePresets.json ]] &&
    [[ ! -f CMakeUserPresets.json || $dir/CMakeCache.txt -nt CMakeUserPresets.json ]]; then
    return 0
  fi
  mkdir -p "$dir"
  closewise_say "configuring the '$preset' preset in $dir (first run: this and the build take a while)"
  if ! cmake --preset "$preset" >"$dir/configure.log" 2>&1; then
    closewise_say "configuring the '$preset' preset failed; the end of $dir/configure.log:"
    tail -n 40 "$dir/configure.log" >&2
    return 1
  fi
}

# closewise_build PRESET [TARGET...]
# Builds PRESET (all targets, or the given ones) with its output in
# build/PRESET/build.log, shown only when the build fails.
closewise_build() {
  local preset=$1
  shift
  local log=build/$preset/build.log
  local -a targets=()
  (($# == 0)) || targets=(--target "$@")
  if ! cmake --build --preset "$preset" "${targets[@]}" >"$log" 2>&1; then
    closewise_say "building the '$preset' preset failed (full log: $log):"
    closewise_show_failure "$log"
    return 1
  fi
}
