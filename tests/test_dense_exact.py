"""ffn_skip=False is stock llama.cpp: same tokens, bit-identical logits as
llama.cpp of the same pin built without our patches.

The reference is built in the test session (conftest.stock_lib_dir) rather
than recorded: bit-exact logits depend on the CPU's instruction set
(GGML_NATIVE), so a recording from another machine could not be compared
bit for bit. It runs in a subprocess because a process can load one libllama.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ffnskip_gguf import Llama

from _greedy import greedy

HERE = Path(__file__).resolve().parent
PROMPT = "The three primary colors are"
N_NEW = 48


@pytest.fixture(scope="module")
def stock_reference(stock_lib_dir, smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("stock") / "ref.npz"
    import os

    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(stock_lib_dir), PYTHONPATH=str(HERE))
    r = subprocess.run([sys.executable, str(HERE / "_stock_ref.py"), smollm2_path, PROMPT, str(N_NEW), str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = np.load(out)
    assert Path(str(ref["lib"])).parent == Path(stock_lib_dir)
    return ref


def _ours(path, **kw):
    llm = Llama(path, n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False, seed=0, **kw)
    return greedy(llm, PROMPT, N_NEW)


def test_dense_matches_stock_llama_cpp_bit_for_bit(stock_reference, smollm2_path):
    tokens, logits = _ours(smollm2_path, ffn_skip=False)
    assert tokens == stock_reference["tokens"].tolist()
    assert logits.shape == stock_reference["logits"].shape
    assert np.array_equal(logits.view(np.uint32), stock_reference["logits"].view(np.uint32))


def test_never_firing_gate_matches_stock_llama_cpp_bit_for_bit(stock_reference, smollm2_path):
    # thresholds above 1 never fire: the gate runs, decides "run" everywhere
    tokens, logits = _ours(smollm2_path, ffn_skip=True, ffn_skip_threshold=2.0, ffn_skip_warmup=0)
    assert tokens == stock_reference["tokens"].tolist()
    assert np.array_equal(logits.view(np.uint32), stock_reference["logits"].view(np.uint32))


def test_probe_calibrated_file_loads_dense_in_stock_llama_cpp(stock_lib_dir, stock_reference, smollm2_path, tmp_path):
    # a file carrying the probe signal (ffn_skip.* metadata only, no extra
    # tensors: the pinned loader refuses those) decodes dense in stock
    # llama-cpp-python, bit for bit as the original file
    import os

    from gguf import GGUFValueType

    from ffnskip_gguf.gguf_io import copy_gguf

    w = np.random.default_rng(0).normal(0, 1, 30 * 577).astype(np.float32)
    p = copy_gguf(smollm2_path, tmp_path / "probe.gguf", set_kv={
        "ffn_skip.version": (2, GGUFValueType.UINT32, None),
        "ffn_skip.signal": ("probe", GGUFValueType.STRING, None),
        "ffn_skip.probe": (w.tolist(), GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
        "ffn_skip.threshold": ([0.0] * 30, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)})
    out = tmp_path / "ref.npz"
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(stock_lib_dir), PYTHONPATH=str(HERE))
    r = subprocess.run([sys.executable, str(HERE / "_stock_ref.py"), str(p), PROMPT, str(N_NEW), str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = np.load(out)
    assert Path(str(ref["lib"])).parent == Path(stock_lib_dir)
    assert ref["tokens"].tolist() == stock_reference["tokens"].tolist()
    assert np.array_equal(ref["logits"].view(np.uint32), stock_reference["logits"].view(np.uint32))
