"""Two ``Llama`` objects on different models with different skip settings,
used from two threads at once, give the outputs they give alone (issue 7)."""

from __future__ import annotations

import threading

from ffnskip_gguf import Llama

PROMPTS = ["The history of the printing press", "A good way to learn a language is", "def fibonacci(n):"]


def _run(llm: Llama, reps: int = 2) -> list:
    out = []
    for _ in range(reps):
        for p in PROMPTS:
            llm.reset()  # no KV-prefix reuse between calls: every call does the same work
            llm.reset_ffn_skip_stats()
            text = llm(p, max_tokens=48, temperature=0)["choices"][0]["text"]
            out.append((text, llm.ffn_skip_stats().skipped_per_layer))
    return out


def test_two_models_in_two_threads_match_their_solo_runs(smollm2_path, gemma_path):
    a = Llama(smollm2_path, n_ctx=256, n_threads=1, verbose=False, ffn_skip=True, ffn_skip_warmup=8)
    b = Llama(gemma_path, n_ctx=256, n_threads=1, verbose=False, ffn_skip="paper", ffn_skip_warmup=4,
              ffn_skip_exclude=[3])
    try:
        solo_a, solo_b = _run(a), _run(b)
        assert any(sum(s) for _, s in solo_a) and any(sum(s) for _, s in solo_b)  # both really skip
        results: dict = {}
        errors: list = []

        def work(name, llm):
            try:
                results[name] = _run(llm)
            except BaseException as e:  # noqa: BLE001  reported below
                errors.append(e)

        ts = [threading.Thread(target=work, args=("a", a)), threading.Thread(target=work, args=("b", b))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        assert results["a"] == solo_a
        assert results["b"] == solo_b
    finally:
        a.close()
        b.close()
