#!/usr/bin/env python3
"""Decode cost of the gate's signals and speed of a calibration (issue 14).

    python scripts/bench-signal.py MODEL [--calibrated FILE.gguf | --report REPORT.json]
        [--repeats 15] [--n-decode 64] [--json OUT.json]

Rows, alternated in one process (``bench.compare``: ratios to dense of the
same repeat, median and every repeat's ratio):

- dense (``ffn_skip=False``);
- the cosine gate on every middle layer (1..L-1), never firing (tau 2.0:
  c_last > 2 cannot hold, whatever the rounding): the cost of the cosine
  signal and the gate op;
- the probe signal on every middle layer, never firing (tau 1e30 with zero
  probe weights, so s_j = 0 < tau; the dot products are computed all the
  same): the cost of the probe signal. The issue's target: the probe
  row's decode time / the cosine row's - 1 <= 1%;
- with ``--calibrated`` (a calibrated GGUF) or ``--report`` (a
  ``calibrate`` report's ``settings``): the calibration as it is, and the
  same settings never firing.

The never-firing rows cannot be faster than dense: a ratio above 1.0x is
the noise of the run. The first repeat warms caches and usually sets the
lower end of a row's range.
"""
from __future__ import annotations

import argparse
import json
import sys

from ffnskip_gguf import bench, policy
from ffnskip_gguf.metadata import check_model_file
from ffnskip_gguf.models import resolve_model

NEVER_COSINE = 2.0   # as bench.run_bench's never-firing row
NEVER_PROBE = 1.0e30


def configs_for(path, calibrated=None, report=None) -> list[tuple[str, dict]]:
    """(name, Runner.set_policy keywords) of the rows above. Raises
    ValueError when the calibration does not fit the model's layer count."""
    info = check_model_file(path, prefixes=())
    L = info.n_layer
    key = f"{info.architecture}.embedding_length"
    info = check_model_file(path, prefixes=(key,))
    middle = {"ffn_skip": True, "ffn_skip_cold_start": 1, "ffn_skip_cold_end": 0, "ffn_skip_exclude": [],
              "ffn_skip_max_skip": L, "ffn_skip_max_runs": L, "ffn_skip_warmup": 0}
    n_embd = int(info.values[key].value)
    rows = [("dense", {"ffn_skip": False}),
            ("never-fire cosine, layers 1..L-1", {**middle, "ffn_skip_threshold": NEVER_COSINE}),
            ("never-fire probe, layers 1..L-1", {**middle, "ffn_skip_threshold": NEVER_PROBE,
                                                 "ffn_skip_signal": "probe",
                                                 "ffn_skip_probe": [0.0] * (L * (n_embd + 1))})]
    settings = None
    if calibrated:
        cinfo = check_model_file(calibrated)
        settings = policy.read_file_settings(cinfo.values, cinfo.n_layer)
        if not settings:
            raise ValueError(f"{calibrated} holds no ffn_skip.* settings: not a calibrated file")
        if cinfo.n_layer != L:
            raise ValueError(f"{calibrated} has {cinfo.n_layer} layers, {path} {L}")
    elif report:
        with open(report, encoding="utf-8") as f:
            settings = dict(json.load(f)["settings"])
        if isinstance(settings.get("ffn_skip_probe"), str):
            raise ValueError(f"{report} does not hold the probe weights (a summary); give --calibrated FILE.gguf")
    if settings:
        th = settings.get("ffn_skip_threshold")
        if not isinstance(th, list) or len(th) != L:
            raise ValueError(f"the calibration has no per-layer ffn_skip_threshold of {L} entries "
                             "(static removal or defaults: nothing to compare here)")
        never = NEVER_PROBE if settings.get("ffn_skip_signal") == "probe" else NEVER_COSINE
        rows.append(("calibrated", {"ffn_skip": True, **settings}))
        rows.append(("calibrated, never firing", {"ffn_skip": True, **settings, "ffn_skip_threshold": [never] * L}))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--calibrated", help="calibrated GGUF of the same model")
    g.add_argument("--report", help="calibrate's calibration.json (cosine settings only)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--n-prompt", type=int, default=64)
    ap.add_argument("--n-decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    path = resolve_model(a.model)
    rows = bench.compare(path, configs_for(path, a.calibrated, a.report), repeats=a.repeats, n_prompt=a.n_prompt,
                         n_decode=a.n_decode, n_threads=a.threads)
    for r in rows:
        rs = sorted(r["ratios"])
        print(f"{r['name']:36s} {r['tok_s']:7.2f} tok/s  {r['ratio']:.3f}x [{rs[0]:.3f}, {rs[-1]:.3f}]  "
              f"skip {r['skip_ratio']:.3f}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
