// ffn-skip-ggml.h - the FFN-skip gate as a ggml op, and the predicated FFN
// matmul. Shared by the graph builder (cpp/ffn-skip-graph.cpp), the op
// constructor (cpp/ffn-skip-ggml.c, in ggml-base), the CPU backend
// (patches/0004) and the GPU backends (cpp/ffn-skip-vulkan.cpp, patches/0006).
// Plain C: included by ggml-cpu.c.
//
// GGML_OP_FFNSKIP_GATE (patches/0005) decides, for every token of a ubatch,
// whether the FFN of layer il runs (DESIGN.md section 3). It is a pure
// function of its inputs (no host state), so any backend can run it as one
// kernel, and the graph stays the same from token to token:
//
//   src[0] input  F32 [n_tokens, FFNSKIP_INPUT_ROWS]  token modes, output rows
//   src[1] policy F32 [FFNSKIP_POL_ROWS(L)]           k, runs, thresholds, ...
//   src[2] prev   F32 [n_tokens, FFNSKIP_STATE_ROWS(L)] previous gate, or NULL
//   src[3] h      F32 [d, rows]   residual before FFN obs (ffn_inp), or NULL
//   src[4] o      F32 [d, rows]   residual after FFN obs (l_out), or NULL
//   src[5] hc     F32 [d, rows']  input of FFN il (its ffn_inp): probe signal only, else NULL
//   src[6] probe  F32 [d + 1, L]  per-layer probe (w_j, b_j): probe signal only, else NULL
//   dst    state  F32 [n_tokens, FFNSKIP_STATE_ROWS(L)]
//   op_params: FFNSKIP_OPP_* (layer, tail flag, observed layer, n_layer)
//
// The state carries the per-token run state to the next gate, the keep mask
// of this layer, the all-skip predicate the matmuls read, and the per-token
// trace (decision and cosine of every layer so far): the last gate node (the
// tail) holds the whole ubatch's trace, which the host reads once per ubatch
// for the stats (ffnskip_ubatch_end in cpp/ffn-skip-graph.cpp).
//
// A predicated MUL_MAT carries the gate state of its layer as src[2] (a
// MUL_MAT_ID of an MoE block as src[3]: src[2] is its expert ids) and
// FFNSKIP_MUL_MAT_MAGIC(_NOOP) in its last op_params slot. When the state's
// all-skip flag (element 0) is set, the backend writes zeros (plus any fused
// addend) to dst and returns without reading the weights (decode is
// weight-bandwidth bound: that is where the time is saved).
#pragma once

#include "ggml.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

// rows of the gate state; row r holds field r for every token (ne0 = n_tokens)
enum ffnskip_state_row {
    FFNSKIP_ROW_ALL      = 0, // element 0: 1 when every token of the ubatch skips this layer (the predicate)
    FFNSKIP_ROW_CLAST    = 1, // cos of the most recent layer whose FFN ran (NaN: none yet)
    FFNSKIP_ROW_BUDGET   = 2, // skips left for this token
    FFNSKIP_ROW_RUN      = 3, // 1: a run of skips is active
    FFNSKIP_ROW_RUNS     = 4, // runs started so far
    FFNSKIP_ROW_SKIP     = 5, // this layer: 0 run, 1 skipped by the gate, 2 statically removed
    FFNSKIP_ROW_KEEP     = 6, // 1 - (SKIP != 0), per token (mask of FFN output rows)
    FFNSKIP_ROW_KEEP_OUT = 7, // KEEP of the output tokens, in output order (last layer)
    FFNSKIP_ROW_TRACE    = 8, // then L rows of decisions (FFNSKIP_DEC_*), L rows of cosines (NaN: none)
};
#define FFNSKIP_STATE_ROWS(L) (FFNSKIP_ROW_TRACE + 2 * (L))

// trace decisions, as floats in the state and as bytes in ffnskip_get_trace
#define FFNSKIP_DEC_RUN     0
#define FFNSKIP_DEC_SKIP    1
#define FFNSKIP_DEC_REMOVED 2
#define FFNSKIP_DEC_NONE    255 // token not gated (prefill) / layer not reached

// graph input rows, F32 [n_tokens, FFNSKIP_INPUT_ROWS]
enum ffnskip_input_row {
    FFNSKIP_IN_MODE    = 0, // 0 prefill (not a decode token), 1 decode in warm-up, 2 gated decode
    FFNSKIP_IN_OUT_IDX = 1, // token index of output row r (as llama.cpp's inp_out_ids)
    FFNSKIP_INPUT_ROWS = 2,
};

// policy input, F32 [FFNSKIP_POL_ROWS(L)]: data, so a policy change between
// tokens changes memory contents only (graph reuse, CUDA graphs)
enum ffnskip_policy_slot {
    FFNSKIP_POL_MAX_SKIP = 0, // k
    FFNSKIP_POL_MAX_RUNS = 1,
    FFNSKIP_POL_CONTINUE = 2, // 0/1
    FFNSKIP_POL_SIGNAL   = 3, // enum ffnskip_signal (cpp/ffn-skip.h): 0 cosine c_last, 1 probe
    FFNSKIP_POL_LAYERS   = 4, // then threshold[L], gated[L] (1: middle, not excluded), remove[L]
};
#define FFNSKIP_POL_ROWS(L) (FFNSKIP_POL_LAYERS + 3 * (L))

// op_params of GGML_OP_FFNSKIP_GATE (int32 slots)
enum ffnskip_gate_opp {
    FFNSKIP_OPP_IL      = 0, // layer decided (tail: g_hi, decides nothing)
    FFNSKIP_OPP_TAIL    = 1, // 1: records the outcome of layer il - 1 only
    FFNSKIP_OPP_OBS     = 2, // layer whose h/o (src[3], src[4]) are read; -1: none
    FFNSKIP_OPP_N_LAYER = 3,
};

#define FFNSKIP_MUL_MAT_MAGIC      0x50534646 /* "FFSP": skipped -> writes zeros (FFN down) */
#define FFNSKIP_MUL_MAT_MAGIC_NOOP 0x4e534646 /* "FFSN": skipped -> nothing (FFN up/gate: read only by the skipped down) */
#define FFNSKIP_OP_PARAM_SLOT (GGML_MAX_OP_PARAMS / (int) sizeof(int32_t) - 1)

// The gate node of layer il (constructor in cpp/ffn-skip-ggml.c, ggml-base).
// prev, h and o may be NULL (first gate node; no observed layer). Returns the
// state tensor F32 [n_tokens, FFNSKIP_STATE_ROWS(n_layer)].
GGML_API struct ggml_tensor * ggml_ffnskip_gate(
        struct ggml_context * ctx,
        struct ggml_tensor  * input,
        struct ggml_tensor  * policy,
        struct ggml_tensor  * prev,
        struct ggml_tensor  * h,
        struct ggml_tensor  * o,
        int32_t il, int32_t tail, int32_t obs, int32_t n_layer);

// The gate state of a predicated matmul: src[2] of a MUL_MAT, src[3] of a
// MUL_MAT_ID (whose src[2] holds the expert ids; MoE blocks, issue 15).
static inline const struct ggml_tensor * ffnskip_mul_mat_gate(const struct ggml_tensor * dst) {
    return dst->op == GGML_OP_MUL_MAT ? dst->src[2] : dst->op == GGML_OP_MUL_MAT_ID ? dst->src[3] : NULL;
}

// Wires the probe signal into a gate node (decides layer il): hc = the input
// of FFN il, probe = the per-layer probe weights F32 [d + 1, L] (a graph
// input). Backends whose gate kernel has no probe refuse such a node in
// supports_op (src[5] != NULL).
static inline void ffnskip_gate_set_probe(struct ggml_tensor * gate, struct ggml_tensor * hc, struct ggml_tensor * probe) {
    GGML_ASSERT(gate->op == GGML_OP_FFNSKIP_GATE && hc != NULL && probe != NULL);
    GGML_ASSERT(hc->type == GGML_TYPE_F32 && probe->type == GGML_TYPE_F32 && probe->ne[0] == hc->ne[0] + 1);
    gate->src[5] = hc;
    gate->src[6] = probe;
}

static inline int ffnskip_mul_mat_is_predicated(const struct ggml_tensor * dst) {
    return ffnskip_mul_mat_gate(dst) != NULL &&
           (dst->op_params[FFNSKIP_OP_PARAM_SLOT] == FFNSKIP_MUL_MAT_MAGIC ||
            dst->op_params[FFNSKIP_OP_PARAM_SLOT] == FFNSKIP_MUL_MAT_MAGIC_NOOP);
}

// 1 when every token of the gate state skips this layer (host-visible state).
static inline int ffnskip_all_skip(const struct ggml_tensor * state) {
    GGML_ASSERT(state->type == GGML_TYPE_F32);
    GGML_ASSERT(state->nb[0] == sizeof(float));
    GGML_ASSERT(state->ne[1] >= FFNSKIP_ROW_TRACE);
    return ((const float *) state->data)[0] != 0.0f;
}

// CPU backend graph loop: 1 when node is an FFN up/gate matmul whose tokens
// all skip. Its output is read only by the GLU feeding the skipped down
// projection, so every thread (all read the same gate state, written before
// an earlier barrier) skips the node and its barrier.
static inline int ffnskip_cpu_node_is_noop(const struct ggml_tensor * node) {
    return node->op == GGML_OP_MUL_MAT && node->src[2] != NULL &&
           node->op_params[FFNSKIP_OP_PARAM_SLOT] == FFNSKIP_MUL_MAT_MAGIC_NOOP &&
           ffnskip_all_skip(node->src[2]);
}

// CPU backend: called by every thread before any other mul_mat path (incl.
// the repacked "extra" buffer types). Returns 1 when the node was skipped:
// thread ith has zeroed its share of dst.
static inline int ffnskip_cpu_mul_mat_skip(int ith, int nth, struct ggml_tensor * dst) {
    if (!ffnskip_mul_mat_is_predicated(dst) || !ffnskip_all_skip(ffnskip_mul_mat_gate(dst))) {
        return 0;
    }
    GGML_ASSERT(ggml_is_contiguous(dst));
    const size_t n     = ggml_nbytes(dst);
    const size_t per   = (n + (size_t) nth - 1) / (size_t) nth;
    const size_t start = per * (size_t) ith;
    const size_t end   = start + per < n ? start + per : n;
    if (start < end) {
        memset((char *) dst->data + start, 0, end - start);
    }
    return 1;
}

// cos(h, o) of one residual-stream row of d floats, accumulated in double.
// Zero or non-finite vectors give NaN (never a skip: NaN > tau is false).
static inline double ffnskip_cos_f64(const float * x, const float * y, int64_t d) {
    double xy = 0.0, xx = 0.0, yy = 0.0;
    for (int64_t i = 0; i < d; ++i) {
        xy += (double) x[i] * (double) y[i];
        xx += (double) x[i] * (double) x[i];
        yy += (double) y[i] * (double) y[i];
    }
    return xy / (sqrt(xx) * sqrt(yy));
}

// host and device (cpp/ffn-skip-cuda.cu calls the same lookup in its kernel)
#ifdef __CUDACC__
#define FFNSKIP_HOST_DEVICE __host__ __device__
#else
#define FFNSKIP_HOST_DEVICE
#endif

// Row of token t in a tensor of `rows` rows holding all n tokens, or (last
// layer) only the output tokens, in the order of outidx; -1: no row.
FFNSKIP_HOST_DEVICE static inline int64_t ffnskip_row_of(int64_t t, int64_t n, const float * outidx, int64_t rows) {
    if (rows == n) {
        return t;
    }
    for (int64_t q = 0; q < rows; ++q) {
        if ((int64_t) outidx[q] == t) {
            return q;
        }
    }
    return -1;
}

// The probe signal of token t (issue 14, docs/QUALITY.md): s = -(w . hc_r /
// |hc_r| + b), the negated predicted log damage of skipping this FFN, on row r
// of hc (all tokens, or the output tokens only on the last layer). NaN when
// the token has no row, no probe is wired, or the value is not finite.
static inline float ffnskip_probe_signal(int64_t t, int64_t n, const float * outidx, int64_t hc_rows,
                                         double (*probe_fn)(int64_t r, void * user), void * user) {
    if (probe_fn == NULL) {
        return NAN;
    }
    const int64_t r = ffnskip_row_of(t, n, outidx, hc_rows);
    if (r < 0) {
        return NAN;
    }
    const double s = probe_fn(r, user);
    return isfinite(s) ? (float) s : NAN;
}

// The gate's semantics (DESIGN.md section 3), one token at a time: the CPU
// implementation of GGML_OP_FFNSKIP_GATE and the reference of every other
// backend's kernel (cpp/ffn-skip-gate.comp). dst must not alias the srcs.
// cos(t, r) returns the cosine of observed row r (the caller's precision).
static inline void ffnskip_gate_ref(
        const float * in, const float * pol, const float * prev, float * dst, int64_t n,
        int32_t il, int32_t tail, int32_t obs, int32_t L, int64_t h_rows,
        double (*cos_fn)(int64_t r, void * user), void * user,
        int64_t hc_rows, double (*probe_fn)(int64_t r, void * user)) {
    const float * mode   = in + FFNSKIP_IN_MODE * n;
    const float * outidx = in + FFNSKIP_IN_OUT_IDX * n;
    const int64_t rows   = FFNSKIP_STATE_ROWS(L);
#define FFNSKIP_AT(base, row, t) (base)[(int64_t) (row) * n + (t)]
    if (prev != NULL) {
        memcpy(dst, prev, (size_t) (rows * n) * sizeof(float));
    } else {
        for (int64_t t = 0; t < n; ++t) {
            for (int32_t j = 0; j < L; ++j) {
                FFNSKIP_AT(dst, FFNSKIP_ROW_TRACE + j, t)     = (float) FFNSKIP_DEC_NONE;
                FFNSKIP_AT(dst, FFNSKIP_ROW_TRACE + L + j, t) = NAN;
            }
        }
    }
    int all = n > 0;
    for (int64_t t = 0; t < n; ++t) {
        const int is_decode = mode[t] >= 1.0f;
        float clast, budget, run, runs, sk;
        if (prev == NULL) {
            // first gate node: the observed layer (if any) is a cold layer that ran
            clast = NAN; budget = pol[FFNSKIP_POL_MAX_SKIP]; run = 0.0f; runs = 0.0f; sk = 0.0f;
        } else {
            clast  = FFNSKIP_AT(prev, FFNSKIP_ROW_CLAST, t);
            budget = FFNSKIP_AT(prev, FFNSKIP_ROW_BUDGET, t);
            run    = FFNSKIP_AT(prev, FFNSKIP_ROW_RUN, t);
            runs   = FFNSKIP_AT(prev, FFNSKIP_ROW_RUNS, t);
            sk     = FFNSKIP_AT(prev, FFNSKIP_ROW_SKIP, t);
        }
        if (obs >= 0 && sk == 0.0f && is_decode) {
            // cosine of layer obs (prefill tokens never gate: none needed)
            const int64_t r = ffnskip_row_of(t, n, outidx, h_rows);
            if (r >= 0) {
                clast = (float) cos_fn(r, user);
                FFNSKIP_AT(dst, FFNSKIP_ROW_TRACE + L + obs, t) = clast;
            }
        }
        FFNSKIP_AT(dst, FFNSKIP_ROW_CLAST, t) = clast;
        if (tail) {
            continue; // records layer il-1 only
        }
        const float thr   = pol[FFNSKIP_POL_LAYERS + il];
        const float gated = pol[FFNSKIP_POL_LAYERS + L + il];
        const float rem   = pol[FFNSKIP_POL_LAYERS + 2 * L + il];
        float d;
        if (rem != 0.0f) {
            d = 2.0f; // statically removed: no FFN in the graph, run state untouched
        } else if (mode[t] != 2.0f || gated == 0.0f) {
            d = 0.0f; run = 0.0f;
        } else if (run != 0.0f && pol[FFNSKIP_POL_CONTINUE] != 0.0f && budget > 0.0f) {
            d = 1.0f; budget -= 1.0f;
        } else if (runs < pol[FFNSKIP_POL_MAX_RUNS] && budget > 0.0f &&
                   (pol[FFNSKIP_POL_SIGNAL] == 1.0f ? ffnskip_probe_signal(t, n, outidx, hc_rows, probe_fn, user)
                                                   : clast) > thr) {
            d = 1.0f; run = 1.0f; runs += 1.0f; budget -= 1.0f;
        } else {
            d = 0.0f; run = 0.0f;
        }
        FFNSKIP_AT(dst, FFNSKIP_ROW_BUDGET, t) = budget;
        FFNSKIP_AT(dst, FFNSKIP_ROW_RUN, t)    = run;
        FFNSKIP_AT(dst, FFNSKIP_ROW_RUNS, t)   = runs;
        FFNSKIP_AT(dst, FFNSKIP_ROW_SKIP, t)   = d;
        FFNSKIP_AT(dst, FFNSKIP_ROW_KEEP, t)   = d == 0.0f ? 1.0f : 0.0f;
        FFNSKIP_AT(dst, FFNSKIP_ROW_TRACE + il, t) = is_decode ? d : (float) FFNSKIP_DEC_NONE;
        all = all && d != 0.0f;
    }
    if (!tail) {
        for (int64_t r = 0; r < n; ++r) {
            const int64_t t = (int64_t) outidx[r];
            FFNSKIP_AT(dst, FFNSKIP_ROW_KEEP_OUT, r) = (t >= 0 && t < n) ? FFNSKIP_AT(dst, FFNSKIP_ROW_KEEP, t) : 1.0f;
            FFNSKIP_AT(dst, FFNSKIP_ROW_ALL, r) = 0.0f;
        }
        if (n > 0) {
            FFNSKIP_AT(dst, FFNSKIP_ROW_ALL, 0) = all ? 1.0f : 0.0f;
        }
    }
#undef FFNSKIP_AT
}

struct ffnskip_cos_rows {
    const struct ggml_tensor * h;
    const struct ggml_tensor * o;
    const struct ggml_tensor * hc;    // probe signal: input of FFN il, or NULL
    const struct ggml_tensor * probe; // probe signal: F32 [d + 1, L], or NULL
    int32_t il;
};

// -(w_il . x / |x| + b_il) for row r of hc, accumulated in double
static inline double ffnskip_probe_rows_f64(int64_t r, void * user) {
    const struct ffnskip_cos_rows * c = (const struct ffnskip_cos_rows *) user;
    const int64_t d = c->hc->ne[0];
    const float * x = (const float *) ((const char *) c->hc->data + r * c->hc->nb[1]);
    const float * w = (const float *) ((const char *) c->probe->data + (int64_t) c->il * c->probe->nb[1]);
    double xw = 0.0, xx = 0.0;
    for (int64_t i = 0; i < d; ++i) {
        xw += (double) x[i] * (double) w[i];
        xx += (double) x[i] * (double) x[i];
    }
    return -(xw / sqrt(xx) + (double) w[d]);
}

static inline double ffnskip_cos_rows_f64(int64_t r, void * user) {
    const struct ffnskip_cos_rows * c = (const struct ffnskip_cos_rows *) user;
    return ffnskip_cos_f64((const float *) ((const char *) c->h->data + r * c->h->nb[1]),
                           (const float *) ((const char *) c->o->data + r * c->o->nb[1]), c->h->ne[0]);
}

// CPU backend: GGML_OP_FFNSKIP_GATE (tiny: one thread; cosine in double)
static inline void ffnskip_gate_forward_cpu(struct ggml_tensor * dst, int ith) {
    if (ith != 0) {
        return;
    }
    const struct ggml_tensor * in   = dst->src[0];
    const struct ggml_tensor * pol  = dst->src[1];
    const struct ggml_tensor * prev = dst->src[2];
    const struct ggml_tensor * h    = dst->src[3];
    const struct ggml_tensor * o    = dst->src[4];
    const int32_t il   = dst->op_params[FFNSKIP_OPP_IL];
    const int32_t tail = dst->op_params[FFNSKIP_OPP_TAIL];
    const int32_t obs  = dst->op_params[FFNSKIP_OPP_OBS];
    const int32_t L    = dst->op_params[FFNSKIP_OPP_N_LAYER];
    const int64_t n    = dst->ne[0];
    GGML_ASSERT(L > 0 && il >= 0 && il <= L && obs < L);
    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst) && dst->ne[1] == FFNSKIP_STATE_ROWS(L));
    GGML_ASSERT(in->type == GGML_TYPE_F32 && ggml_is_contiguous(in) && in->ne[0] == n && in->ne[1] == FFNSKIP_INPUT_ROWS);
    GGML_ASSERT(pol->type == GGML_TYPE_F32 && ggml_is_contiguous(pol) && ggml_nelements(pol) == FFNSKIP_POL_ROWS(L));
    GGML_ASSERT(prev == NULL || (prev->type == GGML_TYPE_F32 && ggml_is_contiguous(prev) && ggml_are_same_shape(prev, dst)));
    GGML_ASSERT(!tail || prev != NULL);
    GGML_ASSERT((obs < 0) == (h == NULL) && (h == NULL) == (o == NULL));
    if (h != NULL) {
        GGML_ASSERT(h->type == GGML_TYPE_F32 && o->type == GGML_TYPE_F32);
        GGML_ASSERT(h->ne[0] == o->ne[0] && h->ne[1] == o->ne[1] && h->nb[0] == sizeof(float) && o->nb[0] == sizeof(float));
        GGML_ASSERT(h->ne[1] <= n);
    }
    const struct ggml_tensor * hc    = dst->src[5];
    const struct ggml_tensor * probe = dst->src[6];
    GGML_ASSERT((hc == NULL) == (probe == NULL));
    if (hc != NULL) {
        GGML_ASSERT(hc->type == GGML_TYPE_F32 && hc->nb[0] == sizeof(float) && hc->ne[1] <= n);
        GGML_ASSERT(probe->type == GGML_TYPE_F32 && ggml_is_contiguous(probe));
        GGML_ASSERT(probe->ne[0] == hc->ne[0] + 1 && probe->ne[1] == L);
    }
    struct ffnskip_cos_rows rows = { h, o, hc, probe, il };
    ffnskip_gate_ref((const float *) in->data, (const float *) pol->data,
                     prev ? (const float *) prev->data : NULL, (float *) dst->data, n,
                     il, tail, obs, L, h ? h->ne[1] : 0, ffnskip_cos_rows_f64, &rows,
                     hc ? hc->ne[1] : 0, hc ? ffnskip_probe_rows_f64 : NULL);
}

#ifdef __cplusplus
}
#endif
