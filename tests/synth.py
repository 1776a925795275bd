"""Tiny random-weight GGUF models, one per architecture, for tests.

What
    ``python tests/synth.py ARCH OUT.gguf [--seed N] [--layers N] [--dtype f32|f16]``
    writes a small model of architecture ARCH (the GGUF
    ``general.architecture`` name) with random weights and a small
    self-contained byte-level BPE vocabulary. From Python::

        from synth import ARCHS, write_synthetic
        path = write_synthetic("qwen35moe", tmp_path / "m.gguf", seed=0, n_layer=6)

    The same arguments give a byte-identical file (all randomness comes from
    ``numpy.random.default_rng(seed)``, drawn in a fixed order; GGUFWriter
    writes keys and tensors in insertion order and nothing time-dependent).

Why
    The real models the tests use cover only a few architectures. These files
    load in the pinned llama.cpp and decode to finite logits, so code that
    walks the compute graph of every supported architecture (dense, MoE,
    hybrid recurrent, sliding-window, per-layer-input) can be tested in
    seconds without downloading anything. The weights are noise: the text
    they generate means nothing.

Where each spec comes from
    The pinned llama.cpp sources (``build/stock/llama.cpp``):

    - ``src/llama-model.cpp`` ``llama_model_base::load_hparams``: the keys every
      model reads (context_length, embedding_length, block_count,
      feed_forward_length, attention.head_count[_kv], key/value_length,
      rope.dimension_count, expert_count / expert_used_count, ...), and
      ``load_tensors``, which ends with ``done_getting_tensors()``: a file
      holding a tensor the loader did not ask for is refused, so each spec
      below writes exactly the tensors the loader creates (required ones, plus
      the optional ones real models of that architecture carry; noted per
      arch). ``create_tensor_qkv`` there: separate q/k/v (or fused
      ``attn_qkv``) with optional biases.
    - ``src/models/<arch>.cpp`` ``load_arch_hparams`` / ``load_arch_tensors``:
      the per-architecture keys and the tensor names and shapes (shapes below
      are written in the same ggml order, ne0 first, as in those files; numpy
      arrays are the reverse). Each ``_arch_*`` function below follows its
      file's create_tensor calls in order and names the file.
    - ``src/llama-hparams.cpp``: sliding-window / recurrent layer patterns,
      ``has_kv`` (Gemma 4 shared-KV layers).
    - ``src/llama-vocab.cpp`` ``llama_vocab::impl::load``: tokenizer keys
      ("gpt2" BPE needs ``tokenizer.ggml.merges``; pre-tokenizer "default").
    - Names of keys and tensors: the installed ``gguf`` package
      (``gguf.Keys``, ``gguf.TENSOR_NAMES``, ``GGUFWriter.add_*``), which match
      the pin's ``src/llama-arch.cpp``.

Sizes: n_embd 64, n_ff 128, n_head 4, n_head_kv 2 (head dim 16 unless an
architecture's real models use a head dim different from n_embd/n_head, then
32), 6 layers (gemma4, qwen35, qwen35moe need at least 2: one layer of
each kind), MoE with 4 experts of which 2 are used (expert and shared-expert
FFN width 64), vocab 283 tokens, sliding window 32.
Weights are F32 (``dtype="f16"`` stores the 2-D+ matmul weights as F16),
normal with std ``scale`` (0.02); norm weights 1 + noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import MODEL_TENSOR as T

# ---------------------------------------------------------------------------
# Tokenizer: GPT-2 byte-level BPE, 256 byte tokens + a few merges + specials.
# ---------------------------------------------------------------------------

# (left, right) pairs in rank order; each merged string becomes a token. Both
# parts must already be tokens (checked in _vocab()). "Ġ" is the byte-level
# symbol for a space.
_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"),
    ("o", "n"), ("r", "e"), ("Ġ", "s"), ("a", "t"), ("e", "n"), ("o", "r"),
    ("Ġ", "w"), ("Ġ", "o"), ("i", "s"), ("Ġ", "b"), ("Ġ", "c"), ("l", "l"),
    ("a", "n"), ("an", "d"), ("Ġ", "and"), ("in", "g"), ("Ġ", "i"), ("Ġ", "in"),
]
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _vocab() -> tuple[list[str], list[int], list[str], int]:
    """Tokens, token types, merges and the id of <|endoftext|> (BOS = EOS)."""
    byte_sym = _bytes_to_unicode()
    tokens = [byte_sym[b] for b in range(256)]
    merges = []
    for left, right in _MERGES:
        assert left in tokens and right in tokens and left + right not in tokens, (left, right)
        merges.append(f"{left} {right}")
        tokens.append(left + right)
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    eot = len(tokens)
    tokens += _SPECIALS
    types += [int(gguf.TokenType.CONTROL)] * len(_SPECIALS)
    return tokens, types, merges, eot


# ---------------------------------------------------------------------------
# Model builder
# ---------------------------------------------------------------------------

class _Model:
    """Adds the tensors of one model to a GGUFWriter, each given by its gguf
    MODEL_TENSOR (for the name), layer, ggml shape (ne0 first, as in
    llama.cpp's create_tensor calls) and how to fill it. Random values are
    drawn from ``rng`` in call order, so a spec's order fixes the file."""

    def __init__(self, w: gguf.GGUFWriter, rng: np.random.Generator, cfg: dict):
        self.w = w
        self.rng = rng
        self.cfg = cfg
        self.names: set[str] = set()

    # names ---------------------------------------------------------------
    @staticmethod
    def name(t: T, bid: int | None = None, suffix: str | None = "weight") -> str:
        n = gguf.TENSOR_NAMES[t].format(bid=bid)
        return f"{n}.{suffix}" if suffix else n

    # tensors -------------------------------------------------------------
    def add(self, t: T, ne: tuple[int, ...], bid: int | None = None, kind: str = "w",
            suffix: str | None = "weight") -> None:
        """Add tensor ``t`` of ggml shape ``ne``. kind: "w" weight or bias
        (normal * scale), "norm" (1 + normal * scale), "one" (ones),
        "ssm_a" (negative decay rates, -(0.5..1.5))."""
        name = self.name(t, bid, suffix)
        assert name not in self.names, f"duplicate tensor {name}"
        self.names.add(name)
        shape = tuple(int(x) for x in reversed(ne))
        scale = self.cfg["scale"]
        rng = self.rng
        if kind == "w":
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        elif kind == "norm":
            a = np.float32(1.0) + rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        elif kind == "one":
            a = np.ones(shape, dtype=np.float32)
        elif kind == "ssm_a":
            a = -(np.float32(0.5) + rng.random(shape, dtype=np.float32))
        else:
            raise ValueError(kind)
        # F16 only for 2-D+ matmul / embedding weights; norms, biases, the
        # conv kernel and other small vectors stay F32 as in converted models
        if (self.cfg["dtype"] == "f16" and len(ne) >= 2 and suffix == "weight"
                and t != T.SSM_CONV1D):
            a = a.astype(np.float16)
        self.w.add_tensor(name, np.ascontiguousarray(a))

    # common pieces ---------------------------------------------------------
    def embd_out(self, tied: bool) -> None:
        """token_embd, output_norm and (untied) output."""
        c = self.cfg
        self.add(T.TOKEN_EMBD, (c["n_embd"], c["n_vocab"]))
        self.add(T.OUTPUT_NORM, (c["n_embd"],), kind="norm")
        if not tied:
            self.add(T.OUTPUT, (c["n_embd"], c["n_vocab"]))

    def qkv(self, i: int, n_q: int, n_k: int, n_v: int, bias: bool = False,
            fused: bool = False) -> None:
        """create_tensor_qkv (llama-model.cpp): separate or fused q/k/v."""
        n = self.cfg["n_embd"]
        if fused:
            self.add(T.ATTN_QKV, (n, n_q + n_k + n_v), i)
            if bias:
                self.add(T.ATTN_QKV, (n_q + n_k + n_v,), i, suffix="bias")
            return
        self.add(T.ATTN_Q, (n, n_q), i)
        self.add(T.ATTN_K, (n, n_k), i)
        self.add(T.ATTN_V, (n, n_v), i)
        if bias:
            self.add(T.ATTN_Q, (n_q,), i, suffix="bias")
            self.add(T.ATTN_K, (n_k,), i, suffix="bias")
            self.add(T.ATTN_V, (n_v,), i, suffix="bias")

    def ffn(self, i: int, n_ff: int | None = None) -> None:
        """SwiGLU FFN: ffn_gate, ffn_down, ffn_up."""
        n = self.cfg["n_embd"]
        f = n_ff or self.cfg["n_ff"]
        self.add(T.FFN_GATE, (n, f), i)
        self.add(T.FFN_DOWN, (f, n), i)
        self.add(T.FFN_UP, (n, f), i)

    def norm(self, t: T, i: int | None, n: int | None = None) -> None:
        self.add(t, (n or self.cfg["n_embd"],), i, kind="norm")


def _common_kv(w: gguf.GGUFWriter, c: dict, *, head_dim: int | None = None,
               n_rot: int | None = None, n_ff: bool = True) -> None:
    """Keys load_hparams reads for every arch (llama-model.cpp), plus the RMS
    norm epsilon every arch here requires."""
    w.add_context_length(c["n_ctx_train"])
    w.add_embedding_length(c["n_embd"])
    w.add_block_count(c["n_layer"])
    if n_ff:
        w.add_feed_forward_length(c["n_ff"])
    w.add_head_count(c["n_head"])
    w.add_head_count_kv(c["n_head_kv"])
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if n_rot is not None:
        w.add_rope_dimension_count(n_rot)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)


def _moe_kv(w: gguf.GGUFWriter, c: dict) -> None:
    w.add_expert_count(c["n_expert"])
    w.add_expert_used_count(c["n_expert_used"])
    w.add_expert_feed_forward_length(c["n_ff_exp"])


# ---------------------------------------------------------------------------
# Architectures: _arch_<name>(writer, model, cfg) writes the arch's keys and
# all its tensors (the tokenizer keys are added by write_synthetic).
# ---------------------------------------------------------------------------

def _llama_like(m: _Model, *, tied: bool) -> None:
    """models/llama.cpp, mistral3.cpp, granite.cpp, smollm3.cpp tensors
    (dense branch): attn_norm, q/k/v, attn_output, ffn_norm, SwiGLU. The
    optional attn_output.bias, ffn biases, rope_freqs are not written (the
    real models of these archs do not carry them)."""
    c = m.cfg
    hd = c["n_embd"] // c["n_head"]
    m.embd_out(tied)
    for i in range(c["n_layer"]):
        m.norm(T.ATTN_NORM, i)
        m.qkv(i, hd * c["n_head"], hd * c["n_head_kv"], hd * c["n_head_kv"])
        m.add(T.ATTN_OUT, (hd * c["n_head"], c["n_embd"]), i)
        m.norm(T.FFN_NORM, i)
        m.ffn(i)


def _arch_llama(w, m, c):
    # models/llama.cpp: n_rot must equal the head dim (load_hparams check)
    _common_kv(w, c, n_rot=c["n_embd"] // c["n_head"])
    _llama_like(m, tied=True)          # Llama 3.2 1B / SmolLM2 tie embeddings


def _arch_mistral3(w, m, c):
    # models/mistral3.cpp (Ministral 3): llama-like; attention temperature /
    # yarn keys are optional and left out
    _common_kv(w, c, n_rot=c["n_embd"] // c["n_head"])
    _llama_like(m, tied=False)


def _arch_granite(w, m, c):
    # models/granite.cpp: logit_scale required; residual/embedding/attention
    # scales optional, written with Granite 3.x's values
    _common_kv(w, c, n_rot=c["n_embd"] // c["n_head"])
    w.add_logit_scale(8.0)
    w.add_residual_scale(0.22)
    w.add_embedding_scale(12.0)
    w.add_attention_scale(1.0 / 64)
    _llama_like(m, tied=True)


def _arch_smollm3(w, m, c):
    # models/smollm3.cpp: every 4th layer has no rope (hard-coded)
    _common_kv(w, c, n_rot=c["n_embd"] // c["n_head"])
    _llama_like(m, tied=True)


def _arch_qwen2(w, m, c):
    # models/qwen2.cpp: q/k/v sizes are n_embd / n_embd_gqa, so head dim must
    # be n_embd/n_head; Qwen2 has q/k/v biases (optional in the loader)
    _common_kv(w, c)
    hd = c["n_embd"] // c["n_head"]
    m.embd_out(tied=True)               # Qwen2.5 0.5B ties
    for i in range(c["n_layer"]):
        m.norm(T.ATTN_NORM, i)
        m.qkv(i, c["n_embd"], hd * c["n_head_kv"], hd * c["n_head_kv"], bias=True)
        m.add(T.ATTN_OUT, (c["n_embd"], c["n_embd"]), i)
        m.norm(T.FFN_NORM, i)
        m.ffn(i)


def _qwen3_attn(m, c, i, hd):
    m.norm(T.ATTN_NORM, i)
    m.qkv(i, hd * c["n_head"], hd * c["n_head_kv"], hd * c["n_head_kv"])
    m.add(T.ATTN_OUT, (hd * c["n_head"], c["n_embd"]), i)
    m.norm(T.ATTN_K_NORM, i, hd)
    m.norm(T.ATTN_Q_NORM, i, hd)
    m.norm(T.FFN_NORM, i)


def _arch_qwen3(w, m, c):
    # models/qwen3.cpp: q/k norms; head dim 32 set by key_length so the q
    # width (128) differs from n_embd as in real Qwen3 (cls_out not written)
    hd = c["head_dim_wide"]
    _common_kv(w, c, head_dim=hd)
    m.embd_out(tied=True)               # Qwen3 0.6B ties
    for i in range(c["n_layer"]):
        _qwen3_attn(m, c, i, hd)
        m.ffn(i)


def _arch_qwen3moe(w, m, c):
    # models/qwen3moe.cpp: every layer MoE (router + 3-D experts), no shared expert
    hd = c["head_dim_wide"]
    _common_kv(w, c, head_dim=hd)
    _moe_kv(w, c)
    n, e, fe = c["n_embd"], c["n_expert"], c["n_ff_exp"]
    m.embd_out(tied=False)
    for i in range(c["n_layer"]):
        _qwen3_attn(m, c, i, hd)
        m.add(T.FFN_GATE_INP, (n, e), i)
        m.add(T.FFN_GATE_EXP, (n, fe, e), i)
        m.add(T.FFN_DOWN_EXP, (fe, n, e), i)
        m.add(T.FFN_UP_EXP, (n, fe, e), i)


def _arch_phi3(w, m, c):
    # models/phi3.cpp: fused attn_qkv (q/k/v are optional either way; Phi-3
    # ships fused), fused gate+up in ffn_up {n_embd, 2*n_ff}, no ffn_gate;
    # separate output. rope_factors_long/short only for longrope: left out.
    _common_kv(w, c)
    hd = c["n_embd"] // c["n_head"]
    m.embd_out(tied=False)
    for i in range(c["n_layer"]):
        m.norm(T.ATTN_NORM, i)
        m.qkv(i, c["n_embd"], hd * c["n_head_kv"], hd * c["n_head_kv"], fused=True)
        m.add(T.ATTN_OUT, (c["n_embd"], c["n_embd"]), i)
        m.norm(T.FFN_NORM, i)
        m.add(T.FFN_DOWN, (c["n_ff"], c["n_embd"]), i)
        m.add(T.FFN_UP, (c["n_embd"], 2 * c["n_ff"]), i)


def _arch_olmo2(w, m, c):
    # models/olmo2.cpp: no pre-norms; q_norm over n_embd, k_norm over
    # n_head_kv*head; post-attention and post-FFN norms; output required
    _common_kv(w, c)
    hd = c["n_embd"] // c["n_head"]
    m.embd_out(tied=False)
    for i in range(c["n_layer"]):
        m.qkv(i, c["n_embd"], hd * c["n_head_kv"], hd * c["n_head_kv"])
        m.add(T.ATTN_OUT, (c["n_embd"], c["n_embd"]), i)
        m.norm(T.ATTN_Q_NORM, i, c["n_embd"])
        m.norm(T.ATTN_K_NORM, i, c["n_head_kv"] * hd)
        m.norm(T.ATTN_POST_NORM, i)
        m.add(T.FFN_GATE, (c["n_embd"], c["n_ff"]), i)
        m.add(T.FFN_UP, (c["n_embd"], c["n_ff"]), i)
        m.add(T.FFN_DOWN, (c["n_ff"], c["n_embd"]), i)
        m.norm(T.FFN_POST_NORM, i)


def _arch_glm4(w, m, c):
    # models/glm4.cpp: q/k/v with biases (GLM-4-0414 has them), post-attn and
    # post-FFN norms, fused gate+up ffn_up {n_embd, 2*n_ff}; partial rotary
    # (rope dim = head/2, as GLM-4); no rope sections (text-only -> NORM rope)
    hd = c["n_embd"] // c["n_head"]
    _common_kv(w, c, n_rot=hd // 2)
    m.embd_out(tied=False)
    for i in range(c["n_layer"]):
        m.norm(T.ATTN_NORM, i)
        m.qkv(i, hd * c["n_head"], hd * c["n_head_kv"], hd * c["n_head_kv"], bias=True)
        m.add(T.ATTN_OUT, (hd * c["n_head"], c["n_embd"]), i)
        m.norm(T.ATTN_POST_NORM, i)
        m.norm(T.FFN_NORM, i)
        m.add(T.FFN_DOWN, (c["n_ff"], c["n_embd"]), i)
        m.add(T.FFN_UP, (c["n_embd"], 2 * c["n_ff"]), i)
        m.norm(T.FFN_POST_NORM, i)


def _arch_exaone4(w, m, c):
    # models/exaone4.cpp: post-norm only (no attn_norm/ffn_norm), q/k norms;
    # attn_output is {n_embd, n_embd}. SWA only for the 64-layer model, so
    # none here; rope_freqs optional, left out
    _common_kv(w, c)
    hd = c["n_embd"] // c["n_head"]
    m.embd_out(tied=True)               # EXAONE 4.0 1.2B ties
    for i in range(c["n_layer"]):
        m.qkv(i, hd * c["n_head"], hd * c["n_head_kv"], hd * c["n_head_kv"])
        m.add(T.ATTN_OUT, (c["n_embd"], c["n_embd"]), i)
        m.norm(T.ATTN_POST_NORM, i)
        m.norm(T.ATTN_Q_NORM, i, hd)
        m.norm(T.ATTN_K_NORM, i, hd)
        m.ffn(i)
        m.norm(T.FFN_POST_NORM, i)


def _gemma_block(m, c, i, hd, qk_norm: bool):
    m.norm(T.ATTN_NORM, i)
    m.qkv(i, hd * c["n_head"], hd * c["n_head_kv"], hd * c["n_head_kv"])
    m.add(T.ATTN_OUT, (hd * c["n_head"], c["n_embd"]), i)
    m.norm(T.ATTN_POST_NORM, i)
    if qk_norm:
        m.norm(T.ATTN_K_NORM, i, hd)
        m.norm(T.ATTN_Q_NORM, i, hd)
    m.norm(T.FFN_NORM, i)
    m.add(T.FFN_GATE, (c["n_embd"], c["n_ff"]), i)
    m.add(T.FFN_UP, (c["n_embd"], c["n_ff"]), i)
    m.add(T.FFN_DOWN, (c["n_ff"], c["n_embd"]), i)
    m.norm(T.FFN_POST_NORM, i)


def _arch_gemma2(w, m, c):
    # models/gemma2.cpp: output is always tok_embd; sliding window with the
    # default pattern 2 (even layers SWA); attention and final logit
    # soft-capping (Gemma 2's 50 / 30); head dim 32 by key_length
    hd = c["head_dim_wide"]
    _common_kv(w, c, head_dim=hd)
    w.add_sliding_window(c["n_swa"])
    w.add_attn_logit_softcapping(50.0)
    w.add_final_logit_softcapping(30.0)
    m.embd_out(tied=True)
    for i in range(c["n_layer"]):
        _gemma_block(m, c, i, hd, qk_norm=False)


def _arch_gemma3(w, m, c):
    # models/gemma3.cpp: q/k norms; sliding window with the default pattern
    # 6 (5 SWA layers then 1 global); freq_base_swa; no dense_2/3 (embedding
    # variant only)
    hd = c["head_dim_wide"]
    _common_kv(w, c, head_dim=hd)
    w.add_sliding_window(c["n_swa"])
    w.add_rope_freq_base_swa(10000.0)
    m.embd_out(tied=True)
    for i in range(c["n_layer"]):
        _gemma_block(m, c, i, hd, qk_norm=True)


def _gemma4_layout(n_layer: int) -> tuple[list[bool], int]:
    """Sliding-window flags and the number of shared-KV layers, E2B-like:
    the last n_layer//3 layers reuse the KV of earlier layers. Shared layers
    read the KV of layer kv_start-1 (full attention) or kv_start-2 (SWA)
    (llama-model.cpp, n_layer_kv_from_start), so those two must be of those
    kinds; otherwise every 4th layer and the last layer are full attention."""
    n_shared = n_layer // 3 if n_layer >= 3 else 0
    kv_start = n_layer - n_shared
    full = [(i + 1) % 4 == 0 or i == n_layer - 1 for i in range(n_layer)]
    if n_shared:
        full[kv_start - 1] = True
        full[kv_start - 2] = False
    return [not f for f in full], n_shared


def _arch_gemma4(w, m, c):
    # models/gemma4.cpp, E2B-like: per-layer token inputs
    # (per_layer_token_embd / per_layer_model_proj / per_layer_proj_norm and
    # per layer inp_gate / proj / post_norm), shared-KV layers (no attn_k /
    # attn_v / attn_k_norm, which the loader then does not require), head dim
    # 16 on SWA layers and 32 on full-attention layers (with their own rope
    # dims), one rope_freqs for the full layers (ones), layer_output_scale
    # (optional; E2B has it, 1.0), final logit soft-capping 30. Dense FFN in
    # every layer (the MoE variant, 26B-A4B, is not generated).
    swa, n_shared = _gemma4_layout(c["n_layer"])
    hd_full, hd_swa = c["head_dim_wide"], c["n_embd"] // c["n_head"]
    n_pl = c["n_embd_per_layer"]
    n, L = c["n_embd"], c["n_layer"]
    _common_kv(w, c, head_dim=hd_full, n_rot=hd_full)
    w.add_key_length_swa(hd_swa)
    w.add_value_length_swa(hd_swa)
    w.add_rope_dimension_count_swa(hd_swa)
    w.add_rope_freq_base_swa(10000.0)
    w.add_sliding_window(c["n_swa"])
    w.add_sliding_window_pattern(swa)
    w.add_shared_kv_layers(n_shared)
    w.add_embedding_length_per_layer_input(n_pl)
    w.add_final_logit_softcapping(30.0)

    # same order as load_arch_tensors (output before tok_embd there; the
    # order in the file does not matter to the loader)
    m.add(T.TOKEN_EMBD, (n, c["n_vocab"]))
    m.add(T.PER_LAYER_TOKEN_EMBD, (n_pl * L, c["n_vocab"]))
    m.add(T.PER_LAYER_MODEL_PROJ, (n, n_pl * L))
    m.norm(T.PER_LAYER_PROJ_NORM, None, n_pl)
    m.norm(T.OUTPUT_NORM, None)
    rope_freqs_done = False
    kv_start = L - n_shared
    for i in range(L):
        hd = hd_swa if swa[i] else hd_full
        has_kv = i < kv_start
        m.norm(T.ATTN_NORM, i)
        m.add(T.ATTN_Q, (n, hd * c["n_head"]), i)
        if has_kv:
            m.add(T.ATTN_K, (n, hd * c["n_head_kv"]), i)
            m.add(T.ATTN_V, (n, hd * c["n_head_kv"]), i)
        m.add(T.ATTN_OUT, (hd * c["n_head"], n), i)
        m.norm(T.ATTN_Q_NORM, i, hd)
        if has_kv:
            m.norm(T.ATTN_K_NORM, i, hd)
        m.norm(T.ATTN_POST_NORM, i)
        m.add(T.LAYER_OUT_SCALE, (1,), i, kind="one")
        if not swa[i] and not rope_freqs_done:
            # one tensor "rope_freqs.weight" shared by all full-attention layers
            m.add(T.ROPE_FREQS, (hd_full // 2,), kind="one")
            rope_freqs_done = True
        m.norm(T.FFN_NORM, i)
        m.add(T.FFN_GATE, (n, c["n_ff"]), i)
        m.add(T.FFN_UP, (n, c["n_ff"]), i)
        m.add(T.FFN_DOWN, (c["n_ff"], n), i)
        m.norm(T.FFN_POST_NORM, i)
        m.add(T.PER_LAYER_INP_GATE, (n, n_pl), i)
        m.add(T.PER_LAYER_PROJ, (n_pl, n), i)
        m.norm(T.PER_LAYER_POST_NORM, i)


def _qwen35_kv(w, c) -> list[bool]:
    """Keys of models/qwen35.cpp / qwen35moe.cpp load_arch_hparams; returns
    the recurrent flag per layer (full_attention_interval 3, or 2 below 3
    layers: layers 2, 5, ...
    are full attention, the others gated delta-net)."""
    hd = c["head_dim_wide"]
    _common_kv(w, c, head_dim=hd, n_rot=hd // 2)   # partial rotary, as Qwen3.5
    # IMROPE sections (required key): they add up to n_rot/2, split as in
    # Qwen3.5 ([11, 11, 10, 0] for n_rot 64)
    s = hd // 4
    a = -(-s // 3)
    w.add_rope_dimension_sections([a, a, s - 2 * a, 0])
    w.add_ssm_conv_kernel(4)
    w.add_ssm_state_size(c["ssm_d_state"])
    w.add_ssm_group_count(c["ssm_n_group"])
    w.add_ssm_time_step_rank(c["ssm_dt_rank"])
    w.add_ssm_inner_size(c["ssm_d_state"] * c["ssm_dt_rank"])
    w.add_full_attention_interval(c["full_attn_interval"])
    return [(i + 1) % c["full_attn_interval"] != 0 for i in range(c["n_layer"])]


def _qwen35_block_attn(m, c, i, recurrent: bool) -> None:
    """load_block_trunk of models/qwen35.cpp (attention / linear part)."""
    n = c["n_embd"]
    m.norm(T.ATTN_NORM, i)
    m.norm(T.ATTN_POST_NORM, i)
    if not recurrent:
        hd = c["head_dim_wide"]
        # q carries query + output gate: 2 * head * n_head
        m.qkv(i, hd * c["n_head"] * 2, hd * c["n_head_kv"], hd * c["n_head_kv"])
        m.add(T.ATTN_OUT, (hd * c["n_head"], n), i)
        m.norm(T.ATTN_Q_NORM, i, hd)
        m.norm(T.ATTN_K_NORM, i, hd)
        return
    ds, nk, nv = c["ssm_d_state"], c["ssm_n_group"], c["ssm_dt_rank"]
    key_dim, value_dim = ds * nk, ds * nv
    conv_dim = 2 * key_dim + value_dim
    # attn_qkv / attn_gate are optional to the loader but the graph uses them
    m.add(T.ATTN_QKV, (n, conv_dim), i)
    m.add(T.ATTN_GATE, (n, value_dim), i)
    m.add(T.SSM_CONV1D, (4, conv_dim), i)
    m.add(T.SSM_DT, (nv,), i, suffix="bias")
    m.add(T.SSM_A, (nv,), i, kind="ssm_a", suffix=None)
    m.add(T.SSM_BETA, (n, nv), i)
    m.add(T.SSM_ALPHA, (n, nv), i)
    m.norm(T.SSM_NORM, i, ds)
    m.add(T.SSM_OUT, (value_dim, n), i)


def _arch_qwen35(w, m, c):
    # models/qwen35.cpp: hybrid, dense SwiGLU FFN in every layer; no MTP layers
    recr = _qwen35_kv(w, c)
    m.embd_out(tied=True)               # small Qwen3.5 models tie
    for i in range(c["n_layer"]):
        _qwen35_block_attn(m, c, i, recr[i])
        m.ffn(i)


def _arch_qwen35moe(w, m, c):
    # models/qwen35moe.cpp: hybrid; every layer MoE: router, separate
    # gate/up experts (no fused gate_up_exps), shared expert with its scalar
    # gate ffn_gate_inp_shexp {n_embd}; no MTP layers
    recr = _qwen35_kv(w, c)
    _moe_kv(w, c)
    w.add_expert_shared_feed_forward_length(c["n_ff_shexp"])
    n, e, fe, fs = c["n_embd"], c["n_expert"], c["n_ff_exp"], c["n_ff_shexp"]
    m.embd_out(tied=False)
    for i in range(c["n_layer"]):
        _qwen35_block_attn(m, c, i, recr[i])
        m.add(T.FFN_GATE_INP, (n, e), i)
        m.add(T.FFN_DOWN_EXP, (fe, n, e), i)
        m.add(T.FFN_GATE_EXP, (n, fe, e), i)
        m.add(T.FFN_UP_EXP, (n, fe, e), i)
        m.add(T.FFN_GATE_INP_SHEXP, (n,), i)
        m.add(T.FFN_GATE_SHEXP, (n, fs), i)
        m.add(T.FFN_UP_SHEXP, (n, fs), i)
        m.add(T.FFN_DOWN_SHEXP, (fs, n), i)


def _arch_gpt_oss(w, m, c):
    # models/openai-moe.cpp (LLM_ARCH_OPENAI_MOE, "gpt-oss"): sliding window
    # (required) with the default pattern 2 (even layers SWA), every layer
    # MoE with router bias and expert biases (all required), attention sinks,
    # attn_output bias; q/k/v biases are optional and written (gpt-oss has
    # them); head size = n_rot; output required
    hd = c["head_dim_wide"]
    _common_kv(w, c, head_dim=hd, n_rot=hd, n_ff=False)   # head 32: q width != n_embd, as gpt-oss
    _moe_kv(w, c)
    w.add_sliding_window(c["n_swa"])
    n, e, fe = c["n_embd"], c["n_expert"], c["n_ff_exp"]
    m.embd_out(tied=False)
    for i in range(c["n_layer"]):
        m.norm(T.ATTN_NORM, i)
        m.norm(T.ATTN_POST_NORM, i)
        m.qkv(i, c["n_head"] * hd, c["n_head_kv"] * hd, c["n_head_kv"] * hd, bias=True)
        m.add(T.ATTN_OUT, (c["n_head"] * hd, n), i)
        m.add(T.ATTN_SINKS, (c["n_head"],), i)
        m.add(T.FFN_GATE_INP, (n, e), i)
        m.add(T.FFN_GATE_EXP, (n, fe, e), i)
        m.add(T.FFN_DOWN_EXP, (fe, n, e), i)
        m.add(T.FFN_UP_EXP, (n, fe, e), i)
        m.add(T.ATTN_OUT, (n,), i, suffix="bias")
        m.add(T.FFN_GATE_INP, (e,), i, suffix="bias")
        m.add(T.FFN_GATE_EXP, (fe, e), i, suffix="bias")
        m.add(T.FFN_DOWN_EXP, (n, e), i, suffix="bias")
        m.add(T.FFN_UP_EXP, (fe, e), i, suffix="bias")


_BUILDERS = {
    "llama": _arch_llama,
    "qwen2": _arch_qwen2,
    "qwen3": _arch_qwen3,
    "gemma3": _arch_gemma3,
    "gemma2": _arch_gemma2,
    "gemma4": _arch_gemma4,
    "phi3": _arch_phi3,
    "mistral3": _arch_mistral3,
    "granite": _arch_granite,
    "olmo2": _arch_olmo2,
    "smollm3": _arch_smollm3,
    "glm4": _arch_glm4,
    "exaone4": _arch_exaone4,
    "qwen35": _arch_qwen35,
    "qwen3moe": _arch_qwen3moe,
    "qwen35moe": _arch_qwen35moe,
    "gpt-oss": _arch_gpt_oss,
}

# Hybrid layouts need one layer of each kind: Gemma 4 an SWA and a global
# layer (the iSWA cache asserts is_swa_any()), Qwen3.5 a recurrent and an
# attention layer (an empty KV cache fails to allocate its buffer).
_MIN_LAYERS = {"gemma4": 2, "qwen35": 2, "qwen35moe": 2}

#: Architectures write_synthetic supports (GGUF general.architecture names),
#: all checked to load and decode in the pinned llama.cpp (tests/test_synth.py).
ARCHS: tuple[str, ...] = tuple(_BUILDERS)


def write_synthetic(arch: str, path, seed: int = 0, n_layer: int = 6, *,
                    n_embd: int = 64, n_ff: int = 128, n_head: int = 4, n_head_kv: int = 2,
                    n_expert: int = 4, n_expert_used: int = 2, dtype: str = "f32",
                    scale: float = 0.02) -> Path:
    """Write a random-weight GGUF model of architecture ``arch`` to ``path``
    and return the path. Deterministic in all arguments. ``dtype`` "f32" or
    "f16" (2-D+ weights only). n_embd must be divisible by n_head, n_head by
    n_head_kv."""
    if arch not in _BUILDERS:
        raise ValueError(f"unsupported arch {arch!r}; supported: {', '.join(ARCHS)}")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be f32 or f16, not {dtype!r}")
    if n_layer < _MIN_LAYERS.get(arch, 1):
        raise ValueError(f"{arch} needs at least {_MIN_LAYERS[arch]} layers")
    if n_embd % n_head or n_head % n_head_kv or n_expert_used > n_expert:
        raise ValueError("n_embd must be divisible by n_head, n_head by n_head_kv, "
                         "and n_expert_used <= n_expert")
    path = Path(path)
    tokens, types, merges, eot = _vocab()
    cfg = dict(
        n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
        n_vocab=len(tokens), n_ctx_train=4096, scale=scale, dtype=dtype,
        head_dim_wide=2 * (n_embd // n_head),   # for archs whose real head dim != n_embd/n_head
        n_expert=n_expert, n_expert_used=n_expert_used,
        n_ff_exp=n_ff // 2, n_ff_shexp=n_ff // 2,
        n_swa=32, n_embd_per_layer=16,
        ssm_d_state=16, ssm_n_group=2, ssm_dt_rank=4,
        full_attn_interval=3 if n_layer >= 3 else 2,
    )
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(str(path), arch)
    # general.name must not contain an arch-like word: llama-vocab.cpp sets
    # token attributes by model name (a name with "phi3" requires "<s>" etc.)
    w.add_name("tiny random model (tests/synth.py)")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
    m = _Model(w, rng, cfg)
    _BUILDERS[arch](w, m, cfg)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(True)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch", choices=ARCHS)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    a = ap.parse_args(argv)
    p = write_synthetic(a.arch, a.out, seed=a.seed, n_layer=a.layers, dtype=a.dtype)
    print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
