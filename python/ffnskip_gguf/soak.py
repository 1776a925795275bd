"""Soak run (issue 7): many decode steps with skipping on, across many
sequences, context shifts and resets; RSS and stats checked.

``ffnskip-gguf soak [--model NAME] [--steps 20000]``. Each step is one
``llama_decode`` of one token for every active sequence (the gate acts as
in generation). A sequence that reaches its share of the context is shifted
(the oldest half after ``keep`` tokens dropped, the rest moved down with
``llama_memory_seq_add``, as llama.cpp's context shift does); every
``reset_every`` steps one sequence is cleared and restarts from a new
prompt. Checks every 1000 steps: the stats counters are consistent
(decode tokens counted = tokens we decoded alone for their sequence, a
restarted prompt adds none; run + skipped = L x decode tokens, per layer
too). Reports RSS at start, after 200 steps and at the end (the caller
judges growth; docs/HARDENING.md has the measured run).
"""

from __future__ import annotations

import random
import resource
import time
from dataclasses import dataclass

import numpy as np

import llama_cpp

from .runner import Runner


def _rss_mib() -> float:
    """Current resident set size (MiB), from /proc (Linux) or ru_maxrss."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class SoakResult:
    """What a soak run did and measured (RSS in MiB, time in seconds)."""

    steps: int
    tokens: int
    shifts: int
    resets: int
    decode_tokens: int
    skip_ratio: float
    rss_start_mib: float
    rss_after_warmup_mib: float
    rss_end_mib: float
    seconds: float


def soak(path: str, *, steps: int = 20000, n_seq: int = 4, n_ctx: int = 1024, keep: int = 8, reset_every: int = 500,
         seed: int = 0, n_threads: int | None = None, progress: bool = True, **ffn: object) -> SoakResult:
    """Run the soak; raises ValueError on bad arguments, AssertionError on
    inconsistent stats, RuntimeError on a decode failure."""
    if steps < 1 or not 1 <= n_seq <= 64:
        raise ValueError(f"steps must be >= 1 and n_seq in [1, 64], got {steps}, {n_seq}")
    if n_ctx // n_seq < 128:
        raise ValueError(f"n_ctx ({n_ctx}) must give every sequence at least 128 positions (n_seq {n_seq})")
    rng = random.Random(seed)
    rss0 = _rss_mib()
    r = Runner(path, n_ctx=n_ctx, n_batch=min(256, n_ctx), n_seq_max=n_seq, n_threads=n_threads)
    try:
        return _soak(r, rng, rss0, steps, n_seq, n_ctx, keep, reset_every, progress, ffn)
    finally:
        r.close()


def _soak(r, rng, rss0, steps, n_seq, n_ctx, keep, reset_every, progress, ffn) -> SoakResult:
    settings = {"ffn_skip_threshold": 0.9} | dict(ffn)
    r.set_policy(True, **settings)
    mem = llama_cpp.llama_get_memory(r.ctx)
    per_seq = n_ctx // n_seq
    words = ("the a river mountain city code function data light sound history science music garden "
             "ocean market engine story window language number").split()

    def prompt() -> list[int]:
        return r.tokenize(" ".join(rng.choice(words) for _ in range(rng.randint(4, 40))), bos=True)

    pos = [0] * n_seq
    last = [0] * n_seq

    def start(s: int) -> int:
        llama_cpp.llama_memory_seq_rm(mem, s, -1, -1)
        toks = prompt()
        out = r.decode([(t, i, s, i == len(toks) - 1) for i, t in enumerate(toks)])
        pos[s] = len(toks)
        last[s] = int(np.argmax(out[0]))
        return len(toks)

    for s in range(n_seq):
        start(s)
    r.reset_stats()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="soak", unit="step")
    tokens = shifts = resets = 0
    alone = 0
    rss_warm = rss0
    t0 = time.perf_counter()
    for step in range(steps):
        for s in range(n_seq):
            if pos[s] >= per_seq:
                discard = (pos[s] - keep) // 2
                llama_cpp.llama_memory_seq_rm(mem, s, keep, keep + discard)
                llama_cpp.llama_memory_seq_add(mem, s, keep + discard, -1, -discard)
                pos[s] -= discard
                shifts += 1
        if reset_every and step and step % reset_every == 0:
            s = rng.randrange(n_seq)
            before = r.stats().decode_tokens
            n_prompt = start(s)
            resets += 1
            # a prompt of several tokens is prefill: no decode token
            assert r.stats().decode_tokens - before == (1 if n_prompt == 1 else 0)
            alone += 1 if n_prompt == 1 else 0
        items = [(last[s], pos[s], s, True) for s in range(n_seq)]
        out = r.decode(items)
        for q, s in enumerate(range(n_seq)):
            # sample among the top 5 so sequences keep changing
            top = np.argpartition(out[q], -5)[-5:]
            last[s] = int(rng.choice(list(top)))
            pos[s] += 1
        tokens += n_seq
        alone += n_seq
        if step == min(200, steps - 1):  # RSS after the first allocations settled
            rss_warm = _rss_mib()
        if step % 1000 == 999 or step == steps - 1:
            st = r.stats()
            assert st.decode_tokens == alone, (st.decode_tokens, alone)
            assert st.run + st.skipped == st.n_layer * st.decode_tokens
            assert all(a + b == st.decode_tokens for a, b in zip(st.run_per_layer, st.skipped_per_layer))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    st = r.stats()
    return SoakResult(steps, tokens, shifts, resets, st.decode_tokens, st.skip_ratio, rss0, rss_warm, _rss_mib(),
                      time.perf_counter() - t0)
