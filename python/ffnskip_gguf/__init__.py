"""ffnskip-gguf: faster decoding of GGUF models by skipping redundant FFN blocks.

Importing this package points llama-cpp-python at the patched llama.cpp
libraries shipped inside it (``LLAMA_CPP_LIB_PATH``) before ``llama_cpp`` is
imported, so ``ffnskip_gguf`` must be imported first. See DESIGN.md section 2.

Raises ImportError when llama-cpp-python is missing, has another version than
the pin, or was already imported with another library.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata as _metadata
from pathlib import Path as _Path

from ._pin import LLAMA_CPP_PYTHON_VERSION
from ._libpath import find_lib_dir as _find_lib_dir
from ._cpucheck import check_cpu as _check_cpu
from ._backends import load_cpu_backend as _load_cpu_backend

__version__ = "0.1.0"


def _wire_llama_cpp() -> _Path:
    try:
        installed = _metadata.version("llama_cpp_python")
    except _metadata.PackageNotFoundError:
        raise ImportError(
            f"ffnskip_gguf needs llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}, which is not installed"
        ) from None
    if installed != LLAMA_CPP_PYTHON_VERSION:
        raise ImportError(
            f"ffnskip_gguf is built against llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} "
            f"but {installed} is installed; run: pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}'"
        )
    lib_dir = _find_lib_dir()
    # before anything compiled for the build machine's CPU is loaded
    _check_cpu(lib_dir)
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None:
        lib = getattr(loaded, "_lib", None)
        loaded_path = _Path(getattr(lib, "_name", "") or "")
        if not loaded_path.name or loaded_path.resolve().parent != lib_dir:
            raise ImportError(
                "llama_cpp was imported before ffnskip_gguf and loaded "
                f"{loaded_path or 'an unknown library'}, not the patched one in {lib_dir}. "
                "Import ffnskip_gguf before llama_cpp (or set "
                f"LLAMA_CPP_LIB_PATH={lib_dir} before starting Python)."
            )
    else:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    import llama_cpp  # noqa: F401  (loads the library from LLAMA_CPP_LIB_PATH)

    if getattr(llama_cpp, "__version__", installed) != LLAMA_CPP_PYTHON_VERSION:
        raise ImportError(
            f"llama_cpp reports version {llama_cpp.__version__}, expected {LLAMA_CPP_PYTHON_VERSION}"
        )
    return lib_dir


LIB_DIR = _wire_llama_cpp()
#: the CPU backend variant a portable build loaded (``"haswell"``, ...); None
#: for a build whose CPU backend is linked in (docs/PORTABLE.md)
CPU_VARIANT = _load_cpu_backend(LIB_DIR)

from . import _lib  # noqa: E402  (checks that the loaded library is ours)
from .llama import Llama, ModelFileError  # noqa: E402

__all__ = ["Llama", "ModelFileError", "LIB_DIR", "CPU_VARIANT", "LLAMA_CPP_PYTHON_VERSION", "__version__"]
