#!/usr/bin/env bash
# CUDA compile check (issue 12), for machines without a GPU (CI, the dev box):
# configure the real CMake build with GGML_CUDA=ON for
# CMAKE_CUDA_ARCHITECTURES="75;86;90" and compile the objects we add or patch
# (cpp/ffn-skip-cuda.cu; mmvq.cu, mmvf.cu, ggml-cuda.cu of patches/0007; our
# host sources do not depend on GGML_CUDA and are built by the main build).
# Fails on any compile error, and on any warning that
# points into our own sources (cpp/ffn-skip*). Nothing is linked and nothing
# runs: tests/gpu/check.sh is the check on a GPU.
#
#   bash scripts/cuda-compile-check.sh
#
# Needs nvcc (CUDA 13 here: /usr/local/cuda) and cuBLAS headers, which the
# toolkit here lacks: they come from the nvidia-cublas wheel (its
# nvidia/cu13/include/, extracted once into ~/.cache/ffnskip-gguf/cublas;
# FFNSKIP_CUBLAS_INCLUDE overrides). The cuBLAS library variables point at
# placeholders (as is the driver library, absent without a GPU driver):
# nothing is linked.
# Time on the 2-core dev machine: see docs/BENCHMARKS.md (CI budget 8 min).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
B="${FFNSKIP_CUDA_CHECK_BUILD:-$ROOT/build/cuda-check}"
CACHE="${FFNSKIP_CACHE:-$HOME/.cache/ffnskip-gguf}"
ARCHS="${FFNSKIP_CUDA_ARCHS:-75;86;90}"
CUBLAS_WHEEL_VERSION=13.1.1.3
PY="${PYTHON:-python3}"
start=$(date +%s)

NVCC="${CUDACXX:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    NVCC=/usr/local/cuda/bin/nvcc
fi
[ -n "$NVCC" ] || { echo "cuda-compile-check: nvcc not found"; exit 1; }
echo "== nvcc: $("$NVCC" --version | tail -1)"

INC="${FFNSKIP_CUBLAS_INCLUDE:-$CACHE/cublas/include}"
if [ ! -f "$INC/cublas_v2.h" ]; then
    echo "== cuBLAS headers from the nvidia-cublas $CUBLAS_WHEEL_VERSION wheel"
    tmp="$(mktemp -d)"
    "$PY" -m pip download --quiet --no-deps --only-binary :all: "nvidia-cublas==$CUBLAS_WHEEL_VERSION" -d "$tmp"
    mkdir -p "$INC"
    unzip -q -o -j "$tmp"/nvidia_cublas-*.whl 'nvidia/cu13/include/*' -d "$INC"
    rm -rf "$tmp"
fi
[ -f "$INC/cublas_v2.h" ] || { echo "cuda-compile-check: no cublas_v2.h in $INC"; exit 1; }

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
[ ${#GEN[@]} -gt 0 ] || { echo "cuda-compile-check: needs ninja (object targets)"; exit 1; }

echo "== configure $B (GGML_CUDA=ON, archs $ARCHS)"
cmake -S "$ROOT" -B "$B" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
    -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_FLAGS="-I$INC" \
    -DCUDA_cublas_LIBRARY="$INC/placeholder-libcublas.so" \
    -DCUDA_cublasLt_LIBRARY="$INC/placeholder-libcublasLt.so" \
    -DCUDA_cuda_driver_LIBRARY="$INC/placeholder-libcuda.so" \
    -DPython_EXECUTABLE="$(command -v "$PY")" >"$B.configure.log" 2>&1 \
    || { tail -40 "$B.configure.log"; echo "cuda-compile-check: configure failed"; exit 1; }

# the object targets of the files we add or patch
objs=()
while IFS= read -r t; do
    objs+=("$t")
done < <(ninja -C "$B" -t targets all | cut -d: -f1 |
         grep -E 'ggml-cuda\.dir/(ffn-skip-cuda|mmvq|mmvf|ggml-cuda)\.cu\.o$' | sort -u)
[ ${#objs[@]} -eq 4 ] || { printf '%s\n' "${objs[@]}"; echo "cuda-compile-check: expected 4 object targets, found ${#objs[@]}"; exit 1; }
printf '   %s\n' "${objs[@]}"

echo "== compile"
log="$B/compile.log"
# -k 0: report every failing object, not just the first
if ! ninja -C "$B" -k 0 "${objs[@]}" >"$log" 2>&1; then
    grep -E 'error|Error' "$log" | head -40 || true
    echo "cuda-compile-check: compile failed (full log: $log)"
    exit 1
fi
# warnings that point into our sources (the patched files' own warnings are upstream's)
if grep -nE 'ffn-skip[^ ]*(:[0-9]+|\([0-9]+\)).*warning|warning.*ffn-skip' "$log"; then
    echo "cuda-compile-check: warnings in our sources (full log: $log)"
    exit 1
fi
echo "   compile check passed in $(( $(date +%s) - start )) s"
