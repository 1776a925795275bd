"""Quality of FFN-skip settings against dense and the paper's baselines.

Library first (calibration reuses it as its quality proxy), CLI on top
(``ffnskip-gguf eval``). Metrics per configuration (issue 4):

- perplexity, teacher-forced, one token per ``llama_decode`` for every
  sequence, so the gate acts exactly as in generation (DESIGN.md section 3):
  the corpus is cut into chunks decoded as parallel sequences, each chunk's
  first ``prefill`` tokens (>= warm-up) are its prompt (dense), every later
  token is a decode token and is scored (NLL of the next token);
- greedy agreement with dense over a prompt set: mean agreed prefix length
  (fraction of the generated length) and fraction of identical continuations;
- factoid QA: greedy answers to ``data/qa.jsonl`` through the model's chat
  template, correct when an answer alias appears as a whole word;
- skip ratio and per-layer skip counts (the perplexity run's stats).

Baselines at the skip ratio an adaptive configuration measured (k = round(r L)):
``random`` (paper: a contiguous block of k FFNs starting at a random middle
layer, drawn per decode step with a fixed seed), ``static`` (the same block
for every token: the first k middle layers, i.e. the paper's placement
without the gate), ``shortgpt`` (ShortGPT-style static removal,
``ffn_remove_layers``, of the k FFNs with the highest mean cos(h, o) in the
dense pass; removed for every token, prefill included).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import policy
from .runner import Runner

EVAL_VERSION = 1


# --- data -----------------------------------------------------------------

def default_corpus() -> list[str]:
    """The project's corpus (data/corpus/*.txt: narrative, encyclopedic,
    dialogue, code, news and letters, history, explainers; ~3.6k tokens)."""
    d = files("ffnskip_gguf").joinpath("data/corpus")
    return [d.joinpath(n).read_text() for n in sorted(p.name for p in d.iterdir() if p.name.endswith(".txt"))]


def default_qa() -> list[dict]:
    """150 factoid questions with answer aliases (data/qa.jsonl)."""
    text = files("ffnskip_gguf").joinpath("data/qa.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def default_prompts() -> list[str]:
    text = files("ffnskip_gguf").joinpath("data/prompts.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


# --- configurations -------------------------------------------------------

@dataclass
class EvalConfig:
    """One configuration to evaluate.

    method: dense | gate | random | static | shortgpt
    settings: keyword settings for gate configurations (Llama keywords)
    ratio: target skip ratio of a baseline (k = round(ratio x L))
    """

    name: str
    method: str
    settings: dict = field(default_factory=dict)
    ratio: float = 0.0

    def key(self) -> str:
        return json.dumps({"m": self.method, "s": self.settings, "r": round(self.ratio, 6)}, sort_keys=True)


_GATE_KEYS = {"threshold": "ffn_skip_threshold", "tau": "ffn_skip_threshold", "k": "ffn_skip_max_skip",
              "cold": None, "cold_start": "ffn_skip_cold_start", "cold_end": "ffn_skip_cold_end",
              "exclude": "ffn_skip_exclude", "runs": "ffn_skip_max_runs", "continue": "ffn_skip_continue",
              "warmup": "ffn_skip_warmup", "remove": "ffn_remove_layers"}


def parse_config(spec: str, n_layer: int, file_settings: dict | None = None) -> EvalConfig:
    """Parse a configuration string.

    ``dense``; ``paper@R`` (the paper's recipe with k = round(R L));
    ``file`` (the calibration stored in the GGUF file);
    ``gate:threshold=0.97,k=6,cold=3,exclude=4+5,runs=2,continue=0``;
    ``random@R``, ``static@R``, ``shortgpt@R`` (baselines at skip ratio R).
    Raises ValueError on anything else.
    """
    spec = spec.strip()
    if spec == "dense":
        return EvalConfig("dense", "dense")
    if spec == "file":
        if not file_settings:
            raise ValueError("configuration 'file': the model file carries no ffn_skip.* calibration")
        return EvalConfig("calibrated (file)", "gate", dict(file_settings))
    m = re.fullmatch(r"(paper|random|static|shortgpt)@([0-9.]+)", spec)
    if m:
        r = float(m.group(2))
        if not 0.0 < r < 1.0:
            raise ValueError(f"skip ratio in {spec!r} must be in (0, 1)")
        if m.group(1) == "paper":
            s = policy.paper_preset(n_layer)
            s["ffn_skip_max_skip"] = max(1, round(r * n_layer))
            return EvalConfig(f"paper k={s['ffn_skip_max_skip']}", "gate", s)
        return EvalConfig(f"{m.group(1)} r={r:.3f}", m.group(1), {}, r)
    if spec.startswith("gate:"):
        s: dict[str, Any] = {}
        for part in spec[5:].split(","):
            if not part.strip():
                continue
            k, _, v = part.partition("=")
            k = k.strip()
            if k not in _GATE_KEYS:
                raise ValueError(f"unknown gate setting {k!r} in {spec!r} (known: {', '.join(_GATE_KEYS)})")
            try:
                if k in ("exclude", "remove"):
                    val: Any = [int(x) for x in v.split("+") if x]
                elif k in ("threshold", "tau"):
                    val = float(v)
                elif k == "continue":
                    val = v.strip().lower() in ("1", "true", "yes", "on")
                else:
                    val = int(v)
            except ValueError:
                raise ValueError(f"gate setting {k}={v!r} in {spec!r} is not a valid value") from None
            if k == "cold":
                s["ffn_skip_cold_start"] = s["ffn_skip_cold_end"] = val
            else:
                s[_GATE_KEYS[k]] = val
        return EvalConfig(f"gate {spec[5:]}", "gate", s)
    raise ValueError(f"cannot parse configuration {spec!r}")


# --- the harness ----------------------------------------------------------

@dataclass
class EvalResult:
    name: str
    method: str
    settings: dict
    ppl: float
    nll_mean: float
    tokens_scored: int
    skip_ratio: float
    skipped_per_layer: list
    decode_tokens: int
    cos_mean_per_layer: list
    agree_prefix: float | None = None     # mean agreed prefix / generated length
    agree_identical: float | None = None  # fraction of identical continuations
    qa_accuracy: float | None = None
    qa_skip_ratio: float | None = None
    ppl_increase: float | None = None     # ppl / dense ppl - 1
    greedy_tokens: list | None = None


class Evaluator:
    """Runs EvalConfigs on one model with a fixed corpus, prompt and QA set.

    Args:
        path: GGUF model.
        corpus: texts (each tokenized on its own, BOS first).
        chunk: tokens per perplexity chunk; prefill: prompt tokens of each
            chunk (dense; should be >= the warm-up of the configurations).
        n_seq: sequences decoded in parallel (one token each per step).
        prompts, qa: greedy-agreement prompts and QA items (None: skip metric).
        gen_tokens, qa_tokens: greedy lengths.
        max_tokens: cap on corpus tokens (quick mode / big models).
        progress: tqdm bars.
    """

    def __init__(self, path: str | Path, *, corpus: list[str] | None = None, chunk: int = 256, prefill: int = 32,
                 n_seq: int = 16, prompts: list[str] | None = None, qa: list[dict] | None = None,
                 gen_tokens: int = 64, qa_tokens: int = 24, max_tokens: int | None = None,
                 n_threads: int | None = None, progress: bool = True, seed: int = 0):
        if chunk < prefill + 2 or prefill < 1:
            raise ValueError(f"chunk ({chunk}) must exceed prefill ({prefill}) by at least 2, prefill >= 1")
        if not 1 <= n_seq <= 64:
            raise ValueError(f"n_seq must be in [1, 64], got {n_seq}")
        self.path = str(path)
        self.chunk, self.prefill, self.n_seq = chunk, prefill, n_seq
        self.gen_tokens, self.qa_tokens = gen_tokens, qa_tokens
        self.progress = progress
        self.seed = seed
        self.corpus = corpus if corpus is not None else default_corpus()
        self.prompts = prompts
        self.qa = qa
        # room for n_seq chunks, or n_seq prompts (QA: chat template + question) plus their generations
        self.r = Runner(self.path, n_ctx=n_seq * (max(chunk, 256) + max(gen_tokens, qa_tokens) + 16),
                        n_batch=max(512, n_seq * prefill), n_seq_max=n_seq, n_threads=n_threads)
        self.L = self.r.n_layer
        self.chunks = self._make_chunks(max_tokens)
        self.dense: EvalResult | None = None

    # data preparation
    def _make_chunks(self, max_tokens):
        chunks, total = [], 0
        for text in self.corpus:
            toks = self.r.tokenize(text, bos=True)
            for i in range(0, len(toks), self.chunk):
                c = toks[i:i + self.chunk]
                if len(c) >= self.prefill + 2:
                    if max_tokens is not None and total + len(c) > max_tokens:
                        c = c[: max(0, max_tokens - total)]
                        if len(c) < self.prefill + 2:
                            return chunks
                    chunks.append(c)
                    total += len(c)
        return chunks

    def corpus_hash(self) -> str:
        h = hashlib.sha256()
        for c in self.chunks:
            h.update(np.array(c, dtype=np.int32).tobytes())
        h.update(json.dumps([self.chunk, self.prefill, self.gen_tokens, self.qa_tokens, self.prompts, self.qa,
                             EVAL_VERSION]).encode())
        return h.hexdigest()[:16]

    def _bar(self, total, desc):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, unit="tok")

    # applying a configuration; returns a per-step hook for random placement
    def _apply(self, cfg: EvalConfig) -> Callable[[], None] | None:
        L = self.L
        if cfg.method == "dense":
            # never-firing gate on every layer (no cold regions): bit-identical
            # to dense, and records cos(h, o) of every layer (ShortGPT needs them)
            self.r.set_policy(True, ffn_skip_threshold=2.0, ffn_skip_warmup=0, ffn_skip_cold_start=0,
                              ffn_skip_cold_end=0)
            return None
        if cfg.method == "gate":
            self.r.set_policy(True, **cfg.settings)
            return None
        k = max(1, round(cfg.ratio * L))
        cold = policy.paper_cold(L, k)
        if cfg.method == "shortgpt":
            if self.dense is None:
                raise RuntimeError("shortgpt needs the dense pass first (its cosine profile)")
            cos = [c if c is not None else -2.0 for c in self.dense.cos_mean_per_layer]
            removed = sorted(sorted(range(L), key=lambda j: -cos[j])[:k])
            cfg.settings = {"ffn_remove_layers": removed}
            self.r.set_policy("static", ffn_remove_layers=removed)
            return None
        last_start = max(cold, L - cold - k)

        def place(start: int) -> None:
            taus = [2.0] * L
            taus[start] = -2.0
            # warm-up: the policy default, as for the gate configurations
            self.r.set_policy(True, ffn_skip_threshold=taus, ffn_skip_cold_start=1, ffn_skip_cold_end=0,
                              ffn_skip_max_skip=k, ffn_skip_max_runs=1, ffn_skip_continue=True)

        if cfg.method == "static":
            cfg.settings = {"block": [cold, cold + k]}
            place(cold)
            return None
        if cfg.method == "random":
            rng = random.Random(self.seed)
            cfg.settings = {"k": k, "start_range": [cold, last_start], "seed": self.seed}
            place(rng.randint(cold, last_start))
            return lambda: place(rng.randint(cold, last_start))
        raise ValueError(f"unknown method {cfg.method}")

    # metrics
    def _perplexity(self, step_hook) -> tuple[float, int]:
        nll, _ = self.score(self.chunks, step_hook)
        return float(nll.mean()) if len(nll) else 0.0, len(nll)

    def score(self, chunks: list[list[int]], step_hook=None,
              after_decode: Callable[[Runner], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced scoring of ``chunks`` under the policy in effect.

        Every chunk's first ``prefill`` tokens are its prompt (one ubatch,
        dense; kept from the previous call when the same, ``Runner.prompt``,
        bit-identical), every later token is decoded alone for its sequence, up to
        ``n_seq`` sequences per ``llama_decode`` (the gate acts as in
        generation). ``step_hook`` runs before every decode step (random
        baseline), ``after_decode(runner)`` after every decode of gated tokens
        (calibration reads the per-token trace there).

        Returns (nll, argmax): float64 and int32 arrays of equal length, one
        entry per scored token in a fixed order (chunk group, position,
        sequence): the negative log-likelihood (nats) of the next token and the
        model's top-1 prediction for it.
        """
        r, P = self.r, self.prefill
        nlls: list[np.ndarray] = []
        tops: list[np.ndarray] = []
        bar = self._bar(sum(len(c) - P for c in chunks), "perplexity")
        for g in range(0, len(chunks), self.n_seq):
            group = chunks[g:g + self.n_seq]
            logits = r.prompt([c[:P] for c in group])  # kept from the previous trial when the same
            last = {s: logits[s] for s in range(len(group))}
            for i in range(P, max(len(c) for c in group)):
                active = [s for s, c in enumerate(group) if i < len(c)]
                # score the prediction of token i of every active sequence at once
                rows = np.stack([last[s] for s in active]).astype(np.float64)
                m = rows.max(axis=1, keepdims=True)
                lse = (m[:, 0] + np.log(np.exp(rows - m).sum(axis=1)))
                tgt = rows[np.arange(len(active)), [group[s][i] for s in active]]
                nlls.append(lse - tgt)
                tops.append(rows.argmax(axis=1).astype(np.int32))
                if step_hook:
                    step_hook()
                active_next = [s for s in active if i + 1 < len(group[s])]
                if bar:
                    bar.update(len(active))
                if not active_next:
                    continue
                out = r.decode([(group[s][i], i, s, True) for s in active_next])
                if after_decode is not None:
                    after_decode(r)
                for q, s in enumerate(active_next):
                    last[s] = out[q]
        if bar:
            bar.close()
        if not nlls:
            return np.zeros(0), np.zeros(0, dtype=np.int32)
        return np.concatenate(nlls), np.concatenate(tops)

    def _greedy_parallel(self, prompt_toks: list[list[int]], n_new: int, step_hook, stop_eog: bool,
                         desc: str) -> list[list[int]]:
        r = self.r
        outs: list[list[int]] = []
        bar = self._bar(len(prompt_toks) * n_new, desc)
        for g in range(0, len(prompt_toks), self.n_seq):
            group = prompt_toks[g:g + self.n_seq]
            r.clear()
            items = [(tok, i, s, i == len(p) - 1) for s, p in enumerate(group) for i, tok in enumerate(p)]
            logits = r.decode(items)
            gen = [[] for _ in group]
            done = [False] * len(group)
            last = list(logits)
            for step in range(n_new):
                items = []
                for s, p in enumerate(group):
                    if done[s]:
                        continue
                    tok = int(np.argmax(last[s]))
                    gen[s].append(tok)
                    if stop_eog and r.is_eog(tok):
                        done[s] = True
                        continue
                    items.append((tok, len(p) + step, s, True))
                if step_hook:
                    step_hook()
                if not items or step == n_new - 1:
                    break
                out = r.decode(items)
                for q, it in enumerate(items):
                    last[it[2]] = out[q]
                if bar:
                    bar.update(len(items))
            outs.extend(gen)
        if bar:
            bar.close()
        return outs

    def _chat_formatter(self):
        """The model's chat template as a llama-cpp-python formatter (None: no template)."""
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        tmpl = self.r.meta("tokenizer.chat_template")
        if not tmpl:
            return None, ""
        bos_id = llama_cpp.llama_vocab_bos(self.r.vocab)
        eos_id = llama_cpp.llama_vocab_eos(self.r.vocab)
        bos = self.r.token_text(bos_id) if bos_id >= 0 else ""
        eos = self.r.token_text(eos_id) if eos_id >= 0 else ""
        return Jinja2ChatFormatter(tmpl, eos_token=eos, bos_token=bos), bos

    def _chat_prompt(self, question: str, fmt, bos: str) -> list[int]:
        if fmt is None:
            return self.r.tokenize(f"Question: {question}\nAnswer:", bos=True)
        text = fmt(messages=[{"role": "user", "content": question + " Answer in a few words."}]).prompt
        add_bos = not (bos and text.startswith(bos))
        return self.r.tokenize(text, bos=add_bos, special=True)

    def _qa(self, step_hook) -> float:
        fmt, bos = self._chat_formatter()
        prompts = [self._chat_prompt(x["q"], fmt, bos) for x in self.qa]
        answers = self._greedy_parallel(prompts, self.qa_tokens, step_hook, True, "qa")
        correct = 0
        for x, toks in zip(self.qa, answers):
            text = self.r.detokenize([t for t in toks if not self.r.is_eog(t)])
            if any(re.search(r"(?<![\w])" + re.escape(a) + r"(?![\w])", text, re.IGNORECASE) for a in x["a"]):
                correct += 1
        return correct / max(len(self.qa), 1)

    def run(self, cfg: EvalConfig) -> EvalResult:
        """Evaluate one configuration (dense first: baselines and agreement use it)."""
        hook = self._apply(cfg)
        self.r.reset_stats()
        nll, n = self._perplexity(hook)
        st = self.r.stats()
        res = EvalResult(cfg.name, cfg.method, dict(cfg.settings), math.exp(nll), nll, n, st.skip_ratio,
                         st.skipped_per_layer, st.decode_tokens, st.cos_mean_per_layer)
        if self.prompts:
            hook = self._apply(cfg)
            ptoks = [self.r.tokenize(p, bos=True) for p in self.prompts]
            res.greedy_tokens = self._greedy_parallel(ptoks, self.gen_tokens, hook, False, "greedy")
        if self.qa:
            hook = self._apply(cfg)
            self.r.reset_stats()
            res.qa_accuracy = self._qa(hook)
            res.qa_skip_ratio = self.r.stats().skip_ratio
        if cfg.method == "dense":
            res.skip_ratio = 0.0
            res.qa_skip_ratio = 0.0 if self.qa else None
            self.dense = res
        if self.dense is not None:
            res.ppl_increase = res.ppl / self.dense.ppl - 1.0
            if self.prompts and self.dense.greedy_tokens and res.greedy_tokens is not None:
                pre, same = [], 0
                for a, b in zip(res.greedy_tokens, self.dense.greedy_tokens):
                    k = 0
                    while k < min(len(a), len(b)) and a[k] == b[k]:
                        k += 1
                    pre.append(k / max(len(b), 1))
                    same += int(a == b)
                res.agree_prefix = float(np.mean(pre))
                res.agree_identical = same / len(pre)
        return res

    def close(self):
        self.r.close()


def model_fingerprint(path: str | Path) -> str:
    """sha256 of the file size and its first and last 8 MiB (fast, for cache keys)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(8 << 20))
        if size > 16 << 20:
            f.seek(size - (8 << 20))
            h.update(f.read(8 << 20))
    return h.hexdigest()[:16]


def expand_baselines(adaptive: list[EvalResult], methods=("random", "static", "shortgpt")) -> list[EvalConfig]:
    """Baseline configurations at the skip ratio each adaptive result measured."""
    out = []
    for res in adaptive:
        if res.skip_ratio <= 0:
            continue
        for m in methods:
            out.append(EvalConfig(f"{m} r={res.skip_ratio:.3f}", m, {}, res.skip_ratio))
    return out


def evaluate(path: str | Path, specs: list[str], *, out_dir: str | Path | None = None, baselines: bool = True,
             cache_dir: str | Path | None = None, file_settings: dict | None = None,
             **evaluator_kw) -> list[EvalResult]:
    """Evaluate configuration strings (see parse_config) plus, when
    ``baselines``, the three baselines at each adaptive configuration's
    measured skip ratio. Results are cached per (model fingerprint,
    configuration, corpus) in ``cache_dir`` so an interrupted run resumes.
    Writes results.json, results.md and quality_vs_skip.png to ``out_dir``."""
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)  # fail now, not after the evaluation
    ev = Evaluator(path, **evaluator_kw)
    L = ev.L
    try:
        cfgs = [parse_config(s, L, file_settings) for s in specs]
        for c in cfgs:  # validate every setting before the first (long) pass
            if c.method == "gate":
                policy.resolve("adaptive", L, {}, c.settings)
    except ValueError:
        ev.close()
        raise
    if not any(c.method == "dense" for c in cfgs):
        cfgs.insert(0, EvalConfig("dense", "dense"))
    cfgs.sort(key=lambda c: c.method != "dense")
    cdir = Path(cache_dir) if cache_dir else None
    from . import __version__, LIB_DIR

    lib_id = hashlib.sha256((LIB_DIR / "libllama.so").read_bytes() if (LIB_DIR / "libllama.so").exists() else b"").hexdigest()[:12]
    base_key = f"{model_fingerprint(path)}-{ev.corpus_hash()}-{__version__}-{lib_id}-{ev.n_seq}-{ev.chunk}"

    def cached_run(cfg: EvalConfig) -> EvalResult:
        f = None
        if cdir:
            k = hashlib.sha256((base_key + cfg.key()).encode()).hexdigest()[:20]
            f = cdir / f"{k}.json"
            if f.is_file():
                res = EvalResult(**json.loads(f.read_text()))
                if cfg.method == "dense":
                    ev.dense = res
                return res
        res = ev.run(cfg)
        if f:
            cdir.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(asdict(res)))
        return res

    results = [cached_run(c) for c in cfgs]
    if baselines:
        extra = expand_baselines([r for r in results if r.method == "gate"])
        results += [cached_run(c) for c in extra]
    ev.close()
    if out_dir:
        write_report(results, Path(out_dir), Path(path).name)
    return results


def format_table(results: list[EvalResult]) -> str:
    lines = ["| configuration | skip ratio | perplexity | vs dense | greedy agreed prefix | identical | QA accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        inc = f"{r.ppl_increase:+.1%}" if r.ppl_increase is not None and r.method != "dense" else ""
        ap = f"{r.agree_prefix:.2f}" if r.agree_prefix is not None else ""
        ai = f"{r.agree_identical:.2f}" if r.agree_identical is not None else ""
        qa = f"{r.qa_accuracy:.3f}" if r.qa_accuracy is not None else ""
        lines.append(f"| {r.name} | {r.skip_ratio:.3f} | {r.ppl:.3f} | {inc} | {ap} | {ai} | {qa} |")
    return "\n".join(lines)


def write_report(results: list[EvalResult], out: Path, model_name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    (out / "results.md").write_text(f"# {model_name}\n\n" + format_table(results) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = {"gate": ("o-", "adaptive gate"), "random": ("s--", "random block"),
               "static": ("^--", "static block"), "shortgpt": ("v--", "ShortGPT removal")}
    dense = next((r for r in results if r.method == "dense"), None)
    for m, (style, label) in methods.items():
        rs = sorted([r for r in results if r.method == m], key=lambda r: r.skip_ratio)
        if not rs:
            continue
        xs = [0.0] + [r.skip_ratio for r in rs] if dense else [r.skip_ratio for r in rs]
        ppl = ([0.0] if dense else []) + [100 * (r.ppl_increase or 0.0) for r in rs]
        axes[0].plot(xs, ppl, style, label=label)
        if all(r.qa_accuracy is not None for r in rs) and dense and dense.qa_accuracy is not None:
            axes[1].plot(xs, [dense.qa_accuracy] + [r.qa_accuracy for r in rs], style, label=label)
    axes[0].set_xlabel("measured skip ratio")
    axes[0].set_ylabel("perplexity increase vs dense (%)")
    axes[0].set_yscale("symlog", linthresh=10)
    axes[1].set_xlabel("measured skip ratio")
    axes[1].set_ylabel("factoid QA accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{model_name}: quality vs FFN skip ratio")
    fig.tight_layout()
    fig.savefig(out / "quality_vs_skip.png", dpi=110)
    plt.close(fig)
