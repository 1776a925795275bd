"""The FFN gate in the graph on the CPU backend (DESIGN.md section 3, issue 3):
exact semantics against a Python oracle, forced skips against zeroed
weights, bit-exact dense paths, batch independence, adaptivity, stats,
graph reuse, validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from ffnskip_gguf import Llama, policy
from ffnskip_gguf.gguf_io import copy_gguf

from _lowlevel import Runner
from _oracle import CallbackOracle

PROSE = "The history of the printing press begins in the fifteenth century, when"
N_NEW = 32


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    r = Runner(smollm2_path, n_seq_max=4)
    yield r
    r.close()


def _gate_vs_oracle(path: str, arch: str, warmup: int = 4):
    g = Runner(path)
    s = g.set_policy(True, preset=policy.paper_preset(g.n_layer), ffn_skip_warmup=warmup)
    prompt = g.tokenize(PROSE)
    toks, logits, traces = g.greedy(prompt, N_NEW)
    o = CallbackOracle(path, arch)
    o.set_settings(s)
    otoks, ologits, odec, ocos = o.greedy(prompt, N_NEW)
    gdec = np.array([tr[0][0] for tr in traces]) != 0
    gcos = np.array([tr[1][0] for tr in traces])
    g.close()
    o.runner.close()
    return s, (toks, logits, gdec, gcos), (otoks, ologits, odec, ocos)


def _first_disagreement_is_at_threshold(s, gdec, odec, ocos):
    """Decisions may differ only where the deciding cosine is within 1e-5 of tau."""
    taus = s.threshold if isinstance(s.threshold, list) else [s.threshold] * gdec.shape[1]
    for t in range(gdec.shape[0]):
        diff = np.nonzero(gdec[t] != odec[t])[0]
        if len(diff):
            j = diff[0]
            ran = [i for i in range(j) if not odec[t][i]]
            c = ocos[t][ran[-1]] if ran else math.nan
            return abs(c - taus[j]) < 1e-5
    return True


@pytest.fixture(scope="module")
def qwen3_synthetic_path(qwen_path, tmp_path_factory):
    """No Qwen3 model is available offline: Qwen2.5-0.5B's weights as a qwen3
    model (architecture renamed, per-head Q/K RMS-norm weights of ones added).
    Not a good language model, but it runs llama.cpp's qwen3 graph."""
    from gguf import GGUFReader

    r = GGUFReader(qwen_path)
    L = int(r.fields["qwen2.block_count"].contents())
    head = int(r.fields["qwen2.embedding_length"].contents()) // int(r.fields["qwen2.attention.head_count"].contents())
    extra = {}
    for j in range(L):
        extra[f"blk.{j}.attn_q_norm.weight"] = np.ones(head, dtype=np.float32)
        extra[f"blk.{j}.attn_k_norm.weight"] = np.ones(head, dtype=np.float32)
    return str(copy_gguf(qwen_path, tmp_path_factory.mktemp("qwen3") / "qwen3-synthetic.gguf",
                         rename_arch="qwen3", extra_tensors=extra))


@pytest.mark.parametrize("model,arch", [("smollm2_path", "llama"), ("qwen_path", "qwen2"), ("gemma_path", "gemma3"),
                                        ("qwen3_synthetic_path", "qwen3")])
def test_gate_matches_the_callback_oracle(request, model, arch):
    path = request.getfixturevalue(model)
    s, (toks, logits, gdec, gcos), (otoks, ologits, odec, ocos) = _gate_vs_oracle(path, arch)
    assert gdec.any(), "the paper preset should skip something"
    if np.array_equal(gdec, odec):
        assert toks == otoks
        assert np.array_equal(logits.view(np.uint32), ologits.view(np.uint32))
        # the gate observes the cosines of layers cold_start-1 .. L-cold_end-1 where the FFN ran
        m = ~np.isnan(gcos)
        assert m.any() and not (m & np.isnan(ocos)).any()
        assert np.max(np.abs(gcos[m] - ocos[m])) < 1e-5
    else:
        assert _first_disagreement_is_at_threshold(s, gdec, odec, ocos)


def _forcing(forced, L):
    """Policy that skips exactly the FFNs of ``forced`` on every token: no cold
    regions, every other layer excluded, tau below any cosine, no runs."""
    return dict(ffn_skip_cold_start=0, ffn_skip_cold_end=0, ffn_skip_threshold=-2.0,
                ffn_skip_exclude=[j for j in range(L) if j not in forced], ffn_skip_max_skip=L,
                ffn_skip_max_runs=L, ffn_skip_continue=False, ffn_skip_warmup=0)


def _zeroed_down_copy(src, dst, layers):
    names = {f"blk.{j}.ffn_down.weight" for j in layers}
    return copy_gguf(src, dst, tensor_data=lambda n, d: np.zeros_like(d) if n in names else d)


def _decode_one_by_one(r: Runner, tokens):
    r.clear()
    return np.concatenate([r.decode([(t, i, 0, True)]) for i, t in enumerate(tokens)])


def test_forced_skip_equals_zeroed_ffn_down(smollm2_path, tmp_path):
    L = 30
    forced = list(range(6, 24, 2))  # every other middle layer
    zeroed = Runner(str(_zeroed_down_copy(smollm2_path, tmp_path / "zeroed.gguf", forced)))
    zeroed.set_policy(False)
    g = Runner(smollm2_path)
    g.set_policy(True, **_forcing(forced, L))
    tokens = g.tokenize(PROSE)
    a = _decode_one_by_one(g, tokens)
    b = _decode_one_by_one(zeroed, tokens)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    dec, _ = g.trace()
    assert sorted(np.nonzero(dec[0] == 1)[0].tolist()) == forced
    st = g.stats()
    assert st.skipped_per_layer == [len(tokens) if j in forced else 0 for j in range(L)]


def test_static_removal_equals_zeroed_ffn_down(smollm2_path, tmp_path):
    removed = [8, 9, 15, 20]
    zeroed = Runner(str(_zeroed_down_copy(smollm2_path, tmp_path / "zeroed2.gguf", removed)))
    zeroed.set_policy(False)
    for mode in ("static", True):
        g = Runner(smollm2_path)
        g.set_policy(mode, ffn_remove_layers=removed, ffn_skip_threshold=2.0)
        tokens = g.tokenize(PROSE)
        # a prefill batch: removal applies to every token
        g.clear()
        zeroed.clear()
        a = g.decode([(t, i, 0, True) for i, t in enumerate(tokens)])
        b = zeroed.decode([(t, i, 0, True) for i, t in enumerate(tokens)])
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        g.decode([(int(np.argmax(a[-1])), len(tokens), 0, True)])
        st = g.stats()
        assert st.decode_tokens == 1
        assert st.skipped_per_layer == [1 if j in removed else 0 for j in range(30)]
        g.close()


def test_never_firing_threshold_is_bit_identical_to_dense(smollm2):
    prompt = smollm2.tokenize(PROSE)
    smollm2.set_policy(False)
    t0, l0, _ = smollm2.greedy(prompt, 16)
    smollm2.set_policy(True, ffn_skip_threshold=1.5, ffn_skip_warmup=0)
    t1, l1, tr = smollm2.greedy(prompt, 16)
    assert t0 == t1
    assert np.array_equal(l0.view(np.uint32), l1.view(np.uint32))
    assert all((d[0] == 0).all() for d, _ in tr)


def _batched_run(r: Runner, prompts, steps, policy_kw, forced_tokens=None):
    """Prefill each sequence, then decode one token per sequence per step in
    one ubatch. Returns per-sequence decisions and logits per step."""
    r.set_policy(**policy_kw)
    r.clear()
    pos = []
    last = []
    for s, p in enumerate(prompts):
        lg = r.decode([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)])
        pos.append(len(p))
        last.append(lg[-1])
    decisions = [[] for _ in prompts]
    logits = [[] for _ in prompts]
    for step in range(steps):
        items = []
        for s in range(len(prompts)):
            tok = forced_tokens[s][step] if forced_tokens else int(np.argmax(last[s]))
            items.append((tok, pos[s], s, True))
            pos[s] += 1
        lg = r.decode(items)
        dec, _ = r.trace()
        for s in range(len(prompts)):
            # dense (ffn_skip=False) records no trace (what trace() holds is an
            # earlier run's): no decisions
            decisions[s].append(dec[s] if policy_kw.get("ffn_skip", True) else np.zeros(r.n_layer, np.uint8))
            logits[s].append(lg[s])
            last[s] = lg[s]
    return np.array(decisions), np.array(logits)


PROMPTS = ["The history of the printing press begins", "def fibonacci(n):\n    ", "Water boils at 100 degrees"]


def test_batched_decisions_do_not_depend_on_the_rest_of_the_ubatch(smollm2):
    kw = dict(ffn_skip=True, ffn_skip_warmup=4, ffn_skip_threshold=0.965, ffn_skip_max_skip=8)
    prompts = [smollm2.tokenize(p) for p in PROMPTS]
    alone = []
    toks = []
    for p in prompts:
        smollm2.set_policy(**kw)
        t, _, tr = smollm2.greedy(p, 12)
        alone.append(np.array([d[0] for d, _ in tr]))
        toks.append(t[len(p):])
    together, _ = _batched_run(smollm2, prompts, 12, kw, forced_tokens=toks)
    skipped_any = False
    for s in range(len(prompts)):
        assert np.array_equal(together[s] != 0, alone[s] != 0), f"sequence {s}"
        skipped_any = skipped_any or (alone[s] == 1).any()
    assert skipped_any


def test_batched_never_firing_is_bit_identical_to_dense(smollm2):
    prompts = [smollm2.tokenize(p) for p in PROMPTS]
    _, dense = _batched_run(smollm2, prompts, 6, dict(ffn_skip=False))
    _, gated = _batched_run(smollm2, prompts, 6, dict(ffn_skip=True, ffn_skip_threshold=1.5, ffn_skip_warmup=0))
    assert np.array_equal(dense.view(np.uint32), gated.view(np.uint32))


@pytest.mark.parametrize("model", ["smollm2_path", "qwen_path"])
def test_paper_preset_is_input_adaptive(request, model):
    path = request.getfixturevalue(model)
    r = Runner(path)
    r.set_policy(True, preset=policy.paper_preset(r.n_layer), ffn_skip_warmup=4)
    prompt = r.tokenize(PROSE + " the craft of bookmaking changed. Meanwhile, in the kitchen, the soup")
    r.greedy(prompt, 48)
    st = r.stats()
    frac = [st.skipped_per_layer[j] / st.decode_tokens for j in range(r.n_layer)]
    strictly_between = [f for f in frac if 0.0 < f < 1.0]
    assert len(strictly_between) >= 2, frac
    assert len(set(round(f, 6) for f in frac)) >= 3, frac
    r.close()


def test_stats_are_consistent(smollm2):
    smollm2.set_policy(True, preset=policy.paper_preset(30), ffn_skip_warmup=8)
    from ffnskip_gguf import _lib

    _lib.ffnskip_reset_stats(smollm2.ctx)
    prompt = smollm2.tokenize(PROSE)
    smollm2.greedy(prompt, 20)
    st = smollm2.stats()
    assert st.decode_tokens == 20  # prefill excluded, warm-up decode tokens included
    assert st.skipped + st.run == 30 * st.decode_tokens
    for j in range(30):
        assert st.skipped_per_layer[j] + st.run_per_layer[j] == st.decode_tokens
    assert st.skip_ratio == pytest.approx(st.skipped / (30 * 20))
    # positions < warmup (8) run dense: prompt is longer than 8 here, so every decode token is gated
    assert st.skipped > 0
    # cold layers never skip
    assert all(st.skipped_per_layer[j] == 0 for j in list(range(5)) + list(range(25, 30)))
    # cosine means exist exactly where a gate node observed a layer that ran:
    # layers cold_start-1 .. L-cold_end-1 (gate nodes exist only for the middle)
    for j in range(30):
        observed = 4 <= j <= 24 and st.run_per_layer[j] > 0
        assert (st.cos_mean_per_layer[j] is not None) == observed, j


def test_warmup_counts_positions(smollm2):
    smollm2.set_policy(True, ffn_skip_threshold=-2.0, ffn_skip_warmup=10, ffn_skip_max_skip=5)
    from ffnskip_gguf import _lib

    _lib.ffnskip_reset_stats(smollm2.ctx)
    smollm2.clear()
    toks = smollm2.tokenize(PROSE)[:12]
    for i, t in enumerate(toks):  # every token a decode token, positions 0..11
        smollm2.decode([(t, i, 0, True)])
    st = smollm2.stats()
    assert st.decode_tokens == 12
    assert st.skipped == 2 * 5  # only positions 10 and 11 are gated, k = 5 each


def test_graph_is_reused_while_skipping(smollm2):
    # continuation off and a tau near the cosines: decisions vary from token to token
    smollm2.set_policy(True, ffn_skip_threshold=0.97, ffn_skip_continue=False, ffn_skip_max_runs=30,
                       ffn_skip_max_skip=10, ffn_skip_warmup=0)
    prompt = smollm2.tokenize(PROSE)
    smollm2.greedy(prompt, 4)  # first graphs built
    before = smollm2.n_reused()
    _, _, tr = smollm2.greedy(prompt, 24)
    after = smollm2.n_reused()
    decisions = {tuple(d[0]) for d, _ in tr}
    assert len(decisions) > 1  # decisions changed between tokens ...
    assert after - before >= 23  # ... and the decode graph was still reused


def test_unsupported_architecture_warns_and_decodes_dense(smollm2_path, tmp_path):
    p = copy_gguf(smollm2_path, tmp_path / "ernie4_5.gguf", rename_arch="ernie4_5")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        llm = Llama(str(p), n_ctx=256, verbose=False, ffn_skip=True, ffn_skip_warmup=0)
    msgs = [str(x.message) for x in w if "decoding dense" in str(x.message)]
    assert len(msgs) == 1 and "ernie4_5" in msgs[0]
    llm("The capital of France is", max_tokens=4, temperature=0)
    st = llm.ffn_skip_stats()
    assert not st.supported and "ernie4_5" in st.reason
    assert st.skipped == 0


@pytest.mark.parametrize("kw,match", [
    (dict(ffn_skip_threshold=float("nan")), "ffn_skip_threshold"),
    (dict(ffn_skip_threshold=float("inf")), "ffn_skip_threshold"),
    (dict(ffn_skip_threshold=[0.9] * 29), "ffn_skip_threshold"),
    (dict(ffn_skip_max_skip=-1), "ffn_skip_max_skip"),
    (dict(ffn_skip_cold_start=20, ffn_skip_cold_end=20), "cold"),
    (dict(ffn_skip_cold_start=31), "ffn_skip_cold_start"),
    (dict(ffn_skip_cold_end=-1), "ffn_skip_cold_end"),
    (dict(ffn_skip_warmup=-1), "ffn_skip_warmup"),
    (dict(ffn_skip_max_runs=0), "ffn_skip_max_runs"),
    (dict(ffn_skip_exclude=[30]), "ffn_skip_exclude"),
    (dict(ffn_remove_layers=[-1]), "ffn_remove_layers"),
    (dict(ffn_skip_max_skip=2.5), "ffn_skip_max_skip"),
    (dict(ffn_skip="sometimes"), "ffn_skip"),
])
def test_invalid_settings_raise_value_error_naming_the_argument(smollm2_path, kw, match):
    with pytest.raises(ValueError, match=match):
        Llama(smollm2_path, n_ctx=64, verbose=False, **{"ffn_skip": True, **kw})


def test_invalid_set_ffn_skip_changes_nothing(smollm2_path):
    llm = Llama(smollm2_path, n_ctx=64, verbose=False, ffn_skip=True, ffn_skip_max_skip=4)
    with pytest.raises(ValueError, match="ffn_skip_threshold"):
        llm.set_ffn_skip(ffn_skip_threshold=float("nan"))
    p = llm.ffn_skip_params()
    assert p.max_skip == 4 and p.threshold == pytest.approx(0.95) and p.sources["ffn_skip_max_skip"] == "argument"


def test_params_report_their_source(smollm2_path):
    llm = Llama(smollm2_path, n_ctx=64, verbose=False, ffn_skip="paper", ffn_skip_warmup=8)
    p = llm.ffn_skip_params()
    assert p.sources["ffn_skip_warmup"] == "argument"
    assert p.sources["ffn_skip_max_skip"] == "preset" and p.max_skip == 8  # round(0.25 * 30)
    assert p.sources["ffn_remove_layers"] == "default"


def test_llama_reset_keeps_stats_and_reset_clears_them(smollm2_path):
    llm = Llama(smollm2_path, n_ctx=256, verbose=False, ffn_skip=True, ffn_skip_warmup=0, seed=0)
    llm("Once upon a time", max_tokens=6, temperature=0)
    n = llm.ffn_skip_stats().decode_tokens
    assert n >= 5
    llm.reset()
    assert llm.ffn_skip_stats().decode_tokens == n
    llm.reset_ffn_skip_stats()
    assert llm.ffn_skip_stats().decode_tokens == 0


def _float_ffn_copy(src, dst, zero_down_layers=()):
    """SmolLM2 with FFN weights dequantized: F16 in even layers, F32 in odd ones."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    zero = {f"blk.{j}.ffn_down.weight" for j in zero_down_layers}

    def conv(t):
        parts = t.name.split(".")
        if len(parts) < 3 or parts[2] not in ("ffn_up", "ffn_gate", "ffn_down"):
            return None
        f = dequantize(t.data, t.tensor_type)
        if t.name in zero:
            f = np.zeros_like(f)
        if int(parts[1]) % 2 == 0:
            return f.astype(np.float16), GGMLQuantizationType.F16
        return f.astype(np.float32), GGMLQuantizationType.F32

    return copy_gguf(src, dst, tensor_convert=conv)


def test_f16_and_f32_ffn_weights_skip_exactly(smollm2_path, tmp_path):
    L = 30
    forced = [9, 12, 15, 18]  # F32, F16, F32, F16
    fp = _float_ffn_copy(smollm2_path, tmp_path / "float.gguf")
    zp = _float_ffn_copy(smollm2_path, tmp_path / "float-zeroed.gguf", forced)
    g = Runner(str(fp))
    z = Runner(str(zp))
    z.set_policy(False)
    tokens = g.tokenize(PROSE)[:12]
    g.set_policy(False)
    dense = _decode_one_by_one(g, tokens)
    g.set_policy(True, ffn_skip_threshold=2.0, ffn_skip_warmup=0)
    assert np.array_equal(_decode_one_by_one(g, tokens).view(np.uint32), dense.view(np.uint32))
    g.set_policy(True, **_forcing(forced, L))
    a = _decode_one_by_one(g, tokens)
    b = _decode_one_by_one(z, tokens)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert not np.array_equal(a.view(np.uint32), dense.view(np.uint32))
    g.close()
    z.close()


def test_prompts_split_across_ubatches_stay_prefill(smollm2_path):
    """A multi-sequence batch is split by llama.cpp into ubatches with equal
    tokens per sequence; prompt tokens that land alone in a ubatch are still
    prefill (decode tokens are the only token of their sequence in the batch)."""
    r = Runner(smollm2_path, n_seq_max=4)
    r.set_policy(True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0)  # skips whatever is gated
    r.reset_stats()
    base = r.tokenize(PROSE + " and so the story goes on and on")
    prompts = [base[:n] for n in (20, 23, 27, 31)]  # uneven lengths
    r.clear()
    r.decode([(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
    st = r.stats()
    assert st.decode_tokens == 0 and st.skipped == 0
    # one decode token of sequence 0 together with a new prompt of sequence 1
    r.decode([(base[20], 20, 0, True)] + [(t, 23 + i, 1, i == 4) for i, t in enumerate(base[23:28])])
    st = r.stats()
    assert st.decode_tokens == 1
    r.close()


def _ffn_down_bias_copy(src, dst, zero_down_layers=()):
    """SmolLM2 with an ffn_down bias in every layer (small random values), and
    optionally zeroed down weights and biases in some layers."""
    from gguf import GGUFReader

    rng = np.random.default_rng(0)
    L = 30
    n_embd = int(GGUFReader(src).fields["llama.embedding_length"].contents())
    extra = {}
    for j in range(L):
        b = (rng.standard_normal(n_embd) * 0.05).astype(np.float32)
        extra[f"blk.{j}.ffn_down.bias"] = np.zeros_like(b) if j in zero_down_layers else b
    names = {f"blk.{j}.ffn_down.weight" for j in zero_down_layers}
    return copy_gguf(src, dst, extra_tensors=extra, tensor_data=lambda n, d: np.zeros_like(d) if n in names else d)


def test_ffn_with_bias_is_masked_to_exact_zero(smollm2_path, tmp_path):
    """With an FFN bias a skipped matmul alone would leave the bias: the
    per-token mask makes the skipped FFN contribute exactly zero."""
    L = 30
    forced = [7, 11, 16]
    g = Runner(str(_ffn_down_bias_copy(smollm2_path, tmp_path / "bias.gguf")))
    z = Runner(str(_ffn_down_bias_copy(smollm2_path, tmp_path / "bias-zeroed.gguf", forced)))
    z.set_policy(False)
    g.set_policy(True, **_forcing(forced, L))
    tokens = g.tokenize(PROSE)[:10]
    a = _decode_one_by_one(g, tokens)
    b = _decode_one_by_one(z, tokens)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    g.close()
    z.close()


def test_methods_after_close_raise_instead_of_crashing(smollm2_path):
    llm = Llama(smollm2_path, n_ctx=64, verbose=False, ffn_skip=True)
    llm.close()
    for call in (llm.ffn_skip_stats, llm.reset_ffn_skip_stats, lambda: llm.set_ffn_skip(False), llm.ffn_skip_trace):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_set_ffn_skip_rejected_by_the_library_changes_nothing(smollm2_path):
    from ffnskip_gguf import _lib
    import ctypes

    llm = Llama(smollm2_path, n_ctx=64, verbose=False, ffn_skip=True, ffn_skip_max_skip=4)
    with pytest.raises(ValueError, match="ffn_skip_threshold"):
        llm.set_ffn_skip(ffn_skip_threshold=1e39)  # finite in Python, inf as a C float
    p = _lib.ffnskip_params()
    _lib.ffnskip_get_params(llm._ffn_ctx, ctypes.byref(p))
    assert p.max_skip == 4 and abs(p.threshold[10] - 0.95) < 1e-6 and p.mode == _lib.FFNSKIP_MODE_ADAPTIVE
    assert llm.ffn_skip_params().threshold == pytest.approx(0.95)
    llm.set_ffn_skip(False)
    _lib.ffnskip_get_params(llm._ffn_ctx, ctypes.byref(p))
    assert p.mode == _lib.FFNSKIP_MODE_OFF
