#!/usr/bin/env bash
# Native safety check (issue 7): build the patched llama.cpp + cpp/ with
# AddressSanitizer and UndefinedBehaviorSanitizer and run the gate tests
# (and the other native-facing tests) against that library. Zero reports is
# the pass condition: every sanitizer report aborts the process
# (halt_on_error), which fails pytest.
#
#   bash scripts/sanitize.sh [pytest args]      # default: the native-facing test files
#
# Needs: the package installed in the current Python (pip install .[test])
# for the Python side, gcc/g++ with libasan and libubsan, cmake, ninja or make.
# Time on the 2-core dev machine: build ~7 min, tests ~6 min (see docs/HARDENING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
B="${FFNSKIP_SANITIZE_BUILD:-$ROOT/build/sanitize}"
PY="${PYTHON:-python3}"
CC="${CC:-gcc}"
CXX="${CXX:-g++}"
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)

echo "== configure $B"
cmake -S "$ROOT" -B "$B" "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" \
    -DCMAKE_C_FLAGS="$SAN" -DCMAKE_CXX_FLAGS="$SAN" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DCMAKE_INSTALL_PREFIX="$B/install" -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
echo "== build"
start=$(date +%s)
cmake --build "$B"
cmake --install "$B" --component ffnskip >/dev/null
echo "   build took $(( $(date +%s) - start )) s"

LIB="$B/install/ffnskip_gguf/lib"
ASAN_RT="$("$CC" -print-file-name=libasan.so)"
UBSAN_RT="$("$CC" -print-file-name=libubsan.so)"
export LD_PRELOAD="$ASAN_RT $UBSAN_RT"
# leaks: CPython and llama-cpp-python keep global objects alive at exit (not ours)
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export FFNSKIP_GGUF_LIB_PATH="$LIB"
export PYTHONWARNINGS=ignore

echo "== tests under ASan + UBSan (library: $LIB)"
start=$(date +%s)
cd tests
if [ "$#" -eq 0 ]; then
    set -- test_gate.py test_dense_exact.py test_bad_inputs.py test_fuzz_metadata.py test_concurrency.py test_archs.py test_probe.py
fi
# the stock reference build is not sanitized; test_dense_exact compares against it in a subprocess
# -s: a sanitizer report goes to stderr just before the abort; captured output would be lost
"$PY" -m pytest -x -q -s -p no:cacheprovider "$@"
echo "   tests took $(( $(date +%s) - start )) s; no sanitizer report"
