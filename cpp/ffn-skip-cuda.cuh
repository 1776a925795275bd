// ffn-skip-cuda.cuh - the FFN-skip gate on ggml's CUDA backend (issue 12).
// Declared for ggml-cuda.cu (patches/0007); the kernels are in
// cpp/ffn-skip-cuda.cu, which the build copies into ggml/src/ggml-cuda/.
//
// How the backend plugs into the device op (docs/ARCHITECTURE.md):
//  - GGML_OP_FFNSKIP_GATE runs as one kernel of one block per gate node
//    (ffnskip_gate_kernel): the cosine of each decode token in double, the
//    state machine of ffnskip_gate_ref() (cpp/ffn-skip-ggml.h), all in device
//    memory. No host synchronisation inside a decode.
//  - A predicated FFN matmul (ffnskip_mul_mat_is_predicated) keeps its launch:
//    the mat-vec kernels (mmvq.cu, mmvf.cu) read element 0 of the gate state
//    after ggml_cuda_pdl_sync() and, when it is set, skip the weight loop. A
//    down projection ("write") then stores 0 + its fused addend (the residual
//    of MUL_MAT+ADD, a bias, 0 alone when unfused); up/gate ("noop") return
//    without a store (only the skipped down reads them). The decision is data:
//    the graph, its nodes and their parameters never change, so a captured CUDA
//    graph keeps replaying while decisions change.
//  - Any other matmul path (cuBLAS, mmq, mmf: several tokens, unusual types)
//    computes the product; a skipped down projection is then zeroed by a tiny
//    kernel that reads the same flag (ffnskip_cuda_zero_if_skip). Correct, no
//    saving; the graph masks the rows of multi-token ubatches anyway.
//  - The fusions of ggml_cuda_try_fuse read src[2] as MoE expert ids; for a
//    predicated MUL_MAT they get no ids (ffnskip_cuda_mm_ids) and the gate state
//    in the fusion arguments instead (ffnskip_cuda_fusion_args); up and gate
//    fuse only when both carry the same predicate (ffnskip_cuda_can_fuse).
#pragma once

#include "ffn-skip-ggml.h"

#include <cstdint>

struct ggml_backend_cuda_context;
struct ggml_backend_reg;

// GGML_OP_FFNSKIP_GATE (compute_forward)
void ggml_cuda_op_ffnskip_gate(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// supports_op: F32 sources and state, contiguous rows
bool ffnskip_cuda_supports_gate(const ggml_tensor * op);

// after a predicated "write" matmul took a path without the in-kernel check:
// zero dst when the gate state's all-skip flag is set (device-side decision)
void ffnskip_cuda_zero_if_skip(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// CUDA graph counters (ggml_backend_cuda_graph_compute): one call per compute
// of a graph, counted as eager (no CUDA graph), capture (graph captured and
// launched) or replay (captured graph launched unchanged)
void ffnskip_cuda_count_graph(bool use_cuda_graph, bool update_required);

// registry get_proc_address: "ffnskip_cuda_gate" (ffnskip_cuda_gate_fn) and
// "ffnskip_cuda_graph_counts" (ffnskip_cuda_graph_counts_fn)
void * ffnskip_cuda_reg_get_proc_address(ggml_backend_reg * reg, const char * name);
typedef int32_t (*ffnskip_cuda_gate_fn)(void);                       // version of the predicated path
typedef void (*ffnskip_cuda_graph_counts_fn)(uint64_t counts[3]);    // eager, captures, replays

// --- predicated matmuls in ggml-cuda.cu (host side) --------------------------

// the expert ids of a mat-vec call: src[2] only for MUL_MAT_ID (a predicated
// MUL_MAT carries the gate state there)
static inline const ggml_tensor * ffnskip_cuda_mm_ids(const ggml_tensor * mm) {
    return mm->op == GGML_OP_MUL_MAT_ID ? mm->src[2] : nullptr;
}

// up and gate of a fused GLU: both predicated on the same gate, or neither
static inline bool ffnskip_cuda_can_fuse(const ggml_tensor * a, const ggml_tensor * b) {
    const ggml_tensor * pa = ffnskip_mul_mat_is_predicated(a) ? a->src[2] : nullptr;
    const ggml_tensor * pb = b == nullptr ? pa : (ffnskip_mul_mat_is_predicated(b) ? b->src[2] : nullptr);
    return pa == pb;
}

// the fusion arguments of a (possibly fused) mat-vec call of mm, with the gate
// state when mm is predicated; "write" when mm or the other matmul (b) writes
template <typename args_t>
static inline args_t ffnskip_cuda_fusion_args(const ggml_tensor * mm, const ggml_tensor * b = nullptr) {
    args_t args{};
    if (ffnskip_mul_mat_is_predicated(mm)) {
        args.ffnskip       = mm->src[2];
        args.ffnskip_write = mm->op_params[FFNSKIP_OP_PARAM_SLOT] == FFNSKIP_MUL_MAT_MAGIC ||
                             (b != nullptr && ffnskip_mul_mat_is_predicated(b) &&
                              b->op_params[FFNSKIP_OP_PARAM_SLOT] == FFNSKIP_MUL_MAT_MAGIC);
    }
    return args;
}

// true when the fusion arguments carry nothing but the predicate (the
// mat-vec hosts then allow several tokens)
template <typename args_t>
static inline bool ffnskip_cuda_pred_only(const args_t * f) {
    return f != nullptr && f->ffnskip != nullptr && f->x_bias == nullptr && f->gate == nullptr &&
           f->gate_bias == nullptr && f->x_scale == nullptr && f->gate_scale == nullptr;
}

// ggml_cuda_mul_mat: the predicate for the mat-vec kernels; on destruction,
// zeroes a skipped "write" matmul that took another path
struct ffnskip_cuda_mm_guard {
    ggml_backend_cuda_context & ctx;
    ggml_tensor * dst;
    bool in_kernel = false; // set when a mat-vec kernel took the predicate

    ffnskip_cuda_mm_guard(ggml_backend_cuda_context & ctx, ggml_tensor * dst) : ctx(ctx), dst(dst) {}
    ~ffnskip_cuda_mm_guard() {
        if (!in_kernel && ffnskip_mul_mat_is_predicated(dst) &&
            dst->op_params[FFNSKIP_OP_PARAM_SLOT] == FFNSKIP_MUL_MAT_MAGIC) {
            ffnskip_cuda_zero_if_skip(ctx, dst);
        }
    }
    // the fusion arguments to pass to mmvf/mmvq (nullptr: not predicated)
    template <typename args_t>
    const args_t * take(args_t & args) {
        if (!ffnskip_mul_mat_is_predicated(dst)) {
            return nullptr;
        }
        args = ffnskip_cuda_fusion_args<args_t>(dst);
        in_kernel = true;
        return &args;
    }
};
