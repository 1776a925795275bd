"""``ffnskip-gguf serve`` (issue 7): llama-cpp-python's OpenAI-compatible
server with our Llama, started on loopback as a user would, used with a real
HTTP client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import N_THREADS

STATS_FIELDS = {"skip_ratio", "decode_tokens", "skipped", "run", "skipped_per_layer", "run_per_layer",
                "cos_mean_per_layer", "supported"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model, log, extra=()):
    port = _free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "ffnskip_gguf", "serve", "--model", model,
                                 "--port", str(port), "--threads", str(N_THREADS), "--n-ctx", "1024", *extra],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(base + "/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return httpx.Client(base_url=base, timeout=120), proc


def _stop(client, proc):
    client.close()
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    client, proc = _start(smollm2_path, tmp_path_factory.mktemp("srv") / "server.log", ["--ffn-skip"])
    yield client, proc
    _stop(client, proc)


def _complete(client, prompt, n=48):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


def test_completion_reports_its_skip_ratio_in_a_header(server):
    client, _ = server
    r = _complete(client, "Once upon a time, in a small village by the sea,")
    body = r.json()
    assert body["choices"][0]["text"].strip()
    assert body["usage"]["completion_tokens"] == 48
    # generation goes past the 32-position warm-up: the gate skips some FFNs
    assert 0.0 < float(r.headers["x-ffn-skip-ratio"]) < 1.0


def test_streaming_chat_carries_ffn_skip_in_the_final_chunk(server):
    client, _ = server
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
            "max_tokens": 40, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip()
    final = [c for c in chunks if c["choices"][0].get("finish_reason")]
    assert len(final) == 1 and "ffn_skip" in final[0]
    fs = final[0]["ffn_skip"]
    assert fs["decode_tokens"] >= 39 and 0.0 <= fs["skip_ratio"] < 1.0


def test_streaming_equals_non_streaming(server):
    client, _ = server
    prompt = "The three primary colors are"
    full = _complete(client, prompt, 24).json()["choices"][0]["text"]
    parts = []
    with client.stream("POST", "/v1/completions",
                       json={"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(parts) == full


def test_stats_endpoint_returns_process_totals(server):
    client, _ = server
    before = client.get("/ffn_skip/stats").json()
    assert STATS_FIELDS <= set(before) and before["supported"] is True and before["n_layer"] == 30
    _complete(client, "A recipe for bread:", 40)
    after = client.get("/ffn_skip/stats").json()
    assert after["decode_tokens"] >= before["decode_tokens"] + 39
    assert after["skipped"] == sum(after["skipped_per_layer"])
    assert after["params"]["mode"] == "adaptive" and after["last_response"]["decode_tokens"] >= 39


def test_concurrent_clients_are_all_answered_as_alone(server):
    client, _ = server
    prompts = [f"Fact number {i} about the ocean:" for i in range(6)]
    alone = [_complete(client, p, 24).json()["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(6) as ex:
        together = list(ex.map(lambda p: _complete(client, p, 24).json()["choices"][0]["text"], prompts))
    assert together == alone


@pytest.mark.parametrize("body", [
    b'{"prompt": "Once upon a ti',  # truncated JSON
    b"not json at all",
    b'{"prompt": "x", "max_tokens": -5}',
    b'{"prompt": "x", "temperature": "hot"}',
    b'{"messages": "hello"}',
    b"[1, 2, 3]",
    b'{"prompt": "' + b"word " * 3000 + b'", "max_tokens": 4}',  # longer than the context
    b"",  # no body
    b'{"prompt": "", "max_tokens": 4}',  # empty prompt (llama-cpp-python asserts)
    b'{"prompt": ["a", "b"], "max_tokens": 4}',
    b'{"prompt": "Hi", "max_tokens": 4, "grammar": "root ::= ((("}',  # segfaults llama.cpp's GBNF parser
    b'{"prompt": "Hi", "max_tokens": 4, "logit_bias": {"abc": 5}}',
])
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, body):
    client, proc = server
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json() or "detail" in r.json()
    assert proc.poll() is None
    _complete(client, "Still there?", 4)


def test_embeddings_on_a_completion_server_are_a_400(server):
    client, proc = server
    r = client.post("/v1/embeddings", json={"input": "hello"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "embedding mode" in err["message"]
    assert proc.poll() is None
    _complete(client, "Still there?", 4)


def test_out_of_range_token_ids_to_detokenize_are_a_400(server):
    client, proc = server
    r = client.post("/extras/detokenize", json={"tokens": [1, 10**9]})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    assert proc.poll() is None
    assert client.post("/extras/detokenize", json={"tokens": [1, 2]}).status_code == 200


def test_stats_during_a_stream_do_not_cut_it(server):
    client, _ = server
    import threading

    chunks = []

    def stream():
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "List twenty animals:", "max_tokens": 64, "temperature": 0,
                                 "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))

    t = threading.Thread(target=stream)
    t.start()
    for _ in range(5):
        assert client.get("/ffn_skip/stats").status_code == 200
        assert client.get("/v1/models").status_code == 200
    t.join(120)
    assert chunks and chunks[-1]["choices"][0]["finish_reason"] is not None and "ffn_skip" in chunks[-1]


@pytest.mark.parametrize("g,ok", [
    ('root ::= "yes" | "no"', True),
    ('root ::= item+\nitem ::= [a-z(] "(" # comment (\n', True),
    ("root ::= (((", False),
    ('root ::= "open', False),
    ("item ::= [a-z]", False),
    ("root ::= [abc", False),
    ("root ::= a)", False),
])
def test_grammar_precheck(g, ok):
    from ffnskip_gguf.server import grammar_problem

    assert (grammar_problem(g) == "") == ok


def test_the_prompt_cache_reuses_states_and_counts_only_generated_tokens(smollm2_path, tmp_path):
    """--cache (llama-cpp-python's LlamaRAMCache): a follow-up request that
    extends the first one's prompt and answer reuses its state; each answer
    counts its own generated tokens only (the reused prompt is not re-counted)."""
    client, proc = _start(smollm2_path, tmp_path / "server.log",
                          ["--cache", "--ffn-skip", "--threshold", "0.9", "--warmup", "0"])
    try:
        p = "The history of the printing press begins in the fifteenth century, when"
        r1 = client.post("/v1/completions", json={"prompt": p, "max_tokens": 16, "temperature": 0})
        assert r1.status_code == 200, r1.text
        t = r1.json()["choices"][0]["text"]
        n1 = r1.json()["usage"]["completion_tokens"]
        assert float(r1.headers["x-ffn-skip-ratio"]) > 0
        r2 = client.post("/v1/completions", json={"prompt": p + t, "max_tokens": 16, "temperature": 0})
        assert r2.status_code == 200, r2.text
        n2 = r2.json()["usage"]["completion_tokens"]
        st = client.get("/ffn_skip/stats").json()
        assert st["decode_tokens"] == (n1 - 1) + (n2 - 1)
    finally:
        _stop(client, proc)
