"""Find the patched llama.cpp shared libraries installed with this package.

The build (``CMakeLists.txt``) installs ``libllama`` and ``libggml*`` into
``ffnskip_gguf/lib``. In an editable install the package's Python files stay in
the source tree while the libraries live in site-packages, so every
``ffnskip_gguf/lib`` on ``sys.path`` is a candidate. ``FFNSKIP_GGUF_LIB_PATH``
overrides the search (a directory holding ``libllama``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_LIB_PATH = "FFNSKIP_GGUF_LIB_PATH"


def _lib_filename(base: str = "llama") -> str:
    if sys.platform == "win32":
        return f"{base}.dll"
    if sys.platform == "darwin":
        return f"lib{base}.dylib"
    return f"lib{base}.so"


def find_lib_dir() -> Path:
    """Return the directory holding our patched ``libllama``.

    Raises:
        ImportError: no candidate directory holds the library (the native
            build did not run or failed), naming the places searched.
    """
    name = _lib_filename()
    override = os.environ.get(ENV_LIB_PATH)
    if override:
        p = Path(override)
        if (p / name).is_file():
            return p.resolve()
        raise ImportError(f"{ENV_LIB_PATH}={override} does not contain {name}")
    candidates = [Path(__file__).resolve().parent / "lib"]
    for entry in sys.path:
        if entry:
            candidates.append(Path(entry) / "ffnskip_gguf" / "lib")
    for c in candidates:
        if (c / name).is_file():
            return c.resolve()
    searched = "\n  ".join(str(c) for c in candidates[:6])
    raise ImportError(
        f"ffnskip_gguf: the patched llama.cpp library ({name}) was not found; searched:\n  {searched}\n"
        "Reinstall with `pip install ffnskip-gguf` (or `pip install .` in a checkout) so the native "
        f"build runs, or set {ENV_LIB_PATH} to a directory holding it."
    )
