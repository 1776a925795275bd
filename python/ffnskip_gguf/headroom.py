"""Headroom of per-token FFN skipping, and candidate gate signals (issue 14).

Measures, on a fixed text, the damage of skipping FFN j for token t alone,

    D[t, j] = NLL_t(FFN j skipped for token t only) - NLL_t(dense)   (nats)

where NLL_t is the negative log-likelihood of the token that follows
position t (teacher forcing). Every (t, j) cell of the gateable layers
(1..L-1; layer 0 has no earlier cosine) is one forced single-token decode
from the dense KV prefix, after which position t is removed from the KV
cache again; the dense decode of t comes last and stays. The skip runs in
the real gate (threshold -2 on layer j, 1 elsewhere), so the cell is exactly
what the gate would do to that token.

Next to D the dense decode records, through llama.cpp's eval callback, the
signals a gate at layer j could compute for about the cost of a dot product
(``SIGNALS``) and the unit residual u_j = h_j / |h_j| (the FFN input, after
attention of layer j) for linear probes.

``validate_mask`` runs a per-token skip mask (T x L booleans) for real,
token by token, KV effects included, so that additive predictions from D
can be checked. Used by ``scripts/headroom.py``; the results are in
docs/QUALITY.md ("Headroom").
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field

import numpy as np

from . import _lib
from .runner import Runner

ALWAYS, NEVER = -2.0, 1.0

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10


class ggml_tensor(ctypes.Structure):
    """Mirror of struct ggml_tensor (ggml/include/ggml.h of the pin)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def f32_rows(t: ggml_tensor) -> np.ndarray:
    """View of a contiguous F32 2-D CPU tensor as [rows, ne0] (shares memory)."""
    assert t.type == 0 and t.nb[0] == 4, (t.name, t.type)
    rows = t.ne[1] * t.ne[2] * t.ne[3]
    buf = (ctypes.c_float * (t.ne[0] * rows)).from_address(t.data)
    return np.ctypeslib.as_array(buf).reshape(rows, t.ne[0])


#: signals computable at layer j before FFN j runs (dense stream), each
#: oriented so that larger = "more redundant" is the paper's reading for
#: ``cos_prev``; Spearman signs are reported as measured.
SIGNALS = (
    "cos_prev",     # cos(h_{j-1}, o_{j-1}): the paper's saturation signal (section 3)
    "cos_attn",     # cos(o_{j-1}, h_j): how little attention j turned the stream
    "attn_ratio",   # |h_j - o_{j-1}| / |o_{j-1}|: relative size of attention j's update
    "ffn_ratio",    # |o_{j-1} - h_{j-1}| / |h_{j-1}|: relative size of FFN j-1's update
    "log_norm",     # log |h_j|
    "x_max",        # log max_i |x_i|, x = the FFN's normalised input (ffn_norm-j)
    "x_kurt",       # mean(x^4) / mean(x^2)^2
)


#: eval-callback name of the tensor each builder gives ffnskip_ffn_begin (h_j,
#: the FFN's input; patches/0003), where it is not "ffn_inp"
FFN_INPUT_NAME = {"gemma2": "sa_out", "gemma3": "sa_out", "gemma4": "attn_out", "qwen35": "attn_residual",
                  "qwen35moe": "attn_residual"}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = np.einsum("ij,ij->i", a, b)
    return num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@dataclass
class Cells:
    """Result of ``measure_cells``: T scored tokens x L layers.

    D: float32 [T, L] damage in nats (NaN for layer 0); K: float32 [T, L]
    KL(p_dense || p_skip) of the next-token distributions (nats: the expected
    NLL increase when the next token follows the dense model; the noise-free
    version of D); nll: float64 [T]
    dense NLL; feats: name -> float32 [T, L] (NaN where undefined); U: float16
    [T, L, n_embd] unit residuals u_j (None unless ``keep_hidden``);
    order: (chunk, position) of each row.
    """

    D: np.ndarray
    K: np.ndarray
    nll: np.ndarray
    feats: dict[str, np.ndarray]
    U: np.ndarray | None
    order: list[tuple[int, int]] = field(default_factory=list)


class CellMeter:
    """One model, one context with the eval callback; see module docstring.

    Args:
        path: GGUF model; arch: its architecture (the FFN input is
            ``sa_out`` on gemma3, ``ffn_inp`` elsewhere).
        n_seq: sequences decoded in parallel (one token each per decode).
        prefill: dense prompt per chunk (= the warm-up).
    """

    def __init__(self, path: str, arch: str, *, n_seq: int = 16, prefill: int = 32, chunk: int = 96,
                 n_threads: int | None = None):
        self.h_name = FFN_INPUT_NAME.get(arch, "ffn_inp")
        self.n_seq, self.P, self.chunk = n_seq, prefill, chunk
        self.r = Runner(path, n_ctx=n_seq * (chunk + 8), n_batch=max(512, n_seq * prefill), n_seq_max=n_seq,
                        cb=self._cb, n_threads=n_threads)
        self.L = self.r.n_layer
        self.capture = False
        self.grab: dict[tuple[str, int], np.ndarray] = {}
        self.mem = __import__("llama_cpp").llama_get_memory(self.r.ctx)

    def close(self):
        self.r.close()

    def _cb(self, t_ptr, ask, _ud):
        t = ggml_tensor.from_address(t_ptr)
        base, _, idx = t.name.decode(errors="replace").rpartition("-")
        if not idx.isdigit() or base not in (self.h_name, "l_out", "ffn_norm"):
            return False
        if ask:
            return self.capture
        if self.capture:
            self.grab[(base, int(idx))] = f32_rows(t).astype(np.float64)
        return True

    # -- policies -------------------------------------------------------------

    def set_mask(self, skip_layers) -> None:
        """Gate that skips exactly ``skip_layers`` on every gated token."""
        L = self.L
        taus = [NEVER] * L
        for j in skip_layers:
            taus[j] = ALWAYS
        self.r.set_policy(True, ffn_skip_threshold=taus, ffn_skip_cold_start=1, ffn_skip_cold_end=0,
                          ffn_skip_max_skip=L - 1, ffn_skip_max_runs=L - 1, ffn_skip_continue=False,
                          ffn_skip_warmup=self.P)

    def chunks(self, texts: list[str], tokens: int) -> list[list[int]]:
        """Chunks of ``chunk`` tokens (first ``prefill`` = prompt), round-robin
        over the texts, until ``tokens`` scored tokens."""
        per = []
        for text in texts:
            toks = self.r.tokenize(text, bos=True)
            per.append([toks[i:i + self.chunk] for i in range(0, len(toks) - self.chunk + 1, self.chunk)])
        out, n = [], 0
        for i in range(max(len(p) for p in per)):
            for p in per:
                if i < len(p) and n < tokens:
                    out.append(p[i])
                    n += self.chunk - 1 - self.P
        return out

    # -- measurement ----------------------------------------------------------

    def measure(self, chunks: list[list[int]], keep_hidden: bool = True, progress: bool = True,
                layers: list[int] | None = None) -> Cells:
        """D, KL, dense NLL and signals for every scored token of ``chunks``
        (each scored position t predicts token t + 1); ``layers``: measure
        the cells of these layers only (the others stay NaN; calibration)."""
        import llama_cpp
        from tqdm import tqdm

        L, P = self.L, self.P
        T = sum(len(c) - 1 - P for c in chunks)
        D = np.full((T, L), np.nan, np.float32)
        K = np.full((T, L), np.nan, np.float32)
        nll = np.zeros(T)
        feats = {k: np.full((T, L), np.nan, np.float32) for k in SIGNALS}
        U = None
        order = []
        row = 0
        bar = tqdm(total=T, desc="cells", unit="tok", disable=not progress)
        for g in range(0, len(chunks), self.n_seq):
            group = chunks[g:g + self.n_seq]
            n = len(group)
            self.r.clear()
            self.set_mask([])
            self.r.decode([(tok, i, s, False) for s, c in enumerate(group) for i, tok in enumerate(c[:P])])
            for i in range(P, len(group[0]) - 1):
                items = [(c[i], i, s, True) for s, c in enumerate(group)]
                tgt = np.array([c[i + 1] for c in group])
                logp = {}
                cell_layers = [j for j in range(1, L) if layers is None or j in layers]
                for j in cell_layers:
                    self.set_mask([j])
                    logp[j] = _logsoftmax(self.r.decode(items))
                    D[row:row + n, j] = -logp[j][np.arange(n), tgt]
                    for s in range(n):
                        llama_cpp.llama_memory_seq_rm(self.mem, s, i, i + 1)
                self.set_mask([])
                self.grab.clear()
                self.capture = True
                try:
                    lp0 = _logsoftmax(self.r.decode(items))
                finally:
                    self.capture = False
                dn = -lp0[np.arange(n), tgt]
                p0 = np.exp(lp0)
                for j in cell_layers:
                    K[row:row + n, j] = (p0 * (lp0 - logp[j])).sum(axis=1)
                nll[row:row + n] = dn
                D[row:row + n, cell_layers] -= dn[:, None]
                h = [self.grab[(self.h_name, j)] for j in range(L)]
                o = [self.grab[("l_out", j)] for j in range(L)]
                if keep_hidden and U is None:
                    U = np.zeros((T, L, h[0].shape[1]), np.float16)
                for j in range(L):
                    x = self.grab[("ffn_norm", j)]
                    x2 = (x * x).mean(axis=1)
                    feats["x_max"][row:row + n, j] = np.log(np.abs(x).max(axis=1))
                    feats["x_kurt"][row:row + n, j] = (x ** 4).mean(axis=1) / (x2 * x2)
                    feats["log_norm"][row:row + n, j] = np.log(np.linalg.norm(h[j], axis=1))
                    if keep_hidden:
                        U[row:row + n, j] = h[j] / np.linalg.norm(h[j], axis=1, keepdims=True)
                    if j == 0:
                        continue
                    feats["cos_prev"][row:row + n, j] = _cos(h[j - 1], o[j - 1])
                    feats["cos_attn"][row:row + n, j] = _cos(o[j - 1], h[j])
                    feats["attn_ratio"][row:row + n, j] = (np.linalg.norm(h[j] - o[j - 1], axis=1)
                                                           / np.linalg.norm(o[j - 1], axis=1))
                    feats["ffn_ratio"][row:row + n, j] = (np.linalg.norm(o[j - 1] - h[j - 1], axis=1)
                                                          / np.linalg.norm(h[j - 1], axis=1))
                order.extend((g + s, i) for s in range(n))
                row += n
                bar.update(n)
        bar.close()
        assert row == T
        return Cells(D, K, nll, feats, U, order)

    def rows(self, chunks: list[list[int]]) -> dict[tuple[int, int], int]:
        """Row index (the order of ``measure``) of each (chunk, position)."""
        rows, r = {}, 0
        for g in range(0, len(chunks), self.n_seq):
            group = chunks[g:g + self.n_seq]
            for i in range(self.P, len(group[0]) - 1):
                for s in range(len(group)):
                    rows[(g + s, i)] = r
                    r += 1
        return rows

    def validate(self, chunks: list[list[int]], apply=None, progress: bool = True) -> np.ndarray:
        """Run ``chunks`` for real, each sequence alone, one token per
        llama_decode (generation's path), KV effects included. ``apply(k)``
        sets the policy for the token of row k (the order of ``measure``)
        before it is decoded; None: the policy in effect. Returns the NLL [T]
        (nats) in row order."""
        from tqdm import tqdm

        P = self.P
        rows = self.rows(chunks)
        out = np.zeros(len(rows))
        bar = tqdm(total=len(rows), desc="validate", unit="tok", disable=not progress, leave=False)
        for ci, c in enumerate(chunks):
            self.r.clear()
            self.r.decode([(tok, i, 0, False) for i, tok in enumerate(c[:P])])
            for i in range(P, len(c) - 1):
                k = rows[(ci, i)]
                if apply is not None:
                    apply(k)
                out[k] = _nll(self.r.decode([(c[i], i, 0, True)]), np.array([c[i + 1]]))[0]
                bar.update(1)
        bar.close()
        return out

    def validate_mask(self, chunks: list[list[int]], mask: np.ndarray, progress: bool = True) -> np.ndarray:
        """``validate`` with a per-token skip mask: bool [T, L] in row order
        (the gate skips exactly mask[k] for the token of row k)."""
        assert mask.shape == (len(self.rows(chunks)), self.L), mask.shape
        return self.validate(chunks, lambda k: self.set_mask(np.flatnonzero(mask[k]).tolist()), progress)


def _logsoftmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def _nll(logits: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(tgt)), tgt]


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def perlayer_mask(M: np.ndarray, layers, f: float) -> np.ndarray:
    """The gate's shape as a skip mask: each layer j of ``layers`` skips
    the tokens whose score M[:, j] (predicted damage: lower skips first)
    is at most its ``f`` quantile; M: float [T, L]. Returns bool [T, L]
    (docs/QUALITY.md, "Inside the gate's shape")."""
    mask = np.zeros(M.shape, bool)
    for j in layers:
        mask[:, j] = M[:, j] <= float(np.nanquantile(M[:, j], f))
    return mask


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays over their finite pairs
    (ties ranked in order of appearance: the data here are continuous)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return math.nan
    ra, rb = _ranks(np.asarray(a)[ok]), _ranks(np.asarray(b)[ok])
    return float(np.corrcoef(ra, rb)[0, 1])


def ridge_fit(X: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Closed-form ridge regression y ~ X w + b (X: [n, d], y: [n]); the
    intercept is not penalised. Returns (w [d], b)."""
    X = X.astype(np.float64)
    mx, my = X.mean(axis=0), float(y.mean())
    Xc = X - mx
    d = X.shape[1]
    if d <= len(y):
        w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(d), Xc.T @ (y - my))
    else:  # dual form: fewer samples than features
        a = np.linalg.solve(Xc @ Xc.T + lam * np.eye(len(y)), y - my)
        w = Xc.T @ a
    return w, my - float(mx @ w)


def ridge_cv(X: np.ndarray, y: np.ndarray, lams=(1e-2, 1e-1, 1.0, 10.0, 100.0), folds: int = 4,
             seed: int = 0) -> tuple[np.ndarray, float, float]:
    """Ridge with the penalty chosen by k-fold cross-validation on Spearman
    (the gate only needs the ranking). Returns (w, b, lambda)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    best, best_lam = -np.inf, lams[0]
    for lam in lams:
        sc = []
        for f in range(folds):
            te = idx[f::folds]
            tr = np.setdiff1d(idx, te)
            w, b = ridge_fit(X[tr], y[tr], lam)
            sc.append(spearman(X[te] @ w + b, y[te]))
        if np.nanmean(sc) > best:
            best, best_lam = float(np.nanmean(sc)), lam
    w, b = ridge_fit(X, y, best_lam)
    return w, b, best_lam
