#!/usr/bin/env bash
# Prepare what tests/gpu/check.sh needs on a GPU machine with no network,
# beside the source tree (issue 12): at most 64 MiB in all.
#
#   bash scripts/gpu-bundle.sh [OUTDIR]      (default build/gpu-bundle)
#
# OUTDIR/
#   llama.cpp.tar.xz   the pinned llama.cpp (stock, from the llama-cpp-python
#                      sdist the build uses), trimmed to what a CUDA build of
#                      the library compiles (and patches/ touch): no other
#                      GPU backends, tools, tests or vocab files (check.sh
#                      builds with GGML_CUDA_FA=OFF: the flash-attention
#                      instances, which CMake requires, compile to stubs);
#                      check.sh applies patches/ to it as the normal build does
#   py/                llama-cpp-python's pure-Python package (llama_cpp/) and
#                      its dist-info, so that ffnskip_gguf imports without
#                      building llama-cpp-python there
#   wheels/            the wheels the GPU image lacks (gguf, diskcache); it has
#                      numpy, jinja2, pyyaml, tqdm, requests (device KINDS.md)
#   smollm2-cut.gguf   SmolLM2-135M-Instruct Q4_1 cut to its first layers
#                      (the whole file is 98 MB)
#   manifest.json      sizes
# Needs: the package installed (pip install -e .[test]), the SmolLM2 model
# package, the sdist in ~/.cache/ffnskip-gguf (the first build fetched it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${1:-$ROOT/build/gpu-bundle}"
PY="${PYTHON:-python3}"
CACHE="${FFNSKIP_CACHE:-$HOME/.cache/ffnskip-gguf}"
LAYERS="${FFNSKIP_GPU_SMALL_LAYERS:-10}"
LIMIT=$((64 * 1024 * 1024))

PIN="$("$PY" -c 'from ffnskip_gguf._pin import LLAMA_CPP_PYTHON_VERSION as v; print(v)')"
SDIST="$CACHE/llama_cpp_python-$PIN.tar.gz"
[ -f "$SDIST" ] || { echo "gpu-bundle: $SDIST not found (build the package once: pip install -e .)"; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT/py" "$OUT/wheels"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== llama.cpp source (trimmed) from $SDIST"
top="llama_cpp_python-$PIN"
tar -xzf "$SDIST" -C "$tmp" "$top/vendor/llama.cpp" "$top/llama_cpp"
src="$tmp/$top/vendor/llama.cpp"
keep="$tmp/llama.cpp"
mkdir -p "$keep"
# the parts the build copies (cmake/fetch-llama-cpp.cmake: _ffnskip_parts)
for p in CMakeLists.txt cmake ggml src include common vendor LICENSE licenses; do
    [ -e "$src/$p" ] && cp -r "$src/$p" "$keep/"
done
for d in "$keep"/ggml/src/ggml-*/; do
    case "$(basename "$d")" in
        ggml-cpu|ggml-cuda|ggml-vulkan) ;; # patches/ touch these
        *) rm -rf "$d" ;;
    esac
done
rm -rf "$keep/common"
find "$keep" -name '*.gguf' -delete
tar -C "$tmp" -cJf "$OUT/llama.cpp.tar.xz" llama.cpp

echo "== llama_cpp (pure Python) and its dist-info"
cp -r "$tmp/$top/llama_cpp" "$OUT/py/"
rm -rf "$OUT/py/llama_cpp/lib" "$OUT/py/llama_cpp/server"
di="$OUT/py/llama_cpp_python-$PIN.dist-info"
mkdir -p "$di"
printf 'Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: %s\n' "$PIN" > "$di/METADATA"
: > "$di/RECORD"

echo "== wheels"
for name in gguf diskcache; do
    ver="$("$PY" -c "from importlib.metadata import version; print(version('$name'))")"
    "$PY" -m pip download --quiet --no-deps --only-binary :all: "$name==$ver" -d "$OUT/wheels"
done

echo "== SmolLM2 cut to $LAYERS layers"
small="$("$PY" -c 'from ffnskip_gguf.models import resolve_model; print(resolve_model("smollm2-135m"))')"
PYTHONPATH="$ROOT/tests/gpu${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    "import sys; from check import cut_layers; cut_layers(sys.argv[1], sys.argv[2], int(sys.argv[3]))" \
    "$small" "$OUT/smollm2-cut.gguf" "$LAYERS"

total=$(du -sb "$OUT" | cut -f1)
"$PY" - "$OUT" "$total" "$LIMIT" <<'EOF'
import json, os, sys
out, total, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sizes = {}
for base, _, files in os.walk(out):
    for f in files:
        p = os.path.join(base, f)
        top = os.path.relpath(p, out).split(os.sep)[0]
        sizes[top] = sizes.get(top, 0) + os.path.getsize(p)
json.dump({"total_bytes": total, "limit_bytes": limit, "bytes": sizes}, open(os.path.join(out, "manifest.json"), "w"), indent=1)
print(json.dumps(sizes, indent=1))
print(f"total {total / 2**20:.1f} MiB of {limit / 2**20:.0f} MiB")
sys.exit(0 if total <= limit else 1)
EOF
