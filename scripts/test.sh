#!/usr/bin/env bash
# Build cport and run the whole test suite in three builds: normal (gcc), ASan+UBSan and
# TSan (clang), plus the format check and the valgrind leak check of the examples.
# Usage: scripts/test.sh [normal|asan|tsan|valgrind|format ...]   (default: everything)
set -uo pipefail
cd "$(dirname "$0")/.."
# (no set -e: every step runs and reports; a failed set-up stops everything)
scripts/deps.sh || { echo "scripts/deps.sh failed: cannot install what the tests need"; exit 1; }
jobs=$(nproc)
steps=("$@")
((${#steps[@]})) || steps=(format normal asan tsan valgrind)
declare -A result
overall=0

run_suite() { # name builddir cmake-args... ; env vars come from the caller
  local name=$1 dir=$2; shift 2
  echo "=== [$name] configure + build in $dir"
  if ! cmake -S . -B "$dir" "$@" >"$dir.log" 2>&1 || ! cmake --build "$dir" -j"$jobs" >>"$dir.log" 2>&1; then
    tail -50 "$dir.log"; result[$name]="BUILD FAILED"; overall=1; return
  fi
  echo "=== [$name] ctest"
  local out
  out=$(cd "$dir" && ctest -j"$jobs" --output-on-failure 2>&1)
  local rc=$?
  echo "$out" | grep -vE '^ +Start|Test +#[0-9]+: .* Passed' || true
  result[$name]=$(echo "$out" | grep -E 'tests passed.*tests failed out of' | tail -1)
  [ -n "${result[$name]}" ] || result[$name]="no summary (rc=$rc)"
  ((rc == 0)) || overall=1
}

for step in "${steps[@]}"; do
  case $step in
  format)
    cmake -S . -B build >/dev/null
    if cmake --build build --target format-check >/dev/null 2>build-format.log; then
      result[format]="clean"
    else
      head -30 build-format.log; result[format]="FAILED"; overall=1
    fi ;;
  normal) run_suite normal build -DCMAKE_BUILD_TYPE=RelWithDebInfo ;;
  asan)
    CC=clang ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
      CPORT_TEST_SCALE=0.5 run_suite asan build-asan -DCMAKE_BUILD_TYPE=Debug -DCPORT_SANITIZE=address -DCPORT_FUZZ=ON -DCPORT_INJECT=ON ;;
  tsan)
    CC=clang TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 CPORT_TEST_SCALE=0.2 \
      run_suite tsan build-tsan -DCMAKE_BUILD_TYPE=Debug -DCPORT_SANITIZE=thread ;;
  valgrind)
    cmake -S . -B build >/dev/null && cmake --build build -j"$jobs" >/dev/null 2>&1
    if scripts/valgrind.sh build; then result[valgrind]="no leaks (examples, cport-echo)"; else result[valgrind]="LEAKS or errors"; overall=1; fi ;;
  *) echo "unknown step $step"; exit 2 ;;
  esac
done

echo
echo "=== cport test summary"
for step in "${steps[@]}"; do printf '  %-9s %s\n' "$step" "${result[$step]:-?}"; done
exit $overall
