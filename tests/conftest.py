"""Shared fixtures: real models (DESIGN.md section 7) and the stock llama.cpp
reference build (same pin, same CMake flags, no cpp/, only the patches of
patches/series marked "stock": upstream fixes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ffnskip_gguf  # noqa: F401  (wires llama_cpp to our library first)
from ffnskip_gguf.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
N_THREADS = 2


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return str(resolve_model("smollm2-135m"))


def _optional_model(name: str) -> str:
    try:
        return str(resolve_model(name))
    except FileNotFoundError as e:
        if os.environ.get("FFNSKIP_REQUIRE_ALL_MODELS"):
            raise
        pytest.skip(f"{name} not installed: {e}")


@pytest.fixture(scope="session")
def qwen_path() -> str:
    return _optional_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma_path() -> str:
    return _optional_model("gemma3-270m")


def build_stock(build_root: Path) -> Path:
    """Build llama.cpp of the pin without our hooks (FFNSKIP_STOCK=ON: only the
    upstream fixes of patches/series) with
    the same CMakeLists and flags as the package; return its lib directory."""
    build_dir = build_root / "stock"
    prefix = build_root / "stock-install"
    lib = prefix / "ffnskip_gguf" / "lib"
    cmake = shutil.which("cmake") or "cmake"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *gen, "-DFFNSKIP_STOCK=ON",
                    "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_INSTALL_PREFIX={prefix}",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(build_dir)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--install", str(build_dir), "--component", "ffnskip"], check=True,
                   stdout=subprocess.DEVNULL)
    return lib


@pytest.fixture(scope="session")
def stock_lib_dir() -> Path:
    """Directory of the stock reference libllama (env FFNSKIP_STOCK_LIB_DIR, or
    built into build/ of the checkout, ~4 min on 2 cores the first time)."""
    env = os.environ.get("FFNSKIP_STOCK_LIB_DIR")
    if env:
        return Path(env)
    # always through cmake: a no-op when nothing changed, a rebuild when the
    # stock-marked patches of patches/series did (its stamp)
    return build_stock(ROOT / "build")
