"""tests/synth.py: every architecture's tiny random model loads in the pinned
llama.cpp (which refuses missing and extra tensors), tokenizes, and decodes
a prompt plus 3 greedy tokens to finite logits; files are deterministic in
the seed."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import ffnskip_gguf  # noqa: F401  (wires llama_cpp to our library first)
import llama_cpp
from synth import ARCHS, write_synthetic

PROMPT = "the cat and the dog"

# One thread: these models are tiny (64-wide), so threads only add barrier
# waits; with 2 threads on a busy 2-core machine each decode took ~0.7 s
# (spinning workers descheduled), with 1 thread a few ms.
N_THREADS = 1


def _load(path: Path) -> llama_cpp.Llama:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=N_THREADS,
                               n_threads_batch=N_THREADS, logits_all=True, verbose=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_loads_and_decodes(arch, tmp_path):
    path = write_synthetic(arch, tmp_path / f"{arch}.gguf", seed=0)
    llm = _load(path)
    try:
        toks = llm.tokenize(PROMPT.encode(), add_bos=True)
        assert toks[0] == llm.token_bos()
        assert llm.detokenize(toks[1:]) == PROMPT.encode()
        assert len(toks) < 1 + len(PROMPT)      # some merges applied

        llm.eval(toks)
        for _ in range(3):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        assert llm.n_tokens == len(toks) + 3
        rows = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
        assert rows.shape == (len(toks) + 3, llm.n_vocab())
        assert np.isfinite(rows).all()
        # computed, not left-over zeros: every row varies over the vocab
        assert (rows.max(axis=1) > rows.min(axis=1)).all()
    finally:
        llm.close()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for arch in ARCHS:
        a = write_synthetic(arch, tmp_path / "a.gguf", seed=7).read_bytes()
        b = write_synthetic(arch, tmp_path / "b.gguf", seed=7).read_bytes()
        c = write_synthetic(arch, tmp_path / "c.gguf", seed=8).read_bytes()
        assert a == b, arch
        assert a != c and len(a) == len(c), arch


def test_cli_matches_api(tmp_path):
    out = tmp_path / "cli.gguf"
    script = Path(__file__).with_name("synth.py")
    subprocess.run([sys.executable, str(script), "qwen35moe", str(out), "--seed", "3",
                    "--layers", "4"], check=True, stdout=subprocess.DEVNULL)
    api = write_synthetic("qwen35moe", tmp_path / "api.gguf", seed=3, n_layer=4)
    assert out.read_bytes() == api.read_bytes()


def test_unknown_arch_and_too_few_layers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported arch"):
        write_synthetic("nope", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="at least 2 layers"):
        write_synthetic("qwen35", tmp_path / "x.gguf", n_layer=1)
