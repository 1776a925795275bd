"""Run greedy generation with plain llama_cpp on the library in
LLAMA_CPP_LIB_PATH (the stock build) and save tokens and logits.

Usage: python _stock_ref.py MODEL PROMPT N_NEW OUT.npz
Used by test_dense_exact.py in a subprocess (one libllama per process)."""

import sys

import numpy as np

import llama_cpp
from _greedy import greedy


def main() -> None:
    model, prompt, n_new, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    llm = llama_cpp.Llama(model, n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False, seed=0)
    tokens, logits = greedy(llm, prompt, n_new)
    np.savez(out, tokens=np.array(tokens), logits=logits, lib=str(llama_cpp.llama_cpp._lib._name))


if __name__ == "__main__":
    main()
