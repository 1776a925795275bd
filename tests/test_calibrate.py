"""Calibration (issue 5): ``calibrate`` measures settings on text and stores
them in a GGUF copy; the loader uses them as defaults; bad keys are clear
errors. One real calibration of SmolLM2 (small corpus) serves the tests."""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import warnings

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from ffnskip_gguf import Llama, _lib
from ffnskip_gguf.calibrate import CalibrationError, Calibrator, calibrate
from ffnskip_gguf.cli import main as cli_main
from ffnskip_gguf.errors import MetadataError
from ffnskip_gguf.evaluate import Evaluator, EvalConfig, default_corpus
from ffnskip_gguf.gguf_io import copy_gguf

from conftest import N_THREADS

TARGET = 0.10  # 3 of SmolLM2's 30 layers


@pytest.fixture(scope="module")
def calibrated(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "smollm2-cal.gguf"
    rep = out.parent / "report"
    res = calibrate(smollm2_path, out, target_skip=TARGET, tokens=256, held_out_tokens=512, report_dir=rep,
                    progress=False, n_threads=N_THREADS)
    return res, out, rep


def _tensors(path):
    r = GGUFReader(path)
    return {t.name: hashlib.sha256(bytes(t.data.tobytes())).hexdigest() for t in r.tensors}


def _fields(path):
    r = GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_calibrated_file_keeps_every_tensor_byte_identical(calibrated, smollm2_path):
    _, out, _ = calibrated
    assert _tensors(out) == _tensors(smollm2_path)


def test_calibrated_file_keeps_every_original_key(calibrated, smollm2_path):
    _, out, _ = calibrated
    a, b = _fields(smollm2_path), _fields(out)
    assert {k: v for k, v in b.items() if not k.startswith("ffn_skip.")} == a


def test_calibrated_file_carries_settings_and_provenance(calibrated):
    res, out, _ = calibrated
    f = _fields(out)
    # layout 2 only when the file needs the probe signal (older readers refuse it)
    assert f["ffn_skip.version"] == (2 if res.placement == "probe" else 1)
    assert f["ffn_skip.calibration.mode"] == "target_skip"
    assert f["ffn_skip.calibration.target"] == pytest.approx(TARGET)
    assert f["ffn_skip.calibration.skip_ratio"] == pytest.approx(res.held_out.skip_ratio, rel=1e-6)
    assert f["ffn_skip.calibration.ppl_increase"] == pytest.approx(res.held_out.ppl_increase, rel=1e-5)
    assert f["ffn_skip.calibration.placement"] == res.placement
    comp = json.loads(f["ffn_skip.calibration.comparison"])
    assert comp[0]["placement"] == res.placement and any(c["placement"] == "paper" for c in comp)
    for kw, v in res.settings.items():
        key = {"ffn_skip_continue": "ffn_skip.continue_run", "ffn_remove_layers": "ffn_skip.remove_layers"}.get(
            kw, "ffn_skip." + kw[len("ffn_skip_"):])
        if isinstance(v, list) and not v:
            assert key not in f  # empty arrays are not valid GGUF
        elif isinstance(v, list) and isinstance(v[0], float):
            assert f[key] == pytest.approx(v, rel=1e-6)
        else:
            assert f[key] == v


def test_target_skip_is_reached_on_held_out_text(calibrated):
    res, _, _ = calibrated
    assert res.placement in ("fixed", "adaptive", "probe", "static")
    # fixed placements skip exactly round(target L) FFNs per decode token;
    # adaptive ones are calibrated on other text: within 40% of the target
    assert abs(res.held_out.skip_ratio - TARGET) <= 0.4 * TARGET
    assert res.tokens["held_out"] >= 512 and math.isfinite(res.held_out.ppl_increase)


def test_calibration_measures_the_probe_signal_and_says_why_it_chose(calibrated):
    res, _, rep = calibrated
    probes = [t for t in res.trials if t.placement == "probe"]
    adaptive = [t for t in res.trials if t.placement == "adaptive"]
    # the probe runs on the same layer sets and fractions as the cosine gate
    assert probes and sorted((t.layers, t.fraction) for t in probes) == sorted((t.layers, t.fraction)
                                                                              for t in adaptive)
    assert all(t.settings["ffn_skip_signal"] == "probe" for t in probes)
    why = [n for n in res.notes if n.startswith("chosen: ")]
    assert len(why) == 1 and res.held_out.name in why[0] and "probe" in why[0]
    # the JSON report summarises the weights instead of listing them
    text = (rep / "calibration.json").read_text()
    assert "floats>" in text and len(text) < 2_000_000


def test_calibrated_values_are_in_effect_when_loaded(calibrated):
    res, out, _ = calibrated
    llm = Llama(str(out), n_ctx=128, verbose=False, ffn_skip=True, n_threads=N_THREADS)
    p = llm.ffn_skip_params()
    for kw, v in res.settings.items():
        assert p.sources[kw] == "file", kw
    if "ffn_skip_threshold" in res.settings:
        assert p.threshold == pytest.approx(res.settings["ffn_skip_threshold"], rel=1e-6)
    # what the native context holds
    c = _lib.ffnskip_params()
    _lib.ffnskip_get_params(llm._ffn_ctx, ctypes.byref(c))
    assert c.max_skip == p.max_skip and c.cold_start == p.cold_start and c.cold_end == p.cold_end
    assert [c.exclude[j] for j in range(30)] == [int(j in p.exclude) for j in range(30)]
    assert [c.remove[j] for j in range(30)] == [int(j in p.remove_layers) for j in range(30)]
    # arguments still override the file
    llm.set_ffn_skip(ffn_skip_max_skip=1)
    assert llm.ffn_skip_params().sources["ffn_skip_max_skip"] == "argument"
    llm.close()


def test_skip_ratio_on_other_text_is_close_to_the_calibrated_one(calibrated):
    """The eval corpus shares no text with the calibration corpus; the stated
    tolerance: within 40% of the calibrated ratio (fixed placements: equal)."""
    res, out, _ = calibrated
    ev = Evaluator(out, corpus=default_corpus(), chunk=128, max_tokens=1024, progress=False, n_threads=N_THREADS)
    try:
        r = ev.run(EvalConfig("file", "gate", dict(res.settings)))
    finally:
        ev.close()
    assert r.decode_tokens > 500
    assert abs(r.skip_ratio - res.held_out.skip_ratio) <= 0.4 * res.held_out.skip_ratio
    assert r.skip_ratio > 0


def test_report_has_json_and_plot(calibrated):
    res, _, rep = calibrated
    d = json.loads((rep / "calibration.json").read_text())
    assert d["held_out"]["skip_ratio"] == pytest.approx(res.held_out.skip_ratio)
    assert len(d["profile"]["cos_mean"]) == 30 and len(d["single_cost"]) == 30
    assert (rep / "calibration.png").stat().st_size > 10_000


def test_inspect_shows_the_calibration(calibrated, smollm2_path, capsys):
    _, out, _ = calibrated
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llama, 30 layers" in text and "ffn_skip.version 1" in text and "calibration.placement" in text
    assert cli_main(["inspect", smollm2_path]) == 0
    text = capsys.readouterr().out
    assert "not calibrated" in text and "FFN share" in text


def test_calibrate_refuses_to_overwrite_its_input(smollm2_path):
    with pytest.raises(ValueError, match="refusing to overwrite"):
        calibrate(smollm2_path, smollm2_path, progress=False)
    assert cli_main(["calibrate", smollm2_path, "-o", smollm2_path, "--quiet"]) == 2


def test_calibrating_an_unsupported_architecture_is_a_clear_error(smollm2_path, tmp_path):
    p = copy_gguf(smollm2_path, tmp_path / "model.gguf", rename_arch="ernie4_5")
    with pytest.raises(CalibrationError, match="not supported.*ernie4_5"):
        Calibrator(p, progress=False, n_threads=N_THREADS)


@pytest.mark.parametrize("rows", [0, -64, 1.5, True, "64"])
def test_invalid_score_rows_are_rejected(smollm2_path, rows):
    with pytest.raises(CalibrationError, match="score_rows"):
        Calibrator(smollm2_path, score_rows=rows, progress=False, n_threads=N_THREADS)


def test_corpus_too_small_is_a_clear_error(smollm2_path):
    with pytest.raises(CalibrationError, match="too small"):
        Calibrator(smollm2_path, corpus=["A few words only."], progress=False, n_threads=N_THREADS)


@pytest.mark.parametrize("kw", [dict(quality_budget=float("nan")), dict(quality_budget=-0.1),
                                dict(target_skip=1.5), dict(target_skip=0.0)])
def test_invalid_targets_are_rejected(smollm2_path, kw):
    cal = Calibrator(smollm2_path, tokens=16, held_out_tokens=16, progress=False, n_threads=N_THREADS)
    try:
        with pytest.raises(CalibrationError):
            cal.run(**kw)
    finally:
        cal.close()


U, I, F, B, S, A = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL,
                    GGUFValueType.STRING, GGUFValueType.ARRAY)


@pytest.mark.parametrize("key,value,match", [
    ("ffn_skip.threshold", ("0.9", S, None), "ffn_skip.threshold has type STRING"),
    ("ffn_skip.threshold", ([0.9] * 29, A, F), "ffn_skip.threshold: .*29 values"),
    ("ffn_skip.threshold", (float("nan"), F, None), "ffn_skip.threshold: .*finite"),
    ("ffn_skip.cold_start", (-1, I, None), "ffn_skip.cold_start: .*>= 0"),
    ("ffn_skip.cold_end", (31, U, None), "ffn_skip.cold_end: .*larger than the model"),
    ("ffn_skip.cold_start", (1.5, F, None), "ffn_skip.cold_start has type FLOAT32"),
    ("ffn_skip.max_runs", (0, U, None), "ffn_skip.max_runs: .*>= 1"),
    ("ffn_skip.continue_run", (1, U, None), "ffn_skip.continue_run has type UINT32"),
    ("ffn_skip.exclude", ([1.0, 2.0], A, F), "ffn_skip.exclude has type array of FLOAT32"),
    ("ffn_skip.exclude", ([40], A, I), "ffn_skip.exclude: layer 40 outside"),
    ("ffn_skip.remove_layers", (3, I, None), "ffn_skip.remove_layers has type INT32"),
    ("ffn_skip.version", (3, U, None), "ffn_skip.version = 3"),
    ("ffn_skip.version", ("1", S, None), "ffn_skip.version has type STRING"),
])
def test_corrupted_calibration_keys_name_the_key(calibrated, tmp_path, key, value, match):
    _, out, _ = calibrated
    p = copy_gguf(out, tmp_path / "bad.gguf", set_kv={key: value})
    with pytest.raises(MetadataError, match=match):
        Llama(str(p), verbose=False, ffn_skip=True)
    # dense still loads: ffn_skip=False ignores the calibration
    Llama(str(p), n_ctx=64, verbose=False).close()


def test_both_splits_mix_every_corpus_file(smollm2_path):
    texts = [f"{name} " * 700 for name in ("apple", "river", "violin")]
    cal = Calibrator(smollm2_path, corpus=texts, tokens=4000, held_out_tokens=4000, chunk=96, progress=False,
                     n_threads=N_THREADS)
    try:
        ids = [set(cal.r.tokenize(" " + name, bos=False)) for name in ("apple", "river", "violin")]
        for split in (cal.search, cal.held):
            seen = set(t for c in split for t in c)
            assert all(i & seen for i in ids)
    finally:
        cal.close()


def test_quality_budget_mode_stays_within_budget_or_says_zero(smollm2_path, tmp_path):
    out = tmp_path / "budget.gguf"
    res = calibrate(smollm2_path, out, quality_budget=0.05, tokens=256, held_out_tokens=256, progress=False,
                    n_threads=N_THREADS)
    assert res.mode == "quality_budget" and res.paper_within_budget is not None
    assert res.held_out.ppl_increase <= 0.05
    llm = Llama(str(out), n_ctx=128, verbose=False, ffn_skip=True, n_threads=N_THREADS)
    try:
        llm("Once upon a time there was a", max_tokens=48, temperature=0)
        st = llm.ffn_skip_stats()
        if res.placement in ("none", "static"):
            # no gate budget: the library runs static mode (no gate nodes, same decisions)
            assert res.settings["ffn_skip_max_skip"] == 0 and st.mode == "static"
        if res.placement == "none":
            assert st.skip_ratio == 0.0 and "no setting within the budget" in " ".join(res.notes)
        else:
            assert st.skip_ratio > 0.0
    finally:
        llm.close()


def _pruned(src, dst, drop: int, set_kv: dict):
    """What ``llama-quantize --prune-layers`` writes: block ``drop`` left out,
    later blocks renumbered, block_count - 1, every other key copied."""
    from gguf import GGUFWriter

    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch=arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in set_kv:
            continue
        v = f.contents()
        if f.name == f"{arch}.block_count":
            v -= 1
        t = f.types[0]
        w.add_key_value(f.name, v, t, sub_type=f.types[-1] if t == GGUFValueType.ARRAY else None)
    for k, (v, t, sub) in set_kv.items():
        w.add_key_value(k, v, t, sub_type=sub)
    for t in r.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            n = int(parts[1])
            if n == drop:
                continue
            if n > drop:
                parts[1] = str(n - 1)
        w.add_tensor(".".join(parts), t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_calibration_records_the_model_it_was_measured_on(calibrated, smollm2_path):
    from ffnskip_gguf.metadata import ffn_fingerprints

    _, out, _ = calibrated
    f = _fields(out)
    shapes, types = ffn_fingerprints(smollm2_path)
    assert (f["ffn_skip.model.n_layer"], f["ffn_skip.model.ffn_shapes"], f["ffn_skip.model.ffn_types"]) == \
        (30, shapes, types)


def test_a_pruned_model_refuses_its_calibration(calibrated, tmp_path, capsys):
    _, out, _ = calibrated
    p = _pruned(out, tmp_path / "pruned.gguf", 3, {
        "ffn_skip.threshold": (0.9, F, None), "ffn_skip.exclude": ([12], A, I)})
    with pytest.raises(MetadataError, match="30 layers .* this file has 29"):
        Llama(str(p), verbose=False, ffn_skip=True)
    Llama(str(p), n_ctx=64, verbose=False).close()  # dense still loads
    assert cli_main(["inspect", str(p)]) == 0
    assert "INVALID: the calibration was measured on a model with 30 layers" in capsys.readouterr().out


def test_other_ffn_tensors_refuse_the_calibration(calibrated, tmp_path):
    _, out, _ = calibrated
    p = copy_gguf(out, tmp_path / "other.gguf", set_kv={"ffn_skip.model.ffn_shapes": ("0123456789abcdef", S, None)})
    with pytest.raises(MetadataError, match="names or shapes differ"):
        Llama(str(p), verbose=False, ffn_skip=True)


def test_a_requantized_model_warns_once_and_loads(calibrated, tmp_path):
    from ffnskip_gguf.llama import FfnSkipCalibrationMismatchWarning

    _, out, _ = calibrated
    p = copy_gguf(out, tmp_path / "requant.gguf", set_kv={"ffn_skip.model.ffn_types": ("0123456789abcdef", S, None)})
    with pytest.warns(FfnSkipCalibrationMismatchWarning, match="requantized"):
        llm = Llama(str(p), n_ctx=64, verbose=False, ffn_skip=True)
    assert llm.ffn_skip_params().sources["ffn_skip_max_skip"] == "file"
    llm.close()


def test_calibrations_without_the_record_still_load(calibrated, tmp_path, capsys):
    _, out, _ = calibrated
    p = copy_gguf(out, tmp_path / "old.gguf", remove_prefixes=("ffn_skip.model.",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Llama(str(p), n_ctx=64, verbose=False, ffn_skip=True).close()
    assert cli_main(["inspect", str(p)]) == 0
    assert "not recorded" in capsys.readouterr().out
    assert cli_main(["inspect", str(out)]) == 0
    assert "fits this model            matches" in capsys.readouterr().out


@pytest.mark.parametrize("layers,static,rows", [([], False, 64), ([5], False, 64), ([5, 9], True, 64),
                                                ([5], False, 7), ([5, 9], True, 512)],
                         ids=["dense", "fixed", "static", "fixed-7-rows", "static-512-rows"])
def test_batched_removal_scores_like_one_token_decoding(smollm2_path, layers, static, rows):
    """Calibrator.score_removed (the search's fixed and static trials, in
    batches of ``rows`` positions, which may split a sequence) gives
    Evaluator.score's numbers under the fixed gate or static removal, token
    for token in the same order (bit for bit on SmolLM2 here; kernels of
    other quantizations may round batched ubatches differently, hence the
    tolerance)."""
    cal = Calibrator(smollm2_path, tokens=256, held_out_tokens=16, chunk=96, n_seq=3, progress=False,
                     n_threads=N_THREADS, score_rows=rows)
    try:
        # two groups of sequences, the last chunk shorter than the others
        chunks = cal.search[:3] + [cal.search[3][:50]]
        nb, tb = cal.score_removed(chunks, layers, prefill_too=static)
        if static:
            cal.r.set_policy("static", ffn_remove_layers=layers)
        elif layers:
            cal.r.set_policy(True, **cal.fixed_settings(layers))
        else:
            cal.r.set_policy(False)
        nd, td = cal.ev.score(chunks)
    finally:
        cal.close()
    assert len(nb) == len(nd) == 3 * 64 + 18
    assert abs(float((nb - nd).mean())) < 1e-3
    assert float(np.corrcoef(nb, nd)[0, 1]) > 0.999
    assert float((tb == td).mean()) >= 0.99


def test_trials_over_the_same_chunks_keep_the_prompt_kv_and_give_the_same_numbers(smollm2_path):
    """Runner.prompt keeps the previous trial's prompt KV entries when the
    prompts and the FFN removal are the same (the gate acts on decode tokens
    only): a trial scored after others equals the same trial on a fresh
    cache, bit for bit; static removal changes the prompt and is not kept."""
    cal = Calibrator(smollm2_path, tokens=128, held_out_tokens=16, chunk=96, n_seq=4, progress=False,
                     n_threads=N_THREADS)
    try:
        r = cal.r

        def gate():
            r.set_policy(True, **cal.gate_settings([5, 9], {5: 0.9, 9: 0.9}))
            return cal.ev.score(cal.search)

        def static():
            r.set_policy("static", ffn_remove_layers=[5])
            return cal.ev.score(cal.search)

        r.clear()
        fresh_gate = gate()
        r.clear()
        fresh_static = static()
        r.clear()
        kept0 = r.n_prompts_kept
        gate()                                    # fills the cache
        b = cal.score_removed(cal.search, [7], prefill_too=False)  # keeps it
        again = gate()                            # keeps it
        assert r.n_prompts_kept == kept0 + 2
        after_static = static()                   # another prompt: decoded again
        assert r.n_prompts_kept == kept0 + 2
        r.clear()
        fresh_b = cal.score_removed(cal.search, [7], prefill_too=False)
    finally:
        cal.close()
    for x, y in ((again, fresh_gate), (after_static, fresh_static), (b, fresh_b)):
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


def test_a_decode_outside_the_kept_prompts_drops_them(smollm2_path):
    """Runner.prompt keeps prompts only while nothing else was decoded next to
    them: a decode on another sequence (or inside a prompt, which llama.cpp
    refuses anyway) makes the next call decode the prompts again."""
    cal = Calibrator(smollm2_path, tokens=128, held_out_tokens=16, chunk=96, n_seq=4, progress=False,
                     n_threads=N_THREADS)
    try:
        r = cal.r
        prompts = [c[:32] for c in cal.search]
        first = r.prompt(prompts)
        kept = r.n_prompts_kept
        r.prompt(prompts)
        assert r.n_prompts_kept == kept + 1
        assert len(prompts) < 4
        r.decode([(prompts[0][5], 0, 3, False)])   # another sequence
        again = r.prompt(prompts)
        assert r.n_prompts_kept == kept + 1          # decoded again, not kept
        assert np.array_equal(first, again)
        assert not again.flags.writeable
    finally:
        cal.close()
