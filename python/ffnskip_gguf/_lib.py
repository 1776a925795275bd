"""ctypes bindings for the ffnskip C API (``cpp/ffn-skip.h``) and the few
ggml GGUF reader functions the metadata checks use.

A thin layer in the style of ``llama_cpp.llama_cpp``: structs mirror the C
header field by field, functions keep their C names. The library is the
``libllama`` that ``llama_cpp`` loaded (``ffnskip_gguf.__init__`` points it at
ours), so both layers always talk to the same copy.
"""

from __future__ import annotations

import ctypes
import sys

import llama_cpp.llama_cpp as _llama_cpp

from ._libpath import _lib_filename
from ._pin import LLAMA_CPP_PYTHON_VERSION

FFNSKIP_API_VERSION = 4
FFNSKIP_MAX_LAYERS = 256

FFNSKIP_MODE_OFF = 0
FFNSKIP_MODE_ADAPTIVE = 1
FFNSKIP_MODE_STATIC = 2

TRACE_RAN = 0
TRACE_SKIPPED = 1
TRACE_REMOVED = 2
TRACE_NOT_DECODE = 255

_lib = _llama_cpp._lib

if not hasattr(_lib, "ffnskip_api_version"):
    raise ImportError(
        f"the llama.cpp library loaded by llama_cpp ({getattr(_lib, '_name', '?')}) is not an "
        "ffnskip-gguf build (no ffnskip_* symbols); reinstall ffnskip-gguf"
    )


class ffnskip_params(ctypes.Structure):
    """Mirror of ``struct ffnskip_params`` (cpp/ffn-skip.h)."""

    _fields_ = [
        ("mode", ctypes.c_int32),
        ("cold_start", ctypes.c_int32),
        ("cold_end", ctypes.c_int32),
        ("max_skip", ctypes.c_int32),
        ("max_runs", ctypes.c_int32),
        ("continue_run", ctypes.c_int32),
        ("warmup", ctypes.c_int32),
        ("threshold", ctypes.c_float * FFNSKIP_MAX_LAYERS),
        ("exclude", ctypes.c_uint8 * FFNSKIP_MAX_LAYERS),
        ("remove", ctypes.c_uint8 * FFNSKIP_MAX_LAYERS),
    ]


class ffnskip_stats(ctypes.Structure):
    """Mirror of ``struct ffnskip_stats`` (cpp/ffn-skip.h)."""

    _fields_ = [
        ("n_layer", ctypes.c_int32),
        ("supported", ctypes.c_int32),
        ("decode_tokens", ctypes.c_uint64),
        ("run", ctypes.c_uint64 * FFNSKIP_MAX_LAYERS),
        ("skipped", ctypes.c_uint64 * FFNSKIP_MAX_LAYERS),
        ("cos_sum", ctypes.c_double * FFNSKIP_MAX_LAYERS),
        ("cos_count", ctypes.c_uint64 * FFNSKIP_MAX_LAYERS),
        ("rejected_tokens", ctypes.c_uint64),
    ]


def _fn(name, argtypes, restype):
    f = getattr(_lib, name)
    f.argtypes = argtypes
    f.restype = restype
    return f


_ctx_p = ctypes.c_void_p
_params_p = ctypes.POINTER(ffnskip_params)

ffnskip_api_version = _fn("ffnskip_api_version", [], ctypes.c_int32)
ffnskip_llama_cpp_pin = _fn("ffnskip_llama_cpp_pin", [], ctypes.c_char_p)
# the version check comes before any other binding: a stale library fails here, clearly
if ffnskip_api_version() != FFNSKIP_API_VERSION:
    raise ImportError(
        f"ffnskip C API version {ffnskip_api_version()} in {_lib._name}, expected {FFNSKIP_API_VERSION}; "
        "the Python package and the native library come from different builds"
    )
if ffnskip_llama_cpp_pin().decode() != LLAMA_CPP_PYTHON_VERSION:
    raise ImportError(
        f"native library built from llama-cpp-python {ffnskip_llama_cpp_pin().decode()}, "
        f"the package expects {LLAMA_CPP_PYTHON_VERSION}"
    )
ffnskip_params_default = _fn("ffnskip_params_default", [_params_p, ctypes.c_int32], None)
ffnskip_params_validate = _fn(
    "ffnskip_params_validate", [_params_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32
)
ffnskip_set_params = _fn(
    "ffnskip_set_params", [_ctx_p, _params_p, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32
)
ffnskip_get_params = _fn("ffnskip_get_params", [_ctx_p, _params_p], ctypes.c_int32)
ffnskip_supported = _fn("ffnskip_supported", [_ctx_p, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32)
ffnskip_get_stats = _fn("ffnskip_get_stats", [_ctx_p, ctypes.POINTER(ffnskip_stats)], ctypes.c_int32)
ffnskip_reset_stats = _fn("ffnskip_reset_stats", [_ctx_p], None)
FFNSKIP_TOKENS_AUTO, FFNSKIP_TOKENS_PROMPT, FFNSKIP_TOKENS_GENERATED = 0, 1, 2  # enum ffnskip_token_kind
ffnskip_set_signal = _fn("ffnskip_set_signal", [_ctx_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_float), ctypes.c_int64,
                                                ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32)
ffnskip_get_signal = _fn("ffnskip_get_signal", [_ctx_p], ctypes.c_int32)
ffnskip_set_token_kind = _fn("ffnskip_set_token_kind", [_ctx_p, ctypes.c_int32], ctypes.c_int32)
ffnskip_get_token_kind = _fn("ffnskip_get_token_kind", [_ctx_p], ctypes.c_int32)
ffnskip_affected_pos = _fn("ffnskip_affected_pos", [_ctx_p], ctypes.c_int64)
ffnskip_set_affected_pos = _fn("ffnskip_set_affected_pos", [_ctx_p, ctypes.c_int64], None)
ffnskip_add_rejected = _fn("ffnskip_add_rejected", [_ctx_p, ctypes.c_uint64], None)
ffnskip_backend_verdict = _fn(
    "ffnskip_backend_verdict",
    [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t],
    ctypes.c_int32,
)
ffnskip_cuda_graph_counts = _fn("ffnskip_cuda_graph_counts", [ctypes.POINTER(ctypes.c_uint64)], ctypes.c_int32)
ffnskip_get_trace = _fn(
    "ffnskip_get_trace",
    [_ctx_p, ctypes.POINTER(ctypes.c_uint8), ctypes.POINTER(ctypes.c_float), ctypes.c_int32],
    ctypes.c_int32,
)




# --- ggml's GGUF reader (libggml-base), used by metadata.py -----------------

class gguf_init_params(ctypes.Structure):
    """Mirror of ``struct gguf_init_params`` (ggml/include/gguf.h)."""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _load_ggml_base():
    if sys.platform == "win32":
        from pathlib import Path

        return ctypes.CDLL(str(Path(_lib._name).parent / _lib_filename("ggml-base")))
    # dlsym on libllama's handle searches its dependencies: the libggml-base
    # it loaded, never a second copy opened by path
    return _lib


_ggml_base = _load_ggml_base()


def _gfn(name, argtypes, restype):
    f = _ggml_base[name]  # a fresh function object: never retypes one llama_cpp set
    f.argtypes = argtypes
    f.restype = restype
    return f


_gguf_p = ctypes.c_void_p
gguf_init_from_file = _gfn("gguf_init_from_file", [ctypes.c_char_p, gguf_init_params], _gguf_p)
gguf_free = _gfn("gguf_free", [_gguf_p], None)
gguf_get_version = _gfn("gguf_get_version", [_gguf_p], ctypes.c_uint32)
gguf_get_data_offset = _gfn("gguf_get_data_offset", [_gguf_p], ctypes.c_size_t)
gguf_get_n_kv = _gfn("gguf_get_n_kv", [_gguf_p], ctypes.c_int64)
gguf_find_key = _gfn("gguf_find_key", [_gguf_p, ctypes.c_char_p], ctypes.c_int64)
gguf_get_key = _gfn("gguf_get_key", [_gguf_p, ctypes.c_int64], ctypes.c_char_p)
gguf_get_kv_type = _gfn("gguf_get_kv_type", [_gguf_p, ctypes.c_int64], ctypes.c_int)
gguf_get_arr_type = _gfn("gguf_get_arr_type", [_gguf_p, ctypes.c_int64], ctypes.c_int)
gguf_get_arr_n = _gfn("gguf_get_arr_n", [_gguf_p, ctypes.c_int64], ctypes.c_size_t)
gguf_get_arr_data = _gfn("gguf_get_arr_data", [_gguf_p, ctypes.c_int64], ctypes.c_void_p)
gguf_get_arr_str = _gfn("gguf_get_arr_str", [_gguf_p, ctypes.c_int64, ctypes.c_size_t], ctypes.c_char_p)
gguf_get_val_str = _gfn("gguf_get_val_str", [_gguf_p, ctypes.c_int64], ctypes.c_char_p)
gguf_get_val_data = _gfn("gguf_get_val_data", [_gguf_p, ctypes.c_int64], ctypes.c_void_p)
gguf_get_n_tensors = _gfn("gguf_get_n_tensors", [_gguf_p], ctypes.c_int64)
gguf_get_tensor_name = _gfn("gguf_get_tensor_name", [_gguf_p, ctypes.c_int64], ctypes.c_char_p)
gguf_get_tensor_offset = _gfn("gguf_get_tensor_offset", [_gguf_p, ctypes.c_int64], ctypes.c_size_t)
gguf_get_tensor_size = _gfn("gguf_get_tensor_size", [_gguf_p, ctypes.c_int64], ctypes.c_size_t)
ggml_get_first_tensor = _gfn("ggml_get_first_tensor", [ctypes.c_void_p], ctypes.c_void_p)
ggml_get_next_tensor = _gfn("ggml_get_next_tensor", [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_void_p)
ggml_get_name = _gfn("ggml_get_name", [ctypes.c_void_p], ctypes.c_char_p)
ggml_free = _gfn("ggml_free", [ctypes.c_void_p], None)
gguf_get_tensor_type = _gfn("gguf_get_tensor_type", [_gguf_p, ctypes.c_int64], ctypes.c_int)
