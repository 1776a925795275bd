// ffn-skip-impl.h - internal state of ffnskip-gguf inside libllama (C++).
//
// One ffnskip_context per llama_context (llama_context::ffnskip, patch 0001),
// created by the first ffnskip_set_params. It holds the policy, the
// cumulative stats the gate ops write, and the scratch the graph hooks
// (llm_graph_context::ffnskip_*, patch 0002/0003) use while a graph is built.
#pragma once

#include "ffn-skip.h"
#include "ffn-skip-ggml.h"

#include <string>
#include <unordered_map>
#include <vector>

struct llama_model;
struct llama_batch_ext;
struct ggml_tensor;
struct ffnskip_context;

class llm_graph_input_ffnskip;

struct ffnskip_context {
    const llama_model * model = nullptr;
    int32_t n_layer = 0;

    ffnskip_params params;  // in effect
    int32_t signal = 0;       // enum ffnskip_signal (ffnskip_set_signal)
    int32_t probe_d = 0;      // probe signal: width of the FFN input (n_embd)
    std::vector<float> probe; // probe signal: n_layer x (probe_d + 1), w_j then b_j
    uint64_t topo = 1;      // bumped when a change alters the graph topology (mode, remove[])

    bool supported = false; // arch hooked, dense-FFN layers, weights on a backend with the predicated path
    std::string reason;     // why not, when !supported
    bool warned = false;

    ffnskip_stats stats;

    int32_t token_kind = FFNSKIP_TOKENS_AUTO; // enum ffnskip_token_kind (ffnskip_set_token_kind)
    int64_t affected_pos = INT64_MAX;         // ffnskip_affected_pos; INT64_MAX: none

    // per-sequence token counts of the batch being decoded (ffnskip_batch_begin)
    std::unordered_map<int32_t, int32_t> batch_seq_count;
    bool batch_valid = false;

    // trace of the last gated ubatch (ffnskip_get_trace)
    int32_t trace_tokens = 0;
    std::vector<uint8_t> trace_decision; // [n_tokens * n_layer]
    std::vector<float>   trace_cos;      // [n_tokens * n_layer]

    // graph input of the ubatch being computed (set by its set_input, read
    // once by ffnskip_ubatch_end after the compute)
    llm_graph_input_ffnskip * cur = nullptr;

    // graph-build scratch (valid while one graph is being built)
    struct {
        bool active = false;               // this graph carries the hooks
        bool adaptive = false;             // gate nodes present
        int32_t g_lo = 0, g_hi = 0;        // gate nodes decide layers [g_lo, g_hi)
        llm_graph_input_ffnskip * inp = nullptr; // this graph's inputs (token rows, policy; owned by the graph result)
        ggml_tensor * state = nullptr;     // last gate node
        ggml_tensor * gate_il = nullptr;   // gate of the layer being built
        std::vector<ggml_tensor *> h;      // ffn_inp per layer
        std::vector<ggml_tensor *> o;      // residual after the FFN per layer
    } b;

    // effective mode for graph building: OFF when unsupported
    int32_t effective_mode() const { return supported ? params.mode : FFNSKIP_MODE_OFF; }
};

ffnskip_context * ffnskip_context_new(const llama_model * model);
void              ffnskip_context_free(ffnskip_context * fctx);

// called by llama_context::decode with the whole batch (patches/0001); fctx may be NULL
void ffnskip_batch_begin(ffnskip_context * fctx, const llama_batch_ext & batch);

// called by llama_context::process_ubatch after a successful graph compute
// (patches/0001): reads the ubatch's trace back (one small read, only when
// the ubatch has gate nodes) and accumulates the stats; fctx may be NULL
void ffnskip_ubatch_end(ffnskip_context * fctx);
