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

# the struct mirror and row view live with the headroom measurement
from ffnskip_gguf.headroom import f32_rows, ggml_tensor  # noqa: E402,F401

_ggml_op_name = _lib._ggml_base.ggml_op_name
_ggml_op_name.argtypes = [ctypes.c_int]
_ggml_op_name.restype = ctypes.c_char_p


def op_name(t: ggml_tensor) -> str:
    return _ggml_op_name(t.op).decode()


def Runner(path, **kw):
    """ffnskip_gguf.runner.Runner with the tests' thread count (2)."""
    kw.setdefault("n_threads", 2)
    return _Runner(path, **kw)
