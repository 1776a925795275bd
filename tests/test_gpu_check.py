"""The CUDA gate without a GPU (issue 12): what runs on any machine.

- the CPU-only parts of the GPU check (tests/gpu/check.py): the synthetic
  Q4_0 model writer, the layer cut of the carried SmolLM2, the table, and
  every row of the check run end to end on the CPU build (--dry-run-cpu), so
  the script a GPU machine runs has been run before it gets there;
- the CPU build reports no CUDA graph counters (the C API says so);
- the GPU bundle fits the 64 MiB the GPU machine may receive.

The compile check of the CUDA sources is scripts/cuda-compile-check.sh
(.ci/run runs it); the check on a GPU is tests/gpu/check.sh.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ffnskip_gguf.runner import Runner
from ffnskip_gguf.stats import cuda_graph_counts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import check  # noqa: E402  (tests/gpu/check.py)


def test_q4_0_random_blocks_are_deterministic_with_finite_scales():
    a = check.q4_0_random(np.random.default_rng(7), 3, 64)
    b = check.q4_0_random(np.random.default_rng(7), 3, 64)
    assert a.shape == (3, 2 * 18) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    scales = a.reshape(-1, 18)[:, :2].copy().view(np.float16).astype(np.float32).ravel()
    assert np.isfinite(scales).all()
    want = 1.0 / (4.6 * math.sqrt(64))
    assert (scales >= 0.74 * want).all() and (scales <= 1.26 * want).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        check.q4_0_random(np.random.default_rng(0), 2, 48)


def test_synthetic_llama_loads_decodes_finite_and_skips_as_forced(smollm2_path, tmp_path):
    L = 6
    p = check.write_synthetic_llama(tmp_path / "syn.gguf", smollm2_path, n_layer=L, n_embd=128, n_ff=256,
                                    n_head=4, n_head_kv=2, seed=3)
    r = Runner(str(p), n_threads=2)
    assert r.n_layer == L
    toks = r.tokenize(check.PROSE)[:12]
    r.set_policy(True, ffn_skip_threshold=-1.0, ffn_skip_cold_start=1, ffn_skip_cold_end=1,
                 ffn_skip_max_skip=2, ffn_skip_max_runs=1, ffn_skip_continue=True, ffn_skip_warmup=0)
    out = np.concatenate([r.decode([(t, i, 0, True)]) for i, t in enumerate(toks)])
    st = r.stats()
    r.close()
    assert np.isfinite(out).all()
    assert st.supported, st.reason
    # tau -1: the first two middle layers skip on every token (the speed rows rely on it)
    assert st.skipped_per_layer == [0, len(toks), len(toks), 0, 0, 0]


def test_synthetic_llama_is_deterministic(smollm2_path, tmp_path):
    kw = dict(n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=1, seed=5)
    a = check.write_synthetic_llama(tmp_path / "a.gguf", smollm2_path, **kw)
    b = check.write_synthetic_llama(tmp_path / "b.gguf", smollm2_path, **kw)
    assert a.read_bytes() == b.read_bytes()


def test_cut_layers_keeps_the_first_layers_of_the_real_model(smollm2_path, tmp_path):
    p = check.cut_layers(smollm2_path, tmp_path / "cut.gguf", 4)
    full, cut = Runner(smollm2_path, n_threads=2), Runner(str(p), n_threads=2)
    assert cut.n_layer == 4 and full.n_layer == 30
    toks = cut.tokenize(check.PROSE)[:6]
    assert toks == full.tokenize(check.PROSE)[:6]
    out = np.concatenate([cut.decode([(t, i, 0, True)]) for i, t in enumerate(toks)])
    full.close()
    cut.close()
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="cannot keep 31"):
        check.cut_layers(smollm2_path, tmp_path / "x.gguf", 31)


def test_table_marks_each_row_against_its_target():
    res = {
        "device": "NVIDIA H200",
        "fallback": {"supported": False, "reason": "the CUDA gate is compiled but not yet verified", "bit_identical_to_dense": True},
        "ops": {"passed": 145, "total": 145},
        "forced_vs_zeroed": True,
        "never_fire_vs_dense": False,
        "decisions": {"compared": 90, "stop": None, "tol": 2e-4, "ok": True},
        "graphs": {"replays": 40, "captures": 8, "eager": 0, "decode_tokens": 48, "distinct_decision_rows": 9,
                   "skip_ratio": 0.2},
        "speed": {"model_name": "synthetic 8B Q4_0", "rows": [
            {"name": "dense", "kind": "dense", "target": 0.0, "skip_ratio": 0.0, "tok_s": 100.0, "ratio": 1.0},
            {"name": "gate, never fires", "kind": "gate", "target": 0.0, "skip_ratio": 0.0, "tok_s": 97.0, "ratio": 0.97},
            {"name": "gate ~25%", "kind": "gate", "target": 0.25, "skip_ratio": 0.25, "tok_s": 120.0, "ratio": 1.2,
             "gain_kept": 0.9},
            {"name": "static 8 FFNs", "kind": "static", "target": 0.25, "skip_ratio": 0.25, "tok_s": 122.0, "ratio": 1.22},
        ]},
    }
    t = check.format_table(res).splitlines()
    assert t[0] == "| check | measured | target | result |"

    def result(prefix):
        line = next(x for x in t if x.startswith(f"| {prefix}"))
        return line.rstrip(" |").rsplit("| ", 1)[1]

    assert result("gate off by default") == "PASS"
    assert result("op check") == "PASS"
    assert result("forced skips == zeroed") == "PASS"
    assert result("never-fire == dense") == "FAIL"
    assert result("CUDA vs CPU decisions") == "PASS"
    assert result("CUDA graphs") == "FAIL"  # 40 of 48 computes replayed: 83% < 95%
    res["graphs"].update(replays=47, captures=0, eager=1)
    assert "PASS" in next(x for x in check.format_table(res).splitlines() if x.startswith("| CUDA graphs"))
    res["graphs"].update(distinct_decision_rows=1)  # decisions never changed: proves nothing
    assert "FAIL" in next(x for x in check.format_table(res).splitlines() if x.startswith("| CUDA graphs"))
    res["missing"] = ["ops"]
    assert "| row missing: ops | not run | present | FAIL |" in check.format_table(res)
    assert result("synthetic 8B Q4_0: gate, never fires") == "FAIL"  # 3% overhead > 2%
    assert result("synthetic 8B Q4_0: gate ~25%") == "PASS"
    assert result("synthetic 8B Q4_0: dense") == "-"


def test_parse_ops_log_reads_the_last_summary():
    assert check.parse_ops_log("OK gate ...\n144/145 cases passed\n") == {"passed": 144, "total": 145}
    assert check.parse_ops_log("crashed") == {"passed": 0, "total": 0}


def test_cpu_build_has_no_cuda_graph_counters():
    assert cuda_graph_counts() is None


def test_every_row_of_the_gpu_check_runs_on_the_cpu_build(smollm2_path, tmp_path, capsys):
    cut = check.cut_layers(smollm2_path, tmp_path / "cut.gguf", 10)
    before = os.environ.get("FFNSKIP_CUDA_GATE")
    rc = check.main(["--small", str(cut), "--work", str(tmp_path / "w"), "--skip-speed", "--dry-run-cpu",
                     "--json", str(tmp_path / "r.json")])
    table = capsys.readouterr().out
    assert os.environ.get("FFNSKIP_CUDA_GATE") == before  # restored
    assert rc == 0, table
    for row in ("forced skips == zeroed ffn_down", "forced skips == static removal", "never-fire == dense",
                "partial offload: forced == zeroed", "CUDA vs CPU decisions"):
        assert any(line.startswith(f"| {row}") and line.endswith("| PASS |") for line in table.splitlines()), (row, table)


def test_gpu_bundle_fits_what_the_gpu_machine_receives(tmp_path):
    out = tmp_path / "bundle"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-bundle.sh"), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert total <= 64 * 2**20
    for name in ("llama.cpp.tar.xz", "smollm2-cut.gguf", "manifest.json"):
        assert (out / name).is_file()
    assert (out / "py" / "llama_cpp" / "llama_cpp.py").is_file()
    assert sorted(p.name.split("-")[0] for p in (out / "wheels").glob("*.whl")) == ["diskcache", "gguf"]


def test_speed_rows_run_on_a_small_synthetic_model(smollm2_path, tmp_path):
    p = check.write_synthetic_llama(tmp_path / "syn.gguf", smollm2_path, n_layer=8, n_embd=128, n_ff=256,
                                    n_head=4, n_head_kv=2)
    res = check.run_speed(str(p), repeats=1, n_decode=4)
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["gate, never fires"]["skip_ratio"] == 0.0
    # tau -1: the gate skips k = round(target x L) FFNs per token, as static removal does
    assert rows["gate ~25%"]["skip_ratio"] == pytest.approx(2 / 8)
    assert rows["gate ~50%"]["skip_ratio"] == pytest.approx(4 / 8)
    assert {r["kind"] for r in res["rows"]} == {"dense", "gate", "static"}
    assert "synthetic 8B Q4_0: gate ~25%" in check.format_table({"speed": res})


def _verdict(reg, buft, built):
    import ctypes

    from ffnskip_gguf import _lib

    msg = ctypes.create_string_buffer(512)
    ok = _lib.ffnskip_backend_verdict(reg.encode(), buft.encode(), b"blk.3.ffn_down.weight", built, msg, len(msg))
    return ok, msg.value.decode()


def test_cuda_gate_is_off_by_default_with_the_reason(monkeypatch):
    monkeypatch.delenv("FFNSKIP_CUDA_GATE", raising=False)
    ok, why = _verdict("CUDA", "CUDA0", 1)
    assert ok == 0 and "not yet verified on a GPU" in why and "FFNSKIP_CUDA_GATE=1" in why and "per model" in why
    monkeypatch.setenv("FFNSKIP_CUDA_GATE", "0")
    assert _verdict("CUDA", "CUDA0", 1)[0] == 0


def test_cuda_gate_on_by_request_says_it_is_unverified(monkeypatch):
    monkeypatch.setenv("FFNSKIP_CUDA_GATE", "1")
    ok, note = _verdict("CUDA", "CUDA0", 1)
    assert ok == 1 and "FFNSKIP_CUDA_GATE=1" in note and "not yet verified" in note


def test_cuda_without_the_gate_or_split_across_gpus_stays_dense(monkeypatch):
    monkeypatch.setenv("FFNSKIP_CUDA_GATE", "1")
    ok, why = _verdict("CUDA", "CUDA0", 0)
    assert ok == 0 and "built without the FFN-skip gate" in why
    ok, why = _verdict("CUDA", "CUDA_Split", 1)
    assert ok == 0 and "split across GPUs" in why and "blk.3.ffn_down.weight" in why


def test_other_gpu_backends_stay_dense_per_model():
    for reg, buft in (("Metal", "Metal"), ("ROCm", "ROCm0"), ("SYCL", "SYCL0")):
        ok, why = _verdict(reg, buft, 1)
        assert ok == 0 and f"'{buft}'" in why and "per model" in why
