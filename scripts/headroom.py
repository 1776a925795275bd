"""Headroom and signal study of issue 14 (docs/QUALITY.md, "Headroom").

    python scripts/headroom.py measure MODEL OUT_DIR [--tokens 1024]
    python scripts/headroom.py analyse MODEL OUT_DIR

measure: D[t, j] and the signals (ffnskip_gguf.headroom) on the eval corpus
(data/corpus: the headroom text, never used by calibration) and on the
calibration corpus (data/calib: training data for the probes); saved as
OUT_DIR/cells-{eval,calib}.npz.
analyse: the oracle / static / gate comparison validated by running, and the
Spearman table of the signals; writes OUT_DIR/headroom.json (validated runs
are cached in OUT_DIR/validated.json). --layer-order calib takes the
per-layer sets from the calibration text (docs/QUALITY.md, "The layer set
must be chosen without the test tokens").
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ffnskip_gguf import calibrate, evaluate, headroom, metadata, models
from ffnskip_gguf.headroom import spearman


def measure(args):
    path = str(models.resolve_model(args.model))
    arch = metadata.check_model_file(path).architecture
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = headroom.CellMeter(path, arch, n_seq=args.n_seq, chunk=args.chunk)
    for name, texts in (("eval", evaluate.default_corpus()), ("calib", calibrate.default_calibration_corpus())):
        f = out / f"cells-{name}.npz"
        if f.exists():
            continue
        ch = m.chunks(texts, args.tokens)
        t0 = time.time()
        c = m.measure(ch, keep_hidden=True)
        np.savez(f, D=c.D, K=c.K, nll=c.nll, U=c.U, chunks=np.array(ch, dtype=np.int32),
                 **{f"f_{k}": v for k, v in c.feats.items()})
        print(f"{name}: {len(c.nll)} tokens x {m.L} layers in {time.time() - t0:.0f} s", file=sys.stderr)
    m.close()


def _load(out: Path, name: str):
    z = np.load(out / f"cells-{name}.npz")
    feats = {k[2:]: z[k] for k in z.files if k.startswith("f_")}
    return z["D"], z["K"], z["nll"], feats, z["U"], [list(map(int, c)) for c in z["chunks"]]


def _interp(points, budget):
    """Largest skip ratio within ``budget`` on the validated curve (linear
    interpolation between measured points, sorted by ratio; 0 if none)."""
    pts = sorted(points)
    best = 0.0
    prev = (0.0, 0.0)
    for r, inc in pts:
        if inc <= budget:
            best = max(best, r)
        elif prev[1] <= budget:
            best = max(best, prev[0] + (r - prev[0]) * (budget - prev[1]) / (inc - prev[1]))
        prev = (r, inc)
    return best


def analyse(args):
    path = str(models.resolve_model(args.model))
    arch = metadata.check_model_file(path).architecture
    out = Path(args.out)
    D, K, nll_b, feats, U, chunks = _load(out, "eval")
    Dc, Kc, _, feats_c, Uc, _ = _load(out, "calib")
    T, L = D.shape
    mid = list(range(1, L))
    res = {"model": args.model, "tokens": T, "n_layer": L}
    cache_f = out / "validated.json"
    cache = json.loads(cache_f.read_text()) if cache_f.exists() else {}
    m = headroom.CellMeter(path, arch, n_seq=args.n_seq, chunk=args.chunk)

    def run(name, mask=None, settings=None):
        if name in cache:
            return cache[name]
        t0 = time.time()
        if settings is not None:
            m.r.set_policy(True, **settings)
            m.r.reset_stats()
            nll = m.validate(chunks, None, progress=False)
            ratio = m.r.stats().skip_ratio
        else:
            nll = m.validate_mask(chunks, mask, progress=False)
            ratio = float(mask.sum() / (T * L))
        cache[name] = {"ratio": ratio, "nll": float(nll.mean()), "sec": time.time() - t0}
        if name != "dense":
            cache[name]["inc"] = math.expm1(cache[name]["nll"] - cache["dense"]["nll"])
        cache_f.write_text(json.dumps(cache, indent=1))
        print(name, cache[name], file=sys.stderr)
        return cache[name]

    run("dense", mask=np.zeros((T, L), bool))
    # concentration of damage
    conc = []
    for j in mid:
        pos = np.clip(D[:, j], 0, None)
        top = np.sort(pos)[::-1][: max(1, T // 10)]
        conc.append(float(top.sum() / pos.sum()) if pos.sum() > 0 else math.nan)
    res["top10_share"] = conc
    res["col_mean"] = [float(np.nanmean(D[:, j])) if j else None for j in range(L)]

    def additive(mask):
        return math.expm1(float(np.nansum(np.where(mask, D, 0.0)) / T))

    # oracles: the cells with the lowest D (knows the next token) or the
    # lowest KL (knows the skipped model's whole next-token distribution:
    # the best any signal of expected damage can do), global threshold
    oracle, oracle_kl = [], []
    for name, M, dst in (("oracle", D, oracle), ("oracle_kl", K, oracle_kl)):
        flat = M[:, 1:].ravel()
        for r in args.oracle_ratios:
            q = float(np.quantile(flat, min(1.0, r * L / (L - 1))))
            mask = np.zeros((T, L), bool)
            mask[:, 1:] = M[:, 1:] <= q
            v = run(f"{name}@{r}", mask)
            dst.append({"target": r, "ratio": v["ratio"], "inc": v["inc"], "additive": additive(mask)})
    # best static sets: layers by mean single-token damage, then validated
    order = sorted(mid, key=lambda j: res["col_mean"][j])
    static = []
    for k in range(1, args.static_max + 1):
        mask = np.zeros((T, L), bool)
        mask[:, order[:k]] = True
        v = run(f"static{order[:k]}", mask)
        static.append({"layers": order[:k], "ratio": v["ratio"], "inc": v["inc"], "additive": additive(mask)})
    res["oracle"], res["oracle_kl"], res["static"] = oracle, oracle_kl, static
    # today's calibrated gate (file settings), if given
    if args.calibrated:
        s = json.loads(Path(args.calibrated).read_text())["settings"]
        v = run("calibrated", settings=s)
        res["calibrated"] = {"ratio": v["ratio"], "inc": v["inc"], "settings": s}

    # signals: Spearman with D per layer, on the eval text
    sp, spk = {}, {}
    for k, F in feats.items():
        sp[k] = [spearman(F[:, j], D[:, j]) for j in mid]
        spk[k] = [spearman(F[:, j], K[:, j]) for j in mid]
    sp["dense_nll (not causal)"] = [spearman(-nll_b, D[:, j]) for j in mid]
    spk["dense_nll (not causal)"] = [spearman(nll_b, K[:, j]) for j in mid]
    sp["KL (not causal)"] = [spearman(K[:, j], D[:, j]) for j in mid]
    # probes fit on the calibration text, scored on the eval text
    pred = {"probe_u": np.full((T, L), np.nan), "probe_feats": np.full((T, L), np.nan),
            "probe_u+feats": np.full((T, L), np.nan)}
    names = [k for k in headroom.SIGNALS]
    for j in mid:
        Fc = np.stack([feats_c[k][:, j] for k in names], 1)
        Fe = np.stack([feats[k][:, j] for k in names], 1)
        mu, sd = Fc.mean(0), Fc.std(0) + 1e-9
        Fc, Fe = (Fc - mu) / sd, (Fe - mu) / sd
        Xc_u, Xe_u = Uc[:, j].astype(np.float64), U[:, j].astype(np.float64)
        for key, Xc, Xe in (("probe_u", Xc_u, Xe_u), ("probe_feats", Fc, Fe),
                            ("probe_u+feats", np.hstack([Xc_u, Fc * 0.03]), np.hstack([Xe_u, Fe * 0.03]))):
            # target: log KL (the expected damage; D's sign is noise)
            w, b, _ = headroom.ridge_cv(Xc, np.log(np.maximum(Kc[:, j], 1e-9)))
            pred[key][:, j] = Xe @ w + b
    for k, P_ in pred.items():
        sp[k] = [spearman(P_[:, j], D[:, j]) for j in mid]
        spk[k] = [spearman(P_[:, j], K[:, j]) for j in mid]

    def summ(d):
        return {k: {"median": float(np.nanmedian(v)), "min": float(np.nanmin(v)),
                    "max": float(np.nanmax(v)), "per_layer": v} for k, v in d.items()}

    res["spearman"], res["spearman_kl"] = summ(sp), summ(spk)
    # pooled ranking over all middle cells (a global threshold needs it)
    res["spearman_pooled"] = {k: spearman(P_[:, 1:].ravel(), D[:, 1:].ravel()) for k, P_ in pred.items()}
    res["spearman_pooled_kl"] = {k: spearman(P_[:, 1:].ravel(), K[:, 1:].ravel()) for k, P_ in pred.items()}

    # probe-ranked masks (predicted damage < delta), validated
    sig = []
    for key in args.signal_keys:
        P_ = pred[key]
        for r in args.signal_ratios:
            q = float(np.nanquantile(P_[:, 1:], min(1.0, r * L / (L - 1))))
            mask = np.zeros((T, L), bool)
            mask[:, 1:] = P_[:, 1:] <= q
            v = run(f"{key}@{r}", mask)
            sig.append({"signal": key, "target": r, "ratio": v["ratio"], "inc": v["inc"], "additive": additive(mask)})
    res["signal_masks"] = sig
    # per-layer ranking on a fixed layer set (the gate's shape: a set of
    # cheap layers, each skipping the fraction f of tokens its signal ranks
    # most skippable), signals against each other and a random control
    rng = np.random.default_rng(0)
    rank_by = {"oracle_D": D, "oracle_KL": K, "probe_u": pred["probe_u"],
               "cos_prev": -feats["cos_prev"], "random": rng.random((T, L))}
    rank_by = {k: v for k, v in rank_by.items() if k in args.perlayer_signals}
    per_layer = []
    p_order = order if args.layer_order == "eval" else sorted(mid, key=lambda j: float(Kc[:, j].mean()))
    res["perlayer_order"] = {"from": args.layer_order, "layers": p_order}
    for k in args.perlayer_sizes:
        S = p_order[:k]
        for sname, M in rank_by.items():
            mask = headroom.perlayer_mask(M, S, args.perlayer_f)
            v = run(f"perlayer{S}@{args.perlayer_f}:{sname}", mask)
            per_layer.append({"layers": S, "f": args.perlayer_f, "signal": sname, "ratio": v["ratio"],
                              "inc": v["inc"], "additive": additive(mask)})
    res["per_layer"] = per_layer
    for b in (0.02, 0.05, 0.10):
        res[f"at_{b}"] = {
            "oracle": _interp([(o["ratio"], o["inc"]) for o in oracle], b),
            "oracle_kl": _interp([(o["ratio"], o["inc"]) for o in oracle_kl], b),
            "static": _interp([(o["ratio"], o["inc"]) for o in static], b),
            **{key: _interp([(o["ratio"], o["inc"]) for o in sig if o["signal"] == key], b)
               for key in args.signal_keys},
        }
    name = "headroom.json" if args.layer_order == "eval" else "headroom-calib-order.json"
    (out / name).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k.startswith("at_") or k.startswith("spearman_pooled")},
                     indent=1))
    for k, v in res["spearman"].items():
        w = res["spearman_kl"].get(k)
        print(f"{k:24s} D: median {v['median']:+.3f} [{v['min']:+.3f}, {v['max']:+.3f}]"
              + (f"   KL: median {w['median']:+.3f} [{w['min']:+.3f}, {w['max']:+.3f}]" if w else ""))
    m.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["measure", "analyse"])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--n-seq", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=97)
    ap.add_argument("--calibrated", help="calibration report JSON (its settings are today's gate)")
    ap.add_argument("--oracle-ratios", type=float, nargs="*", default=[0.05, 0.1, 0.15, 0.2, 0.3])
    ap.add_argument("--signal-ratios", type=float, nargs="*", default=[0.05, 0.1, 0.15])
    ap.add_argument("--static-max", type=int, default=4)
    ap.add_argument("--perlayer-sizes", type=int, nargs="*", default=[2, 4, 6])
    ap.add_argument("--perlayer-f", type=float, default=0.5)
    ap.add_argument("--signal-keys", nargs="*", default=["probe_u", "probe_u+feats"])
    ap.add_argument("--perlayer-signals", nargs="*",
                    default=["oracle_D", "oracle_KL", "probe_u", "cos_prev", "random"])
    ap.add_argument("--layer-order", choices=["eval", "calib"], default="eval",
                    help="layer sets of the per-layer runs: cheapest by mean D on the eval text itself "
                         "(in-sample, the first measurements) or by mean KL on the calibration text "
                         "(chosen without the text they are scored on, as calibrate must)")
    args = ap.parse_args()
    if args.cmd == "measure":
        measure(args)
    else:
        analyse(args)


if __name__ == "__main__":
    main()
