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
// The gate is GGML_OP_FFNSKIP_GATE (cpp/ffn-skip-ggml.h): a pure op that any
// backend runs as one kernel; its policy is a graph input. The topology
// depends only on (mode, cold regions, removed layers, ubatch shape), never
// on data, so llama.cpp's graph reuse (and a backend's captured command
// graph) keeps working. The host reads the ubatch's trace back once, after
// the compute (ffnskip_ubatch_end), for the stats.
#include "ffn-skip-impl.h"

#include "llama-graph.h"
#include "llama-batch.h"
#include "llama-impl.h"
#include "llama-model.h"

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
    fctx->cur = nullptr; // no ubatch of this batch has set its inputs yet
    fctx->batch_seq_count.clear();
    for (const auto & tok : batch.tokens) {
        for (llama_seq_id s : tok.seq_ids) {
            fctx->batch_seq_count[s]++;
        }
    }
    fctx->batch_valid = true;
}

// per-ubatch graph input: token modes (prefill / warm-up / gated), output
// rows and the policy; owns the tail node whose state holds the trace
class llm_graph_input_ffnskip : public llm_graph_input_i {
public:
    llm_graph_input_ffnskip(ffnskip_context * fctx, int32_t mode, int32_t g_lo, int32_t g_hi)
        : fctx(fctx), mode(mode), g_lo(g_lo), g_hi(g_hi) {}
    // no destructor work: llama_context frees its ffnskip_context before its
    // graph results (patches/0001), so fctx may be gone here; fctx->cur is
    // set by set_input and cleared by ffnskip_ubatch_end of the same
    // process_ubatch, and reset by ffnskip_batch_begin
    virtual ~llm_graph_input_ffnskip() = default;

    void set_input(const llama_ubatch * ubatch) override;

    bool can_reuse(const llm_graph_params & params) override {
        // shapes are checked by llm_graph_params::allow_reuse, topology by ffnskip_topo
        return params.ffnskip == fctx;
    }

    ffnskip_context * fctx;
    const int32_t mode;           // the mode this graph was built with
    const int32_t g_lo, g_hi;     // gate nodes decide layers [g_lo, g_hi); the host counts the others
    ggml_tensor * inp  = nullptr; // F32 [n_tokens, FFNSKIP_INPUT_ROWS]; null without gate nodes
    ggml_tensor * pol  = nullptr; // F32 [FFNSKIP_POL_ROWS(L)]
    ggml_tensor * probe = nullptr; // F32 [d + 1, L]: the probe signal's weights (FFNSKIP_SIGNAL_PROBE), else null
    ggml_tensor * tail = nullptr; // last gate node: its state holds the trace (graph output)

    // host copy of the ubatch being computed (set_input -> ffnskip_ubatch_end)
    std::vector<float> modes;     // FFNSKIP_IN_MODE per token
    uint64_t n_decode = 0;
};

void llm_graph_input_ffnskip::set_input(const llama_ubatch * ubatch) {
    const int64_t n = ubatch->n_tokens;
    const int32_t L = fctx->n_layer;
    const ffnskip_params & p = fctx->params;

    // the caller says which tokens are prompt (dense, not counted) and which
    // are generated (gated, counted): ffnskip_set_token_kind. By default (raw
    // C API) a decode token is the only token of each of its sequences in the
    // batch given to llama_decode (so a prompt split into ubatches stays
    // prefill); without a batch (internal graph evaluations) the ubatch decides
    const int32_t kind = fctx->token_kind;
    std::map<llama_seq_id, int32_t> per_seq;
    if (kind == FFNSKIP_TOKENS_AUTO && !fctx->batch_valid) {
        for (int64_t t = 0; t < n; ++t) {
            for (int32_t s = 0; s < ubatch->n_seq_id[t]; ++s) {
                per_seq[ubatch->seq_id[t][s]]++;
            }
        }
    }
    std::vector<float> rows((size_t) n * FFNSKIP_INPUT_ROWS, 0.0f);
    float * mode_row = rows.data() + FFNSKIP_IN_MODE * n;
    float * out_row  = rows.data() + FFNSKIP_IN_OUT_IDX * n;
    n_decode = 0;
    bool any_removed = false;
    for (int32_t j = 0; j < L; ++j) {
        any_removed = any_removed || p.remove[j] != 0;
    }
    for (int64_t t = 0; t < n; ++t) {
        bool decode = ubatch->n_seq_id[t] > 0 && kind != FFNSKIP_TOKENS_PROMPT;
        for (int32_t s = 0; s < ubatch->n_seq_id[t] && kind == FFNSKIP_TOKENS_AUTO; ++s) {
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
        // KV from here on depends on the settings: a gated token (adaptive
        // mode), or any token while FFNs are left out of the graph
        if ((m == 2.0f && mode == FFNSKIP_MODE_ADAPTIVE) || any_removed) {
            fctx->affected_pos = std::min<int64_t>(fctx->affected_pos, ubatch->pos[t]);
        }
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
    modes.assign(mode_row, mode_row + n);
    fctx->cur = this;

    if (inp != nullptr) {
        GGML_ASSERT(inp->ne[0] == n && inp->ne[1] == FFNSKIP_INPUT_ROWS);
        ggml_backend_tensor_set(inp, rows.data(), 0, rows.size() * sizeof(float));
    }
    if (pol != nullptr) {
        std::vector<float> pv(FFNSKIP_POL_ROWS(L), 0.0f);
        pv[FFNSKIP_POL_MAX_SKIP] = (float) p.max_skip;
        pv[FFNSKIP_POL_MAX_RUNS] = (float) p.max_runs;
        pv[FFNSKIP_POL_CONTINUE] = p.continue_run ? 1.0f : 0.0f;
        pv[FFNSKIP_POL_SIGNAL]   = probe != nullptr ? (float) FFNSKIP_SIGNAL_PROBE : (float) FFNSKIP_SIGNAL_COSINE;
        for (int32_t j = 0; j < L; ++j) {
            const bool middle = j >= p.cold_start && j < L - p.cold_end;
            pv[FFNSKIP_POL_LAYERS + j]         = p.threshold[j];
            pv[FFNSKIP_POL_LAYERS + L + j]     = middle && !p.exclude[j] ? 1.0f : 0.0f;
            pv[FFNSKIP_POL_LAYERS + 2 * L + j] = p.remove[j] ? 1.0f : 0.0f;
        }
        GGML_ASSERT(ggml_nelements(pol) == (int64_t) pv.size());
        ggml_backend_tensor_set(pol, pv.data(), 0, pv.size() * sizeof(float));
    }
    if (probe != nullptr) {
        GGML_ASSERT(ggml_nelements(probe) == (int64_t) fctx->probe.size());
        ggml_backend_tensor_set(probe, fctx->probe.data(), 0, fctx->probe.size() * sizeof(float));
    }
}

void ffnskip_ubatch_end(ffnskip_context * fctx) {
    if (fctx == nullptr || fctx->cur == nullptr) {
        return;
    }
    llm_graph_input_ffnskip * in = fctx->cur;
    fctx->cur = nullptr;
    const int64_t n = (int64_t) in->modes.size();
    const int32_t L = fctx->n_layer;
    const ffnskip_params & p = fctx->params;
    ffnskip_stats & st = fctx->stats;
    const bool gated = in->mode == FFNSKIP_MODE_ADAPTIVE && in->tail != nullptr;

    st.decode_tokens += in->n_decode;
    // layers no gate node decides (static mode: all; adaptive: the cold
    // regions) always run, unless statically removed
    for (int32_t j = 0; j < L; ++j) {
        if (gated && j >= in->g_lo && j < in->g_hi) {
            continue;
        }
        if (p.remove[j]) {
            st.skipped[j] += in->n_decode;
        } else {
            st.run[j] += in->n_decode;
        }
    }
    if (in->mode != FFNSKIP_MODE_ADAPTIVE) {
        return;
    }
    // the trace: decisions and cosines of the gate nodes, read back once
    std::vector<float> tr;
    if (gated) {
        ggml_tensor * t = in->tail;
        GGML_ASSERT(t->ne[0] == n && t->ne[1] == FFNSKIP_STATE_ROWS(L) && t->buffer != nullptr);
        tr.resize((size_t) 2 * L * n);
        ggml_backend_tensor_get(t, tr.data(), (size_t) FFNSKIP_ROW_TRACE * t->nb[1], tr.size() * sizeof(float));
    }
    fctx->trace_tokens = (int32_t) n;
    fctx->trace_decision.assign((size_t) n * L, FFNSKIP_DEC_NONE);
    fctx->trace_cos.assign((size_t) n * L, NAN);
    for (int64_t t = 0; t < n; ++t) {
        if (in->modes[t] < 1.0f) {
            continue; // prefill: not gated
        }
        for (int32_t j = 0; j < L; ++j) {
            uint8_t d;
            if (gated && j >= in->g_lo && j < in->g_hi) {
                const float v = tr[(size_t) j * n + t];
                GGML_ASSERT(v == 0.0f || v == 1.0f || v == 2.0f);
                d = (uint8_t) v; // FFNSKIP_DEC_RUN / _SKIP / _REMOVED
                if (d == FFNSKIP_DEC_RUN) {
                    st.run[j]++;
                } else {
                    st.skipped[j]++;
                }
            } else {
                d = p.remove[j] ? FFNSKIP_DEC_REMOVED : FFNSKIP_DEC_RUN;
            }
            fctx->trace_decision[(size_t) t * L + j] = d;
            if (gated) {
                const float c = tr[(size_t) (L + j) * n + t];
                fctx->trace_cos[(size_t) t * L + j] = c;
                if (!std::isnan(c)) {
                    st.cos_sum[j] += c;
                    st.cos_count[j]++;
                }
            }
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
        b.inp      = nullptr;
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
                inp->pol = ggml_new_tensor_1d(ctx0, GGML_TYPE_F32, FFNSKIP_POL_ROWS(f->n_layer));
                ggml_set_input(inp->pol);
                ggml_set_name(inp->pol, "ffnskip_policy");
                if (f->signal == FFNSKIP_SIGNAL_PROBE) {
                    GGML_ASSERT(f->probe_d > 0 && f->probe.size() == (size_t) (f->probe_d + 1) * f->n_layer);
                    inp->probe = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, f->probe_d + 1, f->n_layer);
                    ggml_set_input(inp->probe);
                    ggml_set_name(inp->probe, "ffnskip_probe");
                }
            }
            b.inp = inp.get();
            res->add_input(std::move(inp));
        }
    }
    if (!b.active) {
        return true;
    }
    b.h[il]   = ffn_inp;
    b.gate_il = nullptr;
    if (b.adaptive && il >= b.g_lo && il < b.g_hi) {
        const bool has_prev = il > b.g_lo;
        GGML_ASSERT(!has_prev || b.state != nullptr);
        // the layer whose cosine feeds this decision: il-1, or for the first
        // gate node the last earlier layer whose FFN is in the graph
        int32_t obs = il - 1;
        if (!has_prev) {
            while (obs >= 0 && f->params.remove[obs]) {
                obs--;
            }
        }
        ggml_tensor * h = nullptr;
        ggml_tensor * o = nullptr;
        if (obs >= 0) {
            GGML_ASSERT(b.h[obs] != nullptr && b.o[obs] != nullptr);
            h = b.h[obs];
            o = b.o[obs];
        }
        ggml_tensor * g = ggml_ffnskip_gate(ctx0, b.inp->inp, b.inp->pol, has_prev ? b.state : nullptr, h, o,
                                            il, 0, obs, f->n_layer);
        ggml_format_name(g, "ffnskip_gate-%d", il);
        if (b.inp->probe != nullptr) {
            // the probe reads this layer's FFN input (issue 14)
            GGML_ASSERT(ffn_inp->ne[0] == f->probe_d);
            ffnskip_gate_set_probe(g, ffn_inp, b.inp->probe);
        }
        // MoE layer: into the graph now, right after h_j, not where a consumer
        // first pulls it in: inside the block that moved nodes of the dense
        // graph and changed the output (qwen3moe, never-fire vs dense: 0.007 in
        // the logits; with this, bit-identical, tests/test_archs.py). A dense
        // FFN keeps the order the backends' tests were verified with (the
        // gate pulled in by the up matmul, after the FFN norm)
        const llama_layer & layer = f->model->layers[il];
        if (layer.ffn_gate_inp != nullptr || layer.ffn_down_exps != nullptr) {
            ggml_build_forward_expand(gf, g);
        }
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
        // tail: records the outcome (and cosine) of the last gated layer; its
        // state holds the ubatch's trace, read by ffnskip_ubatch_end
        GGML_ASSERT(b.inp != nullptr);
        ggml_tensor * tail = ggml_ffnskip_gate(ctx0, b.inp->inp, b.inp->pol, b.state, b.h[il], b.o[il],
                                               il + 1, 1, il, f->n_layer);
        ggml_format_name(tail, "ffnskip_tail-%d", il + 1);
        ggml_set_output(tail);
        ggml_build_forward_expand(gf, tail);
        b.inp->tail = tail;
    }
}

// The nodes between out and inp (inp, leaves and the gate g excluded), depth
// first from out; at most max_nodes of them. must_end: more is a bug (the
// block does not lead back to inp), not a bound.
static std::vector<ggml_tensor *> ffnskip_nodes_between(ggml_tensor * out, const ggml_tensor * inp,
                                                       const ggml_tensor * g, size_t max_nodes, bool must_end) {
    std::vector<ggml_tensor *> stack = { out };
    std::vector<ggml_tensor *> seen;
    while (!stack.empty() && (must_end || seen.size() < max_nodes)) {
        ggml_tensor * t = stack.back();
        stack.pop_back();
        if (t == nullptr || t == inp || t == g || t->op == GGML_OP_NONE) {
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
        GGML_ASSERT((!must_end || seen.size() < max_nodes) && "ffnskip: the FFN block does not lead back to its input");
        for (int i = 0; i < GGML_MAX_SRC; ++i) {
            if (t->src[i] != nullptr) {
                stack.push_back(t->src[i]);
            }
        }
    }
    return seen;
}

// out's rows times the keep row of gate g (exact: x * 1 = x, skipped rows 0)
static ggml_tensor * ffnskip_mask_rows(ggml_context * ctx0, ggml_tensor * out, ggml_tensor * g, int64_t n_tokens,
                                       const char * name, int il) {
    const int64_t rows = out->ne[1];
    GGML_ASSERT(ggml_nrows(out) == rows && rows <= n_tokens);
    const int row = rows == n_tokens ? FFNSKIP_ROW_KEEP : FFNSKIP_ROW_KEEP_OUT;
    ggml_tensor * keep = ggml_view_2d(ctx0, g, 1, rows, sizeof(float), row * g->nb[1]);
    out = ggml_mul(ctx0, out, keep);
    ggml_format_name(out, "%s-%d", name, il);
    return out;
}

ggml_tensor * llm_graph_context::ffnskip_ffn_out(
        ggml_tensor * inp, ggml_tensor * out,
        ggml_tensor * up, ggml_tensor * gate, ggml_tensor * down,
        bool has_extra, int il) const {
    ffnskip_context * f = ffnskip;
    if (f == nullptr || il < 0 || il >= f->n_layer || !f->b.active || !f->b.adaptive || f->b.gate_il == nullptr) {
        return out;
    }
    // gate_il stays set until ffnskip_ffn_end: an MoE layer's shared expert
    // (build_ffn) comes before the block hook (ffnskip_ffn_block)
    ggml_tensor * g = f->b.gate_il;

    // predicate the weight matmuls between inp and out on the gate
    for (ggml_tensor * t : ffnskip_nodes_between(out, inp, g, 256, false)) {
        if (t->op == GGML_OP_MUL_MAT && t->src[2] == nullptr && t->src[0] != nullptr &&
            (t->src[0] == up || t->src[0] == gate || t->src[0] == down)) {
            t->src[2] = g;
            // down writes the zeros the residual add reads; up/gate outputs
            // are read only by the skipped down: they may do nothing at all
            // (with biases, scales or LoRA other nodes read them: write zeros)
            t->op_params[FFNSKIP_OP_PARAM_SLOT] = (t->src[0] == down || has_extra) ? FFNSKIP_MUL_MAT_MAGIC
                                                                                   : FFNSKIP_MUL_MAT_MAGIC_NOOP;
        }
    }

    // Exact zeros come from the predicated matmuls when every token skips:
    // every FFN weight is on a backend with the predicated path (checked by
    // ffnskip_check_supported), and a one-token matmul runs where its weights
    // are. Otherwise (several tokens: a matmul may be offloaded to a backend
    // without the predicate or take a non-predicated kernel; biases, scales
    // or LoRA read the outputs) mask the rows.
    const bool need_mask = has_extra || n_tokens > 1;
    return need_mask ? ffnskip_mask_rows(ctx0, out, g, n_tokens, "ffnskip_mask", il) : out;
}

// Predicates every FFN weight matmul of layer il between inp (the tensor given
// to ffnskip_ffn_begin) and out (the FFN block's output, before the residual
// add) that build_ffn has not: the router, the experts (MUL_MAT_ID: the gate
// state goes to src[3], src[2] holds the expert ids) and anything else whose
// weight is named blk.<il>.ffn_*. These write zeros when skipped (never the
// no-op variant: softmax, top-k and bias nodes read them), and the block's
// output rows are masked with the keep row, so a skipped token's FFN output
// is exactly zero whatever biases or routing weights the block adds. A block
// where nothing new was found (a dense FFN: build_ffn did it) is unchanged.
ggml_tensor * llm_graph_context::ffnskip_ffn_block(ggml_tensor * inp, ggml_tensor * out, int il) const {
    ffnskip_context * f = ffnskip;
    if (f == nullptr || il < 0 || il >= f->n_layer || !f->b.active || !f->b.adaptive || f->b.gate_il == nullptr) {
        return out;
    }
    ggml_tensor * g = f->b.gate_il;
    char prefix[32];
    snprintf(prefix, sizeof(prefix), "blk.%d.ffn_", il);
    const size_t prefix_len = strlen(prefix);
    int n_new = 0;
    for (ggml_tensor * t : ffnskip_nodes_between(out, inp, g, 4096, true)) {
        const bool ffn_weight = t->src[0] != nullptr && t->src[0]->op == GGML_OP_NONE &&
                                strncmp(ggml_get_name(t->src[0]), prefix, prefix_len) == 0;
        if (ffn_weight && t->op == GGML_OP_MUL_MAT && t->src[2] == nullptr) {
            t->src[2] = g;
            t->op_params[FFNSKIP_OP_PARAM_SLOT] = FFNSKIP_MUL_MAT_MAGIC;
            n_new++;
        } else if (ffn_weight && t->op == GGML_OP_MUL_MAT_ID && t->src[3] == nullptr) {
            t->src[3] = g;
            t->op_params[FFNSKIP_OP_PARAM_SLOT] = FFNSKIP_MUL_MAT_MAGIC;
            n_new++;
        }
    }
    if (n_new == 0) {
        return out;
    }
    return ffnskip_mask_rows(ctx0, out, g, n_tokens, "ffnskip_block_mask", il);
}
