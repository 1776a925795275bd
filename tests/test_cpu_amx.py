"""CPUs with Intel AMX (Sapphire Rapids and later): the pin's AMX weight
buffer crashed the process on every ubatch of more than one token
(patches/0009, upstream ggml-org/llama.cpp#20824). On other CPUs these tests
pass trivially; on an AMX machine they are the regression test. They run in a
subprocess so that a crash is a failure, not the end of the test run."""

import subprocess
import sys

CODE = """
import sys
from ffnskip_gguf.runner import Runner
r = Runner(sys.argv[1], n_ctx=1024, n_batch=128, n_seq_max=4, verbose=True)
out = r.decode([(100 + i, i % 16, i // 16, True) for i in range(64)])
assert out.shape == (64, r.n_vocab), out.shape
print("decoded", out.shape[0], flush=True)
"""


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


def _run(model: str):
    return subprocess.run([sys.executable, "-c", CODE, model], capture_output=True, text=True, timeout=300)


def test_a_multi_token_ubatch_decodes_without_crashing(smollm2_path):
    r = _run(smollm2_path)
    assert r.returncode == 0, (f"exit {r.returncode} (AMX CPU: {_cpu_has_amx()}); stderr tail:\n"
                               + r.stderr[-2000:])
    assert "decoded 64" in r.stdout


def test_no_weights_are_placed_in_the_amx_buffer(smollm2_path):
    r = _run(smollm2_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "load_tensors" in r.stderr  # the loading log was captured
    assert "AMX model buffer" not in r.stderr
