"""The probe signal of the gate (issue 14, docs/QUALITY.md "Headroom"): per
middle layer j, s_j = -(w_j . h_j / |h_j| + b_j) on FFN j's own input,
compared with tau_j. Exactness on a real model (SmolLM2): never-firing
bit-identical to dense, forced skips bit-identical to zeroed FFN down
projections, every decision equal to a pure-Python emulation that computes
s_j from the residual stream read through the eval callback; bad weights and
files with the wrong layout are clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGUFValueType

from _lowlevel import Runner, f32_rows, ggml_tensor
from _oracle import PolicyEmulation
from ffnskip_gguf import Llama, policy
from ffnskip_gguf.errors import MetadataError
from ffnskip_gguf.gguf_io import copy_gguf

PROSE = "The history of the printing press begins in the fifteenth century, when"
L, D = 30, 576  # SmolLM2-135M


def _probe(seed=0, d=D, n_layer=L):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (n_layer, d + 1)).astype(np.float32)
    w[:, d] = rng.normal(0, 0.1, n_layer)
    return w


def _settings(w, taus, **kw):
    out = dict(ffn_skip_signal="probe", ffn_skip_probe=w.ravel().tolist(), ffn_skip_threshold=taus,
               ffn_skip_cold_start=1, ffn_skip_cold_end=0, ffn_skip_warmup=0, ffn_skip_max_skip=L,
               ffn_skip_max_runs=L, ffn_skip_continue=False)
    out.update(kw)
    return out


def _one_by_one(r, tokens):
    r.clear()
    return np.concatenate([r.decode([(t, i, 0, True)]) for i, t in enumerate(tokens)])


def test_never_firing_probe_is_bit_identical_to_dense(smollm2_path):
    dense = Runner(smollm2_path)
    dense.set_policy(False)
    toks = dense.tokenize(PROSE)
    a = _one_by_one(dense, toks)
    g = Runner(smollm2_path)
    g.set_policy(True, **_settings(_probe(), 3e38))
    b = _one_by_one(g, toks)
    st = g.stats()
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert st.skipped == 0 and st.decode_tokens == len(toks)
    from ffnskip_gguf import _lib

    assert _lib.ffnskip_get_signal(g.ctx) == 1
    dense.close()
    g.close()


def test_forced_probe_skips_equal_zeroed_ffn_down(smollm2_path, tmp_path):
    forced = [5, 9, 17]
    names = {f"blk.{j}.ffn_down.weight" for j in forced}
    zeroed = Runner(str(copy_gguf(smollm2_path, tmp_path / "z.gguf",
                                  tensor_data=lambda n, d: np.zeros_like(d) if n in names else d)))
    zeroed.set_policy(False)
    g = Runner(smollm2_path)
    toks = g.tokenize(PROSE)
    taus = [-3e38 if j in forced else 3e38 for j in range(L)]
    g.set_policy(True, **_settings(_probe(), taus))
    a = _one_by_one(g, toks)
    b = _one_by_one(zeroed, toks)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert g.stats().skipped_per_layer == [len(toks) if j in forced else 0 for j in range(L)]
    g.close()
    zeroed.close()


class _H:
    """Eval callback keeping h_j = ffn_inp-j of the decoded token."""

    def __init__(self):
        self.h = {}

    def __call__(self, t_ptr, ask, _ud):
        t = ggml_tensor.from_address(t_ptr)
        base, _, idx = t.name.decode(errors="replace").rpartition("-")
        if base != "ffn_inp" or not idx.isdigit():
            return False
        if not ask:
            self.h[int(idx)] = f32_rows(t)[-1].astype(np.float64)
        return True


def _scores(w, h):
    return -(w[:, :D].astype(np.float64) @ h / np.linalg.norm(h) + w[:, D])


def probe_decisions_follow_the_emulation(r, cap, toks, tol=1e-4):
    """Decode `toks` one by one with runner `r` twice: dense, to put each
    layer's tau at its median probe score, then gated with the probe; every
    gate decision must equal PolicyEmulation (tests/_oracle.py) fed with s_j
    computed in double from h_j, the FFN input that the eval callback `cap`
    read (cap.h: layer -> float64 [D]). A difference is allowed only within
    `tol` of tau (the backend sums in another order or precision); the
    emulation then follows the gate. Used by the CPU test below and by
    tests/test_vulkan.py. Returns (skips, runs) over the middle layers."""
    w = _probe(1)
    r.set_policy(False)
    r.clear()
    sc = []
    for i, t in enumerate(toks):
        r.decode([(t, i, 0, True)])
        sc.append([_scores(w[j:j + 1], cap.h[j])[0] for j in range(L)])
    taus = [float(x) for x in np.median(np.array(sc), axis=0)]
    s = r.set_policy(True, **_settings(w, taus, ffn_skip_max_skip=8, ffn_skip_max_runs=3))
    emu = PolicyEmulation(s, L)
    r.clear()
    n_skip = n_run = 0
    for i, t in enumerate(toks):
        cap.h.clear()
        r.decode([(t, i, 0, True)])
        dec = r.trace()[0][0]
        emu.new_token(True)
        for j in range(L):
            # the emulation: the state machine with s_j in place of c_last
            emu.clast = _scores(w[j:j + 1], cap.h[j])[0] if j >= 1 else math.nan
            want = emu.decide(j)
            got = bool(dec[j] == 1)
            if got != want:
                assert abs(emu.clast - taus[j]) < tol, (i, j, emu.clast, taus[j])
                # follow the gate (a fresh run: continuation is off here)
                d = 1 if got else -1
                emu.run, emu.runs, emu.budget = got, emu.runs + d, emu.budget - d
            n_skip += got
            n_run += not got and j >= 1
    return n_skip, n_run


def test_probe_decisions_equal_the_python_emulation(smollm2_path):
    cap = _H()
    r = Runner(smollm2_path, cb=cap)
    toks = r.tokenize(PROSE + " the craft of bookmaking changed")
    n_skip, n_run = probe_decisions_follow_the_emulation(r, cap, toks)
    r.close()
    assert n_skip > 0 and n_run > 0


@pytest.mark.parametrize("kw,match", [
    (dict(ffn_skip_signal="probe"), "needs ffn_skip_probe"),
    (dict(ffn_skip_signal="bogus"), "ffn_skip_signal must be one of"),
    (dict(ffn_skip_signal="probe", ffn_skip_probe=[0.5] * (L * 10)), "n_layer x \\(n_embd \\+ 1\\)"),
    (dict(ffn_skip_signal="probe", ffn_skip_probe=[float("nan")] * (L * (D + 1))), "finite"),
    (dict(ffn_skip_signal="probe", ffn_skip_probe=[0.5] * (L * 7)), "17310 weights, got 210"),
])
def test_bad_probe_settings_are_clear_errors(smollm2_path, kw, match):
    with pytest.raises(ValueError, match=match):
        Llama(smollm2_path, n_ctx=128, verbose=False, ffn_skip=True, **kw)


def _probe_file(src, dst, version, w=None, signal="probe"):
    w = _probe(2) if w is None else w
    kv = {"ffn_skip.version": (version, GGUFValueType.UINT32, None),
          "ffn_skip.signal": (signal, GGUFValueType.STRING, None),
          "ffn_skip.probe": (w.ravel().tolist(), GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
          "ffn_skip.threshold": ([1.0] * 10 + [0.0] * 10 + [1.0] * 10, GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
          "ffn_skip.cold_start": (10, GGUFValueType.UINT32, None),
          "ffn_skip.cold_end": (10, GGUFValueType.UINT32, None)}
    return copy_gguf(src, dst, set_kv=kv)


def test_probe_file_is_read_and_used(smollm2_path, tmp_path):
    p = _probe_file(smollm2_path, tmp_path / "probe.gguf", policy.GGUF_VERSION_PROBE)
    llm = Llama(str(p), n_ctx=256, n_threads=2, verbose=False, ffn_skip=True, ffn_skip_warmup=0)
    s = llm.ffn_skip_params()
    assert s.signal == "probe" and s.sources["ffn_skip_probe"] == "file" and len(s.probe) == L * (D + 1)
    llm("The capital of France is", max_tokens=8, temperature=0)
    st = llm.ffn_skip_stats()
    assert st.supported and st.skipped > 0  # tau 0 on layers 10..19: some tokens skip
    # an argument switches back to the cosine gate
    llm.set_ffn_skip(ffn_skip_signal="cosine")
    assert llm.ffn_skip_params().signal == "cosine"
    llm.close()


def test_probe_file_needs_version_2(smollm2_path, tmp_path):
    p = _probe_file(smollm2_path, tmp_path / "v1.gguf", 1)
    with pytest.raises(MetadataError, match="ffn_skip.version = 2"):
        Llama(str(p), n_ctx=128, verbose=False, ffn_skip=True)
    p3 = _probe_file(smollm2_path, tmp_path / "v3.gguf", 3)
    with pytest.raises(MetadataError, match="reads versions 1, 2"):
        Llama(str(p3), n_ctx=128, verbose=False, ffn_skip=True)
