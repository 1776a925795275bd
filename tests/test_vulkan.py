"""The gate on the Vulkan backend (issue 11), on Mesa's software Vulkan device
(lavapipe): the gate op as a shader, the predicated mat-vec (fused with the
residual add), decisions against the CPU build, graph reuse, partial offload.

Runs only in the Vulkan build's test step (scripts/vulkan.sh sets
FFNSKIP_VULKAN=1 and points FFNSKIP_GGUF_LIB_PATH at that build); elsewhere
these tests are skipped, and with FFNSKIP_REQUIRE_VULKAN=1 a missing Vulkan
build or device fails instead. "Dense Vulkan" = this build with the gate off;
the CPU reference = the main CPU build, in a subprocess (tests/_cpu_ref.py).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ffnskip_gguf._libpath import find_lib_dir

from _lowlevel import Runner
from test_gate import PROSE, _decode_one_by_one, _forcing, _zeroed_down_copy

ON = os.environ.get("FFNSKIP_VULKAN") == "1"
if not ON and os.environ.get("FFNSKIP_REQUIRE_VULKAN") == "1":
    raise RuntimeError("FFNSKIP_REQUIRE_VULKAN=1 but this is not the Vulkan test step (FFNSKIP_VULKAN unset)")
pytestmark = pytest.mark.skipif(not ON, reason="Vulkan build not under test (scripts/vulkan.sh runs these)")

HERE = Path(__file__).resolve().parent
N_DEC = 12  # decode tokens per exactness run: lavapipe runs SmolLM2 at a few tok/s


def _vk(path, **kw):
    kw.setdefault("n_gpu_layers", -1)
    return Runner(path, **kw)


def _ggml():
    lib = ctypes.CDLL(str(find_lib_dir() / "libggml.so"))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for f in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, f).restype = ctypes.c_char_p
        getattr(lib, f).argtypes = [ctypes.c_void_p]
    return lib


def _devices():
    g = _ggml()
    out = {}
    for i in range(g.ggml_backend_dev_count()):
        d = g.ggml_backend_dev_get(i)
        out[g.ggml_backend_dev_name(d).decode()] = g.ggml_backend_dev_description(d).decode()
    return out


def _same_bits(a, b) -> bool:
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


def test_device_under_test_is_lavapipe():
    devs = _devices()
    assert "Vulkan0" in devs, f"no Vulkan device (set GGML_VK_VISIBLE_DEVICES=0 for lavapipe): {devs}"
    assert "llvmpipe" in devs["Vulkan0"].lower(), devs


def test_model_weights_are_on_the_vulkan_device(smollm2_path, capfd):
    r = _vk(smollm2_path, verbose=True)
    r.close()
    err = capfd.readouterr().err
    assert "Vulkan0 model buffer size" in err
    assert "offloaded 31/31 layers to GPU" in err


def test_backend_op_check_passes_on_vulkan():
    exe = os.environ.get("FFNSKIP_VULKAN_OPS_TEST")
    assert exe and Path(exe).is_file(), "FFNSKIP_VULKAN_OPS_TEST must name the test-ffnskip-ops binary"
    p = subprocess.run([exe, "Vulkan0"], capture_output=True, text=True, timeout=600)
    print(p.stdout[-4000:], p.stderr[-2000:])
    lines = p.stdout.splitlines()
    assert lines and "llvmpipe" in lines[0].lower()
    fails = [ln for ln in lines if ln.startswith("FAIL")]
    assert not fails, fails
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert lines[-1].split()[0].split("/")[0] == lines[-1].split()[0].split("/")[1], lines[-1]


@pytest.mark.parametrize("model", ["smollm2_path", "qwen_path", "gemma_path"])
def test_gate_is_supported_on_vulkan(request, model):
    r = _vk(request.getfixturevalue(model))
    st = r.stats()
    r.close()
    assert st.supported, st.reason


def test_forced_skips_equal_zeroed_ffn_down_on_vulkan(smollm2_path, tmp_path):
    L = 30
    forced = [5, 6, 11, 17, 22]
    g = _vk(smollm2_path)
    g.set_policy(True, **_forcing(forced, L))
    tokens = g.tokenize(PROSE)[:N_DEC]
    a = _decode_one_by_one(g, tokens)
    dec, _ = g.trace()
    st = g.stats()
    g.close()
    assert sorted(np.nonzero(dec[0] == 1)[0].tolist()) == forced
    assert st.skipped_per_layer == [len(tokens) if j in forced else 0 for j in range(L)]
    z = _vk(str(_zeroed_down_copy(smollm2_path, tmp_path / "zeroed.gguf", forced)))
    z.set_policy(False)
    b = _decode_one_by_one(z, tokens)
    z.close()
    assert _same_bits(a, b)
    # static removal of the same FFNs (left out of the graph) gives the same logits
    s = _vk(smollm2_path)
    s.set_policy("static", ffn_remove_layers=forced)
    c = _decode_one_by_one(s, tokens)
    s.close()
    assert _same_bits(a, c)


def test_never_firing_gate_is_bit_identical_to_dense_vulkan(smollm2_path):
    r = _vk(smollm2_path)
    prompt = r.tokenize(PROSE)
    r.set_policy(False)
    t0, l0, _ = r.greedy(prompt, N_DEC)
    r.set_policy(True, ffn_skip_threshold=2.0, ffn_skip_warmup=0)
    t1, l1, tr = r.greedy(prompt, N_DEC)
    r.close()
    assert t0 == t1
    assert _same_bits(l0, l1)
    assert all((d[0] == 0).all() for d, _ in tr)


def test_graph_is_reused_while_skipping_on_vulkan(smollm2_path):
    r = _vk(smollm2_path)
    r.set_policy(True, ffn_skip_threshold=0.97, ffn_skip_continue=False, ffn_skip_max_runs=30,
                 ffn_skip_max_skip=10, ffn_skip_warmup=0)
    prompt = r.tokenize(PROSE)
    r.greedy(prompt, 2)
    before = r.n_reused()
    _, _, tr = r.greedy(prompt, N_DEC)
    after = r.n_reused()
    st = r.stats()
    r.close()
    assert len({tuple(d[0]) for d, _ in tr}) > 1  # decisions changed between tokens ...
    assert after - before >= N_DEC - 1           # ... and the graph was reused
    assert 0 < st.skipped < st.skipped + st.run


def test_partial_offload_forced_skips_are_exact(smollm2_path, tmp_path):
    """n_gpu_layers below the layer count: FFNs on both backends, each gated where
    its weights are; forced skips in both halves equal the zeroed copy."""
    L = 30
    forced = [4, 9, 20, 25]
    g = _vk(smollm2_path, n_gpu_layers=15)
    st0 = g.stats()
    assert st0.supported, st0.reason
    g.set_policy(True, **_forcing(forced, L))
    tokens = g.tokenize(PROSE)[:N_DEC]
    a = _decode_one_by_one(g, tokens)
    st = g.stats()
    g.close()
    assert st.skipped_per_layer == [len(tokens) if j in forced else 0 for j in range(L)]
    z = _vk(str(_zeroed_down_copy(smollm2_path, tmp_path / "zeroed-po.gguf", forced)), n_gpu_layers=15)
    z.set_policy(False)
    b = _decode_one_by_one(z, tokens)
    z.close()
    assert _same_bits(a, b)


def _cpu_reference(model, prompt, forced, pol):
    env = dict(os.environ)
    env.pop("FFNSKIP_GGUF_LIB_PATH", None)  # the main CPU build
    env.pop("FFNSKIP_VULKAN", None)
    p = subprocess.run([sys.executable, str(HERE / "_cpu_ref.py")], input=json.dumps(
        {"model": model, "prompt": prompt, "forced": forced, "policy": pol}), capture_output=True, text=True,
        env=env, cwd=str(HERE), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    nan = lambda rows: np.array([[math.nan if x is None else x for x in r] for r in rows], dtype=np.float64)
    return np.array(out["dec"]), nan(out["cos"]), out


def _compare_decisions(vdec, vcos, cdec, ccos, taus, lo, hi, tol):
    """Teacher-forced decisions agree up to the first decision that differs
    where its deciding cosine is within tol of the threshold (there the two
    backends may legitimately differ, and later tokens then see different
    residuals). Returns the count of decisions compared and the stop point."""
    compared = 0
    for s in range(vdec.shape[0]):
        for j in range(lo, hi):
            ran = [i for i in range(j) if cdec[s][i] == 0 and not math.isnan(ccos[s][i])]
            c = ccos[s][ran[-1]] if ran else math.nan
            if not math.isnan(c) and abs(c - taus[j]) < tol:
                if vdec[s][j] != cdec[s][j]:
                    return compared, (s, j)  # near tau: may differ, and the runs diverge from here
                continue                     # near tau but equal: nothing diverged
            assert vdec[s][j] == cdec[s][j], (s, j, vdec[s], cdec[s])
            if not math.isnan(ccos[s][j]) or not math.isnan(vcos[s][j]):
                assert abs(vcos[s][j] - ccos[s][j]) <= tol, (s, j, vcos[s][j], ccos[s][j])
            compared += 1
    return compared, None


def test_decisions_agree_with_cpu_under_the_measured_tolerance(qwen_path):
    """Qwen2.5-0.5B: first the dense CPU-vs-Vulkan cosine difference per layer
    (gate never fires), the tolerance = 2x its maximum (at least 1e-5); then
    per-layer thresholds at the dense median cosine, so skips and runs mix."""
    n_new = 10
    r = _vk(qwen_path)
    L = r.n_layer
    prompt = r.tokenize(PROSE)
    never = dict(ffn_skip_threshold=2.0, ffn_skip_warmup=0)
    r.set_policy(True, **never)
    toks, _, tr = r.greedy(prompt, n_new)
    vcos0 = np.array([c[0] for _, c in tr], dtype=np.float64)
    _, ccos0, _ = _cpu_reference(qwen_path, prompt, toks[len(prompt):], never)
    both = ~np.isnan(vcos0) & ~np.isnan(ccos0)
    assert both.sum() > L  # cosines observed on both
    diff = np.abs(vcos0 - ccos0)[both]
    tol = max(2.0 * float(diff.max()), 1e-5)
    print(f"dense CPU-vs-Vulkan |cos| difference: max {diff.max():.3e}, mean {diff.mean():.3e}; tolerance {tol:.3e}")
    assert tol < 2e-2  # the two backends compute the same model (measured: max 1.4e-3)

    # per layer: tau in the widest gap between the dense cosines (between the
    # 20th and 80th percentile), so some tokens skip, some run, few are near tau
    taus = []
    for j in range(L):
        v = np.sort(ccos0[:, j][~np.isnan(ccos0[:, j])])
        if len(v) < 4:
            taus.append(0.95)
            continue
        lo, hi = int(0.2 * len(v)), int(0.8 * len(v))
        k = lo + int(np.argmax(np.diff(v[lo:hi + 1])))
        taus.append(float((v[k] + v[k + 1]) / 2))
    pol = dict(ffn_skip_threshold=taus, ffn_skip_cold_start=2, ffn_skip_cold_end=2, ffn_skip_max_skip=6,
               ffn_skip_max_runs=3, ffn_skip_continue=False, ffn_skip_warmup=0)
    r.set_policy(True, **pol)
    r.reset_stats()
    toks, _, tr = r.greedy(prompt, n_new)
    vst = r.stats()
    r.close()
    vdec = np.array([d[0] for d, _ in tr])
    vcos = np.array([c[0] for _, c in tr], dtype=np.float64)
    cdec, ccos, cout = _cpu_reference(qwen_path, prompt, toks[len(prompt):], pol)
    compared, stop = _compare_decisions(vdec, vcos, cdec, ccos, taus, 2, L - 2, tol)
    print(f"compared {compared} decisions; stopped at {stop}")
    upto = vdec[: stop[0]] if stop else vdec
    assert (upto[:, 2:L - 2] == 1).any() and (upto[:, 2:L - 2] == 0).any()  # both skips and runs
    if stop is None:
        assert vst.skipped_per_layer == cout["skipped"]
        assert vst.run_per_layer == cout["run"]


def test_probe_file_gates_on_vulkan(smollm2_path, tmp_path):
    # the probe signal has a Vulkan kernel (issue 14): a probe-calibrated file
    # on the GPU gates with the probe, without a warning; dense use of the same
    # file is unaffected
    import warnings

    from test_probe import _probe_file

    from ffnskip_gguf import Llama, policy
    from ffnskip_gguf.llama import FfnSkipUnsupportedWarning

    p = _probe_file(smollm2_path, tmp_path / "probe.gguf", policy.GGUF_VERSION_PROBE)
    dense = Llama(str(p), n_ctx=128, n_gpu_layers=-1, verbose=False)  # ffn_skip=False: no error, no warning
    dense.close()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        llm = Llama(str(p), n_ctx=128, n_gpu_layers=-1, verbose=False, ffn_skip=True, ffn_skip_warmup=0)
    msgs = [str(x.message) for x in w if issubclass(x.category, FfnSkipUnsupportedWarning)]
    assert not msgs, msgs
    s = llm.ffn_skip_params()
    assert s.mode == "adaptive" and s.signal == "probe"
    llm("The capital of France is", max_tokens=4, temperature=0)
    st = llm.ffn_skip_stats()
    llm.close()
    assert st.supported and st.skipped > 0  # tau 0 on layers 10..19: some tokens skip


def _never_firing_probe_vs_dense(model):
    """Greedy N_DEC tokens dense, then with the probe gate never firing.
    Returns (same tokens, same logit bits, max |logit difference|, any skip)."""
    from test_probe import _probe, _settings

    r = _vk(model)
    prompt = r.tokenize(PROSE)
    r.set_policy(False)
    t0, l0, _ = r.greedy(prompt, N_DEC)
    r.set_policy(True, **_settings(_probe(), 3e38))
    t1, l1, tr = r.greedy(prompt, N_DEC)
    r.close()
    diff = float(np.abs(np.asarray(l0, np.float64) - np.asarray(l1, np.float64)).max())
    return t0 == t1, _same_bits(l0, l1), diff, any((d[0] != 0).any() for d, _ in tr)


def test_never_firing_probe_is_bit_identical_to_dense_on_vulkan(smollm2_path):
    """Bit-identical with ggml-vulkan's kernel fusion off (a fresh process:
    GGML_VK_DISABLE_FUSION is read when the device opens). With fusion on,
    the gate reading h_j changes which fused kernels ggml-vulkan picks (the
    cosine gate, which reads h_{j-1} and o_{j-1}, does not): measured
    1.5e-5 in the logits of 2 of 12 tokens; the tokens must still agree."""
    code = ("import json, sys; sys.path.insert(0, '.'); from test_vulkan import _never_firing_probe_vs_dense as f; "
            f"print('RESULT ' + json.dumps(f({str(smollm2_path)!r})))")
    env = dict(os.environ, GGML_VK_DISABLE_FUSION="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(HERE),
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    same_tokens, same_bits, diff, skipped = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert same_tokens and same_bits and not skipped, (same_tokens, diff, skipped)
    # fusion on (this process): same tokens, no skip, logits within 1e-4
    same_tokens, _, diff, skipped = _never_firing_probe_vs_dense(smollm2_path)
    print(f"fusion on: max |logit difference| {diff:.2e}")
    assert same_tokens and not skipped and diff <= 1e-4


class _DeviceH:
    """Eval callback keeping h_j = ffn_inp-j of the decoded token, read from
    device memory with ggml_backend_tensor_get."""

    def __init__(self):
        from ffnskip_gguf import _lib

        self.h = {}
        self._get = _lib._ggml_base.ggml_backend_tensor_get
        self._get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self._get.restype = None

    def __call__(self, t_ptr, ask, _ud):
        from _lowlevel import ggml_tensor

        t = ggml_tensor.from_address(t_ptr)
        base, _, idx = t.name.decode(errors="replace").rpartition("-")
        if base != "ffn_inp" or not idx.isdigit():
            return False
        if not ask:
            assert t.type == 0 and t.nb[0] == 4 and t.nb[1] == 4 * t.ne[0], (t.name, t.type)
            rows = np.empty((t.ne[1] * t.ne[2] * t.ne[3], t.ne[0]), np.float32)
            self._get(t_ptr, rows.ctypes.data, 0, rows.nbytes)
            self.h[int(idx)] = rows[-1].astype(np.float64)
        return True


def test_probe_decisions_equal_the_python_emulation_on_vulkan(smollm2_path):
    """Every decision of the probe signal on Vulkan equals the state machine
    run in Python with s_j computed (in double) from the Vulkan build's own
    residual stream; a difference is allowed only within 1e-4 of tau (the
    shader reduces in fp32)."""
    from test_probe import probe_decisions_follow_the_emulation

    cap = _DeviceH()
    r = _vk(smollm2_path, cb=cap)
    toks = r.tokenize(PROSE)[:N_DEC]
    n_skip, n_run = probe_decisions_follow_the_emulation(r, cap, toks)
    st = r.stats()
    r.close()
    assert st.supported, st.reason
    assert n_skip > 0 and n_run > 0


def test_moe_model_on_vulkan_is_unsupported_with_the_reason(tmp_path):
    from synth import write_synthetic

    p = write_synthetic("qwen3moe", tmp_path / "moe.gguf", seed=1, n_layer=4)
    r = _vk(str(p))
    r.set_policy(True)
    st = r.stats()
    r.close()
    assert not st.supported and "MUL_MAT_ID" in st.reason, st.reason
