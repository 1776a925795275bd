"""``ffn_skip.*`` entries of ``kv_overrides`` (issue 13, C5): applied like
file values (arguments > overrides > file), or refused with a clear error;
never silently ignored."""

from __future__ import annotations

import warnings

import pytest

from ffnskip_gguf import Llama
from ffnskip_gguf.errors import MetadataError


def _llama(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Llama(model_path=path, n_ctx=128, verbose=False, n_threads=2, **kw)


def test_overrides_apply_like_file_values(smollm2_path):
    llm = _llama(smollm2_path, ffn_skip=True, kv_overrides={
        "ffn_skip.max_skip": 1, "ffn_skip.threshold": 0.5, "ffn_skip.continue_run": False,
        "ffn_skip.warmup": 0, "ffn_skip.version": 1})
    p = llm.ffn_skip_params()
    assert (p.max_skip, p.threshold, p.continue_run, p.warmup) == (1, 0.5, False, 0)
    for k in ("ffn_skip_max_skip", "ffn_skip_threshold", "ffn_skip_continue", "ffn_skip_warmup"):
        assert p.sources[k] == "override"
    # and they act: one FFN per token at most
    llm("The capital of France is", max_tokens=8, temperature=0.0)
    st = llm.ffn_skip_stats()
    assert st.decode_tokens == 7 and 0 < st.skipped <= 7


def test_arguments_beat_overrides(smollm2_path):
    llm = _llama(smollm2_path, ffn_skip=True, ffn_skip_max_skip=3, kv_overrides={"ffn_skip.max_skip": 1})
    p = llm.ffn_skip_params()
    assert p.max_skip == 3 and p.sources["ffn_skip_max_skip"] == "argument"


def test_other_overrides_are_llama_cpps(smollm2_path):
    llm = _llama(smollm2_path, kv_overrides={"tokenizer.ggml.add_bos_token": False})
    assert llm.ffn_skip_params().sources["ffn_skip_max_skip"] == "default"


@pytest.mark.parametrize("overrides, error, match", [
    ({"ffn_skip.max_skip": 1.5}, ValueError, "float is not valid for ffn_skip_max_skip"),
    ({"ffn_skip.max_skip": "2"}, ValueError, "str is not valid"),
    ({"ffn_skip.continue_run": 1}, ValueError, "int is not valid for ffn_skip_continue"),
    ({"ffn_skip.threshold": float("nan")}, ValueError, "ffn_skip.threshold"),
    ({"ffn_skip.cold_start": 99}, ValueError, "cold_start"),
    ({"ffn_skip.exclude": 3}, ValueError, "per-layer array"),
    ({"ffn_skip.remove_layers": 3}, ValueError, "pass ffn_remove_layers"),
    ({"ffn_skip.maxskip": 1}, ValueError, "unknown FFN-skip key"),
    ({"ffn_skip.version": 99}, MetadataError, "reads versions 1, 2"),
])
def test_bad_overrides_are_refused_before_loading(smollm2_path, overrides, error, match):
    with pytest.raises(error, match=match):
        _llama(smollm2_path, ffn_skip=True, kv_overrides=overrides)
