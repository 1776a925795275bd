// ffn-skip-graph.cpp - the gate in the compute graph (DESIGN.md section 3).
//
// Hooks called from the patched layer loops (patches/0003) and build_ffn
// (patches/0002):
//   ffnskip_ffn_begin(h_j, j)  before FFN j: adds the gate node of layer j,
//                              which reads h_{j-1}, o_{j-1} and the previous
//                              gate's state; returns false when FFN j is
//                              statically removed (left out of the graph);
//   ffnskip_ffn_out(...)       end of build_ffn: predicates FFN j's weight
//                              matmuls on the gate, masks rows when needed;
//   ffnskip_ffn_end(o_j, j)    after the residual add of layer j.
// The topology depends only on (mode, removed layers, ubatch shape), never on
// data, so llama.cpp's graph reuse keeps working; policy values are read by
// the gate op at compute time.
#include "ffn-skip-impl.h"

#include "llama-graph.h"
#include "llama-batch.h"
#include "llama-impl.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstring>
#include <map>
#include <memory>

void ffnskip_batch_begin(ffnskip_context * fctx, const llama_batch_ext & batch) {
    if (fctx == nullptr) {
        return;
    }
    fctx->batch_seq_count.clear();
    for (const auto & tok : batch.tokens) {
        for (llama_seq_id s : tok.seq_ids) {
            fctx->batch_seq_count[s]++;
        }
    }
    fctx->batch_valid = true;
}

// per-ubatch graph input: token modes (prefill / warm-up / gated) and output rows
class llm_graph_input_ffnskip : public llm_graph_input_i {
public:
    llm_graph_input_ffnskip(ffnskip_context * fctx, int32_t mode, int32_t g_lo, int32_t g_hi)
        : fctx(fctx), mode(mode), g_lo(g_lo), g_hi(g_hi) {}
    virtual ~llm_graph_input_ffnskip() = default;

    void set_input(const llama_ubatch * ubatch) override;

    bool can_reuse(const llm_graph_params & params) override {
        // shapes are checked by llm_graph_params::allow_reuse, topology by ffnskip_topo
        return params.ffnskip == fctx;
    }

    ffnskip_context * fctx;
    const int32_t mode;          // the mode this graph was built with
    const int32_t g_lo, g_hi;    // gate nodes record layers [g_lo, g_hi); the host the others
    ggml_tensor * inp = nullptr; // F32 [n_tokens, FFNSKIP_INPUT_ROWS]; null in static mode
};

void llm_graph_input_ffnskip::set_input(const llama_ubatch * ubatch) {
    const int64_t n = ubatch->n_tokens;
    const int32_t L = fctx->n_layer;
    const ffnskip_params & p = fctx->params;

    // a decode token is the only token of each of its sequences in the batch
    // given to llama_decode (so a prompt split into ubatches stays prefill);
    // without a batch (internal graph evaluations) the ubatch decides
    std::map<llama_seq_id, int32_t> per_seq;
    if (!fctx->batch_valid) {
        for (int64_t t = 0; t < n; ++t) {
            for (int32_t s = 0; s < ubatch->n_seq_id[t]; ++s) {
                per_seq[ubatch->seq_id[t][s]]++;
            }
        }
    }
    std::vector<float> rows((size_t) n * FFNSKIP_INPUT_ROWS, 0.0f);
    float * mode_row = rows.data() + FFNSKIP_IN_MODE * n;
    float * out_row  = rows.data() + FFNSKIP_IN_OUT_IDX * n;
    uint64_t n_decode = 0;
    for (int64_t t = 0; t < n; ++t) {
        bool decode = ubatch->n_seq_id[t] > 0;
        for (int32_t s = 0; s < ubatch->n_seq_id[t]; ++s) {
            const llama_seq_id sid = ubatch->seq_id[t][s];
            int32_t count;
            if (fctx->batch_valid) {
                auto it = fctx->batch_seq_count.find(sid);
                count = it == fctx->batch_seq_count.end() ? 0 : it->second;
            } else {
                count = per_seq[sid];
            }
            decode = decode && count == 1;
        }
        float m = 0.0f;
        if (decode) {
            n_decode++;
            m = ubatch->pos[t] >= p.warmup ? 2.0f : 1.0f;
        }
        mode_row[t] = m;
    }
    // output rows in token order, as llm_graph_input_out_ids
    int64_t r = 0;
    for (int64_t t = 0; t < n; ++t) {
        if (ubatch->output == nullptr || ubatch->output[t]) {
            out_row[r++] = (float) t;
        }
    }
    for (int64_t t = r; t < n; ++t) {
        out_row[t] = (float) t;
    }

    fctx->stats.decode_tokens += n_decode;
    // layers no gate node observes (static mode: all; adaptive: the cold
    // regions) always run, unless statically removed
    for (int32_t j = 0; j < L; ++j) {
        if (mode == FFNSKIP_MODE_ADAPTIVE && j >= g_lo && j < g_hi) {
            continue;
        }
        if (p.remove[j]) {
            fctx->stats.skipped[j] += n_decode;
        } else {
            fctx->stats.run[j] += n_decode;
        }
    }
    if (mode == FFNSKIP_MODE_ADAPTIVE) {
        fctx->trace_tokens = (int32_t) n;
        fctx->trace_decision.assign((size_t) n * L, 255);
        fctx->trace_cos.assign((size_t) n * L, NAN);
        for (int64_t t = 0; t < n; ++t) {
            if (mode_row[t] < 1.0f) {
                continue;
            }
            for (int32_t j = 0; j < L; ++j) {
                if (j < g_lo || j >= g_hi) {
                    fctx->trace_decision[(size_t) t * L + j] = p.remove[j] ? 2 : 0;
                }
            }
        }
    }
    if (inp != nullptr) {
        GGML_ASSERT(inp->ne[0] == n && inp->ne[1] == FFNSKIP_INPUT_ROWS);
        ggml_backend_tensor_set(inp, rows.data(), 0, rows.size() * sizeof(float));
    }
}

static inline const float * ffnskip_row(const ggml_tensor * t, int row) {
    return (const float *) ((const char *) t->data + row * t->nb[1]);
}

static inline float * ffnskip_row_mut(ggml_tensor * t, int row) {
    return (float *) ((char *) t->data + row * t->nb[1]);
}

// cos(h, o) of one residual-stream row, accumulated in double
static double ffnskip_cos(const ggml_tensor * h, const ggml_tensor * o, int64_t r) {
    const int64_t d = h->ne[0];
    const float * x = (const float *) ((const char *) h->data + r * h->nb[1]);
    const float * y = (const float *) ((const char *) o->data + r * o->nb[1]);
    double xy = 0.0, xx = 0.0, yy = 0.0;
    for (int64_t i = 0; i < d; ++i) {
        xy += (double) x[i] * y[i];
        xx += (double) x[i] * x[i];
        yy += (double) y[i] * y[i];
    }
    return xy / (std::sqrt(xx) * std::sqrt(yy));
}

void ffnskip_gate_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(nth);
    if (ith != 0) {
        return; // tiny: one thread
    }
    const ffnskip_gate_ud * ud = (const ffnskip_gate_ud *) userdata;
    ffnskip_context * f = ud->fctx;
    const int32_t il = ud->il;
    const bool tail  = ud->tail != 0;
    const int32_t L  = f->n_layer;
    const ffnskip_params & p = f->params;
    ffnskip_stats & st = f->stats;

    // srcs: input, [prev state (has_prev)], [h_obs, o_obs (obs >= 0)]
    const ggml_tensor * in   = dst->src[0];
    const ggml_tensor * prev = ud->has_prev ? dst->src[1] : nullptr;
    const int32_t obs        = ud->obs;
    const ggml_tensor * h    = obs >= 0 ? dst->src[ud->has_prev ? 2 : 1] : nullptr;
    const ggml_tensor * o    = obs >= 0 ? dst->src[ud->has_prev ? 3 : 2] : nullptr;
    GGML_ASSERT(obs < 0 || (h != nullptr && o != nullptr));
    const int64_t n = dst->ne[0];

    GGML_ASSERT(in->type == GGML_TYPE_F32 && in->ne[0] == n && in->ne[1] == FFNSKIP_INPUT_ROWS);
    GGML_ASSERT(dst->type == GGML_TYPE_F32 && dst->ne[1] == FFNSKIP_STATE_ROWS);
    GGML_ASSERT(!tail || prev != nullptr);
    if (prev != nullptr) {
        GGML_ASSERT(prev->ne[0] == n && prev->ne[1] == FFNSKIP_STATE_ROWS);
    }
    if (h != nullptr) {
        GGML_ASSERT(h->type == GGML_TYPE_F32 && o->type == GGML_TYPE_F32);
        GGML_ASSERT(h->ne[0] == o->ne[0] && h->ne[1] == o->ne[1] && h->nb[0] == sizeof(float) && o->nb[0] == sizeof(float));
    }
    const float * mode   = ffnskip_row(in, FFNSKIP_IN_MODE);
    const float * outidx = ffnskip_row(in, FFNSKIP_IN_OUT_IDX);
    const bool trace = f->trace_tokens == n && f->trace_decision.size() == (size_t) n * L;

    for (int64_t t = 0; t < n; ++t) {
        float clast, budget, run, runs;
        const bool is_decode = mode[t] >= 1.0f;
        float sk; // outcome of layer il-1: 0 ran, 1 skipped, 2 removed
        if (prev == nullptr) {
            // first gate node: layer obs (the last earlier layer not removed, if
            // any) is a cold layer that ran; the host counts it
            clast = NAN; budget = (float) p.max_skip; run = 0.0f; runs = 0.0f;
            sk = 0.0f;
        } else {
            clast  = ffnskip_row(prev, FFNSKIP_ROW_CLAST)[t];
            budget = ffnskip_row(prev, FFNSKIP_ROW_BUDGET)[t];
            run    = ffnskip_row(prev, FFNSKIP_ROW_RUN)[t];
            runs   = ffnskip_row(prev, FFNSKIP_ROW_RUNS)[t];
            sk     = ffnskip_row(prev, FFNSKIP_ROW_SKIP)[t];
            if (is_decode) {
                const int32_t jp = il - 1;
                if (sk != 0.0f) {
                    st.skipped[jp]++;
                } else {
                    st.run[jp]++;
                }
                if (trace) {
                    f->trace_decision[(size_t) t * L + jp] = (uint8_t) sk;
                }
            }
        }
        if (h != nullptr && sk == 0.0f && is_decode) {
            // cosine of layer obs (prefill tokens never gate: none needed);
            // row of token t in h/o: all tokens, or (last layer) output tokens only
            const int32_t jp = obs;
            int64_t r = -1;
            if (h->ne[1] == n) {
                r = t;
            } else {
                for (int64_t q = 0; q < h->ne[1]; ++q) {
                    if ((int64_t) outidx[q] == t) {
                        r = q;
                        break;
                    }
                }
            }
            if (r >= 0) {
                const double c = ffnskip_cos(h, o, r);
                clast = (float) c;
                st.cos_sum[jp] += c;
                st.cos_count[jp]++;
                if (trace) {
                    f->trace_cos[(size_t) t * L + jp] = (float) c;
                }
            }
        }
        if (tail) {
            continue; // stats of layer il-1 only
        }

        // decision for layer il (DESIGN.md section 3)
        float d;
        if (p.remove[il]) {
            d = 2.0f; // statically removed: no FFN in the graph, run state untouched
        } else if (mode[t] != 2.0f || il < p.cold_start || il >= L - p.cold_end || p.exclude[il]) {
            d = 0.0f; run = 0.0f;
        } else if (run != 0.0f && p.continue_run && budget > 0.0f) {
            d = 1.0f; budget -= 1.0f;
        } else if (runs < (float) p.max_runs && budget > 0.0f && clast > p.threshold[il]) {
            d = 1.0f; run = 1.0f; runs += 1.0f; budget -= 1.0f;
        } else {
            d = 0.0f; run = 0.0f;
        }
        ffnskip_row_mut(dst, FFNSKIP_ROW_CLAST)[t]  = clast;
        ffnskip_row_mut(dst, FFNSKIP_ROW_BUDGET)[t] = budget;
        ffnskip_row_mut(dst, FFNSKIP_ROW_RUN)[t]    = run;
        ffnskip_row_mut(dst, FFNSKIP_ROW_RUNS)[t]   = runs;
        ffnskip_row_mut(dst, FFNSKIP_ROW_SKIP)[t]   = d;
        ffnskip_row_mut(dst, FFNSKIP_ROW_KEEP)[t]   = d == 0.0f ? 1.0f : 0.0f;
    }
    if (!tail) {
        const float * keep = ffnskip_row(dst, FFNSKIP_ROW_KEEP);
        float * keep_out   = ffnskip_row_mut(dst, FFNSKIP_ROW_KEEP_OUT);
        for (int64_t r = 0; r < n; ++r) {
            const int64_t t = (int64_t) outidx[r];
            keep_out[r] = (t >= 0 && t < n) ? keep[t] : 1.0f;
        }
    }
}

//
// graph hooks (methods of llm_graph_context, declared in patches/0002)
//

bool llm_graph_context::ffnskip_ffn_begin(ggml_tensor * ffn_inp, int il) const {
    ffnskip_context * f = ffnskip;
    if (f == nullptr || il < 0 || il >= f->n_layer) {
        return true;
    }
    auto & b = f->b;
    if (il == 0) {
        const int32_t mode = f->effective_mode();
        const ffnskip_params & p = f->params;
        b.active   = mode != FFNSKIP_MODE_OFF;
        b.g_lo     = p.cold_start;
        b.g_hi     = f->n_layer - p.cold_end;
        // gate nodes only for the middle layers (cold layers always run)
        b.adaptive = mode == FFNSKIP_MODE_ADAPTIVE && b.g_lo < b.g_hi;
        b.input    = nullptr;
        b.state    = nullptr;
        b.gate_il  = nullptr;
        b.h.assign(f->n_layer, nullptr);
        b.o.assign(f->n_layer, nullptr);
        if (b.active) {
            auto inp = std::make_unique<llm_graph_input_ffnskip>(f, mode, b.adaptive ? b.g_lo : 0, b.adaptive ? b.g_hi : 0);
            if (b.adaptive) {
                inp->inp = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, n_tokens, FFNSKIP_INPUT_ROWS);
                ggml_set_input(inp->inp);
                ggml_set_name(inp->inp, "ffnskip_inp");
                b.input = inp->inp;
            }
            res->add_input(std::move(inp));
        }
    }
    if (!b.active) {
        return true;
    }
    b.h[il]   = ffn_inp;
    b.gate_il = nullptr;
    if (b.adaptive && il >= b.g_lo && il < b.g_hi) {
        ggml_tensor * args[4];
        int n_args = 0;
        ffnskip_gate_ud & ud = f->ud[il];
        args[n_args++] = b.input;
        ud.has_prev = il > b.g_lo ? 1 : 0;
        if (ud.has_prev) {
            GGML_ASSERT(b.state != nullptr);
            args[n_args++] = b.state;
        }
        // the layer whose cosine feeds this decision: il-1, or for the first
        // gate node the last earlier layer whose FFN is in the graph
        ud.obs = il - 1;
        if (!ud.has_prev) {
            while (ud.obs >= 0 && f->params.remove[ud.obs]) {
                ud.obs--;
            }
        }
        if (ud.obs >= 0) {
            GGML_ASSERT(b.h[ud.obs] != nullptr && b.o[ud.obs] != nullptr);
            args[n_args++] = b.h[ud.obs];
            args[n_args++] = b.o[ud.obs];
        }
        ggml_tensor * g = ggml_custom_4d(ctx0, GGML_TYPE_F32, n_tokens, FFNSKIP_STATE_ROWS, 1, 1,
                                         args, n_args, ffnskip_gate_op, 1, &f->ud[il]);
        ggml_format_name(g, "ffnskip_gate-%d", il);
        b.state   = g;
        b.gate_il = g;
    }
    return f->params.remove[il] == 0;
}

void llm_graph_context::ffnskip_ffn_end(ggml_tensor * l_out, int il) const {
    ffnskip_context * f = ffnskip;
    if (f == nullptr || il < 0 || il >= f->n_layer || !f->b.active) {
        return;
    }
    auto & b = f->b;
    b.o[il] = l_out;
    b.gate_il = nullptr;
    if (b.adaptive && il == b.g_hi - 1) {
        // tail: records the outcome (and cosine) of the last gated layer
        f->ud_tail[il + 1].has_prev = 1;
        f->ud_tail[il + 1].obs = il;
        ggml_tensor * args[4] = { b.input, b.state, b.h[il], b.o[il] };
        ggml_tensor * tail = ggml_custom_4d(ctx0, GGML_TYPE_F32, n_tokens, FFNSKIP_STATE_ROWS, 1, 1,
                                            args, 4, ffnskip_gate_op, 1, &f->ud_tail[il + 1]);
        ggml_format_name(tail, "ffnskip_tail-%d", il + 1);
        ggml_build_forward_expand(gf, tail);
    }
}

ggml_tensor * llm_graph_context::ffnskip_ffn_out(
        ggml_tensor * inp, ggml_tensor * out,
        ggml_tensor * up, ggml_tensor * gate, ggml_tensor * down,
        bool has_extra, int il) const {
    ffnskip_context * f = ffnskip;
    if (f == nullptr || il < 0 || il >= f->n_layer || !f->b.active || !f->b.adaptive || f->b.gate_il == nullptr) {
        return out;
    }
    ggml_tensor * g = f->b.gate_il;
    f->b.gate_il = nullptr;

    // predicate the weight matmuls between inp and out on the gate
    std::vector<ggml_tensor *> stack = { out };
    std::vector<ggml_tensor *> seen;
    while (!stack.empty() && seen.size() < 256) {
        ggml_tensor * t = stack.back();
        stack.pop_back();
        if (t == nullptr || t == inp || t->op == GGML_OP_NONE) {
            continue;
        }
        bool visited = false;
        for (ggml_tensor * s : seen) {
            visited = visited || s == t;
        }
        if (visited) {
            continue;
        }
        seen.push_back(t);
        if (t->op == GGML_OP_MUL_MAT && t->src[2] == nullptr && t->src[0] != nullptr &&
            (t->src[0] == up || t->src[0] == gate || t->src[0] == down)) {
            t->src[2] = g;
            // down writes the zeros the residual add reads; up/gate outputs
            // are read only by the skipped down: they may do nothing at all
            // (with biases, scales or LoRA other nodes read them: write zeros)
            t->op_params[FFNSKIP_OP_PARAM_SLOT] = (t->src[0] == down || has_extra) ? FFNSKIP_MUL_MAT_MAGIC
                                                                                   : FFNSKIP_MUL_MAT_MAGIC_NOOP;
        }
        for (int i = 0; i < GGML_MAX_SRC; ++i) {
            if (t->src[i] != nullptr && t->src[i] != g) {
                stack.push_back(t->src[i]);
            }
        }
    }

    // Exact zeros come from the predicated matmuls when every token skips.
    // Otherwise (several tokens, biases/scales/LoRA, or a second backend
    // that may run the matmul without the predicate) mask the rows.
    const bool need_mask = has_extra || n_tokens > 1 || ggml_backend_sched_get_n_backends(sched) > 1;
    if (need_mask) {
        const int64_t rows = out->ne[1];
        GGML_ASSERT(ggml_nrows(out) == rows && rows <= n_tokens);
        const int row = rows == n_tokens ? FFNSKIP_ROW_KEEP : FFNSKIP_ROW_KEEP_OUT;
        ggml_tensor * keep = ggml_view_2d(ctx0, g, 1, rows, sizeof(float), row * g->nb[1]);
        out = ggml_mul(ctx0, out, keep);
        ggml_format_name(out, "ffnskip_mask-%d", il);
    }
    return out;
}
