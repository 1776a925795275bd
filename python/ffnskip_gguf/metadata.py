"""Checks and reads GGUF model files before the native load.

llama-cpp-python reduces every native load failure to "Failed to load model
from file", so the file is checked here first, with a message that says what
is wrong. The header and key/value section are parsed by ggml's own GGUF
reader (the parser llama.cpp loads with) through ctypes: gguf-py's
``GGUFReader`` parses the whole vocabulary in Python and takes 2-10 s on the
models of DESIGN.md section 7, too slow for every ``Llama()``. Value types use
gguf-py's ``GGUFValueType``; files are written with gguf-py (calibrate).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

from . import _lib
from .errors import ModelFileError, ModelIsDirectoryError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
_HEADER_BYTES = 24  # magic, version, tensor count, kv count
LLAMA_MAX_LAYERS = 512  # src/llama-hparams.h of the pin: more aborts the native loader

_SCALAR_CTYPES = {
    GGUFValueType.UINT8: ctypes.c_uint8,
    GGUFValueType.INT8: ctypes.c_int8,
    GGUFValueType.UINT16: ctypes.c_uint16,
    GGUFValueType.INT16: ctypes.c_int16,
    GGUFValueType.UINT32: ctypes.c_uint32,
    GGUFValueType.INT32: ctypes.c_int32,
    GGUFValueType.FLOAT32: ctypes.c_float,
    GGUFValueType.BOOL: ctypes.c_bool,
    GGUFValueType.UINT64: ctypes.c_uint64,
    GGUFValueType.INT64: ctypes.c_int64,
    GGUFValueType.FLOAT64: ctypes.c_double,
}


@dataclass
class GGUFValue:
    """One metadata value: its GGUF type (for arrays, ``array_type`` is the
    element type) and the Python value (list for arrays)."""

    type: GGUFValueType
    value: Any
    array_type: GGUFValueType | None = None


@dataclass
class ModelInfo:
    """What ``check_model_file`` learned about a GGUF file.

    Attributes:
        path: resolved file path.
        size: file size in bytes.
        architecture: ``general.architecture`` (e.g. ``"llama"``).
        n_layer: ``<arch>.block_count`` (transformer layers), or 0 if absent.
        values: the keys asked for (``prefixes`` of ``check_model_file``).
        tensor_bytes: tensor name -> size in bytes.
    """

    path: Path
    size: int
    architecture: str
    n_layer: int
    values: dict[str, GGUFValue] = field(default_factory=dict)
    tensor_bytes: dict[str, int] = field(default_factory=dict)


def _read_value(g, kid: int) -> GGUFValue:
    t = GGUFValueType(_lib.gguf_get_kv_type(g, kid))
    if t == GGUFValueType.STRING:
        raw = _lib.gguf_get_val_str(g, kid)
        return GGUFValue(t, raw.decode("utf-8", "replace") if raw is not None else "")
    if t == GGUFValueType.ARRAY:
        at = GGUFValueType(_lib.gguf_get_arr_type(g, kid))
        n = _lib.gguf_get_arr_n(g, kid)
        if at == GGUFValueType.STRING:
            vals = [(_lib.gguf_get_arr_str(g, kid, i) or b"").decode("utf-8", "replace") for i in range(n)]
        elif at in _SCALAR_CTYPES:
            ptr = _lib.gguf_get_arr_data(g, kid)
            arr = (_SCALAR_CTYPES[at] * n).from_address(ptr) if n else []
            vals = list(arr)
        else:  # nested arrays: not used by llama.cpp or us
            vals = None
        return GGUFValue(t, vals, at)
    ptr = _lib.gguf_get_val_data(g, kid)
    return GGUFValue(t, _SCALAR_CTYPES[t].from_address(ptr).value)


def check_model_file(path: str | os.PathLike, prefixes: tuple[str, ...] = ("ffn_skip.",),
                     shard: bool = False) -> ModelInfo:
    """Check that ``path`` is a complete GGUF file and read its basics.

    Args:
        path: model file path.
        prefixes: metadata keys starting with one of these are returned in
            ``ModelInfo.values`` (default: the ``ffn_skip.`` namespace).
        shard: a later shard of a split model (no ``general.architecture``
            needed: the first shard holds the metadata).

    Returns:
        ModelInfo.

    Raises:
        ModelNotFoundError: the path does not exist.
        ModelIsDirectoryError: the path is a directory.
        ModelFileError: not a GGUF file, malformed header or metadata, or
            truncated (tensor data past the end of the file).
    """
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    p = Path(os.fspath(path)).expanduser()
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        raise ModelFileError(f"model path is not valid UTF-8 (llama.cpp needs a UTF-8 path): {p!r}") from None
    if not p.exists():
        raise ModelNotFoundError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelIsDirectoryError(f"model path is a directory, not a GGUF file: {p}")
    if not p.is_file():
        raise ModelFileError(f"model path is not a regular file: {p}")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            head = f.read(_HEADER_BYTES)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {p}: {e}") from e
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file (starts with {head[:4]!r}, expected b'GGUF'): {p}")
    if size < _HEADER_BYTES:
        raise ModelFileError(f"truncated GGUF file ({size} bytes, the header alone needs {_HEADER_BYTES}): {p}")

    g = _lib.gguf_init_from_file(os.fsencode(str(p)), _lib.gguf_init_params(True, None))
    if not g:
        raise ModelFileError(
            f"malformed or truncated GGUF file (its header, metadata or tensor table cannot be parsed): {p}"
        )
    try:
        values: dict[str, GGUFValue] = {}
        arch = ""
        n_layer = 0
        for kid in range(_lib.gguf_get_n_kv(g)):
            key = (_lib.gguf_get_key(g, kid) or b"").decode("utf-8", "replace")
            if key == "general.architecture" and _lib.gguf_get_kv_type(g, kid) == GGUFValueType.STRING:
                arch = _read_value(g, kid).value
            if prefixes and key.startswith(prefixes):
                values[key] = _read_value(g, kid)
        problem = None
        if arch:
            key = f"{arch}.block_count"
            kid = _lib.gguf_find_key(g, key.encode())
            if kid >= 0:
                t = _lib.gguf_get_kv_type(g, kid)
                if t not in (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64,
                             GGUFValueType.INT64, GGUFValueType.UINT16, GGUFValueType.INT16):
                    problem = f"{key} has type {GGUFValueType(t).name}, expected an integer"
                else:
                    n_layer = int(_read_value(g, kid).value)
                    if not 1 <= n_layer <= LLAMA_MAX_LAYERS:
                        problem = f"{key}={n_layer} is outside [1, {LLAMA_MAX_LAYERS}]"
            key = f"{arch}.attention.layer_norm_rms_epsilon"
            kid = _lib.gguf_find_key(g, key.encode())
            if kid >= 0 and _lib.gguf_get_kv_type(g, kid) == GGUFValueType.FLOAT32:
                eps = float(_read_value(g, kid).value)
                if not (eps >= 0.0 and eps < float("inf")):
                    problem = f"{key}={eps} must be a finite value >= 0"
        data_offset = _lib.gguf_get_data_offset(g)
        end = data_offset
        tensor_bytes = {}
        for tid in range(_lib.gguf_get_n_tensors(g)):
            off = _lib.gguf_get_tensor_offset(g, tid)
            nb = _lib.gguf_get_tensor_size(g, tid)
            tensor_bytes[(_lib.gguf_get_tensor_name(g, tid) or b"").decode("utf-8", "replace")] = nb
            end = max(end, data_offset + off + nb)
    finally:
        _lib.gguf_free(g)
    if end > size:
        raise ModelFileError(
            f"truncated GGUF file: tensor data ends at byte {end} but the file has {size} bytes: {p}"
        )
    if not arch and not (shard and KEY_SPLIT_COUNT in values):
        raise ModelFileError(f"GGUF file has no general.architecture key, not a model: {p}")
    if problem:
        raise ModelFileError(f"invalid GGUF metadata: {problem}: {p}")
    return ModelInfo(path=p.resolve(), size=size, architecture=arch, n_layer=n_layer, values=values,
                     tensor_bytes=tensor_bytes)


# --- what a calibration was measured on (issue 13, D6) ---------------------

KEY_FIT_N_LAYER = "ffn_skip.model.n_layer"    # layers of the model calibrate measured
KEY_FIT_SHAPES = "ffn_skip.model.ffn_shapes"  # fingerprint of its FFN tensors' names and shapes
KEY_FIT_TYPES = "ffn_skip.model.ffn_types"    # fingerprint of their types (quantization)
FIT_KEYS = (KEY_FIT_N_LAYER, KEY_FIT_SHAPES, KEY_FIT_TYPES)


def ffn_fingerprints(path: str | os.PathLike) -> tuple[str, str]:
    """Fingerprints of the FFN tensors (``blk.N.ffn_*``) of a GGUF file:
    (names and shapes, names and types), each the first 16 hex digits of a
    SHA-256 over sorted lines. Reads the tensor table only (ggml's C GGUF
    reader), over every shard of a split model. Raises ModelFileError for a
    file that cannot be parsed or a missing shard."""
    import hashlib

    shapes, types = [], []
    for p in shard_paths(path):
        _ffn_lines(p, shapes, types)

    def h(lines: list[str]) -> str:
        return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:16]

    return h(shapes), h(types)


def _ffn_lines(p: Path, shapes: list, types: list) -> None:
    import ctypes

    from . import _lib

    ctx = ctypes.c_void_p()
    g = _lib.gguf_init_from_file(os.fsencode(str(p)), _lib.gguf_init_params(True, ctypes.addressof(ctx)))
    if not g:
        raise ModelFileError(f"malformed or truncated GGUF file: {p}")
    try:
        t = _lib.ggml_get_first_tensor(ctx)
        while t:
            name = (_lib.ggml_get_name(t) or b"").decode("utf-8", "replace")
            parts = name.split(".")
            if len(parts) >= 3 and parts[0] == "blk" and parts[2].startswith("ffn_"):
                # struct ggml_tensor: int type; (pad); void * buffer; int64_t ne[4] (ggml.h)
                ttype = ctypes.c_int.from_address(t).value
                ne = (ctypes.c_int64 * 4).from_address(t + 16)
                shapes.append(f"{name}:{','.join(str(int(x)) for x in ne)}")
                types.append(f"{name}:{ttype}")
            t = _lib.ggml_get_next_tensor(ctx, t)
    finally:
        _lib.gguf_free(g)
        if ctx.value:
            _lib.ggml_free(ctx)


def calibration_fit(info: "ModelInfo") -> tuple[str, str]:
    """Does the file's calibration describe this model? Compares what
    ``calibrate`` recorded (``ffn_skip.model.*``) with the file itself.
    Returns (error, warning): an error when the layer count or the FFN
    tensors' names or shapes differ (a pruned or different model: the
    per-layer settings would land on other layers), a warning when only
    their types differ (requantized); ("", "") when they match or the file
    records nothing (calibrations written before these keys)."""
    rec = {k: info.values.get(k) for k in FIT_KEYS}
    if all(v is None for v in rec.values()):
        return "", ""
    n = rec[KEY_FIT_N_LAYER]
    if n is not None and int(n.value) != info.n_layer:
        return (f"the calibration was measured on a model with {int(n.value)} layers ({KEY_FIT_N_LAYER}), "
                f"this file has {info.n_layer}: its per-layer settings would apply to other layers "
                "(a pruned or different model); recalibrate it"), ""
    shapes, types = ffn_fingerprints(info.path)
    s = rec[KEY_FIT_SHAPES]
    if s is not None and str(s.value) != shapes:
        return (f"the calibration was measured on FFN tensors with fingerprint {s.value} ({KEY_FIT_SHAPES}), "
                f"this file's are {shapes}: names or shapes differ (a pruned or different model); recalibrate it"), ""
    t = rec[KEY_FIT_TYPES]
    if t is not None and str(t.value) != types:
        return "", (f"the FFN tensors' types differ from those the calibration was measured on ({KEY_FIT_TYPES} "
                    f"{t.value}, this file {types}): requantized? The settings may no longer hold; "
                    "measure with `ffnskip-gguf eval`")
    return "", ""


# --- split GGUFs (issue 13, D7) ----------------------------------------------

KEY_SPLIT_COUNT = "split.count"  # llama.cpp's gguf-split / gguf-py's split_max_tensors (LLM_KV_SPLIT_COUNT)


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """Every shard of a split GGUF (``PREFIX-0000i-of-0000N.gguf``, the names
    llama.cpp's ``llama_split_path`` and gguf-py write), first shard first,
    given any of them; ``[path]`` for a single-file model.

    Raises:
        ModelFileError: a shard is missing (names it), or the file says it is
            split but its name does not follow the pattern; as
            ``check_model_file`` for a bad file.
    """
    import re

    info = check_model_file(path, prefixes=("split.",), shard=True)
    v = info.values.get(KEY_SPLIT_COUNT)
    count = int(v.value) if v is not None and isinstance(v.value, int) else 1
    if count <= 1:
        return [info.path]
    m = re.match(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", info.path.name)
    if m is None or int(m.group("count")) != count:
        raise ModelFileError(f"{info.path} is shard of a model split into {count} files ({KEY_SPLIT_COUNT}), but its "
                             "name does not follow PREFIX-0000i-of-0000N.gguf, so the other shards cannot be found")
    shards = [info.path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for q in shards:
        if not q.is_file():
            raise ModelFileError(f"shard {q.name} of the split model {info.path.name} is missing ({count} shards expected "
                                 f"in {q.parent})")
    return shards


def tensor_bytes_all(path: str | os.PathLike) -> dict[str, int]:
    """Tensor name -> bytes over every shard of ``path`` (shard_paths)."""
    out: dict[str, int] = {}
    for q in shard_paths(path):
        out.update(check_model_file(q, prefixes=("split.",), shard=True).tensor_bytes)
    return out
