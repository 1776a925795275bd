"""Decode speed, measured: dense vs FFN skipping vs static removal.

One process, one context, configurations alternated within every repeat,
median of repeats, reported as ratios to dense (DESIGN.md section 6). The
decode loop feeds a fixed text one token per ``llama_decode`` (teacher
forcing: no sampling, no Python beyond the call), so the numbers are the
engine's. Static removal of the same number of FFN blocks is the
zero-overhead reference for any skipping mechanism on the hardware at hand.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

from . import policy
from .metadata import check_model_file
from .runner import Runner

FFN_TENSORS = ("ffn_up", "ffn_gate", "ffn_down")


def ffn_byte_share(path: str | Path) -> float:
    """Share of decode weight bytes in FFN blocks: FFN up/gate/down bytes over
    all bytes a decode step reads (every block tensor plus the output head;
    the token embedding counts only when it doubles as the head). A split
    GGUF counts every shard (metadata.shard_paths)."""
    from .metadata import tensor_bytes_all

    tb = tensor_bytes_all(path)
    head = tb.get("output.weight", tb.get("token_embd.weight", 0))
    blocks = sum(v for k, v in tb.items() if k.startswith("blk."))
    ffn = sum(v for k, v in tb.items() if k.startswith("blk.") and k.split(".")[2] in FFN_TENSORS)
    return ffn / (blocks + head) if blocks + head else 0.0


def byte_bound_speedup(skip_ratio: float, ffn_share: float) -> float:
    """1 / (1 - skip_ratio x FFN share): the speedup if decode time were
    proportional to weight bytes read (DESIGN.md section 7)."""
    return 1.0 / (1.0 - skip_ratio * ffn_share)


@dataclass
class Config:
    name: str
    kind: str  # dense | gate | static
    kwargs: dict
    target: float = 0.0


@dataclass
class Row:
    name: str
    kind: str
    target: float
    skip_ratio: float
    tok_s: float
    ratio: float           # median over repeats of (tok/s / dense tok/s of the same repeat)
    ratios: list = field(default_factory=list)
    static_ratio: float | None = None   # static removal with the same FFN count
    gain_kept: float | None = None      # (ratio - 1) / (static_ratio - 1)
    byte_bound: float | None = None
    removed_layers: list | None = None


def _text_tokens(r: Runner, n: int) -> list[int]:
    text = files("ffnskip_gguf").joinpath("data/bench_prose.txt").read_text()
    toks = r.tokenize(text)
    while len(toks) < n:
        toks = toks + toks[1:]
    return toks[:n]


def _decode_run(r: Runner, tokens: list[int], n_prompt: int, n_decode: int) -> float:
    """Prefill n_prompt tokens, then decode n_decode tokens one at a time.
    Returns decode seconds."""
    r.clear()
    r.decode([(t, i, 0, i == n_prompt - 1) for i, t in enumerate(tokens[:n_prompt])])
    t0 = time.perf_counter()
    for i in range(n_prompt, n_prompt + n_decode):
        r.decode([(tokens[i], i, 0, True)])
    return time.perf_counter() - t0


def _prefill_run(r: Runner, tokens: list[int], n: int) -> float:
    r.clear()
    t0 = time.perf_counter()
    r.decode([(t, i, 0, i == n - 1) for i, t in enumerate(tokens[:n])])
    return time.perf_counter() - t0


def gate_kwargs(n_layer: int, target: float, threshold: float = 0.95) -> dict:
    """Paper-style gate settings aimed at skip ratio ``target``: tau
    ``threshold`` (paper: 0.95; below -1 every gated layer skips while the
    budget lasts), round(5 L / 32) cold layers each side (fewer when the
    target needs the room), continuation, one run, k = round(target x L),
    warm-up 0."""
    k = max(1, round(target * n_layer))
    cold = policy.paper_cold(n_layer, k)
    return dict(ffn_skip_threshold=threshold, ffn_skip_cold_start=cold, ffn_skip_cold_end=cold,
                ffn_skip_max_skip=k, ffn_skip_max_runs=1, ffn_skip_continue=True, ffn_skip_warmup=0)


def _alternate(r: Runner, configs: list[Config], tokens, repeats: int, n_prompt: int, n_decode: int,
               progress: bool):
    """Decode every config once per repeat, in order (the first is the
    reference: dense). Returns per-config decode seconds, ratios to the
    reference of the same repeat, and skip ratios."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=repeats * len(configs), desc="bench", unit="run", leave=False)
    times: dict[str, list[float]] = {c.name: [] for c in configs}
    ratios: dict[str, list[float]] = {c.name: [] for c in configs}
    skip: dict[str, float] = {}
    for rep in range(repeats):
        ref_s = None
        for c in configs:
            r.set_policy(**c.kwargs)
            _decode_run(r, tokens, n_prompt, min(4, n_decode))  # graph built, caches warm
            r.reset_stats()
            dt = _decode_run(r, tokens, n_prompt, n_decode)
            skip[c.name] = r.stats().skip_ratio
            times[c.name].append(dt)
            if ref_s is None:
                ref_s = dt
            ratios[c.name].append(ref_s / dt)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return times, ratios, skip


def compare(path: str | Path, configs: list[tuple[str, dict]], *, repeats: int = 7, n_prompt: int = 64,
            n_decode: int = 64, n_threads: int | None = None, progress: bool = True) -> list[dict]:
    """Decode speed of named settings against the first one (usually dense),
    alternated in one process (DESIGN.md section 6). ``configs``: (name,
    Runner.set_policy keywords). Returns per config: tok/s (median), the
    median ratio to the first config and every repeat's ratio (the spread),
    and the skip ratio."""
    if repeats < 1 or not configs:
        raise ValueError("need at least one repeat and one configuration")
    check_model_file(path, prefixes=())
    r = Runner(str(path), n_ctx=max(1024, n_prompt + n_decode + 8), n_threads=n_threads)
    try:
        tokens = _text_tokens(r, n_prompt + n_decode)
        cs = [Config(name, "dense" if i == 0 else "gate", kw) for i, (name, kw) in enumerate(configs)]
        times, ratios, skip = _alternate(r, cs, tokens, repeats, n_prompt, n_decode, progress)
    finally:
        r.close()
    return [{"name": c.name, "tok_s": n_decode / statistics.median(times[c.name]),
             "ratio": statistics.median(ratios[c.name]), "ratios": [round(x, 4) for x in ratios[c.name]],
             "skip_ratio": skip[c.name]} for c in cs]


def run_bench(path: str | Path, *, targets=(0.10, 0.25, 0.50), repeats: int = 5, n_prompt: int = 64,
              n_decode: int = 64, n_prefill: int = 256, n_threads: int | None = None,
              progress: bool = True, threshold: float = 0.95, n_gpu_layers: int | None = None) -> dict:
    """Benchmark decode and prefill of one model.

    Rows: dense; gate on but never firing (tau 2.0); for each target skip
    ratio, the gate (gate_kwargs) and static removal of the same number of
    FFN blocks (the layers the gate skipped most). Returns a dict with the
    rows, prefill tok/s (gate on vs off), the FFN byte share and settings.
    ``threshold`` is the gate's tau (gate_kwargs); ``n_gpu_layers`` as in
    Runner (None: llama.cpp's default).
    """
    if repeats < 1 or n_decode < 1 or n_prompt < 1 or n_prefill < 1:
        raise ValueError("repeats, n_decode, n_prompt and n_prefill must be >= 1")
    for t in targets:
        if not 0.0 < t < 1.0:
            raise ValueError(f"target skip ratios must be in (0, 1), got {t}")
    check_model_file(path, prefixes=())
    r = Runner(str(path), n_ctx=max(1024, n_prefill + 8, n_prompt + n_decode + 8), n_batch=max(256, n_prefill),
               n_threads=n_threads, n_gpu_layers=n_gpu_layers)
    L = r.n_layer
    tokens = _text_tokens(r, max(n_prompt + n_decode, n_prefill))
    share = ffn_byte_share(path)

    # calibrate the static rows: measure each gate config's skip ratio and layer use once
    configs = [Config("dense", "dense", dict(ffn_skip=False)),
               Config("gate, never fires", "gate", dict(ffn_skip=True, ffn_skip_threshold=2.0, ffn_skip_warmup=0))]
    gate_info = {}
    for tgt in targets:
        kw = dict(ffn_skip=True, **gate_kwargs(L, tgt, threshold))
        r.set_policy(**kw)
        r.reset_stats()
        _decode_run(r, tokens, n_prompt, n_decode)
        st = r.stats()
        n_removed = round(st.skip_ratio * L)
        by_use = sorted(range(L), key=lambda j: -st.skipped_per_layer[j])
        removed = sorted(by_use[:n_removed])
        gate_info[tgt] = (st.skip_ratio, removed)
        configs.append(Config(f"gate ~{tgt:.0%}", "gate", kw, tgt))
        configs.append(Config(f"static {n_removed} FFNs", "static",
                              dict(ffn_skip="static", ffn_remove_layers=removed), tgt))

    times, ratios, skip = _alternate(r, configs, tokens, repeats, n_prompt, n_decode, progress)

    rows = []
    by_name = {}
    for c in configs:
        tok_s = n_decode / statistics.median(times[c.name])
        row = Row(c.name, c.kind, c.target, skip[c.name], tok_s, statistics.median(ratios[c.name]),
                  [round(x, 4) for x in ratios[c.name]])
        if c.kind != "dense":
            row.byte_bound = byte_bound_speedup(row.skip_ratio, share)
        if c.kind == "static":
            row.removed_layers = c.kwargs["ffn_remove_layers"]
        rows.append(row)
        by_name[c.name] = row
    for tgt in targets:
        g = next(x for x in rows if x.kind == "gate" and x.target == tgt)
        s = next(x for x in rows if x.kind == "static" and x.target == tgt)
        g.static_ratio = s.ratio
        if s.ratio > 1.0:
            g.gain_kept = (g.ratio - 1.0) / (s.ratio - 1.0)

    # prefill: gate on (adaptive, never fires) vs off, alternating
    pre = {"off": [], "on": []}
    for rep in range(repeats):
        for mode, kw in (("off", dict(ffn_skip=False)),
                         ("on", dict(ffn_skip=True, **gate_kwargs(L, 0.25, threshold)))):
            r.set_policy(**kw)
            _prefill_run(r, tokens, n_prefill)
            pre[mode].append(_prefill_run(r, tokens, n_prefill))
    r.close()
    return {
        "model": str(path), "n_layer": L, "ffn_byte_share": share, "repeats": repeats,
        "n_prompt": n_prompt, "n_decode": n_decode, "n_prefill": n_prefill,
        "rows": [asdict(x) for x in rows],
        "prefill_tok_s_off": n_prefill / statistics.median(pre["off"]),
        "prefill_tok_s_on": n_prefill / statistics.median(pre["on"]),
        "prefill_ratio_on_off": statistics.median([a / b for a, b in zip(pre["off"], pre["on"])]),
    }


def format_table(res: dict) -> str:
    """Markdown table of a run_bench result."""
    lines = [
        f"model `{Path(res['model']).name}`, {res['n_layer']} layers, FFN share of decode weight bytes "
        f"{res['ffn_byte_share']:.2f}; decode {res['n_decode']} tokens after a {res['n_prompt']}-token prompt, "
        f"median of {res['repeats']} alternating repeats",
        "",
        "| configuration | skip ratio | decode tok/s | vs dense | static removal, same FFNs | gain kept | byte-bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        st = f"{r['static_ratio']:.3f}x" if r.get("static_ratio") else ""
        gk = f"{r['gain_kept']:.0%}" if r.get("gain_kept") is not None else ""
        bb = f"{r['byte_bound']:.3f}x" if r.get("byte_bound") else ""
        lines.append(f"| {r['name']} | {r['skip_ratio']:.3f} | {r['tok_s']:.1f} | {r['ratio']:.3f}x | {st} | {gk} | {bb} |")
    lines.append("")
    lines.append(f"prefill ({res['n_prefill']} tokens): gate off {res['prefill_tok_s_off']:.1f} tok/s, "
                 f"gate on {res['prefill_tok_s_on']:.1f} tok/s (on/off {res['prefill_ratio_on_off']:.3f}x)")
    return "\n".join(lines)
