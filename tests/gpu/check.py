"""The GPU check of the CUDA gate (issue 12): run by tests/gpu/check.sh on a
machine with an NVIDIA GPU and no network, after it has built the library
with GGML_CUDA=ON. Prints one table and writes it as JSON.

Rows (what each proves):
  - fallback: without FFNSKIP_CUDA_GATE=1 the CUDA model reports
    supported=False with the reason, and decodes exactly as dense;
  - op check: cpp/test-ffnskip-ops against the CPU op (its output is passed in);
  - exactness, SmolLM2 (cut to its first layers to fit the carried files):
    forced skips bit-identical to a copy with the skipped ffn_down zeroed and
    to static removal; a never-firing gate bit-identical to dense; the same
    with half the layers offloaded;
  - decisions: teacher-forced CUDA vs CPU (same process, n_gpu_layers=0),
    tolerance = 2x the measured dense CUDA-vs-CPU cosine difference (the rule
    of the Vulkan issue; tests/test_vulkan.py);
  - CUDA graphs: captures and replays (ggml-cuda's counters) over gated
    decode tokens whose decisions change;
  - speed, synthetic 7-8B llama (random Q4_0 blocks, written here): dense vs
    gate never firing, ~25% and ~50% skip, static removal of the same FFNs,
    same process, alternating (ffnskip_gguf.bench).

Targets (issue 12): never-fire overhead <= 2%, >= 85% of static removal's
gain at ~25% and ~50%, graphs replayed on >= 95% of decode tokens.

The model writers and the table formatting run on any machine
(tests/test_gpu_check.py).

    python tests/gpu/check.py --small SMOLLM2.gguf --work DIR [--ops-log FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROSE = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
         "combined movable metal type, an oil-based ink and a wooden screw press. Within fifty years "
         "printing had spread to more than two hundred cities across Europe.")

# shape of the synthetic model: Llama-3-8B's blocks (32 layers, d 4096,
# FFN 14336, GQA 32/8 heads) with the tokenizer of the small model
LLAMA8B = dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8)
QK4_0 = 32           # weights per Q4_0 block (ggml-common.h)
Q4_0_BYTES = 18      # fp16 scale + 16 bytes of 4-bit quants


# --- model files (CPU only) ---------------------------------------------------

def q4_0_random(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q4_0 weights of shape [rows, cols] as raw blocks, uint8
    [rows, cols / 32 * 18]: each block a finite fp16 scale and 16 random
    bytes of quants (no quantizer run). The scale is 1 / (4.6 sqrt(cols))
    +-25%: a quant (q - 8) has std ~4.6, so a row's dot product with a
    unit-RMS input has std ~1 and the residual stream stays finite.
    Raises ValueError when cols is not a multiple of 32."""
    if cols % QK4_0:
        raise ValueError(f"Q4_0 needs a multiple of {QK4_0} columns, got {cols}")
    nb = rows * cols // QK4_0
    blocks = np.empty((nb, Q4_0_BYTES), np.uint8)
    scale = 1.0 / (4.6 * math.sqrt(cols))
    d = (scale * (0.75 + 0.5 * rng.random(nb, dtype=np.float32))).astype(np.float16)
    assert np.isfinite(d).all()
    blocks[:, :2] = d.view(np.uint8).reshape(nb, 2)
    blocks[:, 2:] = np.frombuffer(rng.bytes(nb * 16), np.uint8).reshape(nb, 16)
    return blocks.reshape(rows, cols // QK4_0 * Q4_0_BYTES)


def write_synthetic_llama(path: str | os.PathLike, tokenizer_from: str | os.PathLike, *, n_layer: int,
                          n_embd: int, n_ff: int, n_head: int, n_head_kv: int, seed: int = 0) -> Path:
    """Write a llama-architecture GGUF with random Q4_0 weights (norms F32
    ones) and the tokenizer (every ``tokenizer.*`` key) of ``tokenizer_from``,
    whose vocabulary sets the embedding size. Deterministic in ``seed``.
    Returns the path. Raises ValueError on shapes Q4_0 or the heads cannot take."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError(f"n_embd={n_embd}, n_head={n_head}, n_head_kv={n_head_kv} do not divide")
    tok = GGUFReader(tokenizer_from, "r")
    tokens = tok.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{tokenizer_from} has no tokenizer.ggml.tokens")
    n_vocab = len(tokens.data)
    hd = n_embd // n_head
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), arch="llama")
    w.add_name(f"ffnskip synthetic llama {n_layer}x{n_embd} (random Q4_0)")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(2)  # LLAMA_FTYPE_MOSTLY_Q4_0
    for f in tok.fields.values():
        if f.name.startswith("tokenizer."):
            vt = f.types[0]
            w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1] if vt == GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(seed)
    q = GGMLQuantizationType.Q4_0
    ones = np.ones(n_embd, np.float32)
    w.add_tensor("token_embd.weight", q4_0_random(rng, n_vocab, n_embd), raw_dtype=q)
    for j in range(n_layer):
        b = f"blk.{j}."
        w.add_tensor(b + "attn_norm.weight", ones)
        w.add_tensor(b + "attn_q.weight", q4_0_random(rng, n_embd, n_embd), raw_dtype=q)
        w.add_tensor(b + "attn_k.weight", q4_0_random(rng, n_head_kv * hd, n_embd), raw_dtype=q)
        w.add_tensor(b + "attn_v.weight", q4_0_random(rng, n_head_kv * hd, n_embd), raw_dtype=q)
        w.add_tensor(b + "attn_output.weight", q4_0_random(rng, n_embd, n_embd), raw_dtype=q)
        w.add_tensor(b + "ffn_norm.weight", ones)
        w.add_tensor(b + "ffn_gate.weight", q4_0_random(rng, n_ff, n_embd), raw_dtype=q)
        w.add_tensor(b + "ffn_up.weight", q4_0_random(rng, n_ff, n_embd), raw_dtype=q)
        w.add_tensor(b + "ffn_down.weight", q4_0_random(rng, n_embd, n_ff), raw_dtype=q)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", q4_0_random(rng, n_vocab, n_embd), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def cut_layers(src: str | os.PathLike, dst: str | os.PathLike, n_layer: int) -> Path:
    """Copy ``src`` keeping its first ``n_layer`` blocks (a real model made
    small enough to carry; its later layers and their weights are left out).
    Raises ValueError when the model has fewer layers."""
    from gguf import GGUFReader, GGUFValueType

    from ffnskip_gguf.gguf_io import copy_gguf

    r = GGUFReader(src, "r")
    arch = r.fields["general.architecture"].contents()
    have = int(r.fields[f"{arch}.block_count"].contents())
    if not 1 <= n_layer <= have:
        raise ValueError(f"{src} has {have} layers; cannot keep {n_layer}")
    del r

    def keep(name: str) -> bool:
        return not name.startswith("blk.") or int(name.split(".")[1]) < n_layer

    return copy_gguf(src, dst, keep_tensor=keep,
                     set_kv={f"{arch}.block_count": (n_layer, GGUFValueType.UINT32, None)})


# --- the table (CPU only) -------------------------------------------------------

def format_table(res: dict) -> str:
    """Markdown table of a check result (dict of main(); keys absent when a
    row did not run). Each row: what was measured, the value, the target,
    and PASS / FAIL / "-" (no target)."""
    rows = []

    def row(name, value, target="", ok=None):
        rows.append((name, value, target, "-" if ok is None else ("PASS" if ok else "FAIL")))

    if "device" in res:
        row("device", res["device"])
    if "fallback" in res:
        f = res["fallback"]
        row("gate off by default: supported=False, reason", f["reason"][:60], "dense, with reason",
            (not f["supported"]) and f["bit_identical_to_dense"])
    if "supported" in res:
        row("gate supported with FFNSKIP_CUDA_GATE=1", str(res["supported"]), "True", bool(res["supported"]))
    if "ops" in res:
        o = res["ops"]
        row("op check vs CPU (test-ffnskip-ops CUDA0)", f"{o['passed']}/{o['total']}", "all", o["passed"] == o["total"] > 0)
    for key, label in (("forced_vs_zeroed", "forced skips == zeroed ffn_down (bits)"),
                       ("forced_vs_static", "forced skips == static removal (bits)"),
                       ("never_fire_vs_dense", "never-fire == dense (bits)"),
                       ("partial_forced_vs_zeroed", "partial offload: forced == zeroed (bits)")):
        if key in res:
            row(label, "equal" if res[key] else "DIFFER", "equal", bool(res[key]))
    if "decisions" in res:
        d = res["decisions"]
        row("CUDA vs CPU decisions (teacher forced)",
            f"{d['compared']} equal, tol {d['tol']:.1e}" + ("" if d["stop"] is None else f", near-tau stop at {d['stop']}"),
            "equal up to a near-tau cosine", d["ok"])
    if "graphs" in res:
        g = res["graphs"]
        computes = g["replays"] + g["captures"] + g["eager"]
        share = g["replays"] / max(1, computes)
        row("CUDA graphs over gated decode", f"{g['replays']}/{computes} CUDA computes replayed ({g['captures']} captures, "
            f"{g['eager']} eager) over {g['decode_tokens']} tokens, {g['distinct_decision_rows']} decision patterns, "
            f"skip {g['skip_ratio']:.2f}", ">= 95% replayed while decisions change",
            share >= 0.95 and computes >= g["decode_tokens"] > 0 and g["distinct_decision_rows"] >= 2
            and 0.0 < g["skip_ratio"] < 1.0)
    for name in res.get("missing", []):
        row(f"row missing: {name}", "not run", "present", False)
    if "speed" in res:
        s = res["speed"]
        for r in s["rows"]:
            target, ok = "", None
            if r["kind"] == "gate" and not r.get("target"):
                target, ok = "overhead <= 2%", r["ratio"] >= 0.98
            elif r["kind"] == "gate":
                target = ">= 85% of static's gain"
                ok = r.get("gain_kept") is not None and r["gain_kept"] >= 0.85
            kept = f", {r['gain_kept']:.0%} of static's gain" if r.get("gain_kept") is not None else ""
            row(f"{s['model_name']}: {r['name']}", f"{r['tok_s']:.1f} tok/s, {r['ratio']:.3f}x, skip {r['skip_ratio']:.3f}{kept}",
                target, ok)
    out = ["| check | measured | target | result |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


# --- the GPU rows ------------------------------------------------------------------

def parse_ops_log(text: str) -> dict:
    """passed/total from test-ffnskip-ops' last line ("N/M cases passed")."""
    import re

    m = re.findall(r"(\d+)\s*/\s*(\d+)\s+cases passed", text)
    if not m:
        return {"passed": 0, "total": 0}
    p, t = m[-1]
    return {"passed": int(p), "total": int(t)}


def _same_bits(a, b) -> bool:
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


def _forcing(forced, L):
    return dict(ffn_skip_cold_start=0, ffn_skip_cold_end=0, ffn_skip_threshold=-2.0,
                ffn_skip_exclude=[j for j in range(L) if j not in forced], ffn_skip_max_skip=L,
                ffn_skip_max_runs=L, ffn_skip_continue=False, ffn_skip_warmup=0)


def _one_by_one(r, tokens):
    r.clear()
    return np.concatenate([r.decode([(t, i, 0, True)]) for i, t in enumerate(tokens)])


def _cuda_device_name() -> str:
    import ctypes

    from ffnskip_gguf._libpath import find_lib_dir

    g = ctypes.CDLL(str(find_lib_dir() / "libggml.so"))
    g.ggml_backend_dev_count.restype = ctypes.c_size_t
    g.ggml_backend_dev_get.restype = ctypes.c_void_p
    g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for f in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(g, f).restype = ctypes.c_char_p
        getattr(g, f).argtypes = [ctypes.c_void_p]
    for i in range(g.ggml_backend_dev_count()):
        d = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_name(d).decode().startswith("CUDA"):
            return g.ggml_backend_dev_description(d).decode()
    raise RuntimeError("no CUDA device: this check needs the GGML_CUDA=ON build and a GPU")


def run_fallback(small: str) -> dict:
    """Gate off by default on CUDA (FFNSKIP_CUDA_GATE unset): unsupported,
    with the reason, and exactly dense."""
    from ffnskip_gguf.runner import Runner

    saved = os.environ.pop("FFNSKIP_CUDA_GATE", None)
    try:
        r = Runner(small, n_gpu_layers=-1)
        toks = r.tokenize(PROSE)[:24]
        r.set_policy(False)
        dense = _one_by_one(r, toks)
        r.set_policy(True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0)
        gated = _one_by_one(r, toks)
        st = r.stats()
        r.close()
    finally:
        if saved is not None:
            os.environ["FFNSKIP_CUDA_GATE"] = saved
    return {"supported": st.supported, "reason": st.reason, "bit_identical_to_dense": _same_bits(dense, gated)}


def run_exactness(small: str, work: Path) -> dict:
    """Forced skips vs zeroed ffn_down and static removal; never-fire vs
    dense; partial offload (half the layers)."""
    from ffnskip_gguf.gguf_io import copy_gguf
    from ffnskip_gguf.runner import Runner

    out = {}
    g = Runner(small, n_gpu_layers=-1)
    L = g.n_layer
    forced = list(range(2, L - 2, 2))
    names = {f"blk.{j}.ffn_down.weight" for j in forced}
    zpath = copy_gguf(small, work / "zeroed.gguf", tensor_data=lambda n, d: np.zeros_like(d) if n in names else d)
    toks = g.tokenize(PROSE)[:16]
    g.set_policy(True, **_forcing(forced, L))
    a = _one_by_one(g, toks)
    st = g.stats()
    g.set_policy("static", ffn_remove_layers=forced)
    s = _one_by_one(g, toks)
    g.set_policy(False)
    dense = _one_by_one(g, toks)
    g.set_policy(True, ffn_skip_threshold=2.0, ffn_skip_warmup=0)
    never = _one_by_one(g, toks)
    g.close()
    z = Runner(str(zpath), n_gpu_layers=-1)
    z.set_policy(False)
    b = _one_by_one(z, toks)
    z.close()
    out["supported"] = st.supported
    out["forced_vs_zeroed"] = _same_bits(a, b) and st.skipped_per_layer == [len(toks) if j in forced else 0 for j in range(L)]
    out["forced_vs_static"] = _same_bits(a, s)
    out["never_fire_vs_dense"] = _same_bits(never, dense)
    half = L // 2
    p = Runner(small, n_gpu_layers=half)
    p.set_policy(True, **_forcing(forced, L))
    pa = _one_by_one(p, toks)
    p.close()
    pz = Runner(str(zpath), n_gpu_layers=half)
    pz.set_policy(False)
    pb = _one_by_one(pz, toks)
    pz.close()
    out["partial_forced_vs_zeroed"] = _same_bits(pa, pb)
    return out


def _forced_trace(r, prompt, forced_tokens):
    r.clear()
    r.decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    dec, cos = [], []
    for k, t in enumerate(forced_tokens):
        r.decode([(t, len(prompt) + k, 0, True)])
        d, c = r.trace()
        dec.append(np.asarray(d[0]).astype(int))
        cos.append(np.asarray(c[0], np.float64))
    return np.array(dec), np.array(cos)


def compare_decisions(gdec, gcos, cdec, ccos, taus, lo, hi, tol):
    """Teacher-forced decisions agree up to the first decision that differs
    where its deciding cosine is within tol of the threshold (the rule of
    tests/test_vulkan.py). Returns (decisions compared, stop or None, ok)."""
    compared = 0
    for s in range(gdec.shape[0]):
        for j in range(lo, hi):
            ran = [i for i in range(j) if cdec[s][i] == 0 and not math.isnan(ccos[s][i])]
            c = ccos[s][ran[-1]] if ran else math.nan
            if not math.isnan(c) and abs(c - taus[j]) < tol:
                if gdec[s][j] != cdec[s][j]:
                    return compared, (s, j), True
                continue
            if gdec[s][j] != cdec[s][j]:
                return compared, (s, j), False
            if not (math.isnan(ccos[s][j]) and math.isnan(gcos[s][j])) and not abs(gcos[s][j] - ccos[s][j]) <= tol:
                return compared, (s, j), False
            compared += 1
    return compared, None, True


def run_decisions(small: str, n_new: int = 12) -> dict:
    """CUDA vs CPU (same build, n_gpu_layers=0) on the same tokens."""
    from ffnskip_gguf.runner import Runner

    g = Runner(small, n_gpu_layers=-1)
    c = Runner(small, n_gpu_layers=0)
    L = g.n_layer
    prompt = g.tokenize(PROSE)[:24]
    never = dict(ffn_skip_threshold=2.0, ffn_skip_warmup=0)
    g.set_policy(True, **never)
    toks, _, _ = g.greedy(prompt, n_new)
    forced = toks[len(prompt):]
    _, gcos0 = _forced_trace(g, prompt, forced)
    c.set_policy(True, **never)
    _, ccos0 = _forced_trace(c, prompt, forced)
    both = ~np.isnan(gcos0) & ~np.isnan(ccos0)
    diff = np.abs(gcos0 - ccos0)[both]
    tol = max(2.0 * float(diff.max()), 1e-5) if diff.size else 1e-5
    taus = []
    for j in range(L):
        v = np.sort(ccos0[:, j][~np.isnan(ccos0[:, j])])
        if len(v) < 4:
            taus.append(0.95)
            continue
        lo, hi = int(0.2 * len(v)), int(0.8 * len(v))
        k = lo + int(np.argmax(np.diff(v[lo:hi + 1])))
        taus.append(float((v[k] + v[k + 1]) / 2))
    cold = 2 if L >= 8 else 1
    pol = dict(ffn_skip_threshold=taus, ffn_skip_cold_start=cold, ffn_skip_cold_end=cold,
               ffn_skip_max_skip=max(1, L // 3), ffn_skip_max_runs=3, ffn_skip_continue=False, ffn_skip_warmup=0)
    g.set_policy(True, **pol)
    gdec, gcos = _forced_trace(g, prompt, forced)
    c.set_policy(True, **pol)
    cdec, ccos = _forced_trace(c, prompt, forced)
    g.close()
    c.close()
    compared, stop, ok = compare_decisions(gdec, gcos, cdec, ccos, taus, cold, L - cold, tol)
    upto = gdec[: stop[0]] if stop else gdec
    mixed = bool((upto[:, cold:L - cold] == 1).any() and (upto[:, cold:L - cold] == 0).any())
    return {"compared": compared, "stop": stop, "tol": tol, "dense_cos_diff_max": float(diff.max()) if diff.size else 0.0,
            "skips_and_runs": mixed, "ok": ok and mixed and compared > 0}


def run_graphs(small: str, n_new: int = 48) -> dict:
    """Captures and replays of ggml-cuda over gated decode tokens whose
    decisions change (counted after the prompt and 4 warm-up decodes: the
    first decodes of a new graph run eager, then it is captured)."""
    from ffnskip_gguf.runner import Runner
    from ffnskip_gguf.stats import cuda_graph_counts

    r = Runner(small, n_gpu_layers=-1)
    L = r.n_layer
    prompt = r.tokenize(PROSE)[:24]
    r.set_policy(True, ffn_skip_threshold=0.9, ffn_skip_cold_start=1, ffn_skip_cold_end=1,
                 ffn_skip_max_skip=max(1, L // 3), ffn_skip_warmup=0)
    r.clear()
    logits = r.decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    state = {"pos": len(prompt), "tok": int(np.argmax(logits[-1]))}
    decisions = set()

    def step():
        lg = r.decode([(state["tok"], state["pos"], 0, True)])
        state["pos"] += 1
        state["tok"] = int(np.argmax(lg[-1]))
        d, _ = r.trace()
        decisions.add(tuple(np.asarray(d[0]).tolist()))

    for _ in range(4):
        step()
    before = cuda_graph_counts()
    r.reset_stats()
    decisions.clear()
    for _ in range(n_new):
        step()
    after = cuda_graph_counts()
    st = r.stats()
    r.close()
    if before is None or after is None:
        return {}  # no CUDA backend (--dry-run-cpu): the loop ran, nothing to count
    out = {k: after[k] - before[k] for k in after}
    out["decode_tokens"] = st.decode_tokens
    out["distinct_decision_rows"] = len(decisions)
    out["skip_ratio"] = st.skip_ratio
    return out


def run_speed(big: str, repeats: int, n_decode: int) -> dict:
    """ffnskip_gguf.bench on the synthetic model with tau -1 (every gated
    layer skips while the budget lasts: deterministic skip ratios)."""
    from ffnskip_gguf.bench import run_bench

    res = run_bench(big, targets=(0.25, 0.50), repeats=repeats, n_prompt=32, n_decode=n_decode,
                    n_prefill=128, threshold=-1.0, n_gpu_layers=-1, progress=False)
    res["model_name"] = "synthetic 8B Q4_0"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", required=True, help="SmolLM2 (cut) GGUF: exactness, decisions, graphs")
    ap.add_argument("--work", required=True, help="scratch directory (the synthetic model: ~4.2 GB)")
    ap.add_argument("--ops-log", help="output of test-ffnskip-ops CUDA0")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-decode", type=int, default=64)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="only the speed rows (tests/gpu/check.sh speed)")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="run the rows on a CPU-only build (tests/test_gpu_check.py): no device, no fallback or graph rows")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    import ffnskip_gguf  # noqa: F401  (loads the CUDA build named by FFNSKIP_GGUF_LIB_PATH)

    res: dict = {"device": "CPU (dry run)" if a.dry_run_cpu else _cuda_device_name()}
    t0 = time.time()
    if not a.dry_run_cpu and not a.speed_only:
        res["fallback"] = run_fallback(a.small)
    saved = os.environ.get("FFNSKIP_CUDA_GATE")
    os.environ["FFNSKIP_CUDA_GATE"] = "1"  # the rows below test the gate itself
    try:
        _gated_rows(a, res, work)
    finally:
        if saved is None:
            os.environ.pop("FFNSKIP_CUDA_GATE", None)
        else:
            os.environ["FFNSKIP_CUDA_GATE"] = saved
    if not a.dry_run_cpu:
        required = [] if a.speed_only else ["fallback", "supported", "ops", "forced_vs_zeroed", "forced_vs_static",
                                            "never_fire_vs_dense", "partial_forced_vs_zeroed", "decisions", "graphs"]
        required += [] if a.skip_speed else ["speed"]
        res["missing"] = [k for k in required if k not in res]
    res["seconds"] = round(time.time() - t0, 1)
    table = format_table(res)
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0 if "FAIL" not in table else 1


def _gated_rows(a, res: dict, work: Path) -> None:
    if a.ops_log and not a.speed_only:
        res["ops"] = parse_ops_log(Path(a.ops_log).read_text(errors="replace"))
    if not a.speed_only:
        res.update(run_exactness(a.small, work))
        res["decisions"] = run_decisions(a.small)
        graphs = run_graphs(a.small)
        if graphs:
            res["graphs"] = graphs
    if not a.skip_speed:
        big = work / "synthetic-8b-q4_0.gguf"
        if not big.exists():
            ts = time.time()
            write_synthetic_llama(big, a.small, **LLAMA8B)
            res["synth_seconds"] = round(time.time() - ts, 1)
        res["speed"] = run_speed(str(big), a.repeats, a.n_decode)


if __name__ == "__main__":
    sys.exit(main())
