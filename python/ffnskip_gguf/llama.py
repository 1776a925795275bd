"""Drop-in ``Llama``: llama-cpp-python's class with FFN skipping.

Every llama-cpp-python feature (completion, chat, streaming, embeddings,
the server) works unchanged; the FFN-skip keywords and methods of DESIGN.md
section 5 are added.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from typing import Any

import llama_cpp

from . import _lib, policy
from .errors import ModelFileError
from .metadata import check_model_file
from .stats import FfnSkipStats
from .stats import read as read_stats

__all__ = ["Llama", "ModelFileError", "FfnSkipUncalibratedWarning", "FfnSkipUnsupportedWarning"]

_UNSET = object()


class FfnSkipUncalibratedWarning(UserWarning):
    """``ffn_skip=True`` on a model file without ``ffn_skip.*`` calibration."""


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
        self._ffn_calibrated = bool(self._ffn_file)
        self._ffn_args: dict[str, Any] = {}
        self._ffn_skip_value: Any = False
        self._ffn_warned: set[str] = set()
        args_given = dict(
            ffn_skip_threshold=ffn_skip_threshold, ffn_skip_cold_start=ffn_skip_cold_start,
            ffn_skip_cold_end=ffn_skip_cold_end, ffn_skip_exclude=ffn_skip_exclude,
            ffn_skip_max_skip=ffn_skip_max_skip, ffn_skip_max_runs=ffn_skip_max_runs,
            ffn_skip_continue=ffn_skip_continue, ffn_skip_warmup=ffn_skip_warmup,
            ffn_remove_layers=ffn_remove_layers,
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
        settings = policy.resolve(mode, n_layer, self._ffn_file if preset is None else {}, arguments, preset)
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
        try:
            self._ffn_settings = self._resolve(value, self._ffn_settings.n_layer, args)
            self._ffn_apply()  # the library validates again; nothing changes unless it accepts
        except Exception:
            self._ffn_args, self._ffn_skip_value, self._ffn_settings = old
            raise

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
