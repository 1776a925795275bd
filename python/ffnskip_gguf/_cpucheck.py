"""Instruction-set check before the native libraries load (docs/PORTABLE.md).

A build with ``GGML_NATIVE=ON`` compiles the CPU backend with
``-march=native``: copied to an older CPU (a wheel cache in a Docker layer, a
shared home directory, a CI artefact) it dies with SIGILL on the first
instruction that CPU lacks. The build records the ISA macros its CPU flags
define (``cpu-features.txt``, written by ``cmake/cpu-features.cmake``); here
each one is checked with ``libffnskip-cpucheck`` (``cpp/ffn-skip-cpucheck.c``,
compiled for the x86-64 baseline, cpuid via ``__builtin_cpu_supports``)
before ``libllama`` and the CPU backend are loaded, and a missing one raises
ImportError naming it and the fix.

A portable build (``FFNSKIP_PORTABLE=ON``) records no requirement: its CPU
backend is one module per variant, scored at run time (``_backends.py``).
Builds without the file or the checker (other architectures, older builds)
are not checked.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from ._libpath import _lib_filename

FEATURES_FILE = "cpu-features.txt"


def _checker_name() -> str:
    return _lib_filename("ffnskip-cpucheck")


def cpu_has_fn(lib_dir: Path):
    """``ffnskip_cpu_has(macro: bytes) -> int`` of ``lib_dir``'s checker (1:
    this CPU has it, 0: lacks it, -1: macro not in its table), or None when
    the build has no checker (not x86-64, older build).

    Raises:
        ImportError: the checker exists but cannot be loaded.
    """
    checker = Path(lib_dir) / _checker_name()
    if not checker.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(checker))
    except OSError as e:
        raise ImportError(f"ffnskip_gguf: cannot load the CPU checker {checker}: {e}") from None
    has = lib.ffnskip_cpu_has
    has.argtypes = [ctypes.c_char_p]
    has.restype = ctypes.c_int
    return has


def read_features(lib_dir: Path) -> dict | None:
    """Parse ``lib_dir/cpu-features.txt``.

    Returns:
        ``{"build": "native" | "flags" | "portable", "flags": [str], "require":
        [str]}`` (``require``: ISA macro names such as ``"__AVX2__"``), or None
        when the build wrote no file.

    Raises:
        ImportError: the file exists but is not in the format
            ``cmake/cpu-features.cmake`` writes.
    """
    path = Path(lib_dir) / FEATURES_FILE
    if not path.is_file():
        return None
    out: dict = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in ("build", "flags", "require"):
            raise ImportError(f"ffnskip_gguf: {path} has an unexpected line {line!r}; reinstall ffnskip-gguf")
        out[key.strip()] = value.split()
    if "build" not in out or "require" not in out or len(out["build"]) != 1:
        raise ImportError(f"ffnskip_gguf: {path} lacks its 'build:' or 'require:' line; reinstall ffnskip-gguf")
    out["build"] = out["build"][0]
    out.setdefault("flags", [])
    return out


def missing_features(lib_dir: Path) -> tuple[dict | None, list[str]]:
    """The recorded ISA macros this CPU lacks.

    Returns:
        (the parsed features file or None, the macros the checker answered 0
        for). Macros the checker does not know (-1) are not reported; nothing
        is checked without the file or the checker library.

    Raises:
        ImportError: the features file is malformed, or the checker exists
            but cannot be loaded.
    """
    feats = read_features(lib_dir)
    if feats is None or not feats["require"]:
        return feats, []
    has = cpu_has_fn(lib_dir)
    if has is None:
        return feats, []
    return feats, [m for m in feats["require"] if has(m.encode()) == 0]


def feature_label(macro: str) -> str:
    """``"__AVX512F__"`` -> ``"avx512f"``; ``"__SSE4_2__"`` -> ``"sse4.2"``."""
    name = macro.strip("_").lower()
    if name.startswith("sse4_"):
        name = name.replace("_", ".")
    return name.replace("_", "-")


def check_cpu(lib_dir: Path) -> None:
    """Raise ImportError when this CPU lacks an instruction set the build needs.

    Called by ``ffnskip_gguf.__init__`` before ``llama_cpp`` loads ``libllama``
    (which links the CPU backend of a non-portable build).

    Raises:
        ImportError: naming the missing features, the flags the build used and
            the two fixes (rebuild here, or the portable wheel).
    """
    feats, missing = missing_features(lib_dir)
    if not missing:
        return
    labels = ", ".join(feature_label(m) for m in missing)
    flags = " ".join(feats.get("flags", [])) or "(none recorded)"
    raise ImportError(
        f"ffnskip_gguf: this CPU lacks {labels}, which the native libraries in {lib_dir} were compiled "
        f"for ({feats['build']} build, CPU flags {flags}); loading them would stop the process with an "
        "illegal instruction. Fix: rebuild on this machine without pip's wheel cache: `CMAKE_ARGS=\"-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF\" "
        "pip install --no-cache-dir --force-reinstall --no-deps --no-binary ffnskip-gguf ffnskip-gguf` (or "
        "`pip install --no-cache-dir .` in a checkout); or install the portable wheel "
        "(scripts/build-wheel.sh; docs/PORTABLE.md), which picks the CPU variant at run time."
    )
