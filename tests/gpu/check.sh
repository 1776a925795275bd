#!/usr/bin/env bash
# The CUDA gate's check on a real GPU (issue 12). Until this has passed on a
# GPU, the CUDA gate is off by default (FFNSKIP_CUDA_GATE=1 turns it on).
#
# For a GPU machine with no network that receives the source tree plus the
# bundle of scripts/gpu-bundle.sh (build/gpu-bundle, ~54 MiB: trimmed stock
# llama.cpp source, llama_cpp's Python package, the gguf and diskcache
# wheels, SmolLM2 cut to 10 layers). Here, before:
#     bash scripts/gpu-bundle.sh
# There (the device tool: carry build/gpu-bundle):
#     bash tests/gpu/check.sh [all|build|ops|rows|speed]
# Phases, so that each fits one device command (10 min) and a warm machine
# picks up where the last one stopped (the work folder is build/gpu-work,
# which the device tool keeps between calls on a warm machine): build (the
# library), ops (test-ffnskip-ops), rows (every row but speed), speed (the
# synthetic 8B model and the speed rows); all = the four in order.
# It builds the library with GGML_CUDA=ON for the GPU's architecture only,
# flash-attention kernels off (GGML_CUDA_FA=OFF), runs the op check
# (test-ffnskip-ops CUDA0) and tests/gpu/check.py, which writes a synthetic
# 7-8B Q4_0 model (~4.2 GB, random blocks) and prints one table: fallback,
# op check, exactness, CUDA vs CPU decisions, CUDA graph replays, speed.
# Results in $OUT (the device tool's folder) or $FFNSKIP_GPU_WORK/out.
#
# Time: not measured yet (no GPU has run it). Planned: build ~3-5 min on 16
# cores (one architecture, no FA instances), synthetic model ~1 min, rows
# ~3 min; set FFNSKIP_GPU_SKIP_SPEED=1 to leave out the speed rows.
#
# Needs: nvcc, cmake, ninja, python3 with numpy (the GPU image has them).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
BUNDLE="${FFNSKIP_GPU_BUNDLE:-$ROOT/build/gpu-bundle}"
W="${FFNSKIP_GPU_WORK:-$ROOT/build/gpu-work}"
PHASE="${1:-all}"
case "$PHASE" in all|build|ops|rows|speed) ;; *) echo "usage: $0 [all|build|ops|rows|speed]"; exit 2 ;; esac
want() { [ "$PHASE" = all ] || [ "$PHASE" = "$1" ]; }
RES="${OUT:-$W/out}"
PY="${PYTHON:-python3}"
mkdir -p "$W" "$RES"
t0=$(date +%s)
say() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

for f in llama.cpp.tar.xz smollm2-cut.gguf py wheels; do
    [ -e "$BUNDLE/$f" ] || { echo "check.sh: $BUNDLE/$f missing (run scripts/gpu-bundle.sh here and carry build/gpu-bundle)"; exit 1; }
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$RES/gpu.txt"
ARCH="${FFNSKIP_CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')}"
[ -n "$ARCH" ] || { echo "check.sh: no GPU found (nvidia-smi); set FFNSKIP_CUDA_ARCH to build anyway"; exit 1; }

say "python packages from the bundle"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" "$BUNDLE"/wheels/*.whl
export PYTHONPATH="$ROOT/python:$BUNDLE/py:$W/site:$ROOT/tests/gpu${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import numpy, gguf, jinja2, diskcache" || { echo "check.sh: a Python package is missing"; exit 1; }

B="$W/build"
export FFNSKIP_GGUF_LIB_PATH="$W/install/ffnskip_gguf/lib"
if want build || [ ! -f "$FFNSKIP_GGUF_LIB_PATH/libllama.so" ]; then
# (not indented: the build as one block)
say "llama.cpp source"
rm -rf "$W/llama.cpp"
tar -xJf "$BUNDLE/llama.cpp.tar.xz" -C "$W"

say "configure + build (GGML_CUDA=ON, sm_$ARCH, FA off)"
cmake -S "$ROOT" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DGGML_CUDA_FA=OFF \
    -DFFNSKIP_LLAMA_CPP_SOURCE="$W/llama.cpp" -DFFNSKIP_BUILD_TESTS=ON \
    -DCMAKE_INSTALL_PREFIX="$W/install" -DPython_EXECUTABLE="$(command -v "$PY")" > "$RES/configure.log" 2>&1 \
    || { tail -30 "$RES/configure.log"; exit 1; }
bs=$(date +%s)
cmake --build "$B" -j "$(nproc)" > "$RES/build.log" 2>&1 || { tail -40 "$RES/build.log"; exit 1; }
cmake --install "$B" --component ffnskip > /dev/null
cmake --install "$B" --component ffnskip-tests > /dev/null
echo "build_seconds=$(( $(date +%s) - bs ))" | tee "$W/build-time.txt" "$RES/build-time.txt"
fi
rc=0
if want ops; then
    say "op check: test-ffnskip-ops CUDA0"
    "$W/install/bin/test-ffnskip-ops" CUDA0 > "$W/ops.log" 2>&1 || rc=1
    cp "$W/ops.log" "$RES/ops.log"
    tail -3 "$W/ops.log"
fi
if want rows || want speed; then
    say "rows (tests/gpu/check.py)"
    extra=()
    want speed || extra+=(--skip-speed)
    want rows || extra+=(--speed-only)
    [ -f "$W/ops.log" ] && extra+=(--ops-log "$W/ops.log")
    if ! PYTHONUNBUFFERED=1 "$PY" "$ROOT/tests/gpu/check.py" --small "$BUNDLE/smollm2-cut.gguf" --work "$W" \
            --json "$RES/gpu-check-$PHASE.json" "${extra[@]}" | tee "$RES/table-$PHASE.md"; then
        rc=1
    fi
fi
say "done ($PHASE): results in $RES (rc $rc)"
exit "$rc"
