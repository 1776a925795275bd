"""Low-level decode driver on one llama.cpp context: explicit batches
(several sequences per ubatch, teacher forcing), the FFN-skip C API on the
same context, logits without sampling. The benchmark and the evaluation
harness use it; llama_cpp.Llama is for applications.
"""

from __future__ import annotations

import ctypes

import numpy as np

import llama_cpp

from . import _lib, policy
from .stats import FfnSkipStats
from .stats import read as read_stats


def _default_threads() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Runner:
    """One model + one context; decode explicit (token, pos, seq_id, want_logits) lists.

    Args:
        path: GGUF model path (checked by the caller, e.g. metadata.check_model_file).
        n_ctx: context size in tokens (all sequences together).
        n_batch: batch and ubatch size in tokens.
        n_seq_max: sequences that may decode together.
        cb: optional eval callback (ggml_backend_sched_eval_callback signature).
        n_threads: CPU threads (default: the CPUs this process may use; llama.cpp's
            own default of 4 oversubscribes small machines).
        flash_attn: None = llama.cpp's default (auto: on for the CPU backend), True, False.
        n_gpu_layers: layers offloaded to a GPU backend (None: llama.cpp's default,
            all of them when the library has a GPU backend; 0: none; -1: all).
        verbose: show llama.cpp's loading log (stderr).
    Raises:
        RuntimeError: the model or context could not be created.
    """

    def __init__(self, path: str, *, n_ctx: int = 1024, n_batch: int = 256, n_seq_max: int = 1, cb=None,
                 n_threads: int | None = None, flash_attn: bool | None = None, n_gpu_layers: int | None = None,
                 verbose: bool = False):
        from llama_cpp._utils import suppress_stdout_stderr

        mp = llama_cpp.llama_model_default_params()
        if n_gpu_layers is not None:
            mp.n_gpu_layers = int(n_gpu_layers)
        with suppress_stdout_stderr(disable=verbose):
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq_max
        if n_threads is None:
            n_threads = _default_threads()
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.no_perf = False
        if flash_attn is not None:
            cp.flash_attn_type = 1 if flash_attn else 0
        self._cb = None
        if cb is not None:
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(cb)
            cp.cb_eval = self._cb
        with suppress_stdout_stderr(disable=verbose):
            self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            self.model = None
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        self._prompt_cache = None   # (prompts and removal settings, logits): Runner.prompt
        self._prefill_key: tuple[int, ...] = ()
        self.n_prompts_kept = 0     # Runner.prompt calls that kept the previous prompts' KV

    def _check(self):
        if not getattr(self, "ctx", None):
            raise RuntimeError("this Runner has been closed")

    def _check_token(self, tok: int) -> int:
        tok = int(tok)
        if not 0 <= tok < self.n_vocab:
            raise ValueError(f"token id {tok} outside [0, {self.n_vocab})")
        return tok

    def close(self):
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        if "ctx" in self.__dict__ and "model" in self.__dict__:
            self.close()

    def tokenize(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text`` (``bos``: prepend BOS; ``special``: parse special
        tokens). Characters UTF-8 cannot encode (lone surrogates) become U+FFFD."""
        self._check()
        raw = text.encode("utf-8", errors="replace")
        buf = (llama_cpp.llama_token * (len(raw) + 16))()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), bos, special)
        if n < 0:
            raise ValueError("tokenization failed")
        return list(buf[:n])

    def token_text(self, tok: int) -> str:
        self._check()
        tok = self._check_token(tok)
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def detokenize(self, toks: list[int]) -> str:
        self._check()
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in toks:
            t = self._check_token(t)
            n = llama_cpp.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", "replace")

    def is_eog(self, tok: int) -> bool:
        self._check()
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, tok))

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the loaded model as a string, or None."""
        self._check()
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def set_policy(self, ffn_skip=True, preset=None, file_settings=None, **kw) -> policy.FfnSkipSettings:
        """Apply FFN-skip settings (keywords as for Llama). Returns them resolved."""
        mode = policy.parse_mode(ffn_skip)
        if ffn_skip == "paper" and preset is None:
            preset = policy.paper_preset(self.n_layer)
        s = policy.resolve(mode, self.n_layer, file_settings or {}, kw, preset)
        self.apply(s)
        return s

    def apply(self, s: policy.FfnSkipSettings) -> None:
        self._check()
        p = policy.to_c(s)
        # what a prompt's KV depends on (Runner.prompt): removed FFNs, unless off
        key = () if s.mode == "off" else tuple(sorted(int(j) for j in s.remove_layers))
        err = ctypes.create_string_buffer(256)
        old = _lib.ffnskip_params()
        _lib.ffnskip_get_params(self.ctx, ctypes.byref(old))
        if _lib.ffnskip_set_params(self.ctx, ctypes.byref(p), err, 256) != 0:
            raise ValueError(err.value.decode())
        try:
            policy.apply_signal(self.ctx, s)
        except ValueError:
            _lib.ffnskip_set_params(self.ctx, ctypes.byref(old), err, 256)  # nothing changes
            raise
        self._prefill_key = key

    def reset_stats(self) -> None:
        self._check()
        _lib.ffnskip_reset_stats(self.ctx)

    def clear(self):
        """Forget every sequence (KV cache) and the kept prompts (``prompt``)."""
        self._check()
        self._prompt_cache = None
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def prompt(self, prompts: list[list[int]]) -> np.ndarray:
        """Put ``prompts[s]`` in the KV cache as sequence s (positions 0..,
        nothing after them, no other sequence) and return the logits of each
        prompt's last token, float32 [len(prompts), n_vocab].

        When the previous call had the same prompts under the same FFN removal
        (``ffn_remove_layers``, the only setting that changes a prompt: the
        gate acts on decode tokens alone, DESIGN.md section 3) and nothing
        cleared the cache since, its KV entries are kept and only the
        positions decoded after them are removed (``llama_memory_seq_rm``):
        trials over the same chunks then pay for their prompts once
        (``n_prompts_kept`` counts these calls; only the last call's prompts
        are kept, so a split of more than ``n_seq_max`` chunks gains
        nothing). Else the cache is cleared and the prompts decoded in one
        batch. Kept only when every prompt has at least 2 tokens and all fit
        in one batch of ``n_batch`` (a sequence's single token in a batch
        counts as a decode token for the gate); a ``decode`` at a position
        inside a kept prompt, or a failed removal, drops them. Other changes
        of the KV cache through llama.cpp directly are not seen: call
        ``clear`` after them. tests/test_calibrate.py checks that kept and
        fresh prompts give the same numbers, bit for bit.

        Returns a read-only array (shared with later calls that keep it).
        Raises ValueError for an empty prompt or more prompts than n_seq_max.
        """
        self._check()
        if not 1 <= len(prompts) <= self.n_seq_max or any(len(p) == 0 for p in prompts):
            raise ValueError(f"need 1..{self.n_seq_max} non-empty prompts")
        key = (tuple(tuple(int(t) for t in p) for p in prompts), self._prefill_key)
        cached = self._prompt_cache
        if cached is not None and cached[0] == key:
            mem = llama_cpp.llama_get_memory(self.ctx)
            ok = all(llama_cpp.llama_memory_seq_rm(mem, s, len(prompts[s]) if s < len(prompts) else -1, -1)
                     for s in range(self.n_seq_max))
            if ok:
                self.n_prompts_kept += 1
                return cached[1]
        self.clear()
        logits = self.decode([(tok, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, tok in enumerate(p)])
        logits.setflags(write=False)
        if min(len(p) for p in prompts) >= 2 and sum(len(p) for p in prompts) <= self.n_batch:
            self._prompt_cache = (key, logits)
        return logits

    def decode(self, items: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode ``items`` = (token, pos, seq_id, want_logits), in order, in
        batches of at most n_batch tokens. Returns the logits rows of the
        items that asked for them, in order, as float32 [n, n_vocab].

        Raises ValueError for a bad sequence id, RuntimeError when llama_decode fails.
        """
        self._check()
        if self._prompt_cache is not None:
            lens = [len(p) for p in self._prompt_cache[0][0]]
            if any(seq >= len(lens) or pos < lens[seq] for _, pos, seq, _ in items):
                self._prompt_cache = None  # overwrites a kept prompt (or another sequence): not kept
        rows = []
        for start in range(0, len(items), self.n_batch):
            rows.extend(self._decode_batch(items[start:start + self.n_batch]))
        if not rows:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        return np.stack(rows)

    def _decode_batch(self, items):
        n = len(items)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            for i, (tok, pos, seq, out) in enumerate(items):
                if not 0 <= seq < self.n_seq_max:
                    raise ValueError(f"sequence id {seq} outside [0, {self.n_seq_max})")
                batch.token[i] = self._check_token(tok)
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if out else 0
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with {rc}")
        finally:
            llama_cpp.llama_batch_free(batch)
        rows = []
        for i, (_, _, _, out) in enumerate(items):
            if out:
                ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return rows

    def trace(self):
        self._check()
        n = _lib.ffnskip_get_trace(self.ctx, None, None, 0)
        dec = np.zeros((n, self.n_layer), dtype=np.uint8)
        cos = np.zeros((n, self.n_layer), dtype=np.float32)
        if n:
            _lib.ffnskip_get_trace(self.ctx, dec.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                   cos.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        return dec, cos

    def stats(self) -> FfnSkipStats:
        self._check()
        return read_stats(self.ctx)

    def n_reused(self) -> int:
        self._check()
        return llama_cpp.llama_perf_context(self.ctx).n_reused

    def greedy(self, prompt_tokens: list[int], n_new: int, seq: int = 0):
        """Prefill (dense), then n_new single-token decodes. Returns tokens,
        the logits of each decode step, and the trace of each step."""
        if not prompt_tokens:
            raise ValueError("greedy needs at least one prompt token")
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
