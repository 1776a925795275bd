// ffn-skip-ggml.c - constructor of GGML_OP_FFNSKIP_GATE (compiled into
// ggml-base, beside ggml.c; the op enum is added by patches/0005).
// Semantics and tensor layout: cpp/ffn-skip-ggml.h.
#include "ffn-skip-ggml.h"

struct ggml_tensor * ggml_ffnskip_gate(
        struct ggml_context * ctx,
        struct ggml_tensor  * input,
        struct ggml_tensor  * policy,
        struct ggml_tensor  * prev,
        struct ggml_tensor  * h,
        struct ggml_tensor  * o,
        int32_t il, int32_t tail, int32_t obs, int32_t n_layer) {
    GGML_ASSERT(input != NULL && policy != NULL);
    GGML_ASSERT(n_layer > 0 && il >= 0 && il <= n_layer && obs < n_layer);
    GGML_ASSERT(input->type == GGML_TYPE_F32 && input->ne[1] == FFNSKIP_INPUT_ROWS);
    GGML_ASSERT(policy->type == GGML_TYPE_F32 && ggml_nelements(policy) == FFNSKIP_POL_ROWS(n_layer));
    GGML_ASSERT(!tail || prev != NULL);
    GGML_ASSERT((obs < 0) == (h == NULL) && (h == NULL) == (o == NULL));
    const int64_t n = input->ne[0];
    if (prev != NULL) {
        GGML_ASSERT(prev->type == GGML_TYPE_F32 && prev->ne[0] == n && prev->ne[1] == FFNSKIP_STATE_ROWS(n_layer));
    }
    if (h != NULL) {
        GGML_ASSERT(h->type == GGML_TYPE_F32 && o->type == GGML_TYPE_F32);
        GGML_ASSERT(ggml_are_same_shape(h, o) && h->ne[1] <= n && ggml_nrows(h) == h->ne[1]);
    }
    struct ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, FFNSKIP_STATE_ROWS(n_layer));
    t->op = GGML_OP_FFNSKIP_GATE;
    t->op_params[FFNSKIP_OPP_IL]      = il;
    t->op_params[FFNSKIP_OPP_TAIL]    = tail;
    t->op_params[FFNSKIP_OPP_OBS]     = obs;
    t->op_params[FFNSKIP_OPP_N_LAYER] = n_layer;
    t->src[0] = input;
    t->src[1] = policy;
    t->src[2] = prev;
    t->src[3] = h;
    t->src[4] = o;
    return t;
}
