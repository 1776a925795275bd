// ffn-skip-vulkan.cpp - the FFN-skip gate on ggml's Vulkan backend: the
// dispatch of GGML_OP_FFNSKIP_GATE (cpp/vulkan/ffnskip_gate.comp) and the
// registry hook that tells libllama which mat-vec paths are verified.
// Compiled into ggml-vulkan (CMakeLists.txt); the hooks inside
// ggml-vulkan.cpp (pipeline, dispatch case, supports_op, the predicated
// mat-vec) are patches/0006.
#include "ggml-vulkan-common.h"
#include "ggml-vulkan-shaders.hpp"

#define GGML_VK_FFNSKIP_DISPATCH
#include "ffn-skip-vulkan.h"

#include <cstring>

bool ffnskip_vk_supports_gate(const ggml_tensor * op) {
    const ggml_tensor * in  = op->src[0];
    const ggml_tensor * pol = op->src[1];
    const ggml_tensor * prv = op->src[2];
    const ggml_tensor * h   = op->src[3];
    const ggml_tensor * o   = op->src[4];
    const ggml_tensor * hc  = op->src[5];
    const ggml_tensor * prb = op->src[6];
    const int32_t L = op->op_params[FFNSKIP_OPP_N_LAYER];
    if (op->type != GGML_TYPE_F32 || !ggml_is_contiguous(op) || op->ne[1] != FFNSKIP_STATE_ROWS(L)) {
        return false;
    }
    if (in == nullptr || pol == nullptr || in->type != GGML_TYPE_F32 || !ggml_is_contiguous(in) ||
        pol->type != GGML_TYPE_F32 || !ggml_is_contiguous(pol)) {
        return false;
    }
    if (prv != nullptr && !ggml_is_contiguous(prv)) {
        return false;
    }
    if ((h == nullptr) != (o == nullptr) || (hc == nullptr) != (prb == nullptr)) {
        return false;
    }
    for (const ggml_tensor * t : { h, o, hc }) {
        if (t != nullptr && (t->type != GGML_TYPE_F32 || t->nb[0] != sizeof(float) || t->nb[1] % sizeof(float) != 0)) {
            return false;
        }
    }
    if (hc != nullptr) {
        if (hc->ne[1] > op->ne[0] || prb->type != GGML_TYPE_F32 || !ggml_is_contiguous(prb) ||
            prb->ne[0] != hc->ne[0] + 1 || prb->ne[1] != L || (h != nullptr && h->ne[0] != hc->ne[0])) {
            return false;
        }
    }
    return true;
}

void ggml_vk_ffnskip_gate(ggml_backend_vk_context * ctx, vk_context & subctx, ggml_tensor * dst) {
    const ggml_tensor * in   = dst->src[0];
    const ggml_tensor * pol  = dst->src[1];
    const ggml_tensor * prev = dst->src[2];
    const ggml_tensor * h    = dst->src[3];
    const ggml_tensor * o    = dst->src[4];
    const ggml_tensor * hc   = dst->src[5]; // probe signal (issue 14): input of FFN il, or null
    const ggml_tensor * prb  = dst->src[6]; // probe signal: F32 [d + 1, L], or null
    const int32_t L = dst->op_params[FFNSKIP_OPP_N_LAYER];
    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst) && dst->ne[1] == FFNSKIP_STATE_ROWS(L));
    GGML_ASSERT(in->type == GGML_TYPE_F32 && ggml_is_contiguous(in) && pol->type == GGML_TYPE_F32 && ggml_is_contiguous(pol));
    GGML_ASSERT(prev == nullptr || ggml_is_contiguous(prev));
    GGML_ASSERT((h == nullptr) == (o == nullptr));
    if (h != nullptr) {
        GGML_ASSERT(h->type == GGML_TYPE_F32 && o->type == GGML_TYPE_F32 && h->nb[0] == sizeof(float) && o->nb[0] == sizeof(float));
        GGML_ASSERT(h->nb[1] % sizeof(float) == 0 && o->nb[1] % sizeof(float) == 0);
    }
    GGML_ASSERT((hc == nullptr) == (prb == nullptr));
    if (hc != nullptr) {
        GGML_ASSERT(hc->type == GGML_TYPE_F32 && hc->nb[0] == sizeof(float) && hc->nb[1] % sizeof(float) == 0);
        GGML_ASSERT(hc->ne[1] <= dst->ne[0]);
        GGML_ASSERT(prb->type == GGML_TYPE_F32 && ggml_is_contiguous(prb) && prb->ne[0] == hc->ne[0] + 1 && prb->ne[1] == L);
        GGML_ASSERT(h == nullptr || h->ne[0] == hc->ne[0]); // one width d for both reductions
    }

    vk_pipeline pipeline = ctx->device->pipeline_ffnskip_gate;
    GGML_ASSERT(pipeline != nullptr);
    ggml_pipeline_request_descriptor_sets(ctx, pipeline, 1);

    const vk_subbuffer in_buf  = ggml_vk_tensor_subbuffer(ctx, in);
    const vk_subbuffer pol_buf = ggml_vk_tensor_subbuffer(ctx, pol);
    // absent sources are bound to the input (never read: has_prev / obs)
    const vk_subbuffer prev_buf = prev ? ggml_vk_tensor_subbuffer(ctx, prev) : in_buf;
    const vk_subbuffer h_buf    = h ? ggml_vk_tensor_subbuffer(ctx, h) : in_buf;
    const vk_subbuffer o_buf    = o ? ggml_vk_tensor_subbuffer(ctx, o) : in_buf;
    const vk_subbuffer hc_buf   = hc ? ggml_vk_tensor_subbuffer(ctx, hc) : in_buf;
    const vk_subbuffer prb_buf  = prb ? ggml_vk_tensor_subbuffer(ctx, prb) : in_buf;
    const vk_subbuffer d_buf    = ggml_vk_tensor_subbuffer(ctx, dst);

    const vk_op_ffnskip_gate_push_constants pc = {
        (uint32_t) dst->ne[0],
        (uint32_t) L,
        (uint32_t) dst->op_params[FFNSKIP_OPP_IL],
        (uint32_t) dst->op_params[FFNSKIP_OPP_TAIL],
        dst->op_params[FFNSKIP_OPP_OBS],
        h ? (uint32_t) h->ne[1] : 0u,
        h ? (uint32_t) h->ne[0] : hc ? (uint32_t) hc->ne[0] : 0u,
        h ? (uint32_t) (h->nb[1] / sizeof(float)) : 0u,
        o ? (uint32_t) (o->nb[1] / sizeof(float)) : 0u,
        prev ? 1u : 0u,
        hc ? (uint32_t) hc->ne[1] : 0u,
        hc ? (uint32_t) (hc->nb[1] / sizeof(float)) : 0u,
        prb ? (uint32_t) (prb->nb[1] / sizeof(float)) : 0u,
        hc ? 1u : 0u,
    };
    ggml_vk_dispatch_pipeline(ctx, subctx, pipeline, { in_buf, pol_buf, prev_buf, h_buf, o_buf, d_buf, hc_buf, prb_buf },
                              pc, { 1, 1, 1 });
}

// Which predicated mat-vec path a device takes that lavapipe (where the
// predicate is tested) cannot: NULL when all are verified.
static const char * ffnskip_vk_unverified_path(ggml_backend_dev_t dev) {
    if (dev == nullptr) {
        return "unknown device";
    }
    const auto * dctx = (const ggml_backend_vk_device_context *) dev->context;
    vk_device device = ggml_vk_get_device(dctx->device);
    if (device->integer_dot_product) {
        return "integer-dot mat-vec (mul_mat_vecq)";
    }
    return nullptr;
}

// Signals the gate kernel computes (bit i: enum ffnskip_signal value i):
// cosine and probe (issue 14).
static int32_t ffnskip_vk_gate_signals(void) {
    return (1 << 0) | (1 << 1); // FFNSKIP_SIGNAL_COSINE, FFNSKIP_SIGNAL_PROBE (cpp/ffn-skip.h)
}

void * ffnskip_vk_reg_get_proc_address(ggml_backend_reg_t reg, const char * name) {
    GGML_UNUSED(reg);
    if (name == nullptr) {
        return nullptr;
    }
    if (std::strcmp(name, "ffnskip_vk_unverified_path") == 0) {
        return (void *) ffnskip_vk_unverified_path;
    }
    if (std::strcmp(name, "ffnskip_gate_signals") == 0) {
        return (void *) ffnskip_vk_gate_signals;
    }
    return nullptr;
}
