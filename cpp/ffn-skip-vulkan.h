// ffn-skip-vulkan.h - the FFN-skip gate on ggml's Vulkan backend (declared
// for ggml-vulkan.cpp, patches/0006; defined in cpp/ffn-skip-vulkan.cpp).
#pragma once

#include "ffn-skip-ggml.h"

#include <stdint.h>

// fusion_flags bits of the mat-vec shaders beside MAT_VEC_FUSION_FLAGS_*
// (mul_mat_vec_iface.glsl): the gate state is bound as Fuse1 and its
// element 0 is the all-skip predicate (mul_mat_vec_base.glsl, patches/0006)
#define FFNSKIP_VK_FUSION_PRED  0x10 // predicated: skip when the predicate is set
#define FFNSKIP_VK_FUSION_WRITE 0x20 // skipped: write the fused addend (or zeros); else write nothing

// push constants of cpp/vulkan/ffnskip_gate.comp
struct vk_op_ffnskip_gate_push_constants {
    uint32_t n;        // tokens of the ubatch
    uint32_t L;        // layers
    uint32_t il;       // layer decided
    uint32_t tail;     // 1: records layer il - 1 only
    int32_t  obs;      // observed layer, -1: none
    uint32_t h_rows;   // rows of h / o (all tokens, or the output tokens)
    uint32_t d;        // embedding width
    uint32_t h_stride; // row stride of h, in floats
    uint32_t o_stride; // row stride of o, in floats
    uint32_t has_prev;
    uint32_t hc_rows;      // probe signal (issue 14): rows of hc
    uint32_t hc_stride;    // row stride of hc, in floats
    uint32_t probe_stride; // row stride of the probe weights, in floats
    uint32_t has_probe;
};

struct ggml_backend_vk_context;
struct ggml_tensor;
struct ggml_backend_device;

// GGML_OP_FFNSKIP_GATE: one dispatch of one workgroup (the op is tiny)
#ifdef GGML_VK_FFNSKIP_DISPATCH
void ggml_vk_ffnskip_gate(ggml_backend_vk_context * ctx, vk_context & subctx, ggml_tensor * dst);
#endif

// supports_op of GGML_OP_FFNSKIP_GATE: exactly what the dispatch asserts
bool ffnskip_vk_supports_gate(const struct ggml_tensor * op);

// backend registry's get_proc_address: "ffnskip_vk_unverified_path",
// "ffnskip_gate_signals"
void * ffnskip_vk_reg_get_proc_address(struct ggml_backend_reg * reg, const char * name);
