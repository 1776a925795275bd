"""CPU reference for the Vulkan tests, run in a subprocess with the main CPU
build of the library (the Vulkan test process has the Vulkan build loaded).

    python _cpu_ref.py < request.json > result.json

Request: {"model": path, "prompt": [tokens], "forced": [tokens decoded one at
a time after the prompt], "policy": {keywords of Runner.set_policy}}.
Result: {"dec": [[...] per step], "cos": [[...] per step]} with NaN as null:
the trace of each teacher-forced decode step (token 0 of the ubatch).
"""

from __future__ import annotations

import json
import math
import sys

import ffnskip_gguf  # noqa: F401  (before llama_cpp)
from ffnskip_gguf.runner import Runner


def main() -> None:
    req = json.load(sys.stdin)
    r = Runner(req["model"], n_threads=2, n_gpu_layers=0)
    r.set_policy(True, **req["policy"])
    prompt = req["prompt"]
    r.clear()
    r.decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    dec, cos = [], []
    for k, t in enumerate(req["forced"]):
        r.decode([(t, len(prompt) + k, 0, True)])
        d, c = r.trace()
        dec.append([int(x) for x in d[0]])
        cos.append([None if math.isnan(float(x)) else float(x) for x in c[0]])
    st = r.stats()
    json.dump({"dec": dec, "cos": cos, "skipped": st.skipped_per_layer, "run": st.run_per_layer}, sys.stdout)
    r.close()


if __name__ == "__main__":
    main()
