"""Calibration: measured FFN-skip settings for one model, stored in its GGUF.

``ffnskip-gguf calibrate MODEL -o OUT.gguf`` (issue 5, DESIGN.md section 4).
The paper (arXiv 2404.03865, section 4) uses one threshold (0.95) and 5 cold
layers per side for every model. Our measurements (docs/QUALITY.md) show
why that is not enough: single FFNs in the middle of a model can be fatal
(Gemma3-270M layer 3), cheap ones are scattered (Qwen2.5-0.5B layers 3, 4, 9,
10), and single-layer costs do not add up. So calibration *measures
combinations* on text, teacher-forced, with the gate acting exactly as in
generation (``Evaluator.score``: one token per sequence per decode; trials
where every token skips the same layers in batches of positions, step 3).

The rule (every number is a default of ``calibrate``):

1. Corpus: the shipped calibration corpus (``data/calib``, six genres,
   ~20k tokens; written for the project) or the user's files. Each file is
   cut into chunks of ``chunk`` tokens (the first ``prefill`` = the warm-up
   are the prompt, dense); every third chunk of each file is **held out**,
   the rest forms the **search** split; each split takes its chunks
   round-robin over the files (every prefix mixes genres) up to its cap:
   ``tokens`` scored search tokens, ``held_out_tokens`` scored held-out
   tokens. Only the search split is used to choose; the held-out split is
   used to check the choice (step 6) and to report it.
2. Profile: a dense pass over the search split (never-firing gate on every
   layer, bit-identical to dense) records each decode token's cos(h_j, o_j)
   for every layer (mean, p10, p90 go into the report) and the dense
   next-token NLL and top-1 prediction every later trial is compared with
   (paired, against the dense pass scored the same way, step 3: the proxy is
   ``exp(mean(NLL - NLL_dense)) - 1``, the relative
   perplexity increase, plus top-1 agreement with dense; "within budget" on
   the search split means one standard error of the paired mean above it).
3. Single-layer sensitivity: each layer 1..L-1 skipped alone on every decode
   token, on a short slice of the search split (``sens_tokens`` scored
   tokens per chunk). Layer 0 cannot be gated (there is no earlier cosine).
   Used only to order candidates.
   Trials where every decode token skips the same layers (this step, the
   ``fixed`` sets of step 4, ``static`` in step 5) are scored on the search
   split in batches of positions (``Calibrator.score_removed``: the same
   computation, up to 1.6x faster per token on the CPU, by machine) against a dense pass
   scored the same way, because batched and one-token kernels can round
   differently (Q4_K: a few 0.001 nats per token on average). Every gated
   trial and every held-out number runs one token per decode, as in
   generation.
4. Greedy forward selection of the skipped set S on the search split: at each
   step the ``width`` cheapest remaining layers (by single cost) are each
   added to S and the combination is *measured*; the best is kept. Quality
   budget mode stops at the first set over budget; target mode at
   ceil(target L) + 1 layers. The cold regions follow from S: cold start =
   min(S), cold end = L - 1 - max(S); middle layers not in S are excluded
   (``ffn_skip.exclude``), so harmful layers inside the middle never skip.
5. Placements, measured on the search split: ``fixed`` (every decode token
   skips S; thresholds -2), ``adaptive`` (the cosine gate on a larger set S'
   with per-layer thresholds set so that each layer of S' fires on a
   fraction f of tokens: tau_j is the (1 - f) quantile of c_last at layer j,
   simulated on the profile, continuation off, one run per layer) and
   ``static`` (the FFNs of S removed from the graph, prefill included:
   ``ffn_skip.remove_layers``). Budget mode, n = |S| within budget: fixed S,
   static S, adaptive on n + 1 layers at f = n / (n + 1) (same ratio) and
   (n + 0.5) / (n + 1), adaptive on n + 3 layers at (n + 1) / (n + 3).
   Target mode, k = ceil(target L): fixed S_k (when target L is whole),
   adaptive on k and k + 2 layers at the target ratio. Budget mode ranks by
   skip ratio (one candidate per ratio level, the lowest increase), target
   mode keeps candidates within 20% of the target and ranks by increase.
6. Held-out check: candidates in that order are measured on the held-out
   split; budget mode takes the first within budget there (at most
   ``backoff`` + 1 checks, falling back to smaller ratios), target mode the
   first. The chosen settings, the other placements at that size and the
   paper's recipe (k = 1, 2, ... until it leaves the budget) are reported
   with their held-out numbers. Because the held-out split also decides
   between candidates, its number for the chosen settings is slightly
   optimistic; docs/CALIBRATION.md checks the files on the separate eval
   corpus.

A model with no setting within budget gets ``ffn_skip.max_skip = 0``: with
``ffn_skip=True`` it decodes dense (the honest answer, with the measurement
in the report and the provenance keys).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from . import __version__, policy
from ._pin import LLAMA_CPP_PYTHON_VERSION
from .evaluate import EvalConfig, Evaluator
from .metadata import check_model_file

DEFAULT_BUDGET = 0.05    # issue 5: 5% relative perplexity increase
WARMUP = 32              # DESIGN.md section 5 default (positions)
ALWAYS, NEVER = -2.0, 1.0  # thresholds: c_last > -2 always holds, c_last > 1 never


def _check_target(quality_budget, target_skip) -> None:
    """Raise CalibrationError on a budget outside (0, 10] or a target outside (0, 1)."""
    if target_skip is not None:
        if isinstance(target_skip, bool) or not (isinstance(target_skip, (int, float)) and 0.0 < target_skip < 1.0):
            raise CalibrationError(f"target skip ratio must be in (0, 1), got {target_skip!r}")
    elif quality_budget is not None:
        qb = quality_budget
        if isinstance(qb, bool) or not (isinstance(qb, (int, float)) and math.isfinite(qb) and 0.0 < qb <= 10.0):
            raise CalibrationError(f"quality budget must be in (0, 10] (relative perplexity increase), got {qb!r}")


class CalibrationError(ValueError):
    """Calibration cannot run on this model or input (unsupported architecture,
    corpus too small, invalid target)."""


def default_calibration_corpus() -> list[str]:
    """The shipped calibration corpus (``data/calib/*.txt``): narrative,
    dialogue, encyclopedic, news and how-to, code, explainers; ~14.8k words,
    ~20k tokens; written for the project, disjoint from the eval corpus."""
    d = files("ffnskip_gguf").joinpath("data/calib")
    return [d.joinpath(n).read_text() for n in sorted(p.name for p in d.iterdir() if p.name.endswith(".txt"))]


@dataclass
class Trial:
    """One configuration measured on one split.

    ppl_increase: exp(mean(NLL - NLL_dense)) - 1 over the split's scored tokens.
    top1: fraction of scored tokens whose top-1 prediction equals dense's.
    skip_ratio: skipped FFNs / (L x decode tokens) (DESIGN.md section 3).
    """

    name: str
    placement: str          # fixed | adaptive | static | paper | dense | none
    layers: list[int]
    fraction: float         # adaptive: target fraction of tokens skipping each layer
    settings: dict
    split: str
    skip_ratio: float
    ppl_increase: float
    top1: float
    tokens: int
    ppl_increase_hi: float = 0.0  # one standard error above (paired per-token NLL differences)


@dataclass
class CalibrationResult:
    """What ``calibrate`` chose and measured (JSON report, GGUF provenance)."""

    model: str
    architecture: str
    n_layer: int
    mode: str                 # quality_budget | target_skip
    target: float
    placement: str            # fixed | adaptive | probe | static | none
    settings: dict            # Llama keywords
    held_out: Trial
    comparisons: list[Trial]  # held-out: other placements, paper recipe
    path: list[Trial]         # greedy path (search split)
    trials: list[Trial]       # every search-split trial
    single_cost: list         # per layer: ppl increase skipping it alone (None: layer 0)
    profile: dict             # cos_mean / cos_p10 / cos_p90 per layer, dense, search split
    tokens: dict              # scored tokens per split
    dense_ppl: dict           # per split
    corpus_hash: str
    seconds: dict
    notes: list[str] = field(default_factory=list)
    tool: str = ""
    paper_within_budget: float | None = None  # budget mode: the paper recipe's largest held-out skip ratio within it

    def to_json(self) -> dict:
        """The result as JSON-ready dicts and lists (``calibration.json``);
        probe weights are summarised (their count), they live in the GGUF."""
        def strip(x):
            if isinstance(x, dict):
                return {k: (f"<{len(v)} floats>" if k == "ffn_skip_probe" and isinstance(v, list) else strip(v))
                        for k, v in x.items()}
            if isinstance(x, list):
                return [strip(v) for v in x]
            return x

        return strip(asdict(self))

    def gguf_kv(self) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
        """The ``ffn_skip.*`` keys to store (DESIGN.md sections 4, 5); empty
        arrays are omitted (not valid GGUF)."""
        s = self.settings
        U, I, F, B, S, A = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32,
                            GGUFValueType.BOOL, GGUFValueType.STRING, GGUFValueType.ARRAY)
        probe = s.get("ffn_skip_signal") == "probe"
        kv: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {
            # a file that needs the probe carries layout 2: older readers refuse it
            policy.GGUF_KEY_VERSION: (policy.GGUF_VERSION_PROBE if probe else policy.GGUF_VERSION, U, None),
        }
        types = {"ffn_skip_cold_start": U, "ffn_skip_cold_end": U, "ffn_skip_max_skip": U,
                 "ffn_skip_max_runs": U, "ffn_skip_warmup": U, "ffn_skip_continue": B, "ffn_skip_signal": S}
        for kw, (key, _) in policy.KEYWORDS.items():
            if kw not in s:
                continue
            v = s[kw]
            if kw == "ffn_skip_threshold":
                kv[key] = ([float(x) for x in v], A, F) if isinstance(v, list) else (float(v), F, None)
            elif kw in ("ffn_skip_exclude", "ffn_remove_layers"):
                if v:
                    kv[key] = ([int(x) for x in v], A, I)
            elif kw == "ffn_skip_probe":
                kv[key] = ([float(x) for x in v], A, F)
            else:
                kv[key] = (v, types[kw], None)
        h = self.held_out
        prov = {
            "mode": (self.mode, S), "target": (float(self.target), F), "placement": (self.placement, S),
            "skip_ratio": (float(h.skip_ratio), F), "ppl_increase": (float(h.ppl_increase), F),
            "top1_agreement": (float(h.top1), F), "tokens": (int(self.tokens["search"] + self.tokens["held_out"]), U),
            "corpus_hash": (self.corpus_hash, S), "tool": (self.tool, S),
            "comparison": (json.dumps([{"name": t.name, "placement": t.placement, "layers": t.layers, "skip_ratio": round(t.skip_ratio, 5),
                                        "ppl_increase": round(t.ppl_increase, 5), "top1": round(t.top1, 5)}
                                       for t in [h] + self.comparisons], separators=(",", ":")), S),
        }
        for k, (v, t) in prov.items():
            kv[f"ffn_skip.calibration.{k}"] = (v, t, None)
        return kv


class Calibrator:
    """Measures FFN-skip settings for one model (the rule: module docstring).

    Args:
        path: GGUF model (checked with ``metadata.check_model_file``).
        corpus: texts (default: ``default_calibration_corpus()``).
        tokens: scored tokens of the search split (cap).
        held_out_tokens: scored tokens of the held-out split (cap).
        sens_tokens: scored tokens per chunk in the single-layer pass.
        chunk, prefill, n_seq: chunk length, dense prompt per chunk (>= the
            warm-up, 32), sequences decoded in parallel.
        width: candidates measured per greedy step.
        n_threads: CPU threads (default: the CPUs this process may use).
        progress: tqdm bars and phase messages on stderr.
        probe, probe_positions: fit and try the probe signal (issue 14), on
            that many decode positions per chunk.
        batched: score the fixed and static trials (every token skips the
            same layers) in batches of positions (``score_removed``) rather
            than one decode per position: same numbers up to rounding,
            up to 1.6x faster per token, by machine (docs/CALIBRATION.md).
        score_rows: positions per ``llama_decode`` in batched scoring (at
            most the context's n_batch, 512). On 2 cores (Qwen2.5-Coder-0.5B,
            AMD EPYC, 2026-12-07) 64-128 rows were equally fast within noise
            (5.68-5.85 ms per token) and 512, the previous value, slowest
            (7.21 ms); 64 keeps the logits of a decode at 39 MB
            (docs/CALIBRATION.md, "Time, session 11"). Results depend on it
            only through kernel rounding.
    Raises:
        ModelFileError: not a loadable GGUF; CalibrationError: architecture or
        backend without the gate, or a corpus too small for both splits.
    """

    def __init__(self, path, *, corpus: list[str] | None = None, tokens: int = 3072, held_out_tokens: int = 2048,
                 sens_tokens: int = 32, chunk: int = 224, prefill: int = WARMUP, n_seq: int = 16, width: int = 2,
                 n_threads: int | None = None, progress: bool = True, probe: bool = True, probe_positions: int = 32,
                 batched: bool = True, score_rows: int = 64):
        if tokens < 16 or held_out_tokens < 16:
            raise CalibrationError("tokens and held_out_tokens must be at least 16")
        if width < 1:
            raise CalibrationError("width must be >= 1")
        if not policy._is_int(score_rows) or score_rows < 1:
            raise CalibrationError(f"score_rows must be an integer >= 1, got {score_rows!r}")
        if prefill < WARMUP:
            raise CalibrationError(f"prefill ({prefill}) must cover the warm-up ({WARMUP} positions)")
        self.info = check_model_file(path)
        self.path = str(self.info.path)
        self.progress = progress
        self.width = width
        self.probe, self.probe_positions, self.n_threads = probe, probe_positions, n_threads
        self.batched = batched
        self.corpus = corpus if corpus is not None else default_calibration_corpus()
        self.ev = Evaluator(self.path, corpus=[], chunk=chunk, prefill=prefill, n_seq=n_seq,
                            n_threads=n_threads, progress=progress)
        self.r = self.ev.r
        self.score_rows = min(int(score_rows), self.r.n_batch)  # Runner.decode splits at n_batch
        self.L = self.r.n_layer
        self.P = prefill
        # supported? (architecture with hooks, layers on a backend with the predicated path)
        self.r.set_policy(True, ffn_skip_threshold=NEVER)
        st = self.r.stats()
        if not st.supported:
            self.close()
            raise CalibrationError(f"cannot calibrate {self.path}: FFN skipping is not supported here ({st.reason})")
        if self.L < 3:
            self.close()
            raise CalibrationError(f"cannot calibrate a model with {self.L} layers (need at least 3)")
        try:
            self.search, self.held = self._split(chunk, tokens, held_out_tokens)
        except BaseException:
            self.close()
            raise
        s_chunk = min(sens_tokens, chunk - prefill)
        self.sens = [c[:prefill + s_chunk] for c in self.search[:n_seq]]

    def close(self) -> None:
        """Free the model and context."""
        self.ev.close()

    # -- data ----------------------------------------------------------------

    def _split(self, chunk: int, tokens: int, held_tokens: int):
        # every third chunk of each file is held out; each split then takes
        # its files' chunks round-robin, so any prefix of it mixes genres
        search_f, held_f = [], []
        for text in self.corpus:
            toks = self.r.tokenize(text, bos=True)
            cs = [toks[i:i + chunk] for i in range(0, len(toks), chunk) if len(toks[i:i + chunk]) >= self.P + 2]
            search_f.append([c for i, c in enumerate(cs) if i % 3 != 2])
            held_f.append([c for i, c in enumerate(cs) if i % 3 == 2])

        def take(per_file, cap):
            out, n = [], 0
            for i in range(max((len(f) for f in per_file), default=0)):
                for f in per_file:
                    if i < len(f) and n < cap:
                        out.append(f[i])
                        n += len(f[i]) - self.P
            return out

        search, held = take(search_f, tokens), take(held_f, held_tokens)
        if not search or not held:
            n = sum(len(f) for f in search_f) + sum(len(f) for f in held_f)
            raise CalibrationError(
                f"the calibration corpus is too small: {n} chunk(s) of at least {self.P + 2} tokens; "
                f"need at least 3 in one text (two for the search split, one held out)")
        h = hashlib.sha256()
        for c in search + [[-1]] + held:
            h.update(np.array(c, dtype=np.int32).tobytes())
        self.corpus_hash = h.hexdigest()[:16]
        return search, held

    # -- measuring -----------------------------------------------------------

    def _log(self, msg: str) -> None:
        if self.progress:
            import sys

            print(f"[calibrate] {msg}", file=sys.stderr, flush=True)

    def _dense(self, chunks, profile: bool = False):
        self.ev._apply(EvalConfig("dense", "dense"))  # never-firing gate on every layer: dense, with cosines
        rows: list[np.ndarray] = []

        def grab(r):
            dec, cos = r.trace()
            rows.append(cos[dec[:, 0] != 255])

        nll, top = self.ev.score(chunks, after_decode=grab if profile else None)
        cos = np.concatenate(rows) if rows else np.zeros((0, self.L), np.float32)
        return nll, top, cos

    def score_removed(self, chunks: list[list[int]], layers, *, prefill_too: bool) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced scoring with the FFNs of ``layers`` removed on every
        position from ``prefill`` on (``prefill_too``: on the prompt as well),
        in batches of positions instead of one decode per position.

        Same numbers as ``Evaluator.score`` under the fixed gate on ``layers``
        (``prefill_too=False``: every decode token skips them, the prompt is
        dense) or under static removal (``prefill_too=True``), up to the
        rounding of batched against one-token kernels (tests/test_calibrate.py
        bounds it); up to 1.6x faster per token on the CPU (by machine), where the search
        spends most of its time (docs/CALIBRATION.md, "Time"). A token's
        prediction depends only on the positions before it, so the order of
        evaluation changes nothing else. An empty ``layers`` is dense.

        Matches the fixed gate only when ``prefill`` covers the warm-up (the
        constructor checks it) and layer 0 is not in ``layers``. Leaves the
        removal policy in effect and the gate's statistics as they were
        (the caller knows the skip ratio: len(layers) / L). Prompts are kept
        between calls when they can be (``Runner.prompt``).

        Returns (nll, argmax) in ``Evaluator.score``'s order (chunk group,
        position, sequence).
        """
        r, P, n_seq = self.r, self.P, self.ev.n_seq
        layers = sorted(int(j) for j in layers)
        removed = ("static", {"ffn_remove_layers": layers}) if layers else (False, {})
        nlls: list[np.ndarray] = []
        tops: list[np.ndarray] = []
        for g in range(0, len(chunks), n_seq):
            group = chunks[g:g + n_seq]
            if prefill_too:
                r.set_policy(removed[0], **removed[1])
            else:
                r.set_policy(False)
            last = r.prompt([c[:P] for c in group])
            r.set_policy(removed[0], **removed[1])
            # logits row of (position i, sequence s) predicts token i + 1
            items = [(c[i], i, s, True) for s, c in enumerate(group) for i in range(P, len(c) - 1)]
            nll = {}
            top = {}
            n_, t_ = self._nll_top(last, [c[P] for c in group])
            for s in range(len(group)):
                nll[(P - 1, s)], top[(P - 1, s)] = n_[s], t_[s]
            for a in range(0, len(items), self.score_rows):
                part = items[a:a + self.score_rows]
                rows = r.decode(part)  # float32 [len(part), n_vocab]
                for b in range(0, len(part), 64):  # float64 copies of 64 rows at a time
                    sub = part[b:b + 64]
                    n_, t_ = self._nll_top(rows[b:b + 64], [group[s][i + 1] for _, i, s, _ in sub])
                    for q, (_, i, s, _) in enumerate(sub):
                        nll[(i, s)], top[(i, s)] = n_[q], t_[q]
                del rows
            for i in range(P - 1, max(len(c) for c in group) - 1):
                active = [s for s, c in enumerate(group) if i + 1 < len(c)]
                nlls.append(np.array([nll[(i, s)] for s in active]))
                tops.append(np.array([top[(i, s)] for s in active], dtype=np.int32))
        if not nlls:
            return np.zeros(0), np.zeros(0, dtype=np.int32)
        return np.concatenate(nlls), np.concatenate(tops)

    @staticmethod
    def _nll_top(rows: np.ndarray, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
        # as Evaluator.score: float64 log-sum-exp minus the target's logit
        rows = rows.astype(np.float64)
        m = rows.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(rows - m).sum(axis=1))
        return lse - rows[np.arange(len(targets)), targets], rows.argmax(axis=1).astype(np.int32)

    def _measure(self, name: str, placement: str, layers, fraction: float, settings: dict, split: str) -> Trial:
        chunks = {"search": self.search, "held_out": self.held, "sens": self.sens}[split]
        # every token skips the same layers: batched scoring, compared with the
        # batched dense pass (not across kernels: they round differently);
        # the held-out split, whose numbers are reported, as in generation
        batched = self.batched and placement in ("fixed", "static") and split != "held_out"
        d_nll, d_top = (self.dense_batched if batched else self.dense)[split]
        if batched:
            nll, top = self.score_removed(chunks, layers, prefill_too=placement == "static")
            skip_ratio = len(layers) / self.L
        else:
            if placement == "static":
                self.r.set_policy("static", ffn_remove_layers=settings["ffn_remove_layers"])
            else:
                self.r.set_policy(True, **settings)
            self.r.reset_stats()
            nll, top = self.ev.score(chunks)
            skip_ratio = self.r.stats().skip_ratio
        assert len(nll) == len(d_nll)
        d = nll - d_nll
        se = float(np.std(d) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        t = Trial(name, placement, sorted(layers), fraction, settings, split, skip_ratio,
                  float(math.expm1(float(np.mean(d)))), float(np.mean(top == d_top)), len(nll),
                  float(math.expm1(float(np.mean(d)) + se)))
        if split != "held_out":
            self.trials.append(t)
        return t

    # -- configurations ------------------------------------------------------

    def fixed_settings(self, S) -> dict:
        """Gate settings skipping the layers in S on every decode token."""
        return self.gate_settings(S, {j: ALWAYS for j in S})

    def gate_settings(self, S, taus: dict[int, float]) -> dict:
        """Per-layer gate: layers in S may skip (threshold taus[j]), middle
        layers not in S are excluded, cold regions outside S; continuation
        off, one run per layer, budget |S|."""
        S = sorted(S)
        L = self.L
        th = [NEVER] * L
        for j in S:
            th[j] = float(taus[j])
        cs, ce = S[0], L - 1 - S[-1]
        return {"ffn_skip_threshold": th, "ffn_skip_cold_start": cs, "ffn_skip_cold_end": ce,
                "ffn_skip_exclude": [j for j in range(cs, L - ce) if j not in S],
                "ffn_skip_max_skip": len(S), "ffn_skip_max_runs": len(S), "ffn_skip_continue": False,
                "ffn_skip_warmup": WARMUP}

    def adaptive_taus(self, S, f: float) -> dict[int, float]:
        """Thresholds making each layer of S skip a fraction ``f`` of decode
        tokens, simulated on the dense profile: walking the layers in order,
        tau_j is the (1 - f) quantile of c_last (the cosine of the last layer
        that ran for that token) over the profile's tokens."""
        cos = self.cos
        S = sorted(S)
        if f >= 1.0 or len(cos) == 0:
            return {j: ALWAYS for j in S}
        clast = cos[:, S[0] - 1].astype(np.float64)
        taus = {}
        for j in range(S[0], S[-1] + 1):
            if j in S:
                tau = float(np.nanquantile(clast, 1.0 - f))
                taus[j] = tau
                fire = clast > tau
                clast = np.where(fire, clast, cos[:, j])
            else:
                clast = cos[:, j].astype(np.float64)
        return taus

    def fit_probe(self, layers: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Fit the probe signal of ``layers`` (docs/QUALITY.md, "Headroom").

        Measures, on the first ``probe_positions`` decode positions of
        ``n_seq`` search chunks, KL(p_dense || p_skip) of skipping each layer
        of ``layers`` for one token alone (``headroom.CellMeter``), and fits
        per layer a ridge regression (closed form, penalty by 4-fold
        cross-validation on Spearman) of log KL on u_j = h_j / |h_j|.

        Returns (w, scores): w float32 [L, n_embd + 1] (w_j then b_j; zeros
        for other layers), the probe's weights as ``ffn_skip_probe`` takes
        them; scores float64 [T, L], s_j = -(w_j . u_j + b_j) of the training
        tokens (the thresholds are quantiles of it).
        """
        from .headroom import CellMeter, ridge_cv

        n = self.P + 1 + self.probe_positions
        chunks = [c[:n] for c in self.search if len(c) >= n][: self.ev.n_seq]
        if not chunks:
            raise CalibrationError(f"no search chunk of {n} tokens to fit the probe")
        self._log(f"probe: {len(chunks) * self.probe_positions} tokens x layers {layers}")
        m = CellMeter(self.path, self.info.architecture, n_seq=self.ev.n_seq, prefill=self.P, chunk=n,
                      n_threads=self.n_threads)
        try:
            cells = m.measure(chunks, keep_hidden=True, progress=self.progress, layers=layers)
        finally:
            m.close()
        d = cells.U.shape[2]
        w = np.zeros((self.L, d + 1), np.float32)
        scores = np.full((len(cells.nll), self.L), np.nan)
        for j in layers:
            X = cells.U[:, j].astype(np.float64)
            wj, bj, _ = ridge_cv(X, np.log(np.maximum(cells.K[:, j].astype(np.float64), 1e-9)))
            w[j, :d], w[j, d] = wj, bj
            scores[:, j] = -(X @ wj + bj)
        return w, scores

    # -- the search ----------------------------------------------------------

    def run(self, *, quality_budget: float | None = DEFAULT_BUDGET, target_skip: float | None = None,
            backoff: int = 2) -> CalibrationResult:
        """Calibrate for a quality budget (largest skip ratio whose held-out
        perplexity increase is <= budget) or a target skip ratio (best proxy at
        that ratio). Returns the result; nothing is written.

        Raises CalibrationError on a budget outside (0, 10] or a target outside (0, 1).
        """
        _check_target(quality_budget, target_skip)
        if target_skip is not None:
            mode, target = "target_skip", float(target_skip)
            if target * self.L > self.L - 1:
                raise CalibrationError(f"target skip ratio {target} needs more than the {self.L - 1} layers "
                                       f"that can be gated (layer 0 cannot)")
        else:
            mode, target = "quality_budget", float(DEFAULT_BUDGET if quality_budget is None else quality_budget)
        L = self.L
        secs: dict[str, float] = {}
        self.trials: list[Trial] = []
        notes: list[str] = [
            f"search and single-layer splits: fixed and static trials scored in batches of {self.score_rows} "
            "positions against a dense pass scored the same way (Calibrator.score_removed); gated trials and every "
            "held-out number one token per decode" if self.batched else "every trial scored one token per decode"]

        t0 = time.perf_counter()
        self._log(f"dense pass: {len(self.search)} search chunks, {len(self.held)} held-out chunks")
        nll_s, top_s, self.cos = self._dense(self.search, profile=True)
        nll_h, top_h, _ = self._dense(self.held)
        self.dense = {"search": (nll_s, top_s), "held_out": (nll_h, top_h)}
        self.dense_batched = {}
        if self.batched:
            self.dense_batched = {k: self.score_removed(c, [], prefill_too=False)
                                  for k, c in (("search", self.search), ("sens", self.sens))}
            nll_x = self.dense_batched["sens"][0]
        else:
            self.dense["sens"] = self._dense(self.sens)[:2]
            nll_x = self.dense["sens"][0]
        profile = {
            "cos_mean": [float(np.nanmean(self.cos[:, j])) for j in range(L)],
            "cos_p10": [float(np.nanquantile(self.cos[:, j], 0.10)) for j in range(L)],
            "cos_p90": [float(np.nanquantile(self.cos[:, j], 0.90)) for j in range(L)],
        }
        secs["dense"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        self._log(f"single-layer sensitivity: {L - 1} layers x {len(nll_x)} tokens")
        single: list[float | None] = [None] * L
        for j in range(1, L):
            single[j] = self._measure(f"single {j}", "fixed", [j], 1.0, self.fixed_settings([j]), "sens").ppl_increase
        secs["single"] = time.perf_counter() - t0

        # greedy forward selection (search split)
        t0 = time.perf_counter()
        order = sorted(range(1, L), key=lambda j: (single[j], j))
        n_max = L - 1 if mode == "quality_budget" else min(L - 1, math.ceil(target * L) + 1)
        S: list[int] = []
        path: list[Trial] = []
        while len(S) < n_max:
            cands = [j for j in order if j not in S][: self.width]
            best = None
            for j in cands:
                t = self._measure(f"fixed {sorted(S + [j])}", "fixed", S + [j], 1.0, self.fixed_settings(S + [j]),
                                  "search")
                if best is None or t.ppl_increase < best.ppl_increase:
                    best = t
            S = list(best.layers)
            path.append(best)
            self._log(f"greedy {len(S)}: layers {S} skip {best.skip_ratio:.3f} ppl {best.ppl_increase:+.2%}")
            if mode == "quality_budget" and best.ppl_increase_hi > target:
                break
        secs["greedy"] = time.perf_counter() - t0

        # placements of the chosen size
        t0 = time.perf_counter()
        cands: list[Trial] = []  # feasible candidates in preference order
        if mode == "quality_budget":
            ok = [t for t in path if t.ppl_increase_hi <= target]
            n = len(ok)
            fixed_n = ok[-1] if ok else None
        else:
            n_t = target * L
            n = math.floor(n_t + 1e-9)
            fixed_n = path[n - 1] if 1 <= n <= len(path) and abs(n - n_t) < 1e-9 else None
        pool: list[Trial] = [fixed_n] if fixed_n is not None else []
        # adaptive gate on larger sets, at the same ratio and (budget mode) beyond it
        def grow(base: list[int], m: int) -> list[int]:
            # the greedy path's next layers first, then the single-layer order
            seq: list[int] = []
            for j in [j for t in path for j in t.layers] + order:
                if j not in base and j not in seq:
                    seq.append(j)
            return sorted(base + seq[:m])

        variants: list[tuple[list[int], float]] = []
        if mode == "quality_budget":
            base = list(fixed_n.layers) if fixed_n is not None else []
            if n:
                variants.append((grow(base, 1), n / (n + 1)))
            variants.append((grow(base, 1), (n + 0.5) / (n + 1)))
            variants.append((grow(base, 3), (n + 1) / (n + 3)))
        else:
            n_t = target * L
            k = math.ceil(n_t - 1e-9)
            if 1 <= k <= len(path):
                variants.append((path[k - 1].layers, n_t / k))
                variants.append((grow(path[k - 1].layers, 2), n_t / (k + 2)))
        for Sm, f in variants:
            if f >= 1.0 - 1e-9 or len(Sm) == 0 or any(t.layers == Sm and abs(t.fraction - f) < 1e-9 for t in pool):
                continue
            s = self.gate_settings(Sm, self.adaptive_taus(Sm, f))
            pool.append(self._measure(f"adaptive {Sm} f={f:.3f}", "adaptive", Sm, f, s, "search"))
        # the probe signal (issue 14) on the same sets and fractions
        probe_sets = [(Sm, f) for Sm, f in variants if 0.0 < f < 1.0 - 1e-9 and Sm]
        if self.probe and probe_sets:
            t1 = time.perf_counter()
            w, scores = self.fit_probe(sorted({j for Sm, _ in probe_sets for j in Sm}))
            secs["probe_fit"] = time.perf_counter() - t1
            for Sm, f in probe_sets:
                taus = {j: float(np.nanquantile(scores[:, j], 1.0 - f)) for j in Sm}
                s = self.gate_settings(Sm, taus)
                s.update({"ffn_skip_signal": "probe", "ffn_skip_probe": [float(x) for x in w.ravel()]})
                pool.append(self._measure(f"probe {Sm} f={f:.3f}", "probe", Sm, f, s, "search"))
        if fixed_n is not None and fixed_n.layers:
            s = {"ffn_remove_layers": list(fixed_n.layers)}
            pool.append(self._measure(f"static {fixed_n.layers}", "static", fixed_n.layers, 1.0, s, "search"))
        secs["placements"] = time.perf_counter() - t0

        if mode == "quality_budget":
            feas = [t for t in pool if t.ppl_increase_hi <= target]
            # smaller fixed sets of the path as fall-backs for the held-out check
            feas += [t for t in path[: max(0, n - 1)]]
            # one candidate per skip-ratio level (the lowest increase), largest
            # ratio first: a failed held-out check falls back to a smaller ratio
            best: dict[float, Trial] = {}
            for t in feas:
                lvl = round(t.skip_ratio, 3)
                if lvl not in best or t.ppl_increase < best[lvl].ppl_increase:
                    best[lvl] = t
            cands = [best[k] for k in sorted(best, reverse=True)]
        else:
            # within 20% of the target ratio (else the closest), then the lowest increase
            near = [t for t in pool if abs(t.skip_ratio - target) <= 0.2 * target]
            cands = sorted(near or sorted(pool, key=lambda t: abs(t.skip_ratio - target))[:1],
                           key=lambda t: t.ppl_increase)

        # held-out check
        t0 = time.perf_counter()
        chosen = None
        checked = 0
        held_done: dict[str, Trial] = {}
        for c in cands:
            h = self._measure(c.name, c.placement, c.layers, c.fraction, c.settings, "held_out")
            held_done[c.name] = h
            self._log(f"held-out: {c.name}: skip {h.skip_ratio:.3f} ppl {h.ppl_increase:+.2%}")
            if mode == "target_skip" or h.ppl_increase <= target:
                chosen = h
                break
            notes.append(f"{c.name}: {h.ppl_increase:+.2%} perplexity on held-out text, over budget; next candidate")
            checked += 1
            if checked > backoff:
                break
        if chosen is not None:
            notes.append(
                f"chosen: {chosen.name} ({chosen.placement}): "
                + ("the largest skip ratio within the budget on the search split (then the lowest increase), "
                   "confirmed on held-out text" if mode == "quality_budget" else
                   "the lowest increase near the target skip ratio on the search split")
                + "; search-split candidates: "
                + "; ".join(f"{t.name}: skip {t.skip_ratio:.3f}, {t.ppl_increase:+.2%}" for t in pool))
        if chosen is None:
            notes.append("no setting within the budget on held-out text: 0% (max_skip = 0, dense)")
            settings = {"ffn_skip_max_skip": 0, "ffn_skip_warmup": WARMUP}
            chosen = Trial("none", "none", [], 0.0, settings, "held_out", 0.0, 0.0, 1.0, len(nll_h))
        # comparisons at the chosen size: other placements, the paper's recipe at the same k
        # (every trial already measured on held-out text; else one trial per
        # placement other than the chosen one: in budget mode its best within
        # the budget on the search split (the candidate it would have been),
        # else its trial nearest the chosen skip ratio; one held-out pass each
        # keeps the 15-minute budget; with no setting chosen, every trial)
        comps: list[Trial] = [h for name, h in held_done.items() if name != chosen.name]
        seen = set(held_done) | {chosen.name}
        near: dict[str, Trial] = {}
        if chosen.placement == "none":
            near = {t.name: t for t in pool if t.name not in seen}
        else:
            order = cands if mode == "quality_budget" else []
            dist = lambda t: (abs(t.skip_ratio - chosen.skip_ratio), t.ppl_increase)  # noqa: E731
            for fam in dict.fromkeys(t.placement for t in pool):
                if fam == chosen.placement or any(c.placement == fam for c in comps):
                    continue
                best = next((t for t in order if t.placement == fam), None)
                if best is None:
                    best = min((t for t in pool if t.placement == fam), key=dist)
                if best.name not in seen:
                    near[best.name] = best
        for t in near.values():
            comps.append(self._measure(t.name, t.placement, t.layers, t.fraction, t.settings, "held_out"))
        # the paper's recipe (tau 0.95, fixed cold regions, continuation) on the
        # same held-out text: at the chosen k, and in budget mode k = 1, 2, ...
        # until it leaves the budget (the skip ratio it reaches within it)
        k0 = max(1, round(chosen.skip_ratio * L))
        ks = [k0] if mode == "target_skip" else list(range(1, L - 1))
        for k in ks:
            paper = policy.paper_preset(L)
            paper["ffn_skip_max_skip"] = k
            t = self._measure(f"paper k={k}", "paper", [], 0.0, paper, "held_out")
            comps.append(t)
            if mode == "quality_budget" and t.ppl_increase > target:
                break
        secs["held_out"] = time.perf_counter() - t0

        settings = dict(chosen.settings)
        if chosen.placement == "static":
            # removal only: the gate never fires (max_skip 0 -> no gate nodes, policy.to_c)
            settings = {"ffn_remove_layers": list(chosen.layers), "ffn_skip_max_skip": 0, "ffn_skip_warmup": WARMUP}
        return CalibrationResult(
            model=Path(self.path).name, architecture=self.info.architecture, n_layer=L, mode=mode, target=target,
            placement=chosen.placement, settings=settings, held_out=chosen, comparisons=comps, path=path,
            trials=self.trials, single_cost=single, profile=profile,
            tokens={"search": len(nll_s), "held_out": len(nll_h), "sensitivity": len(nll_x)},
            dense_ppl={"search": float(math.exp(np.mean(nll_s))), "held_out": float(math.exp(np.mean(nll_h)))},
            corpus_hash=self.corpus_hash, seconds={k: round(v, 1) for k, v in secs.items()}, notes=notes,
            tool=f"ffnskip-gguf {__version__} (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})",
            paper_within_budget=None if mode != "quality_budget" else max(
                [t.skip_ratio for t in comps if t.placement == "paper" and t.ppl_increase <= target], default=0.0),
        )


def write_calibrated(src, dst, result: CalibrationResult, progress: bool = True) -> Path:
    """Stream ``src`` to ``dst`` with the calibration's ``ffn_skip.*`` keys
    (earlier ``ffn_skip.*`` keys dropped; every other key and tensor
    unchanged). Raises ValueError when ``dst`` is ``src``."""
    from .gguf_io import copy_gguf

    from .metadata import KEY_FIT_N_LAYER, KEY_FIT_SHAPES, KEY_FIT_TYPES, check_model_file, ffn_fingerprints

    # what the settings were measured on: a pruned or different model is refused at load (metadata.calibration_fit)
    shapes, types = ffn_fingerprints(src)
    kv = dict(result.gguf_kv())
    kv[KEY_FIT_N_LAYER] = (int(check_model_file(src).n_layer), GGUFValueType.UINT32, None)
    kv[KEY_FIT_SHAPES] = (shapes, GGUFValueType.STRING, None)
    kv[KEY_FIT_TYPES] = (types, GGUFValueType.STRING, None)
    return copy_gguf(src, dst, set_kv=kv, remove_prefixes=("ffn_skip.",), progress=progress)


def write_report(result: CalibrationResult, out_dir) -> Path:
    """``calibration.json`` and ``calibration.png`` (per-layer cosine profile
    with p10/p90 band, single-layer costs, cold regions, excluded and skipped
    layers, thresholds, target vs achieved skip ratio) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result.to_json(), indent=1))
    L = result.n_layer
    x = np.arange(L)
    pr = result.profile
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax.fill_between(x, pr["cos_p10"], pr["cos_p90"], alpha=0.25, label="cos(h, o) p10-p90")
    ax.plot(x, pr["cos_mean"], "o-", ms=3, label="cos(h, o) mean (dense)")
    s = result.settings
    th = s.get("ffn_skip_threshold")
    layers = set(result.held_out.layers)
    if isinstance(th, list):
        tx = [j for j in range(L) if j in layers and -1.0 <= th[j] <= 1.0]
        if tx:
            ax.plot(tx, [th[j] for j in tx], "rv", label="threshold tau_j")
    for j in range(L):
        if j in layers:
            ax.axvspan(j - 0.5, j + 0.5, color="tab:green", alpha=0.15, lw=0)
    cs, ce = s.get("ffn_skip_cold_start"), s.get("ffn_skip_cold_end")
    if cs is not None and ce is not None:
        ax.axvspan(-0.5, cs - 0.5, color="gray", alpha=0.15, lw=0, label="cold regions")
        ax.axvspan(L - ce - 0.5, L - 0.5, color="gray", alpha=0.15, lw=0)
    ax.set_ylabel("cosine similarity")
    h = result.held_out
    ax.set_title(f"{result.model}: {result.mode} = {result.target:g}\n{h.placement} {sorted(layers)}: held-out skip "
                 f"{h.skip_ratio:.1%}, ppl {h.ppl_increase:+.1%}; green: layers that skip, "
                 f"white: excluded", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    sc = [c if c is not None else np.nan for c in result.single_cost]
    ax2.bar(x, np.array(sc) * 100)
    ax2.set_yscale("symlog", linthresh=10)
    ax2.set_ylabel("ppl increase, layer skipped alone (%)")
    ax2.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)
    return out


def format_summary(result: CalibrationResult) -> str:
    """Human-readable summary (CLI)."""
    h = result.held_out
    lines = [f"model {result.model} ({result.architecture}, {result.n_layer} layers), {result.mode} = {result.target:g}",
             f"chosen: {h.placement} layers {h.layers}" + (f" fraction {h.fraction:.2f}" if h.placement == "adaptive" else ""),
             f"held-out ({h.tokens} tokens): skip ratio {h.skip_ratio:.3f}, ppl {h.ppl_increase:+.2%}, "
             f"top-1 agreement {h.top1:.3f}"]
    for c in result.comparisons:
        lines.append(f"  vs {c.name:<40} skip {c.skip_ratio:.3f} ppl {c.ppl_increase:+.2%} top-1 {c.top1:.3f}")
    if result.paper_within_budget is not None:
        pw = result.paper_within_budget
        gain = f" ({h.skip_ratio / pw:.2f}x)" if pw > 0 else ""
        lines.append(f"within the budget on held-out text: calibrated {h.skip_ratio:.3f}, paper's recipe {pw:.3f}{gain}")
    lines += [f"  note: {n}" for n in result.notes]
    lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    return "\n".join(lines)


def calibrate(model, out, *, quality_budget: float | None = None, target_skip: float | None = None,
              corpus_files: list | None = None, tokens: int = 3072, held_out_tokens: int = 2048,
              report_dir=None, progress: bool = True, n_threads: int | None = None,
              probe: bool = True, score_rows: int = 64) -> CalibrationResult:
    """Calibrate ``model`` and write ``out`` (the CLI's ``calibrate``).

    ``score_rows``: ``Calibrator``'s positions per decode in batched scoring.

    Raises CalibrationError, ModelFileError, ValueError (out == model), OSError.
    """
    from .gguf_io import check_output_path
    from .models import resolve_model

    if quality_budget is not None and target_skip is not None:
        raise CalibrationError("give a quality budget or a target skip ratio, not both")
    _check_target(quality_budget, target_skip)
    src = resolve_model(model)
    dst = Path(out)
    check_output_path(src, dst)
    from .metadata import shard_paths

    if len(shard_paths(src)) > 1:  # before any work
        raise CalibrationError(f"{src} is a split GGUF ({len(shard_paths(src))} shards); calibrate writes one file "
                               "and would not copy the other shards: merge them first "
                               "(llama.cpp: llama-gguf-split --merge FIRST-SHARD OUT.gguf), then calibrate that file")
    if report_dir is not None:
        rd = Path(report_dir)
        if rd.exists() and not rd.is_dir():
            raise ValueError(f"report directory {rd} exists and is not a directory")
    if isinstance(corpus_files, (str, os.PathLike)):
        corpus_files = [corpus_files]
    corpus = None
    if corpus_files:
        corpus = []
        for p in corpus_files:
            p = Path(p)
            if not p.is_file():
                raise CalibrationError(f"corpus file {p} does not exist or is not a file")
            corpus.append(p.read_text(encoding="utf-8", errors="replace"))
    cal = Calibrator(src, corpus=corpus, tokens=tokens, held_out_tokens=held_out_tokens, progress=progress,
                     n_threads=n_threads, probe=probe, score_rows=score_rows)
    try:
        t0 = time.perf_counter()
        res = cal.run(quality_budget=quality_budget, target_skip=target_skip)
        res.seconds["total"] = round(time.perf_counter() - t0, 1)
    finally:
        cal.close()
    write_calibrated(src, dst, res, progress=progress)
    if report_dir is not None:
        write_report(res, report_dir)
    return res
