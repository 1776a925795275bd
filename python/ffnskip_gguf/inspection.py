"""``ffnskip-gguf inspect``: what a GGUF file holds for FFN skipping.

Reads only metadata and the tensor table (ggml's C GGUF reader, as the
loader), never the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import policy
from .bench import ffn_byte_share
from .errors import MetadataError
from .metadata import check_model_file


@dataclass
class Inspection:
    """Summary of one GGUF file.

    ffn_share: FFN up/gate/down bytes / bytes a decode step reads (bench.ffn_byte_share).
    settings: the validated ``ffn_skip.*`` settings as Llama keywords ({} when none).
    calibration: the ``ffn_skip.calibration.*`` provenance values by short name.
    error: why the ``ffn_skip.*`` keys are invalid ("" when they are valid),
        including a calibration measured on another model (pruned).
    fit: whether the calibration describes this model: "matches", "not
        recorded" (calibrated before the ffn_skip.model.* keys), or the
        warning (requantized) / error (metadata.calibration_fit).
    """

    path: Path
    architecture: str
    n_layer: int
    size: int
    ffn_share: float
    version: Any = None
    settings: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    error: str = ""
    fit: str = ""
    shards: int = 1


def inspect_model(path) -> Inspection:
    """Inspect ``path``. Raises ModelFileError for a file that is not a loadable GGUF."""
    from .metadata import shard_paths

    shards = shard_paths(path)  # a split model: every shard, or an error naming the missing one
    info = check_model_file(shards[0])  # the first shard holds the metadata
    size = sum(q.stat().st_size for q in shards)
    ins = Inspection(info.path, info.architecture, info.n_layer, size, ffn_byte_share(info.path), shards=len(shards))
    v = info.values.get(policy.GGUF_KEY_VERSION)
    ins.version = v.value if v is not None else None
    try:
        ins.settings = policy.read_file_settings(info.values, info.n_layer)
    except MetadataError as e:
        ins.error = str(e)
    if ins.settings or ins.version is not None:
        from .metadata import FIT_KEYS, calibration_fit

        fit_error, fit_warning = calibration_fit(info)
        if fit_error and not ins.error:
            ins.error = fit_error
        ins.fit = fit_error or fit_warning or (
            "matches" if any(k in info.values for k in FIT_KEYS) else "not recorded (calibrated before ffn_skip.model.*)")
    pre = "ffn_skip.calibration."
    ins.calibration = {k[len(pre):]: gv.value for k, gv in info.values.items() if k.startswith(pre)}
    return ins


def _comparison_rows(v: Any) -> list[str] | None:
    """Lines for ``ffn_skip.calibration.comparison`` (JSON list of dicts), or
    None when it is not that (then the raw value is shown)."""
    try:
        items = json.loads(v) if isinstance(v, str) else None
        if not isinstance(items, list):
            return None
        rows = []
        for c in items:
            what = c.get("name") or f"{c['placement']} {c['layers']}"
            rows.append(f"  held-out {str(what):34s} skip {float(c['skip_ratio']):.3f} "
                        f"ppl {float(c['ppl_increase']):+.2%} top-1 {float(c['top1']):.3f}")
        return rows
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


def format_inspect(ins: Inspection) -> str:
    """Human-readable report of an Inspection."""
    split = f", {ins.shards} shards" if ins.shards > 1 else ""
    lines = [f"file          {ins.path} ({ins.size / 2**20:.1f} MiB{split})",
             f"architecture  {ins.architecture}, {ins.n_layer} layers",
             f"FFN share     {ins.ffn_share:.1%} of the weight bytes a decode step reads"]
    if ins.error:
        lines.append(f"calibration   INVALID: {ins.error}")
    elif not ins.settings and ins.version is None:
        lines.append("calibration   not calibrated (ffn_skip=True uses the defaults of DESIGN.md section 5)")
    else:
        lines.append(f"calibration   ffn_skip.version {ins.version}")
        lines.append(f"  {'fits this model':26s} {ins.fit}")
        for kw, v in ins.settings.items():
            if isinstance(v, list) and v and isinstance(v[0], float):
                v = "[" + ", ".join(f"{x:g}" for x in v) + "]"
            lines.append(f"  {policy.KEYWORDS[kw][0]:26s} {v}")
        for k, v in ins.calibration.items():
            if k == "comparison":
                rows = _comparison_rows(v)
                if rows is not None:
                    lines += rows
                    continue
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, str) and len(v) > 200:
                v = v[:200] + f"... ({len(v)} characters)"
            lines.append(f"  {'calibration.' + k:26s} {v}")
    return "\n".join(lines)
