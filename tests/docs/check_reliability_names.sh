#!/usr/bin/env bash
# Every test docs/reliability.md names as proof must exist.
#
#   check_reliability_names.sh DOC BUILD_DIR TESTS_CMAKELISTS
#
# Reads the `suite.test` names in the "proved by" column (the last one) of
# the document's tables and compares them with the tests this build
# registered: the *_tests.cmake files gtest_discover_tests writes from each
# binary's --gtest_list_tests at build time, plus the add_test(NAME ...)
# tests of tests/CMakeLists.txt (the install check is not built under the
# sanitizers, yet exists). Not `ctest -N`: it would overwrite the build's
# Testing/Temporary/LastTest.log, which .ci/run reads after the suite. A
# gtest name matches without its instantiation prefix and parameter suffix
# (ip/stream_test.x/v4 is stream_test.x); `suite.*` must match at least one
# test, and so must a name cut short with "…" (lab_tcp.row3_…). Exit 1,
# with the names that match nothing, if any.
set -euo pipefail

doc=$1 build=$2 cmakelists=$3

known=$(mktemp)
trap 'rm -f "$known"' EXIT

# add_test([=[ip/stream_test.peer_half_close_leaves_write_side_open/v4  # GetParam() = false]=]  /path/binary ...)
find "$build" -name '*_tests.cmake' -print0 | xargs -0 -r cat |
  sed -n 's/^add_test(\[=*\[\([^]]*\)\]=*\].*/\1/p' |
  sed -E 's#^([^./]*/)?([^./]+)\.([^/ ]+)(/.*| .*)?$#\2.\3#' >"$known"
sed -n 's/.*add_test(NAME \([^ )]*\).*/\1/p' "$cmakelists" >>"$known"
sort -u -o "$known" "$known"
if [[ ! -s $known ]]; then
  echo "no tests registered in $build: nothing to compare with" >&2
  exit 1
fi

# The last column of each table row, then every `suite.test` in it ("…" is
# grouped: in the C locale it is three bytes).
# shellcheck disable=SC2016 # the backquotes are the document's, not a command
names=$(grep -E '^\|' "$doc" | grep -vE '^\|[- |]*\|$' |
  awk -F'|' '{ print $(NF - 1) }' |
  grep -oE '`[A-Za-z_][A-Za-z0-9_]*\.([A-Za-z0-9_]+(…)?|\*)`' | tr -d '`' | sort -u)
if [[ -z $names ]]; then
  echo "no test names found in $doc" >&2
  exit 1
fi

missing=0 checked=0
while IFS= read -r name; do
  checked=$((checked + 1))
  # Names are [A-Za-z0-9_] around one dot: a prefix is safe in a regex once
  # its dot is escaped.
  case $name in
    *.\*) prefix=${name%\*} ;;
    *…) prefix=${name%…} ;;
    *) prefix= ;;
  esac
  if [[ -n $prefix ]]; then
    found=$(grep -c -E -- "^${prefix//./\\.}" "$known" || true)
  else
    found=$(grep -c -x -F -- "$name" "$known" || true)
  fi
  if ((found == 0)); then
    echo "docs/reliability.md names $name, which matches no test registered in this build (renamed, removed, or its test binary not built)"
    missing=$((missing + 1))
  fi
done <<<"$names"

echo "$checked test names in docs/reliability.md, $missing of them matching no test"
((missing == 0))
