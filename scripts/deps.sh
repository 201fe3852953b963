#!/usr/bin/env bash
# Checks that the Debian packages closewise needs are installed; as root it
# installs the missing ones, otherwise it prints the command to do so and fails.
#
#   scripts/deps.sh [build|test|fuzz|package|all]     # run it (default: all)
#   source scripts/deps.sh; closewise_deps build   # or source it and call the function
#
# build: what configuring and compiling needs. test: build + the tools the
# loopback and fault tests drive (ss, nc, socat, curl, nft), the reverse
# proxy of the proxy tests (nginx-light) and systemd-socket-activate (systemd)
# for the socket activation test. fuzz: build +
# clang-14 and its runtimes (libFuzzer, ASan, UBSan) for scripts/fuzz. package:
# build + what cpack -G DEB and the pkg-config check of scripts/package need.
#
# Environment:
#   CLOSEWISE_SKIP_DEPS=1            skip the check (a non-Debian machine, a hand-made toolchain)
#   CLOSEWISE_DEPS_ASSUME_NONROOT=1  take the not-root path even as root (to test it)
#
# Written to be sourced: it sets no shell options and returns instead of exiting.

CLOSEWISE_BUILD_PACKAGES=(
  cmake ninja-build g++
  libboost1.81-dev libspdlog-dev libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev
  libssl-dev pkg-config libsystemd-dev
)
CLOSEWISE_TEST_PACKAGES=(iproute2 netcat-openbsd socat curl nftables nginx-light openssl python3 systemd)
# scripts/package: cpack's DEB generator runs dpkg-shlibdeps (dpkg-dev) on the
# files `file` calls ELF; the pkg-config consumer needs pkg-config (pkgconf).
CLOSEWISE_PACKAGE_PACKAGES=(dpkg-dev file pkgconf)
# scripts/fuzz: libFuzzer and the sanitizer runtimes come with clang's runtime package.
CLOSEWISE_FUZZ_PACKAGES=(clang-14 libclang-rt-14-dev)

# Prints, one a line, those of the given packages that are not installed.
# One dpkg-query for all of them: a package dpkg has never heard of is simply
# absent from its output (it complains on stderr and exits 1, which is fine).
closewise_deps_missing() {
  local -A installed=()
  local name state
  # ${Status} is "want flag state", e.g. "install ok installed" or "hold ok installed".
  while read -r name _ _ state; do
    [[ $state == installed ]] && installed[$name]=1
  done < <(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null || true)
  local pkg
  for pkg in "$@"; do
    [[ -n ${installed[$pkg]:-} ]] || printf '%s\n' "$pkg"
  done
}

closewise_deps() {
  local group=${1:-all}
  local -a wanted
  case $group in
    build) wanted=("${CLOSEWISE_BUILD_PACKAGES[@]}") ;;
    test | all) wanted=("${CLOSEWISE_BUILD_PACKAGES[@]}" "${CLOSEWISE_TEST_PACKAGES[@]}") ;;
    fuzz) wanted=("${CLOSEWISE_BUILD_PACKAGES[@]}" "${CLOSEWISE_FUZZ_PACKAGES[@]}") ;;
    package) wanted=("${CLOSEWISE_BUILD_PACKAGES[@]}" "${CLOSEWISE_PACKAGE_PACKAGES[@]}") ;;
    *)
      printf 'closewise: deps: unknown group "%s" (build, test, fuzz, package or all)\n' "$group" >&2
      return 2
      ;;
  esac

  [[ ${CLOSEWISE_SKIP_DEPS:-0} == 1 ]] && return 0
  if ! command -v dpkg-query >/dev/null 2>&1; then
    printf 'closewise: deps: no dpkg-query (not Debian?): not checking packages. Needed: %s\n' "${wanted[*]}" >&2
    return 0
  fi

  local -a missing
  mapfile -t missing < <(closewise_deps_missing "${wanted[@]}")
  ((${#missing[@]} == 0)) && return 0

  if [[ $EUID -ne 0 || ${CLOSEWISE_DEPS_ASSUME_NONROOT:-0} == 1 ]]; then
    {
      printf 'closewise: missing Debian packages: %s\n' "${missing[*]}"
      printf 'closewise: not root, so not installing them. Install them with:\n'
      printf '  sudo apt-get update\n'
      printf '  sudo apt-get install -y --no-install-recommends %s\n' "${missing[*]}"
    } >&2
    return 1
  fi

  printf 'closewise: installing missing Debian packages: %s\n' "${missing[*]}" >&2
  # The package lists of a fresh machine are empty or stale: update first.
  if ! apt-get -q update >&2; then
    printf 'closewise: apt-get update failed\n' >&2
    return 1
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "${missing[@]}" >&2; then
    printf 'closewise: apt-get install failed for: %s\n' "${missing[*]}" >&2
    return 1
  fi
  mapfile -t missing < <(closewise_deps_missing "${wanted[@]}")
  if ((${#missing[@]} != 0)); then
    printf 'closewise: still missing after apt-get install: %s\n' "${missing[*]}" >&2
    return 1
  fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  closewise_deps "$@"
fi
