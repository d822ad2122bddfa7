#!/usr/bin/env bash
# Reliability checks (issue 7), about 5 minutes on 2 cores from a clean build (build/asan reused after):
#   1. build the native core + Python extension with AddressSanitizer + UBSan (build/asan)
#   2. run the kernel / packing / reliability tests on that build (libasan preloaded)
#   3. leak check: a sanitizer-built C++ driver loops pack + mpgemm with LeakSanitizer on
#   4. bounded fuzz run: atheris grows a corpus on the regular build, then the corpus is
#      replayed and extended with random inputs on the sanitizer build
# Exits non-zero on any test failure, sanitizer report, leak or fuzz finding.
# Env: PYTHON (default python3), JOBS (2), SONIQ_FUZZ_SECONDS (60), SONIQ_ASAN_TESTS
# (test files to run under the sanitizers; default: the kernel and packing tests).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$(command -v "${PYTHON:-python3}")
PY=$("$PY" -c 'import sys; print(sys.executable)')
JOBS=${JOBS:-2}
FUZZ_SECONDS=${SONIQ_FUZZ_SECONDS:-60}
B=$ROOT/build/asan
LOGS=$B/logs
step() { printf '\n==== reliability: %s (%ds)\n' "$1" "$SECONDS"; }

step "sanitizer build ($B)"
mkdir -p "$B"
cmake -S . -B "$B" -DSONIQ_SANITIZE=ON -DSONIQ_CUDA=OFF -DSONIQ_BUILD_PYTHON=ON -DCMAKE_CXX_COMPILER=g++ \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE="$PY" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >"$B/configure.log" 2>&1 \
  || { cat "$B/configure.log"; exit 1; }
cmake --build "$B" -j "$JOBS"
# an importable package: python/soniq plus the sanitizer-built extension
rm -rf "$B/stage" && mkdir -p "$B/stage"
cp -r python/soniq "$B/stage/"
cp "$B"/_C*.so "$B/stage/soniq/"

rm -rf "$LOGS" && mkdir -p "$LOGS"
SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan"
# Python (and torch) are not built with ASan: leaks are checked by the C++ driver instead;
# allocator_may_return_null lets a huge request fail as MemoryError, as without ASan
PY_ASAN="detect_leaks=0:allocator_may_return_null=1:abort_on_error=0:log_path=$LOGS/asan"
san_python() {
  env PYTHONPATH="$B/stage" LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="$PY_ASAN" "$PY" "$@"
}
check_logs() {  # reports, not the expected "failed to allocate" warnings of huge-size tests
  if compgen -G "$LOGS/*" >/dev/null && grep -lE 'ERROR: |runtime error:|SUMMARY: ' "$LOGS"/* >/dev/null; then
    echo "reliability: sanitizer reports after: $1"
    cat "$LOGS"/*
    exit 1
  fi
}

step "tests on the sanitizer build"
shopt -s nullglob
if [[ -n "${SONIQ_ASAN_TESTS:-}" ]]; then
  read -r -a TESTS <<<"$SONIQ_ASAN_TESTS"
else
  TESTS=(tests/test_pack*.py tests/test_unpack*.py tests/test_mpgemm*.py tests/test_*kernel*.py
         tests/test_ops*.py tests/test_quantize*.py tests/test_fuzz_inputs.py tests/test_overflow.py
         tests/test_threads.py tests/test_determinism.py)
fi
shopt -u nullglob
san_python -c "import soniq, sys; assert soniq.__file__.startswith('$B/stage'), soniq.__file__"
san_python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
check_logs "tests"

step "leak check (LeakSanitizer, C++ API)"
g++ -std=c++17 -O1 -g $SAN_FLAGS -I"$ROOT" tests/native/leak_check.cpp "$B/libsoniq_core.a" -lpthread \
  -o "$B/leak_check"
ASAN_OPTIONS="detect_leaks=1:log_path=$LOGS/asan" "$B/leak_check" 300
check_logs "leak check"

step "fuzz run (${FUZZ_SECONDS}s)"
CORPUS=$B/fuzz_corpus
mkdir -p "$CORPUS"
GROW=$((FUZZ_SECONDS * 3 / 5))
REST=$((FUZZ_SECONDS - GROW))
if ! "$PY" -c "import atheris" 2>/dev/null; then
  "$PY" -m pip install -q atheris 2>/dev/null || echo "reliability: atheris unavailable, random inputs only"
fi
# coverage-guided phase on the regular build (the installed soniq); atheris' coverage
# hooks do not work under a preloaded gcc libasan, so the sanitizer phase replays
if "$PY" -c "import atheris, soniq" 2>/dev/null; then
  rc=0
  (cd "$B" && "$PY" "$ROOT/tests/fuzz/fuzz_ops.py" -max_total_time="$GROW" -timeout=60 \
     -rss_limit_mb=8192 -print_final_stats=1 "$CORPUS") >"$B/fuzz.log" 2>&1 || rc=$?
  grep -Ev '^#[0-9]+\s+(NEW|REDUCE)' "$B/fuzz.log" | tail -n 30
  [[ $rc -eq 0 ]] || { echo "reliability: fuzzer finding (exit $rc; input saved under $B)"; exit 1; }
else
  REST=$FUZZ_SECONDS
fi
(cd "$B" && san_python "$ROOT/tests/fuzz/fuzz_ops.py" --replay "$CORPUS" --random "$REST")
check_logs "fuzz run"

step "all reliability checks passed"
