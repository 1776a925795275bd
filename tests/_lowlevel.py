"""Low-level llama.cpp driver for the gate tests: explicit batches (several
sequences per ubatch), optional eval callback (cb_eval), our C API on the
same context. Mirrors what llama_cpp.Llama does, minus sampling."""

from __future__ import annotations

import ctypes

import numpy as np

import ffnskip_gguf  # noqa: F401
import llama_cpp
from ffnskip_gguf import _lib, policy  # noqa: F401
from ffnskip_gguf.runner import Runner as _Runner

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10


class ggml_tensor(ctypes.Structure):
    """Mirror of struct ggml_tensor (ggml/include/ggml.h of the pin)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_ggml_op_name = _lib._ggml_base.ggml_op_name
_ggml_op_name.argtypes = [ctypes.c_int]
_ggml_op_name.restype = ctypes.c_char_p


def op_name(t: ggml_tensor) -> str:
    return _ggml_op_name(t.op).decode()


def f32_rows(t: ggml_tensor) -> np.ndarray:
    """View of a contiguous F32 2-D tensor as [rows, ne0] (shares memory)."""
    assert t.type == 0 and t.nb[0] == 4, (t.name, t.type)
    rows = t.ne[1] * t.ne[2] * t.ne[3]
    buf = (ctypes.c_float * (t.ne[0] * rows)).from_address(t.data)
    return np.ctypeslib.as_array(buf).reshape(rows, t.ne[0])




def Runner(path, **kw):
    """ffnskip_gguf.runner.Runner with the tests' thread count (2)."""
    kw.setdefault("n_threads", 2)
    return _Runner(path, **kw)
