"""Greedy decoding through llama_cpp.Llama.eval, one token per decode, keeping
every logit row (prompt rows from the prefill, then one row per new token)."""

import numpy as np


def greedy(llm, prompt: str, n_new: int):
    toks = llm.tokenize(prompt.encode(), add_bos=True)
    llm.reset()
    llm.eval(toks)
    rows = [np.array(llm.scores[: llm.n_tokens], dtype=np.float32)]
    out = list(toks)
    for _ in range(n_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
        rows.append(np.array(llm.scores[llm.n_tokens - 1: llm.n_tokens], dtype=np.float32))
    return out, np.concatenate(rows, axis=0)
