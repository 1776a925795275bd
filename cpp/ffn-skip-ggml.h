// ffn-skip-ggml.h - the predicated FFN matmul, shared by the graph builder
// (cpp/ffn-skip-graph.cpp) and the CPU backend hook (patches/0004).
//
// A predicated MUL_MAT carries the gate state of its layer as src[2] and
// FFNSKIP_MUL_MAT_MAGIC in its last op_params slot. The gate state is an F32
// tensor [n_tokens, FFNSKIP_STATE_ROWS]: row r holds field r for every token.
// When every token's SKIP field is non-zero the backend writes zeros to dst
// and returns without reading the weights (decode is weight-bandwidth bound,
// that is where the time is saved). Plain C: included by ggml-cpu.c.
#pragma once

#include "ggml.h"

#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

enum ffnskip_state_row {
    FFNSKIP_ROW_CLAST    = 0, // cos of the most recent layer whose FFN ran (NaN: none yet)
    FFNSKIP_ROW_BUDGET   = 1, // skips left for this token
    FFNSKIP_ROW_RUN      = 2, // 1: a run of skips is active
    FFNSKIP_ROW_RUNS     = 3, // runs started so far
    FFNSKIP_ROW_SKIP     = 4, // this layer: 0 run, 1 skipped by the gate, 2 statically removed
    FFNSKIP_ROW_KEEP     = 5, // 1 - (SKIP != 0), per token (mask of FFN output rows)
    FFNSKIP_ROW_KEEP_OUT = 6, // KEEP of the output tokens, in output order (last layer)
    FFNSKIP_STATE_ROWS   = 7,
};

// graph input rows, F32 [n_tokens, FFNSKIP_INPUT_ROWS]
enum ffnskip_input_row {
    FFNSKIP_IN_MODE    = 0, // 0 prefill (not a decode token), 1 decode in warm-up, 2 gated decode
    FFNSKIP_IN_OUT_IDX = 1, // token index of output row r (as llama.cpp's inp_out_ids)
    FFNSKIP_INPUT_ROWS = 2,
};

#define FFNSKIP_MUL_MAT_MAGIC      0x50534646 /* "FFSP": skipped -> writes zeros (FFN down) */
#define FFNSKIP_MUL_MAT_MAGIC_NOOP 0x4e534646 /* "FFSN": skipped -> nothing (FFN up/gate: read only by the skipped down) */
#define FFNSKIP_OP_PARAM_SLOT (GGML_MAX_OP_PARAMS / (int) sizeof(int32_t) - 1)

static inline int ffnskip_mul_mat_is_predicated(const struct ggml_tensor * dst) {
    return dst->op == GGML_OP_MUL_MAT && dst->src[2] != NULL &&
           (dst->op_params[FFNSKIP_OP_PARAM_SLOT] == FFNSKIP_MUL_MAT_MAGIC ||
            dst->op_params[FFNSKIP_OP_PARAM_SLOT] == FFNSKIP_MUL_MAT_MAGIC_NOOP);
}

// 1 when every token of the gate state skips this layer.
static inline int ffnskip_all_skip(const struct ggml_tensor * state) {
    GGML_ASSERT(state->type == GGML_TYPE_F32);
    GGML_ASSERT(state->ne[1] == FFNSKIP_STATE_ROWS);
    GGML_ASSERT(state->nb[0] == sizeof(float));
    const float * skip = (const float *) ((const char *) state->data + FFNSKIP_ROW_SKIP * state->nb[1]);
    for (int64_t t = 0; t < state->ne[0]; ++t) {
        if (skip[t] == 0.0f) {
            return 0;
        }
    }
    return 1;
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
    if (!ffnskip_mul_mat_is_predicated(dst) || !ffnskip_all_skip(dst->src[2])) {
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

#ifdef __cplusplus
}
#endif
