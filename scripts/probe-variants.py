#!/usr/bin/env python3
"""Cheap probe variants against the linear probe on u_j (issue 14; docs/QUALITY.md,
"What this says, honestly"). Needs the cells of ``scripts/headroom.py measure MODEL OUT``
(both texts, with hidden states).

    python scripts/probe-variants.py fit OUT
        fit each variant on the calibration text's cells, score it on the eval
        text's (Spearman with KL per layer); writes OUT/sigexp.json and the
        predictions OUT/sigexp-preds.npz
    python scripts/probe-variants.py validate OUT MODEL "8,9,10,11,12;9,10,11,12" "oracle_KL;probe_u;..."
        run each layer set with half of each layer's tokens (lowest predicted
        damage) skipped, one token per decode, KV effects included
        (headroom.CellMeter.validate_mask); caches runs in OUT/sigval.json
    python scripts/probe-variants.py layer-costs OUT MODEL [F]
        the layer-choice rule with KV effects: each middle layer alone skips
        the fraction F (default 0.5) of its tokens with the lowest KL, run on
        the *calibration* text one token per decode (KV effects included);
        prints each layer's run cost next to its additive cost (sum of its
        cells' D), then the layers ranked by run cost; caches OUT/layercost.json

Variants: ``probe_u`` (ridge on u_j = h_j / |h_j| to log KL, as calibrate),
the rank of KL as target, [u_j, u_{j-1}] (two dot products), u_j plus the
squares of its 8 leading principal components (nine dot products), one probe
shared by all layers, and that plus a per-layer residual probe.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np

from ffnskip_gguf import headroom, metadata, models
from ffnskip_gguf.headroom import _ranks, ridge_cv, spearman
from headroom import _load  # scripts/headroom.py (this script's folder is on sys.path)


def fit(out: Path) -> None:
    D, K, _, _, U, _ = _load(out, "eval")
    _, Kc, _, _, Uc, _ = _load(out, "calib")
    T, L = K.shape; mid = list(range(1, L))
    y = lambda k: np.log(np.maximum(k, 1e-9))
    res = {}; preds = {}
    def add(name, j, p):
        preds.setdefault(name, np.full((T, L), np.nan))[:, j] = p
    # PCA directions of u (calib), per layer, for quadratic features
    for j in mid:
        Xc, Xe = Uc[:, j].astype(np.float64), U[:, j].astype(np.float64)
        w, b, _ = ridge_cv(Xc, y(Kc[:, j])); add("probe_u", j, Xe @ w + b)
        # rank target
        w, b, _ = ridge_cv(Xc, _ranks(Kc[:, j]) / len(Kc)); add("probe_u rank-target", j, Xe @ w + b)
        # previous layer's input too (2 dot products)
        Xc2 = np.hstack([Xc, Uc[:, j - 1].astype(np.float64)]); Xe2 = np.hstack([Xe, U[:, j - 1].astype(np.float64)])
        w, b, _ = ridge_cv(Xc2, y(Kc[:, j])); add("probe [u_j, u_j-1]", j, Xe2 @ w + b)
        # quadratic: squares of top-8 principal components (9 dot products)
        mu = Xc.mean(0); _, _, Vt = np.linalg.svd(Xc - mu, full_matrices=False); V = Vt[:8].T
        Qc, Qe = ((Xc - mu) @ V) ** 2, ((Xe - mu) @ V) ** 2
        sq = Qc.std(0) + 1e-12
        Xc3 = np.hstack([Xc, Qc / sq * 0.03]); Xe3 = np.hstack([Xe, Qe / sq * 0.03])
        w, b, _ = ridge_cv(Xc3, y(Kc[:, j])); add("probe u + 8 squared PCs", j, Xe3 @ w + b)
    # pooled over layers: one weight vector + per-layer bias (layer-centred target)
    Xp = np.concatenate([Uc[:, j].astype(np.float64) for j in mid]); yp = np.concatenate([y(Kc[:, j]) - y(Kc[:, j]).mean() for j in mid])
    w, b, _ = ridge_cv(Xp, yp)
    for j in mid: add("probe pooled over layers", j, U[:, j].astype(np.float64) @ w)
    # pooled + per-layer (residual fit)
    for j in mid:
        Xc = Uc[:, j].astype(np.float64); r = y(Kc[:, j]) - Xc @ w
        w2, b2, _ = ridge_cv(Xc, r); add("probe pooled + per-layer", j, U[:, j].astype(np.float64) @ (w + w2) + b2)
    for name, P in preds.items():
        s = [spearman(P[:, j], K[:, j]) for j in mid]
        res[name] = {"median": float(np.median(s)), "min": float(np.min(s)), "max": float(np.max(s)), "per_layer": s,
                     "D_median": float(np.median([spearman(P[:, j], D[:, j]) for j in mid]))}
        print(f"{name:30s} Spearman/KL median {np.median(s):+.3f} [{np.min(s):+.3f}, {np.max(s):+.3f}]  mid layers 8-12: "
              + " ".join(f"{s[j-1]:+.2f}" for j in range(8, 13)), flush=True)
    np.savez(out / "sigexp-preds.npz", **{k.replace(" ", "_"): v for k, v in preds.items()})
    json.dump(res, open(out / "sigexp.json", "w"), indent=1)


def _validator(out: Path, model: str, text: str, cache_name: str):
    """Cells of ``text`` ("eval" or "calib") and a cached validation run:
    returns (npz, run) where run(key, mask) is the mean NLL of the masked
    run over that text's chunks, one token per decode (cached in OUT/cache_name)."""
    z = np.load(out / f"cells-{text}.npz"); chunks = [list(map(int, c)) for c in z["chunks"]]
    path = str(models.resolve_model(model)); arch = metadata.check_model_file(path).architecture
    m = headroom.CellMeter(path, arch, n_seq=16, chunk=97)
    cf = out / cache_name; cache = json.loads(cf.read_text()) if cf.exists() else {}
    def run(key, mask):
        if key not in cache:
            cache[key] = float(m.validate_mask(chunks, mask, progress=False).mean()); cf.write_text(json.dumps(cache, indent=1))
        return cache[key]
    return z, run


def validate(out: Path, model: str, sets_arg: str, names_arg: str) -> None:
    sets = [[int(x) for x in s.split(",")] for s in sets_arg.split(";")]
    names = names_arg.split(";")
    z, run = _validator(out, model, "eval", "sigval.json"); K = z["K"]
    pz = np.load(out / "sigexp-preds.npz")
    T, L = K.shape
    d = run("dense", np.zeros((T, L), bool))
    for S in sets:
        for n in names:
            P = K if n == "oracle_KL" else pz[n]
            mask = headroom.perlayer_mask(P, S, 0.5)
            v = run(f"{S} {n}", mask)
            print(S, n, f"skip {mask.sum() / (T * L):.3f} inc {math.expm1(v - d) * 100:+.2f}%", flush=True)


def layer_costs(out: Path, model: str, f: float = 0.5) -> None:
    if not 0.0 < f <= 1.0:
        sys.exit(f"layer-costs: F must be in (0, 1], got {f}")
    z, run = _validator(out, model, "calib", "layercost.json"); Kc = z["K"]
    T, L = Kc.shape
    d = run("dense", np.zeros((T, L), bool))
    inc = {}
    for j in range(1, L):
        mask = headroom.perlayer_mask(Kc, [j], f)
        inc[j] = math.expm1(run(f"[{j}] oracle_KL@{f}", mask) - d)
        add = math.expm1(float(np.nansum(np.where(mask, z["D"], 0.0))) / T)
        print(f"layer {j:2d}: validated {inc[j] * 100:+.2f}%   additive {add * 100:+.2f}%", flush=True)
    print("cheapest first:", sorted(inc, key=inc.get))


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "layer-costs":
        layer_costs(Path(sys.argv[2]), sys.argv[3], *(float(x) for x in sys.argv[4:]))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "fit":
        fit(Path(sys.argv[2]))
    elif len(sys.argv) == 6 and sys.argv[1] == "validate":
        validate(Path(sys.argv[2]), *sys.argv[3:])
    else:
        sys.exit(__doc__)
