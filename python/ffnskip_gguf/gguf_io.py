"""Streamed GGUF copies with gguf-py: change metadata, keep tensors.

Used by calibration (write ``ffn_skip.*`` keys next to the weights) and by
the tests (zeroed FFN weights, renamed architectures). Follows gguf-py's
``gguf_new_metadata.py``: every key and tensor is copied in order, tensor
data is streamed from the source's memory map, so memory stays far below
the model size. Writes to a temporary file in the target directory and
renames it, and refuses to overwrite its input.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def check_output_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Raise ValueError unless ``dst`` can receive a GGUF written from ``src``:
    not ``src`` itself (also through links), not a directory or special file,
    its parent (or nearest existing ancestor) a writable directory."""
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        if dst.resolve() == src.resolve():
            raise ValueError(f"refusing to overwrite the input file {src} (choose another output)")
        if dst.is_dir():
            raise ValueError(f"output {dst} is a directory")
        if not dst.is_file():
            raise ValueError(f"output {dst} exists and is not a regular file")
    anc = dst.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"output {dst}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"output {dst}: cannot write to {anc}")


def copy_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    set_kv: Mapping[str, tuple[Any, GGUFValueType, GGUFValueType | None]] | None = None,
    remove_prefixes: tuple[str, ...] = (),
    rename_arch: str | None = None,
    tensor_data: Callable[[str, np.ndarray], np.ndarray] | None = None,
    tensor_convert: Callable[[Any], tuple[np.ndarray, Any] | None] | None = None,
    extra_tensors: Mapping[str, np.ndarray] | None = None,
    keep_tensor: Callable[[str], bool] | None = None,
    progress: bool = False,
) -> Path:
    """Copy ``src`` to ``dst`` with metadata changes.

    Args:
        src, dst: GGUF paths; ``dst`` must differ from ``src``.
        set_kv: key -> (value, type, array element type or None); added or replaced.
            Empty arrays are not valid GGUF: omit such keys instead.
        remove_prefixes: keys starting with one of these are dropped.
        rename_arch: new ``general.architecture``; ``<old>.*`` keys are renamed.
        tensor_data: optional (name, raw data) -> raw data of the same byte size
            (tests: zeroed weights).
        tensor_convert: optional (gguf ReaderTensor) -> (new data, GGMLQuantizationType)
            or None to keep it: changes a tensor's type (tests: F16/F32 FFN weights).
            Loads the converted tensors in memory.
        extra_tensors: name -> F32/F16 array appended after the copied tensors
            (tests: synthetic architectures).
        keep_tensor: optional name -> False to leave a tensor out (a model cut
            to its first layers, with ``set_kv`` changing the block count).
        progress: show a tqdm bar over tensor bytes.

    Returns: ``dst`` as a Path.
    Raises: ValueError when ``dst`` is ``src`` or a value is an empty array.
    """
    src, dst = Path(src), Path(dst)
    check_output_path(src, dst)
    set_kv = dict(set_kv or {})
    for k, (v, t, _) in set_kv.items():
        if t == GGUFValueType.ARRAY and len(v) == 0:
            raise ValueError(f"{k}: empty arrays are not valid GGUF; omit the key")
    reader = GGUFReader(src, "r")
    old_arch = reader.fields["general.architecture"].contents()
    arch = rename_arch or old_arch
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        align = reader.fields.get("general.alignment")
        if align is not None:
            writer.add_custom_alignment(int(align.contents()))
        for field in reader.fields.values():
            name = field.name
            if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
                continue
            if name in set_kv or (remove_prefixes and name.startswith(remove_prefixes)):
                continue
            if rename_arch and name.startswith(old_arch + "."):
                name = arch + name[len(old_arch):]
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        for k, (v, t, sub) in set_kv.items():
            writer.add_key_value(k, v, t, sub_type=sub)
        total = 0
        converted = {}
        tensors = [t for t in reader.tensors if keep_tensor is None or keep_tensor(t.name)]
        for t in tensors:
            conv = tensor_convert(t) if tensor_convert is not None else None
            if conv is not None:
                arr, qtype = conv
                converted[t.name] = arr
                writer.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, qtype)
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            total += int(t.n_bytes)
        for name, arr in (extra_tensors or {}).items():
            writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {dst.name}")
        for t in tensors:
            data = converted.get(t.name, t.data)
            if tensor_data is not None:
                new = tensor_data(t.name, data)
                if new is not data:
                    if new.nbytes != data.nbytes:
                        raise ValueError(f"tensor {t.name}: replacement has {new.nbytes} bytes, expected {data.nbytes}")
                    data = new
            writer.write_tensor_data(data)
            if bar:
                bar.update(int(t.n_bytes))
        for arr in (extra_tensors or {}).values():
            writer.write_tensor_data(arr)
        writer.close()
        if bar:
            bar.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file is as readable as any new file
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst
