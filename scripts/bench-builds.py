#!/usr/bin/env python3
"""Decode speed of two builds of the libraries, e.g. the portable wheel
against the native build (issue 15 B; docs/PORTABLE.md).

    python scripts/bench-builds.py NATIVE_LIB PORTABLE_LIB [--model smollm2-135m]

Two builds cannot share a process (one libggml per process), so each round
starts one process per build, alternating which goes first; each process
decodes dense and with the gate (bench.gate_kwargs, target 0.25) ``--repeats``
times alternately and reports median decode tok/s. The result is the median
over rounds of B/A tok/s ratios, dense and gate, with every round's ratio
(the spread), as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, statistics, sys
import ffnskip_gguf
from ffnskip_gguf import bench
from ffnskip_gguf.models import resolve_model
from ffnskip_gguf.runner import Runner
model, repeats, n_prompt, n_decode, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
r = Runner(str(resolve_model(model)), n_ctx=1024, n_threads=threads)
toks = bench._text_tokens(r, n_prompt + n_decode)
cfgs = {"dense": dict(ffn_skip=False), "gate": bench.gate_kwargs(r.n_layer, 0.25) | dict(ffn_skip=True)}
t = {k: [] for k in cfgs}
skip = {}
for rep in range(repeats):
    for k, kw in cfgs.items():
        r.set_policy(**kw)
        bench._decode_run(r, toks, n_prompt, 4)
        r.reset_stats()
        t[k].append(bench._decode_run(r, toks, n_prompt, n_decode))
        skip[k] = r.stats().skip_ratio
print(json.dumps({"variant": ffnskip_gguf.CPU_VARIANT, "lib": str(ffnskip_gguf.LIB_DIR),
                  "tok_s": {k: n_decode / statistics.median(v) for k, v in t.items()}, "skip": skip}))
"""


def _run(lib: str, a) -> dict:
    env = dict(os.environ, FFNSKIP_GGUF_LIB_PATH=lib)
    r = subprocess.run([sys.executable, "-c", WORKER, a.model, str(a.repeats), str(a.n_prompt), str(a.n_decode),
                        str(a.threads)], env=env, capture_output=True, text=True, cwd="/")
    if r.returncode != 0:
        sys.exit(f"worker for {lib} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lib_a", help="lib folder of build A (the reference, e.g. native)")
    ap.add_argument("lib_b", help="lib folder of build B (e.g. the portable wheel's)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=64)
    ap.add_argument("--n-decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    a.lib_a, a.lib_b = os.path.abspath(a.lib_a), os.path.abspath(a.lib_b)
    ratios = {"dense": [], "gate": []}
    info = {}
    for rnd in range(a.rounds):
        order = [a.lib_a, a.lib_b] if rnd % 2 == 0 else [a.lib_b, a.lib_a]
        res = {lib: _run(lib, a) for lib in order}
        ra, rb = res[a.lib_a], res[a.lib_b]
        info = {"a": {k: ra[k] for k in ("variant", "lib")}, "b": {k: rb[k] for k in ("variant", "lib")},
                "skip": rb["skip"]}
        for k in ratios:
            ratios[k].append(rb["tok_s"][k] / ra["tok_s"][k])
        print(f"round {rnd}: A {ra['tok_s']} B {rb['tok_s']}", file=sys.stderr)
    out = {**info, "model": a.model, "rounds": a.rounds,
           "ratio_b_over_a": {k: round(statistics.median(v), 4) for k, v in ratios.items()},
           "ratios": {k: [round(x, 4) for x in v] for k, v in ratios.items()}}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
