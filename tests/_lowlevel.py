"""Low-level llama.cpp driver for the gate tests: explicit batches (several
sequences per ubatch), optional eval callback (cb_eval), our C API on the
same context. Mirrors what llama_cpp.Llama does, minus sampling."""

from __future__ import annotations

import ctypes

import numpy as np

import ffnskip_gguf  # noqa: F401
import llama_cpp
from ffnskip_gguf import _lib, policy

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


class Runner:
    """One model + one context; decode explicit (token, pos, seq) lists."""

    def __init__(self, path: str, *, n_ctx: int = 1024, n_batch: int = 256, n_seq_max: int = 1, cb=None):
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        assert self.model
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq_max
        cp.n_threads = 2
        cp.n_threads_batch = 2
        cp.no_perf = False
        self._cb = None
        if cb is not None:
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(cb)
            cp.cb_eval = self._cb
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        assert self.ctx
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self.n_seq_max = n_seq_max

    def close(self):
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        self.close()

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        buf = (llama_cpp.llama_token * (len(text) + 16))()
        n = llama_cpp.llama_tokenize(self.vocab, text.encode(), len(text.encode()), buf, len(buf), bos, False)
        assert n >= 0
        return list(buf[:n])

    def set_policy(self, ffn_skip=True, preset=None, **kw):
        mode = policy.parse_mode(ffn_skip)
        s = policy.resolve(mode, self.n_layer, {}, kw, preset)
        p = policy.to_c(s)
        err = ctypes.create_string_buffer(256)
        assert _lib.ffnskip_set_params(self.ctx, ctypes.byref(p), err, 256) == 0, err.value
        return s

    def clear(self):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """items: (token, pos, seq_id, want_logits). Returns logits rows of
        the items that asked for them, in order, as float32 [n, n_vocab]."""
        n = len(items)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            for i, (tok, pos, seq, out) in enumerate(items):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if out else 0
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self.ctx, batch)
            assert rc == 0, rc
        finally:
            llama_cpp.llama_batch_free(batch)
        rows = []
        for i, (_, _, _, out) in enumerate(items):
            if out:
                ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return np.array(rows, dtype=np.float32)

    def trace(self):
        n = _lib.ffnskip_get_trace(self.ctx, None, None, 0)
        dec = np.zeros((n, self.n_layer), dtype=np.uint8)
        cos = np.zeros((n, self.n_layer), dtype=np.float32)
        if n:
            _lib.ffnskip_get_trace(self.ctx, dec.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                   cos.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        return dec, cos

    def stats(self):
        st = _lib.ffnskip_stats()
        _lib.ffnskip_get_stats(self.ctx, ctypes.byref(st))
        from ffnskip_gguf.stats import from_c

        return from_c(st, "", "")

    def n_reused(self) -> int:
        return llama_cpp.llama_perf_context(self.ctx).n_reused

    def greedy(self, prompt_tokens: list[int], n_new: int, seq: int = 0):
        """Prefill (dense), then n_new single-token decodes. Returns tokens,
        the logits of each decode step, and the trace of each step."""
        self.clear()
        logits = self.decode([(t, i, seq, i == len(prompt_tokens) - 1) for i, t in enumerate(prompt_tokens)])
        toks = list(prompt_tokens)
        rows, traces = [], []
        for _ in range(n_new):
            nxt = int(np.argmax(logits[-1]))
            toks.append(nxt)
            logits = self.decode([(nxt, len(toks) - 1, seq, True)])
            rows.append(logits[0])
            traces.append(self.trace())
        return toks, np.array(rows), traces
