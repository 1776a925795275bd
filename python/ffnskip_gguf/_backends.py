"""Loading the CPU backend of a portable build (docs/PORTABLE.md).

A portable build (``FFNSKIP_PORTABLE=ON``: ggml's ``GGML_BACKEND_DL`` with
``GGML_CPU_ALL_VARIANTS``) ships the CPU backend as one module per instruction
-set variant, ``libggml-cpu-<variant>.so``, next to ``libllama``. ggml's own
``ggml_backend_load_all()`` searches the executable's and the working
directory, which for Python are neither ours, and llama-cpp-python loads
nothing; so after ``libllama`` is loaded this module scores each variant with
its exported ``ggml_backend_score()`` (0: this CPU cannot run it; the scoring
is ggml's ``ggml/src/ggml-cpu/arch/x86/cpu-feats.cpp``), loads the best one
with ``ggml_backend_load()`` (ties: the first in name order) and records its
name. ``FFNSKIP_CPU_VARIANT=<variant>`` loads that one instead (tests use it
to run the gate on every variant this CPU runs).

A non-portable build registers its CPU backend when ``libggml`` loads; then
nothing is done here.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ENV_CPU_VARIANT = "FFNSKIP_CPU_VARIANT"


def _prefix_suffix() -> tuple[str, str]:
    # ggml names backend modules .so on macOS too (backend_filename_extension)
    return ("ggml-cpu-", ".dll") if sys.platform == "win32" else ("libggml-cpu-", ".so")


def variant_files(lib_dir: Path) -> dict[str, Path]:
    """``{variant name: module path}`` of the CPU variant modules in ``lib_dir``
    (empty for a non-portable build)."""
    prefix, suffix = _prefix_suffix()
    out = {}
    for p in sorted(Path(lib_dir).iterdir()):
        if p.name.startswith(prefix) and p.name.endswith(suffix) and p.is_file():
            out[p.name[len(prefix):-len(suffix)]] = p
    return out


def variant_scores(lib_dir: Path) -> dict[str, int]:
    """Score every CPU variant module in ``lib_dir`` for this CPU.

    Each module is loaded, its ``ggml_backend_score()`` called and the module
    closed again (what ggml's ``ggml_backend_load_best`` does).

    Returns:
        ``{variant: score}``; 0 means this CPU lacks an instruction set the
        variant was compiled for.

    Raises:
        ImportError: a module cannot be loaded or exports no score.
    """
    import _ctypes

    scores = {}
    for name, path in variant_files(lib_dir).items():
        try:
            mod = ctypes.CDLL(str(path))
        except OSError as e:
            raise ImportError(f"ffnskip_gguf: cannot load the CPU backend variant {path}: {e}") from None
        try:
            fn = getattr(mod, "ggml_backend_score", None)
            if fn is None:
                raise ImportError(f"ffnskip_gguf: {path} exports no ggml_backend_score; reinstall ffnskip-gguf")
            fn.restype = ctypes.c_int
            fn.argtypes = []
            scores[name] = int(fn())
        finally:
            if sys.platform != "win32":
                _ctypes.dlclose(mod._handle)
    return scores


def load_cpu_backend(lib_dir: Path) -> str | None:
    """Register the CPU backend of a portable build with ggml.

    Returns:
        The loaded variant's name, or None for a build whose CPU backend is
        linked in (nothing to do).

    Raises:
        ImportError: ``FFNSKIP_CPU_VARIANT`` names a variant that is not there
            (or the build has no variant modules) or that this CPU cannot run;
            no variant runs here; ggml refuses to load the chosen module.
    """
    files = variant_files(lib_dir)
    wanted = os.environ.get(ENV_CPU_VARIANT, "").strip()
    if not files:
        if wanted:
            raise ImportError(f"ffnskip_gguf: {ENV_CPU_VARIANT}={wanted}, but this build has no CPU variant modules")
        from ._cpucheck import read_features

        feats = read_features(lib_dir)
        if feats is None or feats["build"] != "portable":
            # the CPU backend is linked in; touching ggml's registry here would
            # start GPU drivers at import
            return None
    # ggml's registry through the libllama that llama_cpp loaded: dlsym on its
    # handle searches its dependencies, so this is the libggml it uses
    import llama_cpp.llama_cpp as _llama_cpp

    lib = _llama_cpp._lib

    def fn(name, argtypes, restype):
        f = lib[name]  # a fresh function object: never retypes one llama_cpp set
        f.argtypes, f.restype = argtypes, restype
        return f

    dev_count = fn("ggml_backend_dev_count", [], ctypes.c_size_t)
    backend_load = fn("ggml_backend_load", [ctypes.c_char_p], ctypes.c_void_p)
    if not files:
        # GGML_BACKEND_DL without variants: one libggml-cpu module
        if dev_count() == 0:
            fn("ggml_backend_load_all_from_path", [ctypes.c_char_p], None)(str(lib_dir).encode())
            if dev_count() == 0:
                raise ImportError(f"ffnskip_gguf: no ggml backend could be loaded from {lib_dir}")
        return None
    others = sorted(p.name for p in Path(lib_dir).glob("*ggml-*") if p.is_file() and any(
        g in p.name for g in ("cuda", "vulkan", "hip", "metal", "sycl", "opencl", "musa", "cann", "blas")))
    if others:
        import warnings

        warnings.warn(f"ffnskip_gguf: the portable build loads its CPU backend only; {', '.join(others)} "
                      "in its lib folder are not loaded (GPU builds: build without FFNSKIP_PORTABLE)",
                      RuntimeWarning, stacklevel=3)
    scores = variant_scores(lib_dir)
    if wanted:
        if wanted not in scores:
            raise ImportError(
                f"ffnskip_gguf: {ENV_CPU_VARIANT}={wanted} is not a CPU variant of this build; "
                f"there are: {', '.join(scores)}"
            )
        if scores[wanted] <= 0:
            raise ImportError(f"ffnskip_gguf: {ENV_CPU_VARIANT}={wanted}: this CPU cannot run that variant")
        best = wanted
    else:
        runnable = [(s, n) for n, s in scores.items() if s > 0]
        if not runnable:
            raise ImportError(
                f"ffnskip_gguf: this CPU runs none of the CPU backend variants in {lib_dir} ({', '.join(scores)})"
            )
        top = max(s for s, _ in runnable)
        best = next(n for s, n in runnable if s == top)
    # ggml logs "load_backend: loaded CPU backend from ..." at INFO through
    # llama-cpp-python's logger: quiet at import, as a linked-in backend is
    import logging

    from llama_cpp._logger import logger

    level = logger.level
    logger.setLevel(max(level, logging.ERROR))  # what Llama(verbose=False) sets
    try:
        reg = backend_load(str(files[best]).encode())
    finally:
        logger.setLevel(level)
    if not reg:
        raise ImportError(f"ffnskip_gguf: ggml could not load the CPU backend {files[best]}")
    if dev_count() < 1:
        raise ImportError(f"ffnskip_gguf: {files[best]} registered no device")
    return best
