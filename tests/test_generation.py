"""llama-cpp-python features work unchanged through our Llama."""

import pytest

from ffnskip_gguf import Llama


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return Llama(smollm2_path, n_ctx=512, n_threads=2, verbose=False, seed=0)


def test_completion(llm):
    out = llm("The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] > 0


def test_chat_completion(llm):
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "What color is the sky on a clear day?"}],
                                     max_tokens=32, temperature=0)
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert "blue" in msg["content"]


def test_streaming_equals_non_streaming(llm):
    full = llm("Water boils at", max_tokens=16, temperature=0)["choices"][0]["text"]
    parts = [c["choices"][0]["text"] for c in llm("Water boils at", max_tokens=16, temperature=0, stream=True)]
    assert len(parts) > 1
    assert "".join(parts) == full


def test_ffn_skip_keyword_is_accepted_and_switchable(llm):
    llm.set_ffn_skip(True)
    assert llm.ffn_skip_params().enabled
    llm.set_ffn_skip(False)
    assert not llm.ffn_skip_params().enabled
