#!/usr/bin/env bash
# The Vulkan variant (issue 11): build the library with GGML_VULKAN=ON in a
# build tree of its own (like the sanitizer step), then run the gate's Vulkan
# tests (tests/test_vulkan.py) on Mesa's software device, lavapipe.
#
#   bash scripts/vulkan.sh [pytest args]
#
# Needs: the package installed in the current Python (pip install .[test]:
# the CPU build is the tests' reference), the offline models, and Debian's
# mesa-vulkan-drivers glslc libvulkan-dev spirv-headers (.ci/run installs
# them). Fails (never skips) when the Vulkan build or the device is missing.
# Time on the 2-core dev machine: build ~10 min (shader generation
# dominates), tests ~5 min (see docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
B="${FFNSKIP_VULKAN_BUILD:-$ROOT/build/vulkan}"
PY="${PYTHON:-python3}"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)

command -v glslc >/dev/null || { echo "vulkan.sh: glslc not found (Debian: apt-get install glslc)"; exit 1; }

echo "== configure $B"
cmake -S "$ROOT" -B "$B" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_VULKAN=ON -DFFNSKIP_BUILD_TESTS=ON \
    -DCMAKE_INSTALL_PREFIX="$B/install" -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
echo "== build"
start=$(date +%s)
cmake --build "$B"
cmake --install "$B" --component ffnskip >/dev/null
cmake --install "$B" --component ffnskip-tests >/dev/null
echo "   build took $(( $(date +%s) - start )) s"

export FFNSKIP_GGUF_LIB_PATH="$B/install/ffnskip_gguf/lib"
export FFNSKIP_VULKAN_OPS_TEST="$B/install/bin/test-ffnskip-ops"
export FFNSKIP_VULKAN=1
# lavapipe is a CPU-type device, which ggml-vulkan ignores unless named
export GGML_VK_VISIBLE_DEVICES=0
export PYTHONWARNINGS=ignore

echo "== Vulkan tests (library: $FFNSKIP_GGUF_LIB_PATH)"
start=$(date +%s)
cd tests
if [ "$#" -eq 0 ]; then
    set -- test_vulkan.py
fi
"$PY" -m pytest -q -ra -s -p no:cacheprovider "$@"
echo "   tests took $(( $(date +%s) - start )) s"
