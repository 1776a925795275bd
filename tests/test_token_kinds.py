"""Prompt or generated token is what the caller does, not the batch shape
(issue 13, A-C): prompt tokens run dense and are not counted, generated
tokens are gated and counted, through llama-cpp-python's paths; reused KV
state is cut where other settings affected it. README: "Prompt and
generated tokens"."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ffnskip_gguf import Llama

P = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
     "combined movable metal type, an oil-based ink and a wooden screw press into one system.")
PARAGRAPH = ("Honey bees live in colonies of many thousands of workers, a few hundred drones and one queen. "
             "The workers gather nectar and pollen, build the comb and care for the young, while the queen "
             "lays the eggs. In winter the colony clusters together to keep warm and lives on stored honey.")
GATE = dict(ffn_skip=True, ffn_skip_threshold=0.9, ffn_skip_warmup=0)


def _llama(path, **kw):
    kw.setdefault("n_ctx", 512)
    kw.setdefault("verbose", False)
    kw.setdefault("n_threads", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Llama(model_path=path, **kw)


def _text(llm, prompt, n):
    return llm(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]


def test_prompt_tokens_are_dense_when_the_same_prompt_comes_twice(smollm2_path):
    llm = _llama(smollm2_path, **GATE)
    assert len(llm.tokenize(P.encode())) >= 30
    first = _text(llm, P, 16)
    st1 = llm.ffn_skip_stats()
    llm.reset_ffn_skip_stats()
    second = _text(llm, P, 16)  # full prefix hit: the last prompt token is re-decoded alone
    st2 = llm.ffn_skip_stats()
    fresh = _text(_llama(smollm2_path, **GATE), P, 16)
    assert st1.decode_tokens == 15 and st2.decode_tokens == 15  # 16 sampled, the last one not decoded
    assert st1.skipped > 0
    assert second == first == fresh


def test_a_prompt_one_token_longer_than_the_batch_stays_dense(smollm2_path):
    kw = dict(n_batch=64, logits_all=True)
    gated = _llama(smollm2_path, ffn_skip=True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0, **kw)
    dense = _llama(smollm2_path, **kw)
    toks = (gated.tokenize((P + " " + P + " " + P).encode()) * 2)[:65]
    gated.eval(toks)
    dense.eval(toks)
    assert gated.ffn_skip_stats().decode_tokens == 0
    assert np.array_equal(np.asarray(gated.scores[64]).view(np.uint32), np.asarray(dense.scores[64]).view(np.uint32))


def test_a_single_token_eval_outside_generate_is_a_generated_token(smollm2_path):
    llm = _llama(smollm2_path, ffn_skip=True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0)
    toks = llm.tokenize(P.encode())
    llm.eval(toks[:-3])
    for t in toks[-3:]:
        llm.eval([t])  # low-level teacher forcing
    st = llm.ffn_skip_stats()
    assert st.decode_tokens == 3 and st.skipped > 0


def test_speculative_verification_tokens_are_gated_and_counted(smollm2_path):
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    prompt = PARAGRAPH + "\nRepeat the paragraph above:\n"
    plain = _llama(smollm2_path, **GATE)
    _text(plain, prompt, 64)
    sp = plain.ffn_skip_stats()
    spec = _llama(smollm2_path, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=5), **GATE)
    _text(spec, prompt, 64)
    ss = spec.ffn_skip_stats()
    assert sp.decode_tokens == 63 and sp.rejected_tokens == 0
    # every evaluated token is counted: the 63 (or 64, when the last sampled
    # token was an accepted draft) real ones plus the rejected drafts
    assert ss.decode_tokens - ss.rejected_tokens in (63, 64)
    assert ss.rejected_tokens > 0
    assert ss.skipped > 0.5 * sp.skipped  # gated like the plain run, not mostly dense


def test_a_settings_change_drops_kv_computed_while_skipping(smollm2_path):
    llm = _llama(smollm2_path, ffn_skip=True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0)
    n_prompt = len(llm.tokenize(P.encode()))
    t = _text(llm, P, 40)
    assert llm.ffn_skip_stats().skipped > 0
    llm.set_ffn_skip(False)
    assert llm.n_tokens == n_prompt  # cut at the first generated position: the dense prompt is kept
    continued = _text(llm, P + t, 16)
    fresh = _text(_llama(smollm2_path), P + t, 16)
    assert continued == fresh


def test_same_settings_keep_the_whole_kv_cache(smollm2_path):
    llm = _llama(smollm2_path, **GATE)
    _text(llm, P, 8)
    n = llm.n_tokens
    llm.set_ffn_skip(True)  # same effective settings
    assert llm.n_tokens == n


def test_a_state_saved_under_other_settings_keeps_only_its_dense_prefix(smollm2_path):
    llm = _llama(smollm2_path, ffn_skip=True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0)
    n_prompt = len(llm.tokenize(P.encode()))
    _text(llm, P, 12)
    state = llm.save_state()
    assert state.n_tokens > n_prompt
    llm.load_state(state)  # same settings: all kept
    assert llm.n_tokens == state.n_tokens
    llm.set_ffn_skip(False)
    llm.load_state(state)  # other settings: cut where the gate first acted
    assert llm.n_tokens == n_prompt


def test_embedding_inputs_are_never_gated(smollm2_path):
    gated = _llama(smollm2_path, embedding=True, ffn_skip=True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0)
    dense = _llama(smollm2_path, embedding=True)
    for text in ("A short sentence.", "x"):  # one token too
        a = np.asarray(gated.embed(text), np.float32)
        b = np.asarray(dense.embed(text), np.float32)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert gated.ffn_skip_stats().decode_tokens == 0


def test_the_raw_c_api_keeps_the_batch_shape_rule(smollm2_path):
    from ffnskip_gguf import _lib

    llm = _llama(smollm2_path, ffn_skip=True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0)
    assert _lib.ffnskip_get_token_kind(llm._ctx.ctx) == _lib.FFNSKIP_TOKENS_AUTO
    assert _lib.ffnskip_set_token_kind(llm._ctx.ctx, 7) == -1
    assert _lib.ffnskip_get_token_kind(llm._ctx.ctx) == _lib.FFNSKIP_TOKENS_AUTO
    with pytest.raises(Exception):
        llm.eval([10**9])  # invalid token: the kind is restored
    assert _lib.ffnskip_get_token_kind(llm._ctx.ctx) == _lib.FFNSKIP_TOKENS_AUTO


def test_a_mode_change_re_reserves_the_compute_buffers(smollm2_path, capfd):
    llm = _llama(smollm2_path, **GATE)
    _text(llm, P, 4)
    llm.set_ffn_skip(False)  # topology change: no gate nodes
    _text(llm, P + " And", 4)
    llm.set_ffn_skip(True, ffn_remove_layers=[5])
    _text(llm, P, 4)
    llm.close()
    err = capfd.readouterr().err
    assert "does not match expectation" not in err, err[-2000:]


def test_chat_and_streaming_count_only_generated_tokens(smollm2_path):
    llm = _llama(smollm2_path, **GATE)
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    out = llm.create_chat_completion(messages=msgs, max_tokens=12, temperature=0.0)
    n = out["usage"]["completion_tokens"]
    st = llm.ffn_skip_stats()
    assert st.decode_tokens == n - 1 and st.skipped > 0
    llm.reset_ffn_skip_stats()
    chunks = list(llm.create_chat_completion(messages=msgs, max_tokens=12, temperature=0.0, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == out["choices"][0]["message"]["content"]
    assert llm.ffn_skip_stats().decode_tokens == n - 1


def test_ram_cache_states_follow_the_settings(smollm2_path):
    from llama_cpp import LlamaRAMCache

    # heavy forced skipping: KV of the generated tokens far from dense
    llm = _llama(smollm2_path, ffn_skip=True, ffn_skip_threshold=-2.0, ffn_skip_warmup=0, ffn_skip_max_skip=20,
                 ffn_skip_cold_start=2, ffn_skip_cold_end=2)
    llm.set_cache(LlamaRAMCache())
    t = _text(llm, P, 24)
    llm.set_ffn_skip(False)
    llm.reset()
    llm.ffn_skip_stats()
    # the continuation's prompt extends into what was generated while
    # skipping: the cached state is loaded and cut to its dense prompt
    b = _text(llm, P + t, 12)
    assert b == _text(_llama(smollm2_path), P + t, 12)


def test_turning_static_removal_on_drops_the_whole_cache(smollm2_path):
    llm = _llama(smollm2_path)
    _text(llm, P, 8)
    assert llm.n_tokens > 0
    llm.set_ffn_skip("static", ffn_remove_layers=[5, 9])
    assert llm.n_tokens == 0  # removal changes the prompt's KV too
    a = _text(llm, P, 8)
    assert a == _text(_llama(smollm2_path, ffn_skip="static", ffn_remove_layers=[5, 9]), P, 8)
    state = llm.save_state()
    llm.set_ffn_skip(False)
    llm.load_state(state)  # saved under removal, loaded dense: nothing of it holds
    assert llm.n_tokens == 0


def test_a_dense_state_loaded_under_removal_is_dropped(smollm2_path):
    llm = _llama(smollm2_path)
    _text(llm, P, 8)
    state = llm.save_state()
    llm.set_ffn_skip("static", ffn_remove_layers=[5])
    llm.load_state(state)
    assert llm.n_tokens == 0


def test_a_late_close_of_an_abandoned_generator_counts_nothing_spurious(smollm2_path):
    llm = _llama(smollm2_path, **GATE)
    toks = llm.tokenize(P.encode())
    g = llm.generate(toks, temp=0.0)
    for _ in range(3):
        next(g)
    llm.reset_ffn_skip_stats()
    _text(llm, "A different prompt about bees and honey", 8)  # another call while g is held
    g.close()
    assert llm.ffn_skip_stats().rejected_tokens == 0
