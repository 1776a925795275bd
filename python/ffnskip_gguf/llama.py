"""Drop-in ``Llama``: llama-cpp-python's class with FFN skipping.

Every llama-cpp-python feature (completion, chat, streaming, embeddings,
the server) works unchanged; the FFN-skip keywords and methods of DESIGN.md
section 5 are added.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import warnings
from typing import Any

import llama_cpp

from . import _lib, policy
from .errors import MetadataError, ModelFileError
from .metadata import calibration_fit, check_model_file
from .stats import FfnSkipStats
from .stats import read as read_stats

__all__ = ["Llama", "ModelFileError", "FfnSkipUncalibratedWarning", "FfnSkipUnsupportedWarning"]

_UNSET = object()


class FfnSkipUncalibratedWarning(UserWarning):
    """``ffn_skip=True`` on a model file without ``ffn_skip.*`` calibration."""


class FfnSkipCalibrationMismatchWarning(UserWarning):
    """The file's FFN tensors differ in type from those its calibration was
    measured on (requantized): the settings may no longer hold."""


class FfnSkipUnsupportedWarning(UserWarning):
    """FFN skipping was asked for but this model/backend decodes dense."""


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama with input-adaptive FFN skipping (FFN-SkipLLM).

    Args:
        model_path: path of a GGUF model file.
        ffn_skip: False (dense, default), True (gate on, with the file's
            calibration or the defaults), ``"paper"`` (the paper's recipe,
            arXiv 2404.03865 section 4) or ``"static"`` (only
            ``ffn_remove_layers``, no gate).
        ffn_skip_threshold: tau, float or per-layer list (cosine similarity).
        ffn_skip_cold_start, ffn_skip_cold_end: layers at each end that always run.
        ffn_skip_exclude: middle layers that always run.
        ffn_skip_max_skip: k, FFN blocks one token may skip.
        ffn_skip_max_runs: runs of consecutive skips one token may start.
        ffn_skip_continue: an active run continues without re-checking tau.
        ffn_skip_warmup: sequence positions below this run dense.
        ffn_remove_layers: FFN blocks left out of the graph (static removal).
        ffn_skip_signal: the gate's decision signal, ``"cosine"`` (c_last, the
            paper's; default) or ``"probe"`` (a per-layer linear probe on the
            FFN's input, docs/QUALITY.md; on the CPU, Vulkan and CUDA
            backends: with FFN weights on a backend whose gate has no probe
            the model decodes dense with a warning). Usually from a
            calibrated file.
        ffn_skip_probe: the probe's weights, n_layer x (n_embd + 1) floats
            (w_j then b_j per layer); usually from a calibrated file.
        *args, **kwargs: passed to ``llama_cpp.Llama``.

    Raises:
        ModelFileError (a ValueError; FileNotFoundError / IsADirectoryError
            for those cases): the file is missing, a directory, not GGUF,
            malformed or truncated.
        MetadataError: an ``ffn_skip.*`` key of the file is invalid (names it).
        ValueError: an FFN-skip argument is invalid (names it).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *args: Any,
        ffn_skip: bool | str = False,
        ffn_skip_threshold: float | list[float] | None = None,
        ffn_skip_cold_start: int | None = None,
        ffn_skip_cold_end: int | None = None,
        ffn_skip_exclude: list[int] | None = None,
        ffn_skip_max_skip: int | None = None,
        ffn_skip_max_runs: int | None = None,
        ffn_skip_continue: bool | None = None,
        ffn_skip_warmup: int | None = None,
        ffn_remove_layers: list[int] | None = None,
        ffn_skip_signal: str | None = None,
        ffn_skip_probe: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = [k for k in kwargs if k.startswith(("ffn_skip", "ffn_remove"))]
        if unknown:
            raise ValueError(f"unknown FFN-skip setting(s): {', '.join(sorted(unknown))} "
                             f"(known: ffn_skip, {', '.join(policy.KEYWORDS)})")
        info = check_model_file(model_path)
        n_layer = info.n_layer
        if n_layer < 1:
            raise ModelFileError(f"GGUF file has no {info.architecture}.block_count key: {info.path}")
        # an invalid ffn_skip.* key is an error as soon as skipping is asked
        # for; ffn_skip=False means dense, whatever the file carries
        self._ffn_file_error: Exception | None = None
        try:
            self._ffn_file = policy.read_file_settings(info.values, n_layer)
        except ValueError as e:
            self._ffn_file, self._ffn_file_error = {}, e
        # a calibration measured on another model (pruned: other layers) is
        # invalid like a bad key; only requantized: a warning (metadata.calibration_fit)
        fit_error, fit_warning = calibration_fit(info) if self._ffn_file_error is None else ("", "")
        if fit_error:
            self._ffn_file, self._ffn_file_error = {}, MetadataError(fit_error)
        if fit_warning and ffn_skip not in (False, None, "off", "paper"):
            warnings.warn(fit_warning, FfnSkipCalibrationMismatchWarning, stacklevel=2)
        self._ffn_calibrated = bool(self._ffn_file)
        # ffn_skip.* entries of kv_overrides apply like file values (README)
        self._ffn_overrides = policy.read_override_settings(kwargs.get("kv_overrides"), n_layer)
        self._ffn_args: dict[str, Any] = {}
        self._ffn_skip_value: Any = False
        self._ffn_warned: set[str] = set()
        args_given = dict(
            ffn_skip_threshold=ffn_skip_threshold, ffn_skip_cold_start=ffn_skip_cold_start,
            ffn_skip_cold_end=ffn_skip_cold_end, ffn_skip_exclude=ffn_skip_exclude,
            ffn_skip_max_skip=ffn_skip_max_skip, ffn_skip_max_runs=ffn_skip_max_runs,
            ffn_skip_continue=ffn_skip_continue, ffn_skip_warmup=ffn_skip_warmup,
            ffn_remove_layers=ffn_remove_layers, ffn_skip_signal=ffn_skip_signal, ffn_skip_probe=ffn_skip_probe,
        )
        # validate before the (slow) native load
        self._ffn_settings = self._resolve(ffn_skip, n_layer, {k: v for k, v in args_given.items() if v is not None})
        super().__init__(str(info.path), *args, **kwargs)
        n_native = int(llama_cpp.llama_model_n_layer(self._model.model))
        if n_native != n_layer:  # block_count disagreeing with the loaded model: trust the loader
            self._ffn_settings = self._resolve(ffn_skip, n_native, self._ffn_args)
        self._ffn_apply()

    def close(self) -> None:
        """Free the native model and context (safe after a failed __init__)."""
        if "_stack" in self.__dict__:
            super().close()

    # -- FFN skip API ------------------------------------------------------

    def _resolve(self, ffn_skip: Any, n_layer: int, arguments: dict[str, Any]) -> policy.FfnSkipSettings:
        mode = policy.parse_mode(ffn_skip)
        if mode != "off" and self._ffn_file_error is not None:
            raise self._ffn_file_error
        preset = policy.paper_preset(n_layer) if ffn_skip == "paper" else None
        settings = policy.resolve(mode, n_layer, self._ffn_file if preset is None else {}, arguments, preset,
                                  self._ffn_overrides if preset is None else {})
        self._ffn_args = dict(arguments)
        self._ffn_skip_value = ffn_skip
        return settings

    @property
    def _ffn_ctx(self) -> int:
        ctx = getattr(getattr(self, "_ctx", None), "ctx", None)
        if not ctx:
            raise RuntimeError("this Llama has been closed (or failed to load); create a new one")
        return ctx

    def _ffn_apply(self) -> None:
        s = self._ffn_settings
        if s.mode == "off" and s.n_layer > _lib.FFNSKIP_MAX_LAYERS:
            p = _lib.ffnskip_params()
            p.mode = _lib.FFNSKIP_MODE_OFF
        else:
            p = policy.to_c(s)
        err = ctypes.create_string_buffer(512)
        if _lib.ffnskip_set_params(self._ffn_ctx, ctypes.byref(p), err, len(err)) != 0:
            raise ValueError(f"invalid FFN-skip settings: {err.value.decode()}")
        try:
            policy.apply_signal(self._ffn_ctx, s)
        except ValueError as e:
            if "has no gate kernel on the backend" not in str(e) or not s.enabled:
                raise
            # the weights' backend has no probe kernel: dense, with the reason (issue 14)
            p.mode = _lib.FFNSKIP_MODE_OFF
            _lib.ffnskip_set_params(self._ffn_ctx, ctypes.byref(p), err, len(err))
            policy.apply_signal(self._ffn_ctx, policy.FfnSkipSettings(**{**s.__dict__, "signal": "cosine",
                                                                         "probe": None}))
            # what the context runs: dense (ffn_skip_params and the KV key say so)
            self._ffn_settings = dataclasses.replace(s, mode="off", signal="cosine", probe=None)
            if "probe-backend" not in self._ffn_warned:
                self._ffn_warned.add("probe-backend")
                warnings.warn(f"FFN skipping is off, decoding dense: {e}", FfnSkipUnsupportedWarning, stacklevel=3)
            return
        if s.enabled:
            reason = ctypes.create_string_buffer(512)
            if not _lib.ffnskip_supported(self._ffn_ctx, reason, len(reason)) and "unsupported" not in self._ffn_warned:
                self._ffn_warned.add("unsupported")
                warnings.warn(f"FFN skipping is off, decoding dense: {reason.value.decode()}",
                              FfnSkipUnsupportedWarning, stacklevel=3)
            elif s.mode == "adaptive" and self._ffn_skip_value in (True, "adaptive") and not self._ffn_calibrated \
                    and "uncalibrated" not in self._ffn_warned:
                self._ffn_warned.add("uncalibrated")
                warnings.warn(
                    "this model file carries no ffn_skip.* calibration; using the default settings. "
                    "Quality loss varies a lot between models: measure it with `ffnskip-gguf eval` "
                    "before relying on it.", FfnSkipUncalibratedWarning, stacklevel=3)

    def set_ffn_skip(self, ffn_skip: Any = _UNSET, **kwargs: Any) -> None:
        """Change FFN-skip settings between calls, without reloading.

        Args:
            ffn_skip: new mode (see the class); omitted keeps the current one.
            **kwargs: any ``ffn_skip_*`` / ``ffn_remove_layers`` keyword; a
                value of None drops the argument (the file or default applies).

        Raises:
            ValueError: unknown keyword or invalid value (names it); nothing changes.
        """
        unknown = set(kwargs) - set(policy.KEYWORDS)
        if unknown:
            raise ValueError(f"unknown FFN-skip setting(s): {', '.join(sorted(unknown))}")
        args = dict(self._ffn_args)
        for k, v in kwargs.items():
            if v is None:
                args.pop(k, None)
            else:
                args[k] = v
        value = self._ffn_skip_value if ffn_skip is _UNSET else ffn_skip
        old = (self._ffn_args, self._ffn_skip_value, self._ffn_settings)
        old_key = self._ffn_key()
        try:
            self._ffn_settings = self._resolve(value, self._ffn_settings.n_layer, args)
            self._ffn_apply()  # the library validates again; nothing changes unless it accepts
        except Exception:
            self._ffn_args, self._ffn_skip_value, self._ffn_settings = old
            try:
                self._ffn_apply()  # the library may have taken the params before refusing the signal
            except Exception:  # pragma: no cover - the old settings were accepted before
                pass
            raise
        if self._ffn_key() != old_key:
            # KV computed under the old settings is valid only below the first
            # affected position; static removal changes every position
            self._ffn_cut_kv(0 if self._ffn_removes() else int(_lib.ffnskip_affected_pos(self._ffn_ctx)))
            _lib.ffnskip_set_affected_pos(self._ffn_ctx, -1)

    def ffn_skip_params(self) -> policy.FfnSkipSettings:
        """The settings in effect, with ``sources`` (default / preset / file / argument)."""
        return self._ffn_settings

    def ffn_skip_stats(self) -> FfnSkipStats:
        """Cumulative statistics since load or ``reset_ffn_skip_stats()``
        (``Llama.reset()`` keeps them). See ``FfnSkipStats``."""
        return read_stats(self._ffn_ctx)

    def reset_ffn_skip_stats(self) -> None:
        """Zero the statistics of this context."""
        _lib.ffnskip_reset_stats(self._ffn_ctx)

    def ffn_skip_trace(self) -> tuple["Any", "Any"]:
        """Per-token decisions and cosines of the last gated ubatch.

        Returns:
            (decision, cos): numpy arrays [n_tokens, n_layer], uint8 (0 ran,
            1 skipped by the gate, 2 removed, 255 not a decode token) and
            float32 (cos(h_j, o_j) where the FFN ran for a decode token, else NaN).
        """
        import numpy as np

        L = self._ffn_settings.n_layer
        n = _lib.ffnskip_get_trace(self._ffn_ctx, None, None, 0)
        dec = np.zeros((max(n, 0), L), dtype=np.uint8)
        cos = np.zeros((max(n, 0), L), dtype=np.float32)
        if n > 0:
            _lib.ffnskip_get_trace(
                self._ffn_ctx,
                dec.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                cos.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        return dec, cos

    # -- prompt and generated tokens (README "Prompt and generated tokens") --
    #
    # Prompt tokens run dense and are not counted; generated tokens are gated
    # and counted, however they reach llama_decode. Inside ``generate`` every
    # eval before the first sampled token is prompt (a prefix-cache hit
    # re-decodes the last prompt token alone: still prompt) and every eval
    # after it holds generated tokens (the sampled token plus any speculative
    # drafts, each gated on its own state). Outside ``generate`` a
    # multi-token eval is prompt and a single-token eval is a generated token
    # (low-level teacher forcing). Embedding inputs are never gated.

    _ffn_phase: str | None = None  # None outside generate; "prompt" / "generated" inside

    def _ffn_token_kind(self, n_tokens: int) -> int:
        if self._ffn_phase == "prompt":
            return _lib.FFNSKIP_TOKENS_PROMPT
        if self._ffn_phase == "generated":
            return _lib.FFNSKIP_TOKENS_GENERATED
        return _lib.FFNSKIP_TOKENS_GENERATED if n_tokens == 1 else _lib.FFNSKIP_TOKENS_PROMPT

    def _ffn_with_kind(self, kind: int, fn, *args, **kwargs):
        ctx = self._ffn_ctx
        prev = _lib.ffnskip_get_token_kind(ctx)
        _lib.ffnskip_set_token_kind(ctx, kind)
        try:
            return fn(*args, **kwargs)
        finally:
            _lib.ffnskip_set_token_kind(ctx, prev)

    def eval(self, tokens) -> None:
        """``llama_cpp.Llama.eval`` with the tokens classified as prompt or
        generated (see the comment above; README "Prompt and generated
        tokens"). Speculative drafts evaluated earlier in the same
        ``generate`` and discarded now count as rejected."""
        gen = self._ffn_gen
        if gen is not None and self._ffn_phase == "generated":
            if gen["end"] > self.n_tokens:  # drafts after a mismatch, about to be removed
                gen["rejected"] += gen["end"] - self.n_tokens
        # the parent's eval drops the KV cache from n_tokens on: an affected
        # position there no longer describes the cache
        if int(_lib.ffnskip_affected_pos(self._ffn_ctx)) >= self.n_tokens:
            _lib.ffnskip_set_affected_pos(self._ffn_ctx, -1)
        self._ffn_with_kind(self._ffn_token_kind(len(tokens)), super().eval, tokens)
        if gen is not None and self._ffn_phase == "generated":
            gen["end"] = self.n_tokens

    _ffn_gen: dict | None = None

    def generate(self, tokens, *args, **kwargs):
        """``llama_cpp.Llama.generate``; its evals are classified as prompt
        until the first sampled token and as generated after it."""
        return self._ffn_generate(super().generate(tokens, *args, **kwargs))

    def _ffn_generate(self, inner):
        gen = {"end": 0, "rejected": 0, "prompt_end": None}
        n_yielded = 0
        last = None    # the last yielded token
        n_after = 0    # self.n_tokens after the last step (a late close must not read later calls' state)
        sent = None
        try:
            while True:
                outer = (self._ffn_phase, self._ffn_gen)
                self._ffn_phase, self._ffn_gen = ("prompt" if n_yielded == 0 else "generated"), gen
                try:
                    token = inner.send(sent)
                except StopIteration:
                    return
                finally:
                    self._ffn_phase, self._ffn_gen = outer
                    n_after = self.n_tokens
                if n_yielded == 0:
                    gen["prompt_end"] = self.n_tokens  # the prompt is in the KV cache, no generated token yet
                n_yielded += 1
                last = token
                sent = yield token
        finally:
            inner.close()
            # drafts removed after the last eval, or evaluated and never verified
            if gen["end"] > n_after:
                gen["rejected"] += gen["end"] - n_after
            if gen["prompt_end"] is not None and n_yielded:
                # the last sampled token sits at q; a draft evaluated there was
                # accepted only if it is that token
                q = gen["prompt_end"] + n_yielded - 1
                kept = q + 1 if q < min(n_after, gen["end"]) and int(self.input_ids[q]) == last else q
                gen["rejected"] += max(0, min(n_after, gen["end"]) - kept)
            if gen["rejected"] and getattr(getattr(self, "_ctx", None), "ctx", None):
                _lib.ffnskip_add_rejected(self._ffn_ctx, gen["rejected"])

    def create_chat_completion(self, *args, **kwargs):
        """``llama_cpp.Llama.create_chat_completion``; evals a chat handler
        makes itself (multimodal handlers evaluate text chunks, even single
        tokens, before generating) are prompt."""
        outer = self._ffn_phase
        self._ffn_phase = "prompt"
        try:
            return self._ffn_with_kind(_lib.FFNSKIP_TOKENS_PROMPT, super().create_chat_completion, *args, **kwargs)
        finally:
            self._ffn_phase = outer

    def embed(self, *args, **kwargs):
        """``llama_cpp.Llama.embed``; embedding inputs are prompt tokens
        (never gated, not counted)."""
        return self._ffn_with_kind(_lib.FFNSKIP_TOKENS_PROMPT, super().embed, *args, **kwargs)

    # -- reused state that depends on the settings --------------------------
    #
    # A KV cache entry computed with FFNs skipped (a generated token past the
    # warm-up with the gate on) or removed (static removal: every token) is
    # valid only under the settings it was computed with. The library tracks
    # the lowest such position (ffnskip_affected_pos); when the settings
    # change, or a saved state from other settings is loaded, the KV cache is
    # cut there and the rest is kept (a dense prompt prefix stays valid under
    # any settings, so prefix reuse and chat caching keep working).

    def _ffn_key(self) -> bytes:
        """What the KV cache's values depend on: only the fields that change
        decisions in the mode in effect (dense when unsupported)."""
        s = self._ffn_settings
        if not s.enabled or not _lib.ffnskip_supported(self._ffn_ctx, None, 0):
            return b"off"
        if s.mode == "static":
            return b"static:" + ",".join(str(j) for j in sorted(s.remove_layers)).encode()
        key = bytes(policy.to_c(s))
        if s.signal == "probe" and s.probe is not None:
            import hashlib

            import numpy as np

            key += b"probe:" + hashlib.sha256(np.asarray(s.probe, dtype=np.float32).tobytes()).digest()
        return key

    def _ffn_removes(self) -> bool:
        """Static removal in effect: it changes every token, prompt included."""
        return self._ffn_key() != b"off" and bool(self._ffn_settings.remove_layers)

    def _ffn_cut_kv(self, pos: int) -> None:
        """Drop KV cache entries from position ``pos`` on."""
        if 0 <= pos < self.n_tokens:
            if not self._ctx.kv_cache_seq_rm(-1, pos, -1):
                self._ctx.kv_cache_clear()  # a memory that cannot drop a suffix: start over
                pos = 0
            self.n_tokens = pos
            self._requires_eval = True

    def save_state(self):
        """``llama_cpp.Llama.save_state`` plus what the state's KV cache
        depends on (the FFN-skip settings and the first affected position)."""
        state = super().save_state()
        state.ffn_skip_key = self._ffn_key()
        state.ffn_skip_affected = int(_lib.ffnskip_affected_pos(self._ffn_ctx))
        return state

    def load_state(self, state) -> None:
        """``llama_cpp.Llama.load_state``; a state saved under other
        FFN-skip settings keeps only its KV cache below the first position
        those settings affected."""
        super().load_state(state)
        key = getattr(state, "ffn_skip_key", None)
        affected = getattr(state, "ffn_skip_affected", -1)
        if key is None:  # saved by another Llama class: settings unknown
            affected = 0 if self._ffn_key() != b"off" else -1
            key = b"unknown"
        if key != self._ffn_key():
            if self._ffn_removes():
                affected = 0  # removal now changes every position, prompt included
            if affected >= 0:
                self._ffn_cut_kv(affected)
            affected = -1
        _lib.ffnskip_set_affected_pos(self._ffn_ctx, affected if affected < self.n_tokens else -1)
