"""The gate on every hooked architecture (issue 15), on tests/synth.py's tiny
random-weight models: supported, never-fire bit-identical to dense, forced
skips bit-identical to zeroed FFN down projections (MoE: experts, shared
expert, down biases) and to static removal, and decisions equal to the
pure-Python state machine fed with cosines computed here from the residual
stream read through the eval callback, with per-layer thresholds at the
observed median cosine (both skips and runs occur)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from _lowlevel import Runner, f32_rows, ggml_tensor
from _oracle import PolicyEmulation
from ffnskip_gguf import policy
from ffnskip_gguf.gguf_io import copy_gguf
from synth import ARCHS, write_synthetic

N_LAYER = 6
TOKENS = [1, 40, 66, 71, 80, 99, 120, 7, 33, 250, 12, 61, 200, 5, 77, 140]

# the tensor each builder gives ffnskip_ffn_begin (h_j) and ffnskip_ffn_end
# (o_j), by their eval-callback names (patches/0003)
H_NAME = {"gemma2": "sa_out", "gemma3": "sa_out", "gemma4": "attn_out", "qwen35": "attn_residual",
          "qwen35moe": "attn_residual"}
O_NAME = {"gemma4": "pe_in"}  # gemma4: before the per-layer input; elsewhere l_out

# tensors whose zeros remove FFN j's output (dense down, experts' down and its
# bias, shared expert's down)
DOWN = ("ffn_down.weight", "ffn_down.bias", "ffn_down_exps.weight", "ffn_down_exps.bias", "ffn_down_shexp.weight")


def _runner(path, **kw):
    kw.setdefault("n_threads", 1)  # tiny models: threads only add barrier waits
    return Runner(str(path), **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("archs")
    return {a: write_synthetic(a, d / f"{a}.gguf", seed=3, n_layer=N_LAYER) for a in ARCHS}


def _one_by_one(r, tokens=TOKENS):
    r.clear()
    return np.concatenate([r.decode([(t, i, 0, True)]) for i, t in enumerate(tokens)])


def _forcing(forced, L):
    return dict(ffn_skip_cold_start=0, ffn_skip_cold_end=0, ffn_skip_threshold=-2.0,
                ffn_skip_exclude=[j for j in range(L) if j not in forced], ffn_skip_max_skip=L,
                ffn_skip_max_runs=L, ffn_skip_continue=False, ffn_skip_warmup=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_is_supported(models, arch):
    r = _runner(models[arch])
    r.set_policy(True)
    st = r.stats()
    r.close()
    assert st.supported, st.reason
    assert st.reason == ""


@pytest.mark.parametrize("arch", ARCHS)
def test_never_firing_gate_is_bit_identical_to_dense(models, arch):
    dense = _runner(models[arch])
    dense.set_policy(False)
    a = _one_by_one(dense)
    gate = _runner(models[arch])
    gate.set_policy(True, ffn_skip_threshold=2.0, ffn_skip_warmup=0, ffn_skip_cold_start=1, ffn_skip_cold_end=0)
    b = _one_by_one(gate)
    dec, cos = gate.trace()
    st = gate.stats()
    dense.close()
    gate.close()
    assert np.isfinite(a).all()
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert st.skipped == 0 and st.decode_tokens == len(TOKENS)
    assert np.isfinite(cos[0, :N_LAYER - 1]).all()  # the gate saw every layer's cosine


@pytest.mark.parametrize("arch", ARCHS)
def test_forced_skip_equals_zeroed_ffn_down_and_static_removal(models, arch, tmp_path):
    forced = [2, 4]
    names = {f"blk.{j}.{t}" for j in forced for t in DOWN}
    zp = copy_gguf(models[arch], tmp_path / "zeroed.gguf",
                   tensor_data=lambda n, d: np.zeros_like(d) if n in names else d)
    zeroed = _runner(zp)
    zeroed.set_policy(False)
    ref = _one_by_one(zeroed)
    g = _runner(models[arch])
    g.set_policy(True, **_forcing(forced, N_LAYER))
    a = _one_by_one(g)
    dec, _ = g.trace()
    st = g.stats()
    assert np.array_equal(a.view(np.uint32), ref.view(np.uint32))
    assert sorted(np.nonzero(dec[0] == 1)[0].tolist()) == forced
    assert st.skipped_per_layer == [len(TOKENS) if j in forced else 0 for j in range(N_LAYER)]
    # static removal: the same FFNs left out of the graph (a prefill batch)
    g.set_policy("static", ffn_remove_layers=forced)
    g.clear()
    zeroed.clear()
    b = g.decode([(t, i, 0, True) for i, t in enumerate(TOKENS)])
    c = zeroed.decode([(t, i, 0, True) for i, t in enumerate(TOKENS)])
    assert np.array_equal(b.view(np.uint32), c.view(np.uint32))
    g.close()
    zeroed.close()
    # the forced skip changed the output (the FFNs were not already zero)
    dense = _runner(models[arch])
    dense.set_policy(False)
    assert not np.array_equal(_one_by_one(dense), ref)
    dense.close()


class _Capture:
    """Eval callback keeping h_j and o_j (last row: the decoded token)."""

    def __init__(self, arch):
        self.names = {H_NAME.get(arch, "ffn_inp"): "h", O_NAME.get(arch, "l_out"): "o"}
        self.h, self.o = {}, {}

    def __call__(self, t_ptr, ask, _ud):
        t = ggml_tensor.from_address(t_ptr)
        base, _, idx = t.name.decode(errors="replace").rpartition("-")
        if not idx.isdigit() or base not in self.names:
            return False
        if not ask:
            (self.h if self.names[base] == "h" else self.o)[int(idx)] = f32_rows(t)[-1].astype(np.float64)
        return True


@pytest.mark.parametrize("arch", ARCHS)
def test_decisions_equal_the_python_state_machine(models, arch):
    L = N_LAYER
    # 1. cosines of a dense pass: per-layer thresholds at their median
    probe = _runner(models[arch])
    probe.set_policy(True, ffn_skip_threshold=2.0, ffn_skip_warmup=0, ffn_skip_cold_start=0, ffn_skip_cold_end=0)
    coss = []
    probe.clear()
    for i, t in enumerate(TOKENS):
        probe.decode([(t, i, 0, True)])
        coss.append(probe.trace()[1][0])
    probe.close()
    med = np.nanmedian(np.array(coss), axis=0)
    taus = [1.0] + [float(med[j - 1]) for j in range(1, L)]
    kw = dict(ffn_skip_threshold=taus, ffn_skip_cold_start=1, ffn_skip_cold_end=0, ffn_skip_warmup=0,
              ffn_skip_max_skip=L, ffn_skip_max_runs=L, ffn_skip_continue=False)
    # 2. the gate, with h_j / o_j read through the eval callback
    cap = _Capture(arch)
    g = _runner(models[arch], cb=cap)
    s = g.set_policy(True, **kw)
    emu = PolicyEmulation(s, L)
    g.clear()
    n_skip = n_run = 0
    for i, t in enumerate(TOKENS):
        cap.h.clear()
        cap.o.clear()
        g.decode([(t, i, 0, True)])
        dec, cos = g.trace()
        emu.new_token(True)
        for j in range(L):
            want = emu.decide(j)
            got = dec[0][j] == 1
            if got != want:
                # only a cosine within float rounding of tau may decide otherwise
                assert not math.isnan(emu.clast) and abs(emu.clast - emu.tau[j]) < 1e-5, (arch, i, j)
                want = got
                emu.run = got  # follow the gate from here
            if not got:
                # FFN j ran: the cosine the gate saw equals cos(h_j, o_j) computed here
                h, o = cap.h[j], cap.o[j]
                c = float(np.dot(h, o) / (np.linalg.norm(h) * np.linalg.norm(o)))
                if j < L - 1:
                    assert abs(c - cos[0][j]) < 1e-6, (arch, i, j, c, cos[0][j])
                emu.saw_cos(c)
            n_skip += got and j >= 1
            n_run += (not got) and j >= 1
    g.close()
    assert n_skip > 0 and n_run > 0, (n_skip, n_run)


def test_an_unhooked_architecture_keeps_the_dense_fallback(models, tmp_path):
    # same tensors as llama, no hooks in its builder
    p = copy_gguf(models["llama"], tmp_path / "ernie.gguf", rename_arch="ernie4_5")
    r = _runner(p)
    r.set_policy(True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0)
    a = _one_by_one(r)
    st = r.stats()
    r.close()
    assert not st.supported and "ernie4_5" in st.reason and "no FFN-skip hooks" in st.reason
    assert st.skipped == 0
    d = _runner(models["llama"])
    d.set_policy(False)
    assert np.array_equal(a.view(np.uint32), _one_by_one(d).view(np.uint32))
    d.close()


def test_paper_preset_resolves_for_every_architecture(models):
    # the default settings of ffn_skip=True exist for every hooked model
    for arch in ARCHS:
        r = _runner(models[arch])
        s = r.set_policy(True, preset=policy.paper_preset(r.n_layer))
        assert s.mode == "adaptive"
        r.close()
