"""Pure-Python emulation of the gate (DESIGN.md section 3) through llama.cpp's
eval callback: the dense graph runs, the callback reads h_j (ffn_inp /
gemma3 sa_out) and o_j (l_out), decides each FFN with the policy below, and
zeroes the FFN output (llama/qwen: the down-projection output ffn_out-j;
gemma3: ffn_post_norm-j) to emulate a skip exactly. Independent of cpp/."""

from __future__ import annotations

import math

import numpy as np

from _lowlevel import Runner, f32_rows, ggml_tensor, op_name

import ctypes


class PolicyEmulation:
    """State machine of DESIGN.md section 3 for one token, in Python."""

    def __init__(self, s, n_layer: int):
        self.s = s
        self.L = n_layer
        self.tau = s.threshold if isinstance(s.threshold, list) else [s.threshold] * n_layer

    def new_token(self, gated: bool):
        self.gated = gated
        self.clast = math.nan
        self.budget = self.s.max_skip
        self.run = False
        self.runs = 0

    def saw_cos(self, c: float):
        self.clast = c

    def decide(self, j: int) -> bool:
        s, L = self.s, self.L
        if j in s.remove_layers:
            return True
        if not self.gated or j < s.cold_start or j >= L - s.cold_end or j in s.exclude:
            self.run = False
            return False
        if self.run and s.continue_run and self.budget > 0:
            self.budget -= 1
            return True
        if self.runs < s.max_runs and self.budget > 0 and self.clast > self.tau[j]:
            self.run = True
            self.runs += 1
            self.budget -= 1
            return True
        self.run = False
        return False


class CallbackOracle:
    """Dense model + eval callback that applies PolicyEmulation to one
    single-token decode at a time."""

    def __init__(self, path: str, arch: str, **runner_kw):
        self.h_name = "sa_out" if arch == "gemma3" else "ffn_inp"
        self.zero_name = "ffn_post_norm" if arch == "gemma3" else "ffn_out"
        self.runner = Runner(path, cb=self._cb, **runner_kw)
        self.L = self.runner.n_layer
        self.active = False
        self.emu = None

    def set_settings(self, s):
        self.emu = PolicyEmulation(s, self.L)
        self.runner.set_policy(False)  # the graph itself stays dense

    def _cb(self, t_ptr, ask, _ud):
        t = ggml_tensor.from_address(t_ptr)
        name = t.name.decode(errors="replace")
        base, _, idx = name.rpartition("-")
        if not idx.isdigit() or base not in (self.h_name, "l_out", self.zero_name):
            return False
        j = int(idx)
        if base == self.zero_name and self.zero_name == "ffn_out" and op_name(t) != "MUL_MAT":
            return False  # llama also names the residual add "ffn_out"
        if ask:
            return self.active
        if not self.active:
            return True
        if base == self.h_name:
            self.h[j] = f32_rows(t)[0].astype(np.float64)
        elif base == "l_out":
            self.o[j] = f32_rows(t)[0].astype(np.float64)
        else:
            # decide FFN j from the most recent layer whose FFN ran
            if j > 0 and not self.skip[j - 1]:
                h, o = self.h[j - 1], self.o[j - 1]
                c = float(np.dot(h, o) / (np.sqrt(np.dot(h, h)) * np.sqrt(np.dot(o, o))))
                self.cos[j - 1] = c
                self.emu.saw_cos(c)
            self.skip[j] = self.emu.decide(j)
            if self.skip[j]:
                f32_rows(t)[:] = 0.0
        return True

    def step(self, token: int, pos: int) -> np.ndarray:
        self.h = [None] * self.L
        self.o = [None] * self.L
        self.skip = [False] * self.L
        self.cos = [math.nan] * self.L
        self.emu.new_token(pos >= self.emu.s.warmup)
        self.active = True
        try:
            logits = self.runner.decode([(token, pos, 0, True)])
        finally:
            self.active = False
        h, o = self.h[self.L - 1], self.o[self.L - 1]
        if not self.skip[self.L - 1] and h is not None:
            self.cos[self.L - 1] = float(np.dot(h, o) / (np.sqrt(np.dot(h, h)) * np.sqrt(np.dot(o, o))))
        return logits[0]

    def greedy(self, prompt_tokens: list[int], n_new: int):
        self.runner.clear()
        logits = self.runner.decode([(t, i, 0, i == len(prompt_tokens) - 1) for i, t in enumerate(prompt_tokens)])
        toks = list(prompt_tokens)
        rows, decisions, coss = [], [], []
        last = logits[-1]
        for _ in range(n_new):
            nxt = int(np.argmax(last))
            toks.append(nxt)
            last = self.step(nxt, len(toks) - 1)
            rows.append(last)
            decisions.append(list(self.skip))
            coss.append(list(self.cos))
        return toks, np.array(rows), np.array(decisions, dtype=bool), np.array(coss)
