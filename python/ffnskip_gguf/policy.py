"""The FFN-skip policy: parameters, presets, defaults, validation.

The parameters and their semantics are those of ``cpp/ffn-skip.h`` (the
single source of their names) and DESIGN.md sections 3 and 5. Settings are
resolved in three layers, later ones winning: built-in defaults, the
``ffn_skip.*`` keys of the GGUF file (calibration), constructor /
``set_ffn_skip`` arguments. ``ffn_skip=False`` is always dense.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from gguf import GGUFValueType

from . import _lib
from .errors import MetadataError

# keyword argument -> (GGUF key, field of struct ffnskip_params)
KEYWORDS: dict[str, tuple[str, str]] = {
    "ffn_skip_threshold": ("ffn_skip.threshold", "threshold"),
    "ffn_skip_cold_start": ("ffn_skip.cold_start", "cold_start"),
    "ffn_skip_cold_end": ("ffn_skip.cold_end", "cold_end"),
    "ffn_skip_exclude": ("ffn_skip.exclude", "exclude"),
    "ffn_skip_max_skip": ("ffn_skip.max_skip", "max_skip"),
    "ffn_skip_max_runs": ("ffn_skip.max_runs", "max_runs"),
    "ffn_skip_continue": ("ffn_skip.continue_run", "continue_run"),
    "ffn_skip_warmup": ("ffn_skip.warmup", "warmup"),
    "ffn_remove_layers": ("ffn_skip.remove_layers", "remove"),
    # the decision signal (issue 14; ffnskip_set_signal in cpp/ffn-skip.h)
    "ffn_skip_signal": ("ffn_skip.signal", "signal"),
    "ffn_skip_probe": ("ffn_skip.probe", "probe"),
}
SIGNALS = {"cosine": 0, "probe": 1}  # enum ffnskip_signal
GGUF_KEY_VERSION = "ffn_skip.version"
# layouts of the ffn_skip.* keys: 1 = the cosine gate; 2 = adds ffn_skip.signal
# and ffn_skip.probe (a file that needs the probe carries 2, so a reader of
# version 1 refuses it instead of running the cosine gate with probe thresholds)
GGUF_VERSION = 1        # what calibrate writes for the cosine gate / static removal
GGUF_VERSION_PROBE = 2  # what calibrate writes when it chose the probe signal
GGUF_VERSIONS_READ = (1, 2)
_F32_MAX = 3.4028234663852886e38
MODES = {"off": _lib.FFNSKIP_MODE_OFF, "adaptive": _lib.FFNSKIP_MODE_ADAPTIVE, "static": _lib.FFNSKIP_MODE_STATIC}


def _round_half_up(x: float) -> int:
    # the C side (ffnskip_params_default) rounds half away from zero too
    return int(math.floor(x + 0.5))


def defaults(n_layer: int) -> dict[str, Any]:
    """Defaults without calibration for a model of ``n_layer`` layers
    (DESIGN.md section 5; computed by the C library, ``ffnskip_params_default``)."""
    p = _lib.ffnskip_params()
    _lib.ffnskip_params_default(ctypes_byref(p), n_layer)
    return {
        "ffn_skip_threshold": round(float(p.threshold[0]), 6),  # 0.95f
        "ffn_skip_cold_start": int(p.cold_start),
        "ffn_skip_cold_end": int(p.cold_end),
        "ffn_skip_exclude": [],
        "ffn_skip_max_skip": int(p.max_skip),
        "ffn_skip_max_runs": int(p.max_runs),
        "ffn_skip_continue": bool(p.continue_run),
        "ffn_skip_warmup": int(p.warmup),
        "ffn_remove_layers": [],
        "ffn_skip_signal": "cosine",
    }


def paper_cold(n_layer: int, k: int = 0) -> int:
    """Cold layers each side of the paper's recipe: round(5 L / 32), at least 1
    (5 of 32 on LLaMa, arXiv 2404.03865 section 4), reduced while the middle
    region is smaller than ``k`` (room for a run of k skips)."""
    cold = max(1, _round_half_up(5 * n_layer / 32))
    while n_layer - 2 * cold < k and cold > 1:
        cold -= 1
    return cold


def paper_preset(n_layer: int) -> dict[str, Any]:
    """FFN-SkipLLM's recipe (arXiv 2404.03865, section 4): tau = 0.95 on every
    middle layer, round(5 L / 32) cold layers each side (5 of 32 on LLaMa),
    run continuation, one run, k = round(0.25 L) (25% skip budget)."""
    cold = paper_cold(n_layer)
    return {
        "ffn_skip_threshold": 0.95,
        "ffn_skip_cold_start": cold,
        "ffn_skip_cold_end": cold,
        "ffn_skip_exclude": [],
        "ffn_skip_max_skip": _round_half_up(0.25 * n_layer),
        "ffn_skip_max_runs": 1,
        "ffn_skip_continue": True,
    }


def ctypes_byref(obj):
    import ctypes

    return ctypes.byref(obj)


def parse_mode(ffn_skip: Any) -> str:
    """Map the ``ffn_skip`` argument to a mode name.

    False/None -> "off"; True, "adaptive" or "paper" -> "adaptive"; "static"
    -> "static" (only ``ffn_remove_layers``, no gate). Raises ValueError.
    """
    if ffn_skip is None or ffn_skip is False:
        return "off"
    if ffn_skip is True:
        return "adaptive"
    if isinstance(ffn_skip, str) and ffn_skip in ("adaptive", "paper", "static", "off"):
        return "adaptive" if ffn_skip == "paper" else ffn_skip
    raise ValueError(f"ffn_skip must be True, False, 'paper' or 'static', got {ffn_skip!r}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def validate(name: str, value: Any, n_layer: int) -> Any:
    """Validate one keyword's value for an ``n_layer``-layer model and return
    it normalized (float, int, bool, list). Raises ValueError naming ``name``."""
    if name == "ffn_skip_threshold":
        if isinstance(value, (str, bytes)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a float or a list of {n_layer} floats, got {value!r}")
        if isinstance(value, numbers.Real):
            try:
                v = float(value)
            except OverflowError:
                raise ValueError(f"{name} must be a finite float32, got {value!r}") from None
            if not math.isfinite(v) or abs(v) > _F32_MAX:
                raise ValueError(f"{name} must be a finite float32, got {v}")
            return v
        if isinstance(value, (dict, set, frozenset)) or not hasattr(value, "__iter__"):
            raise ValueError(f"{name} must be a float or a list of {n_layer} floats, got {value!r}")
        try:
            items = list(value)
            if any(isinstance(x, (str, bytes, bool)) or not isinstance(x, numbers.Real) for x in items):
                raise TypeError
            vals = [float(x) for x in items]
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be a float or a list of {n_layer} floats, got {value!r}") from None
        if len(vals) != n_layer:
            raise ValueError(f"{name} has {len(vals)} values, the model has {n_layer} layers")
        bad = [i for i, x in enumerate(vals) if not math.isfinite(x) or abs(x) > _F32_MAX]
        if bad:
            raise ValueError(f"{name}[{bad[0]}] must be a finite float32, got {vals[bad[0]]}")
        return vals
    if name in ("ffn_skip_exclude", "ffn_remove_layers"):
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise ValueError(f"{name} must be a list of layer indices, got {value!r}")
        out = []
        for x in value:
            if not _is_int(x):
                raise ValueError(f"{name} must hold integer layer indices, got {x!r}")
            if not 0 <= int(x) < n_layer:
                raise ValueError(f"{name}: layer {x} outside [0, {n_layer})")
            out.append(int(x))
        return sorted(set(out))
    if name == "ffn_skip_signal":
        if not isinstance(value, str) or value not in SIGNALS:
            raise ValueError(f"{name} must be one of {', '.join(SIGNALS)}, got {value!r}")
        return value
    if name == "ffn_skip_probe":
        # n_layer x (n_embd + 1) float32: w_j then b_j per layer; the library
        # checks n_embd (ffnskip_set_signal)
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise ValueError(f"{name} must be a list of n_layer x (n_embd + 1) floats, got {type(value).__name__}")
        try:
            vals = [float(x) for x in value]
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must hold floats") from None
        if len(vals) < 2 * n_layer or len(vals) % n_layer:
            raise ValueError(f"{name} has {len(vals)} values: not n_layer ({n_layer}) x (n_embd + 1)")
        bad = [i for i, x in enumerate(vals) if not math.isfinite(x) or abs(x) > _F32_MAX]
        if bad:
            raise ValueError(f"{name}[{bad[0]}] must be a finite float32, got {vals[bad[0]]}")
        return vals
    if name == "ffn_skip_continue":
        try:
            import numpy as np

            if isinstance(value, np.bool_):
                return bool(value)
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(value, (bool, numbers.Integral)) or (_is_int(value) and value not in (0, 1)):
            raise ValueError(f"{name} must be a bool, got {value!r}")
        return bool(value)
    lo = {"ffn_skip_cold_start": 0, "ffn_skip_cold_end": 0, "ffn_skip_max_skip": 0,
          "ffn_skip_max_runs": 1, "ffn_skip_warmup": 0}
    if name in lo:
        if not _is_int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        v = int(value)
        if v < lo[name]:
            raise ValueError(f"{name} must be >= {lo[name]}, got {v}")
        if name in ("ffn_skip_cold_start", "ffn_skip_cold_end") and v > n_layer:
            raise ValueError(f"{name}={v} is larger than the model ({n_layer} layers)")
        if v > 2**31 - 1:
            raise ValueError(f"{name}={v} is too large")
        return v
    raise ValueError(f"unknown FFN-skip setting {name!r}")


def read_file_settings(values: Mapping[str, Any], n_layer: int) -> dict[str, Any]:
    """Turn the ``ffn_skip.*`` GGUF values (``metadata.GGUFValue`` by key) into
    keyword settings. Raises MetadataError naming the key on a wrong type or
    out-of-range value (DESIGN.md section 4)."""
    out: dict[str, Any] = {}
    ints = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
            GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)
    floats = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
    gv = values.get(GGUF_KEY_VERSION)
    if gv is not None:
        if gv.type not in ints:
            raise MetadataError(f"GGUF key {GGUF_KEY_VERSION} has type {gv.type.name}, expected an integer")
        if gv.value not in GGUF_VERSIONS_READ:
            raise MetadataError(f"GGUF key {GGUF_KEY_VERSION} = {gv.value}: this library reads versions "
                                f"{', '.join(map(str, GGUF_VERSIONS_READ))} (written by another ffnskip-gguf version?)")
    for kw, (key, _) in KEYWORDS.items():
        gv = values.get(key)
        if gv is None:
            continue
        t, v, at = gv.type, gv.value, gv.array_type
        if kw == "ffn_skip_threshold":
            ok = t in floats or (t == GGUFValueType.ARRAY and at in floats)
        elif kw in ("ffn_skip_exclude", "ffn_remove_layers"):
            ok = t == GGUFValueType.ARRAY and at in ints
        elif kw == "ffn_skip_continue":
            ok = t == GGUFValueType.BOOL
        elif kw == "ffn_skip_signal":
            ok = t == GGUFValueType.STRING
        elif kw == "ffn_skip_probe":
            ok = t == GGUFValueType.ARRAY and at in floats
        else:
            ok = t in ints
        if not ok:
            shown = f"array of {at.name}" if t == GGUFValueType.ARRAY and at is not None else t.name
            raise MetadataError(f"GGUF key {key} has type {shown}, which is not valid for {kw}")
        try:
            out[kw] = validate(kw, v, n_layer)
        except ValueError as e:
            raise MetadataError(f"GGUF key {key}: {e}") from None
    if out.get("ffn_skip_signal") == "probe":
        v = values.get(GGUF_KEY_VERSION)
        if v is None or v.value < GGUF_VERSION_PROBE:
            raise MetadataError(f"GGUF key ffn_skip.signal = 'probe' needs {GGUF_KEY_VERSION} = {GGUF_VERSION_PROBE}")
        if "ffn_skip_probe" not in out:
            raise MetadataError("GGUF key ffn_skip.signal = 'probe' without ffn_skip.probe (the probe weights)")
    cs = out.get("ffn_skip_cold_start")
    ce = out.get("ffn_skip_cold_end")
    if cs is not None and ce is not None and cs + ce > n_layer:
        raise MetadataError(f"GGUF keys ffn_skip.cold_start={cs} + ffn_skip.cold_end={ce} exceed the model's "
                            f"{n_layer} layers (cold regions overlap)")
    return out


def read_override_settings(kv_overrides: Mapping[str, Any] | None, n_layer: int) -> dict[str, Any]:
    """The ``ffn_skip.*`` entries of llama-cpp-python's ``kv_overrides`` as
    keyword settings, applied like file values (precedence: arguments, then
    overrides, then the file; ``sources`` says "override"). Other keys are
    llama.cpp's and ignored here.

    Raises:
        ValueError: an unknown ``ffn_skip.*`` key, a per-layer key
            (``kv_overrides`` carries only bool, int, float and str values, no
            arrays), a value of the wrong type or out of range (names it).
        MetadataError: ``ffn_skip.version`` other than the one this library reads.
    """
    out: dict[str, Any] = {}
    by_key = {key: kw for kw, (key, _) in KEYWORDS.items()}
    for key, v in (kv_overrides or {}).items():
        if not isinstance(key, str) or not key.startswith("ffn_skip."):
            continue
        where = f"kv_overrides[{key!r}]"
        if key == GGUF_KEY_VERSION:
            if not _is_int(v):
                raise ValueError(f"{where} = {v!r}: expected an integer")
            if v not in GGUF_VERSIONS_READ:
                raise MetadataError(f"{where} = {v}: this library reads versions "
                                    f"{', '.join(map(str, GGUF_VERSIONS_READ))}")
            continue
        kw = by_key.get(key)
        if kw is None:
            raise ValueError(f"{where}: unknown FFN-skip key (known: {', '.join(sorted(by_key))}, {GGUF_KEY_VERSION})")
        if kw in ("ffn_skip_exclude", "ffn_remove_layers", "ffn_skip_probe"):
            raise ValueError(f"{where}: {key} is a per-layer array, and kv_overrides carries only bool, int, "
                             f"float and str values; pass {kw}=[...] to Llama instead")
        if kw == "ffn_skip_continue":
            ok = isinstance(v, bool)
        elif kw == "ffn_skip_signal":
            ok = isinstance(v, str)
        elif kw == "ffn_skip_threshold":
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
        else:
            ok = _is_int(v)
        if not ok:
            raise ValueError(f"{where} = {v!r}: a {type(v).__name__} is not valid for {kw}")
        try:
            out[kw] = validate(kw, float(v) if kw == "ffn_skip_threshold" else v, n_layer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return out


@dataclass
class FfnSkipSettings:
    """The FFN-skip settings in effect for one context.

    Attributes mirror the keyword arguments (without the ``ffn_skip_``
    prefix); ``threshold`` is a float or a per-layer list. ``sources`` maps
    each keyword to "default", "preset", "file", "override" (kv_overrides)
    or "argument".
    """

    mode: str
    n_layer: int
    threshold: float | list[float]
    cold_start: int
    cold_end: int
    exclude: list[int]
    max_skip: int
    max_runs: int
    continue_run: bool
    warmup: int
    remove_layers: list[int]
    signal: str = "cosine"             # ffn_skip_signal: "cosine" (c_last, the paper) or "probe"
    probe: list[float] | None = None   # ffn_skip_probe: n_layer x (n_embd + 1) weights of the probe
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def resolve(mode: str, n_layer: int, file_settings: Mapping[str, Any], arguments: Mapping[str, Any],
            preset: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> FfnSkipSettings:
    """Combine defaults < preset < file < overrides (kv_overrides) < arguments
    into validated settings.

    Raises ValueError naming the argument when a value is invalid or the
    combination is (cold regions larger than the model)."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer_name, layer in (("default", defaults(n_layer)), ("preset", preset or {}),
                              ("file", file_settings), ("override", overrides or {}), ("argument", arguments)):
        for k, v in layer.items():
            if v is None:
                continue
            merged[k] = validate(k, v, n_layer)
            sources[k] = layer_name
    cs, ce = merged["ffn_skip_cold_start"], merged["ffn_skip_cold_end"]
    if cs + ce > n_layer:
        src = f" (from: cold_start {sources['ffn_skip_cold_start']}, cold_end {sources['ffn_skip_cold_end']})"
        raise ValueError(
            f"ffn_skip_cold_start={cs} + ffn_skip_cold_end={ce} exceed the model's {n_layer} layers "
            f"(cold regions overlap){src}"
        )
    if merged["ffn_skip_signal"] == "probe" and merged.get("ffn_skip_probe") is None:
        raise ValueError("ffn_skip_signal='probe' needs ffn_skip_probe (the per-layer probe weights a calibrated "
                         "file carries)")
    return FfnSkipSettings(
        mode=mode, n_layer=n_layer, signal=merged["ffn_skip_signal"],
        probe=merged.get("ffn_skip_probe") if merged["ffn_skip_signal"] == "probe" else None,
        threshold=merged["ffn_skip_threshold"], cold_start=cs, cold_end=ce,
        exclude=merged["ffn_skip_exclude"], max_skip=merged["ffn_skip_max_skip"],
        max_runs=merged["ffn_skip_max_runs"], continue_run=merged["ffn_skip_continue"],
        warmup=merged["ffn_skip_warmup"], remove_layers=merged["ffn_remove_layers"], sources=sources,
    )


def to_c(s: FfnSkipSettings) -> "_lib.ffnskip_params":
    """Build the C struct for settings ``s`` (validated again by the library)."""
    if s.n_layer > _lib.FFNSKIP_MAX_LAYERS:
        raise ValueError(f"models with more than {_lib.FFNSKIP_MAX_LAYERS} layers are not supported")
    p = _lib.ffnskip_params()
    _lib.ffnskip_params_default(ctypes_byref(p), s.n_layer)
    p.mode = MODES[s.mode]
    if s.mode == "adaptive" and s.max_skip == 0:
        # a gate with no budget never fires: static mode makes the same
        # decisions without gate nodes (a calibration that found no safe
        # setting, or one that chose static removal, stores max_skip = 0)
        p.mode = MODES["static"]
    p.cold_start, p.cold_end = s.cold_start, s.cold_end
    p.max_skip, p.max_runs = s.max_skip, s.max_runs
    p.continue_run = 1 if s.continue_run else 0
    p.warmup = s.warmup
    taus = s.threshold if isinstance(s.threshold, list) else [s.threshold] * s.n_layer
    for j in range(s.n_layer):
        p.threshold[j] = taus[j]
    for j in s.exclude:
        p.exclude[j] = 1
    for j in s.remove_layers:
        p.remove[j] = 1
    return p


def apply_signal(ctx, s: FfnSkipSettings) -> None:
    """Set the decision signal of settings ``s`` on a llama_context
    (``ffnskip_set_signal``): the probe only when the gate runs (adaptive
    mode), the cosine otherwise (dense and static removal never read it).
    Raises ValueError with the library's reason (wrong probe size for this
    model, probe with FFN weights on a backend whose gate kernel lacks it)."""
    import ctypes

    import numpy as np

    err = ctypes.create_string_buffer(512)
    if s.mode == "adaptive" and s.signal == "probe" and s.probe is not None:
        w = np.ascontiguousarray(s.probe, dtype=np.float32)
        rc = _lib.ffnskip_set_signal(ctx, SIGNALS["probe"], w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                     len(w), err, len(err))
    else:
        rc = _lib.ffnskip_set_signal(ctx, SIGNALS["cosine"], None, 0, err, len(err))
    if rc != 0:
        raise ValueError(f"ffn_skip_signal={s.signal!r}: {err.value.decode()}")
