// ffn-skip.h - C API of ffnskip-gguf, compiled into libllama.
//
// Input-adaptive FFN skipping for decode (FFN-SkipLLM, Jaiswal et al.,
// EMNLP 2024, arXiv 2404.03865), semantics in ../shared/DESIGN.md section 3.
// This header is the single source of the policy's parameter names; the
// Python ctypes layer (python/ffnskip_gguf/_lib.py) mirrors these structs
// field by field, so any change here bumps FFNSKIP_API_VERSION.
#pragma once

#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define FFNSKIP_API __declspec(dllexport)
#else
#    define FFNSKIP_API __attribute__((visibility("default")))
#endif

#define FFNSKIP_API_VERSION 4

// Largest model (layers) the fixed-size arrays below describe; a model with
// more layers decodes dense and reports itself unsupported.
#define FFNSKIP_MAX_LAYERS 256

struct llama_context;

enum ffnskip_mode {
    FFNSKIP_MODE_OFF      = 0, // dense: the graph is stock llama.cpp's
    FFNSKIP_MODE_ADAPTIVE = 1, // gate in the graph + static removal
    FFNSKIP_MODE_STATIC   = 2, // static removal only (no gate nodes)
};

// The policy (DESIGN.md section 3). Layer arrays are indexed by layer; only
// the first n_layer entries are read.
struct ffnskip_params {
    int32_t mode;                          // enum ffnskip_mode
    int32_t cold_start;                    // layers [0, cold_start) always run
    int32_t cold_end;                      // layers [L - cold_end, L) always run
    int32_t max_skip;                      // k: FFNs one token may skip (budget)
    int32_t max_runs;                      // runs of skips one token may start (>= 1)
    int32_t continue_run;                  // 1: an active run continues while budget remains
    int32_t warmup;                        // positions < warmup run dense
    float   threshold[FFNSKIP_MAX_LAYERS]; // tau_j: start a run when c_last > tau_j
    uint8_t exclude[FFNSKIP_MAX_LAYERS];   // 1: layer j always runs, ends a run
    uint8_t remove[FFNSKIP_MAX_LAYERS];    // 1: FFN of layer j left out of the graph
};

// Which tokens of a llama_decode are prompt and which are generated
// (ffnskip_set_token_kind). Prompt tokens run dense and are not counted;
// generated tokens are gated (each on its own state) and counted.
enum ffnskip_token_kind {
    FFNSKIP_TOKENS_AUTO      = 0, // raw C API default: a token is generated when it is the only
                                  // token of its sequence in the batch, else prompt
    FFNSKIP_TOKENS_PROMPT    = 1, // every token is prompt (prefill, embeddings, a re-decoded prompt token)
    FFNSKIP_TOKENS_GENERATED = 2, // every token is generated (one sampled token, speculative drafts)
};

// Cumulative per-context statistics (DESIGN.md section 3, "Skip ratio").
// Decode tokens: generated tokens (ffnskip_token_kind; warm-up ones
// included, prompt tokens excluded). Per-layer counts refer to decode
// tokens only.
struct ffnskip_stats {
    int32_t  n_layer;
    int32_t  supported;                    // 0: this context decodes dense (see ffnskip_supported)
    uint64_t decode_tokens;
    uint64_t run[FFNSKIP_MAX_LAYERS];      // FFN blocks run
    uint64_t skipped[FFNSKIP_MAX_LAYERS];  // FFN blocks skipped (adaptive or statically removed)
    double   cos_sum[FFNSKIP_MAX_LAYERS];  // sum of cos(h_j, o_j) over decode tokens whose FFN j ran
    uint64_t cos_count[FFNSKIP_MAX_LAYERS];
    uint64_t rejected_tokens;              // decode tokens that were speculative drafts the sampler rejected
                                           // (counted above too; reported by the caller, ffnskip_add_rejected)
};

// The gate's decision signal (ffnskip_set_signal; issue 14, docs/QUALITY.md).
enum ffnskip_signal {
    FFNSKIP_SIGNAL_COSINE = 0, // c_last = cos(h, o) of the last FFN that ran (the paper, section 3): skip when c_last > tau_j
    FFNSKIP_SIGNAL_PROBE  = 1, // per-layer linear probe on FFN j's own input h_j:
                               // s_j = -(w_j . h_j / |h_j| + b_j), the negated predicted log damage; skip when s_j > tau_j
};

// Sets the decision signal of ctx (takes effect at the next llama_decode;
// changes the graph). PROBE: weights = n_layer x (n_embd + 1) floats, layer
// by layer w_j (n_embd) then b_j; n their count; COSINE: weights NULL, n 0.
// The probe runs where the gate op has it (CPU, Vulkan, CUDA: the backend's
// "ffnskip_gate_signals" registry entry); with FFN weights on a backend
// without it, it is refused. Returns 0, or -1 with the reason in err (nothing changed).
FFNSKIP_API int32_t ffnskip_set_signal(struct llama_context * ctx, int32_t signal, const float * weights, int64_t n,
                                       char * err, size_t err_len);
FFNSKIP_API int32_t ffnskip_get_signal(struct llama_context * ctx);

// ABI version of the loaded library (== FFNSKIP_API_VERSION).
FFNSKIP_API int32_t ffnskip_api_version(void);

// llama-cpp-python version whose vendored llama.cpp the library was built from.
FFNSKIP_API const char * ffnskip_llama_cpp_pin(void);

// Fills *p with an "off" policy for n_layer layers: mode OFF, thresholds 0.95,
// cold regions max(1, round(5 L / 32)), k = max(1, round(0.10 L)), one run,
// continuation on, warm-up 32 (DESIGN.md section 5).
FFNSKIP_API void ffnskip_params_default(struct ffnskip_params * p, int32_t n_layer);

// Validates p for n_layer layers. Returns 0 when valid, else -1 with a
// message naming the field in err (if err_len > 0).
FFNSKIP_API int32_t ffnskip_params_validate(const struct ffnskip_params * p, int32_t n_layer, char * err, size_t err_len);

// Sets the policy of ctx; takes effect at the next llama_decode. Returns 0,
// or -1 (invalid params, message in err; nothing changed).
FFNSKIP_API int32_t ffnskip_set_params(struct llama_context * ctx, const struct ffnskip_params * p, char * err, size_t err_len);

// Copies the policy in effect (defaults with mode OFF if never set). Returns 0.
FFNSKIP_API int32_t ffnskip_get_params(struct llama_context * ctx, struct ffnskip_params * p);

// 1 when ctx can gate FFNs (architecture with hooks, layers on a backend with
// the predicated path); else 0 and a reason in reason (if reason_len > 0).
// When 1, reason is empty or names the unverified path in effect (for example
// the CUDA gate forced on by FFNSKIP_CUDA_GATE=1).
FFNSKIP_API int32_t ffnskip_supported(struct llama_context * ctx, char * reason, size_t reason_len);

// Classify the tokens of the following llama_decode calls (sticky until
// changed; enum ffnskip_token_kind). Returns 0, or -1 for a NULL context or
// an unknown kind (nothing changes).
FFNSKIP_API int32_t ffnskip_set_token_kind(struct llama_context * ctx, int32_t kind);
FFNSKIP_API int32_t ffnskip_get_token_kind(struct llama_context * ctx);

// Lowest sequence position decoded, since the last ffnskip_set_affected_pos,
// whose result depends on the FFN-skip settings: a generated token past the
// warm-up with the gate on, or any token while FFNs are statically removed.
// KV cache entries from there on are valid only under the settings they
// were computed with; below it they are dense. -1: none (or NULL context).
FFNSKIP_API int64_t ffnskip_affected_pos(struct llama_context * ctx);
FFNSKIP_API void    ffnskip_set_affected_pos(struct llama_context * ctx, int64_t pos); // pos < 0: none

// Add n to stats.rejected_tokens (speculative drafts the sampler rejected).
FFNSKIP_API void ffnskip_add_rejected(struct llama_context * ctx, uint64_t n);

// The gate's verdict for FFN weights on a GPU backend other than Vulkan
// (cpp/ffn-skip.cpp, ffnskip_weight_backend_ok): reg_name is the ggml
// backend registry ("CUDA", "Metal", ...), buft_name the weights' buffer
// type, built_with_gate the version of the backend's predicated path (0:
// none). Returns 1 (gate; msg may name the unverified path in effect) or 0
// (dense; msg says why). CUDA gates only with FFNSKIP_CUDA_GATE=1 until the
// GPU check (tests/gpu/check.sh) has passed; never on a row split.
FFNSKIP_API int32_t ffnskip_backend_verdict(const char * reg_name, const char * buft_name, const char * weight_name,
                                            int32_t built_with_gate, char * msg, size_t msg_len);

// Graph computes of the CUDA backend in this process, since it loaded:
// counts[0] eager (no CUDA graph), [1] CUDA graph captured, [2] captured graph
// replayed unchanged. Returns 0, or -1 (counts untouched) without a CUDA
// backend built with the gate (cpp/ffn-skip-cuda.cu).
FFNSKIP_API int32_t ffnskip_cuda_graph_counts(uint64_t counts[3]);

FFNSKIP_API int32_t ffnskip_get_stats(struct llama_context * ctx, struct ffnskip_stats * out);
FFNSKIP_API void    ffnskip_reset_stats(struct llama_context * ctx);

// Per-token trace of the last ubatch decoded with the gate (tests, oracle):
// for token t of the ubatch and layer j, decision[t*n_layer + j] is
// 0 = FFN ran, 1 = skipped by the gate, 2 = statically removed, 255 = token
// not gated (prefill / warm-up / gate off); cos[t*n_layer + j] is
// cos(h_j, o_j) when the FFN ran for a decode token, else NaN.
// Copies at most max_tokens tokens; returns the number of tokens of the ubatch.
FFNSKIP_API int32_t ffnskip_get_trace(struct llama_context * ctx, uint8_t * decision, float * cos, int32_t max_tokens);

#ifdef __cplusplus
}
#endif
