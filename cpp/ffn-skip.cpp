// ffn-skip.cpp - C API of ffnskip-gguf (ffn-skip.h): policy, validation,
// per-context state, stats. The graph side lives in ffn-skip-graph.cpp.
#include "ffn-skip-impl.h"

#include "llama-context.h"
#include "llama-model.h"
#include "llama-impl.h"

#include "ggml-backend.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdarg>
#include <cstdlib>
#include <string>

#ifndef FFNSKIP_LLAMA_CPP_PYTHON_VERSION
#    error "FFNSKIP_LLAMA_CPP_PYTHON_VERSION must be defined by the build"
#endif

static void ffnskip_err(char * err, size_t err_len, const char * fmt, ...) {
    if (err == nullptr || err_len == 0) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

// round half away from zero, as the Python side (policy.py) does
static int32_t ffnskip_round(double x) {
    return (int32_t) std::floor(x + 0.5);
}

int32_t ffnskip_api_version(void) {
    return FFNSKIP_API_VERSION;
}

const char * ffnskip_llama_cpp_pin(void) {
    return FFNSKIP_LLAMA_CPP_PYTHON_VERSION;
}

void ffnskip_params_default(ffnskip_params * p, int32_t n_layer) {
    GGML_ASSERT(p != nullptr);
    std::memset(p, 0, sizeof(*p));
    const double L = n_layer > 0 ? n_layer : 0;
    const int32_t cold = std::max(1, ffnskip_round(5.0 * L / 32.0)); // paper: 5 of 32 layers each side
    p->mode         = FFNSKIP_MODE_OFF;
    p->cold_start   = cold;
    p->cold_end     = cold;
    p->max_skip     = std::max(1, ffnskip_round(0.10 * L));           // DESIGN.md section 5
    p->max_runs     = 1;
    p->continue_run = 1;
    p->warmup       = 32;                                            // paper: 25-30 tokens
    for (int j = 0; j < FFNSKIP_MAX_LAYERS; ++j) {
        p->threshold[j] = 0.95f;                                     // paper, section 4
    }
}

int32_t ffnskip_params_validate(const ffnskip_params * p, int32_t n_layer, char * err, size_t err_len) {
    if (p == nullptr) {
        ffnskip_err(err, err_len, "params is NULL");
        return -1;
    }
    if (n_layer < 1 || n_layer > FFNSKIP_MAX_LAYERS) {
        ffnskip_err(err, err_len, "n_layer=%d outside [1, %d]", n_layer, FFNSKIP_MAX_LAYERS);
        return -1;
    }
    if (p->mode != FFNSKIP_MODE_OFF && p->mode != FFNSKIP_MODE_ADAPTIVE && p->mode != FFNSKIP_MODE_STATIC) {
        ffnskip_err(err, err_len, "mode=%d is not 0 (off), 1 (adaptive) or 2 (static)", p->mode);
        return -1;
    }
    if (p->cold_start < 0 || p->cold_start > n_layer) {
        ffnskip_err(err, err_len, "cold_start=%d outside [0, n_layer=%d]", p->cold_start, n_layer);
        return -1;
    }
    if (p->cold_end < 0 || p->cold_end > n_layer) {
        ffnskip_err(err, err_len, "cold_end=%d outside [0, n_layer=%d]", p->cold_end, n_layer);
        return -1;
    }
    if (p->cold_start + p->cold_end > n_layer) {
        ffnskip_err(err, err_len, "cold_start=%d + cold_end=%d exceed n_layer=%d", p->cold_start, p->cold_end, n_layer);
        return -1;
    }
    if (p->max_skip < 0) {
        ffnskip_err(err, err_len, "max_skip=%d is negative", p->max_skip);
        return -1;
    }
    if (p->max_runs < 1) {
        ffnskip_err(err, err_len, "max_runs=%d is below 1", p->max_runs);
        return -1;
    }
    if (p->continue_run != 0 && p->continue_run != 1) {
        ffnskip_err(err, err_len, "continue_run=%d is not 0 or 1", p->continue_run);
        return -1;
    }
    if (p->warmup < 0) {
        ffnskip_err(err, err_len, "warmup=%d is negative", p->warmup);
        return -1;
    }
    for (int j = 0; j < n_layer; ++j) {
        if (!std::isfinite(p->threshold[j])) {
            ffnskip_err(err, err_len, "threshold[%d]=%f is not finite", j, (double) p->threshold[j]);
            return -1;
        }
        if (p->exclude[j] > 1 || p->remove[j] > 1) {
            ffnskip_err(err, err_len, "exclude[%d]/remove[%d] must be 0 or 1", j, j);
            return -1;
        }
    }
    return 0;
}

static bool ffnskip_arch_hooked(llm_arch arch) {
    // the architectures whose layer loop carries the hooks (patches/0003)
    switch (arch) {
        case LLM_ARCH_LLAMA:
        case LLM_ARCH_QWEN2:
        case LLM_ARCH_QWEN3:
        case LLM_ARCH_GEMMA3:
        // issue 15: one hunk per builder, the FFN block between ffnskip_ffn_begin
        // and ffnskip_ffn_block/_end (MoE blocks whole: router, experts, shared expert)
        case LLM_ARCH_GEMMA2:
        case LLM_ARCH_GEMMA4:
        case LLM_ARCH_PHI3:
        case LLM_ARCH_MISTRAL3:
        case LLM_ARCH_GRANITE:
        case LLM_ARCH_OLMO2:
        case LLM_ARCH_SMOLLM3:
        case LLM_ARCH_GLM4:
        case LLM_ARCH_EXAONE4:
        case LLM_ARCH_QWEN35:
        case LLM_ARCH_QWEN3MOE:
        case LLM_ARCH_QWEN35MOE:
        case LLM_ARCH_OPENAI_MOE:
            return true;
        default:
            return false;
    }
}

// Where an FFN weight is computed, and whether that backend has the gate op
// and the predicated matmul. Returns true when it has; else why in *why.
//  - host memory (mmap'd file, CPU buffers, pinned host buffers) and the CPU
//    device's extra buffer types (repack): the CPU backend (patches/0004);
//  - a Vulkan device (patches/0006, cpp/ffn-skip-vulkan.cpp): verified on
//    Mesa's lavapipe; a device that would take a mat-vec path lavapipe
//    cannot run (integer dot product) needs FFNSKIP_VULKAN_UNVERIFIED=1;
//  - a CUDA device (patches/0007, cpp/ffn-skip-cuda.cu): compiled in CI, not
//    yet checked on a GPU (tests/gpu/check.sh), so it gates only with
//    FFNSKIP_CUDA_GATE=1 (*note says so); a row split across GPUs never;
//  - anything else (ROCm, Metal, SYCL, ...): no predicated path yet.
static bool ffnskip_weight_backend_ok(const ggml_tensor * w, std::string & why, std::string & note) {
    if (w == nullptr) {
        return true;
    }
    if (w->buffer == nullptr) {
        why = std::string("FFN weight ") + ggml_get_name(w) + " has no buffer";
        return false;
    }
    if (ggml_backend_buffer_is_host(w->buffer)) {
        return true;
    }
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(w->buffer);
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (dev != nullptr && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        return true;
    }
    ggml_backend_reg_t reg = dev != nullptr ? ggml_backend_dev_backend_reg(dev) : nullptr;
    const char * reg_name  = reg != nullptr ? ggml_backend_reg_name(reg) : "";
    if (reg != nullptr && std::strcmp(reg_name, "Vulkan") == 0) {
        typedef const char * (*unverified_fn)(ggml_backend_dev_t);
        unverified_fn fn = (unverified_fn) ggml_backend_reg_get_proc_address(reg, "ffnskip_vk_unverified_path");
        if (fn == nullptr) {
            why = "the Vulkan backend was built without the FFN-skip gate; decoding dense";
            return false;
        }
        const char * path = fn(dev);
        if (path == nullptr) {
            return true;
        }
        const char * env = std::getenv("FFNSKIP_VULKAN_UNVERIFIED");
        if (env != nullptr && std::strcmp(env, "1") == 0) {
            note = std::string("Vulkan device ") + ggml_backend_dev_name(dev) + " takes the " + path +
                   " path, which has the predicate but is unverified; gating anyway (FFNSKIP_VULKAN_UNVERIFIED=1)";
            return true;
        }
        why = std::string("Vulkan device ") + ggml_backend_dev_name(dev) + " would take the " + path +
              " path, which is unverified (checked only on lavapipe); decoding dense "
              "(set FFNSKIP_VULKAN_UNVERIFIED=1 to gate anyway)";
        return false;
    }
    int32_t built = 0;
    if (reg != nullptr && std::strcmp(reg_name, "CUDA") == 0) {
        typedef int32_t (*gate_fn)(void);
        gate_fn fn = (gate_fn) ggml_backend_reg_get_proc_address(reg, "ffnskip_cuda_gate");
        built = fn != nullptr ? fn() : 0;
    }
    char buf[512];
    const int32_t ok = ffnskip_backend_verdict(reg_name, ggml_backend_buft_name(buft), ggml_get_name(w), built,
                                               buf, sizeof(buf));
    (ok ? note : why) = buf;
    return ok == 1;
}

int32_t ffnskip_backend_verdict(const char * reg_name, const char * buft_name, const char * weight_name,
                                int32_t built_with_gate, char * msg, size_t msg_len) {
    const std::string reg  = reg_name != nullptr ? reg_name : "";
    const std::string buft = buft_name != nullptr ? buft_name : "";
    const std::string w    = weight_name != nullptr ? weight_name : "?";
    if (reg == "CUDA") {
        if (built_with_gate < 1) {
            ffnskip_err(msg, msg_len, "the CUDA backend was built without the FFN-skip gate; decoding dense");
            return 0;
        }
        if (buft.find("Split") != std::string::npos) {
            ffnskip_err(msg, msg_len, "FFN weight %s is split across GPUs (buffer '%s'), which has no predicated path "
                        "(per model: every layer decodes dense)", w.c_str(), buft.c_str());
            return 0;
        }
        const char * env = std::getenv("FFNSKIP_CUDA_GATE");
        if (env != nullptr && std::strcmp(env, "1") == 0) {
            ffnskip_err(msg, msg_len, "CUDA gate on by FFNSKIP_CUDA_GATE=1: compiled, not yet verified on a GPU "
                        "(tests/gpu/check.sh)");
            return 1;
        }
        ffnskip_err(msg, msg_len, "the CUDA gate is compiled but not yet verified on a GPU (tests/gpu/check.sh); "
                    "decoding dense (per model; set FFNSKIP_CUDA_GATE=1 to gate anyway)");
        return 0;
    }
    ffnskip_err(msg, msg_len, "FFN weight %s is on backend buffer '%s', which has no predicated FFN path yet "
                "(per model: every layer decodes dense)", w.c_str(), buft.c_str());
    return 0;
}

// weights in host memory or on the CPU device: the CPU backend computes them
static bool ffnskip_on_host(const ggml_tensor * w) {
    if (w == nullptr) {
        return true;
    }
    if (w->buffer == nullptr) {
        return false;
    }
    if (ggml_backend_buffer_is_host(w->buffer)) {
        return true;
    }
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(w->buffer));
    return dev != nullptr && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
}

// Whether the gate kernel of the backend that computes FFN weight w has the
// signal (enum ffnskip_signal): the CPU op has all of them; a GPU backend
// says which through its registry ("ffnskip_gate_signals": a bit per signal;
// cpp/ffn-skip-vulkan.cpp, cpp/ffn-skip-cuda.cu). Backends built before a
// signal existed have no such entry or lack the bit.
static bool ffnskip_backend_has_signal(const ggml_tensor * w, int32_t signal) {
    if (ffnskip_on_host(w)) {
        return true;
    }
    if (w->buffer == nullptr) {
        return false;
    }
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(w->buffer));
    ggml_backend_reg_t reg = dev != nullptr ? ggml_backend_dev_backend_reg(dev) : nullptr;
    if (reg == nullptr) {
        return false;
    }
    typedef int32_t (*signals_fn)(void);
    signals_fn fn = (signals_fn) ggml_backend_reg_get_proc_address(reg, "ffnskip_gate_signals");
    return fn != nullptr && (fn() & (1 << signal)) != 0;
}

static void ffnskip_check_supported(ffnskip_context * fctx) {
    const llama_model & model = *fctx->model;
    fctx->supported = false;
    if (!ffnskip_arch_hooked(model.arch)) {
        fctx->reason = std::string("architecture '") + llm_arch_name(model.arch) +
                       "' has no FFN-skip hooks (supported: llama, qwen2, qwen3, gemma3, gemma2, gemma4, phi3, "
                       "mistral3, granite, olmo2, smollm3, glm4, exaone4, qwen35, qwen3moe, qwen35moe, gpt-oss)";
        return;
    }
    if (fctx->n_layer < 1 || fctx->n_layer > FFNSKIP_MAX_LAYERS) {
        fctx->reason = "model has " + std::to_string(fctx->n_layer) + " layers, more than the " +
                       std::to_string(FFNSKIP_MAX_LAYERS) + " supported";
        return;
    }
    std::string note;
    for (int il = 0; il < fctx->n_layer; ++il) {
        const llama_layer & layer = model.layers[il];
        const bool moe = layer.ffn_gate_inp != nullptr || layer.ffn_down_exps != nullptr;
        if (!moe && layer.ffn_down == nullptr) {
            fctx->reason = "layer " + std::to_string(il) + " has no FFN down projection the gate knows";
            return;
        }
        for (const ggml_tensor * w : { layer.ffn_up, layer.ffn_gate, layer.ffn_down }) {
            std::string why;
            if (!ffnskip_weight_backend_ok(w, why, note)) {
                fctx->reason = why;
                return;
            }
        }
        // MoE block: the predicated MUL_MAT_ID exists on the CPU backend only
        // (patches/0004; src[3] carries the gate); the router and the shared
        // expert go with the block
        for (const ggml_tensor * w : { layer.ffn_gate_inp, layer.ffn_up_exps, layer.ffn_gate_exps, layer.ffn_down_exps,
                                       layer.ffn_gate_up_exps, layer.ffn_up_shexp, layer.ffn_gate_shexp,
                                       layer.ffn_down_shexp, layer.ffn_gate_inp_shexp }) {
            if (!moe || w == nullptr) {
                continue;
            }
            if (!ffnskip_on_host(w)) {
                fctx->reason = "layer " + std::to_string(il) + " is a mixture-of-experts block whose weight " +
                               ggml_get_name(w) + " is on backend buffer '" +
                               (w->buffer ? ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer)) : "none") +
                               "', which has no predicated MUL_MAT_ID yet (per model: every layer decodes dense)";
                return;
            }
        }
    }
    fctx->supported = true;
    // supported: the reason is empty, or says which unverified path is in effect
    fctx->reason = note;
    if (!note.empty()) {
        LLAMA_LOG_WARN("ffnskip: %s\n", note.c_str());
    }
}

ffnskip_context * ffnskip_context_new(const llama_model * model) {
    ffnskip_context * fctx = new ffnskip_context();
    fctx->model   = model;
    fctx->n_layer = (int32_t) model->hparams.n_layer();
    ffnskip_params_default(&fctx->params, fctx->n_layer);
    std::memset(&fctx->stats, 0, sizeof(fctx->stats));
    fctx->stats.n_layer = std::min(fctx->n_layer, (int32_t) FFNSKIP_MAX_LAYERS);
    ffnskip_check_supported(fctx);
    fctx->stats.supported = fctx->supported ? 1 : 0;
    return fctx;
}

void ffnskip_context_free(ffnskip_context * fctx) {
    delete fctx;
}

static ffnskip_context * ffnskip_get(llama_context * ctx) {
    if (ctx == nullptr) {
        return nullptr;
    }
    if (ctx->ffnskip == nullptr) {
        ctx->ffnskip = ffnskip_context_new(&ctx->get_model());
    }
    return ctx->ffnskip;
}

int32_t ffnskip_set_params(llama_context * ctx, const ffnskip_params * p, char * err, size_t err_len) {
    if (ctx == nullptr) {
        ffnskip_err(err, err_len, "context is NULL");
        return -1;
    }
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (p != nullptr && p->mode == FFNSKIP_MODE_OFF && (fctx->n_layer < 1 || fctx->n_layer > FFNSKIP_MAX_LAYERS)) {
        if (fctx->params.mode != FFNSKIP_MODE_OFF) {
            ctx->ffnskip_need_reserve();
        }
        fctx->params.mode = FFNSKIP_MODE_OFF; // any model can decode dense
        fctx->topo++;
        return 0;
    }
    if (ffnskip_params_validate(p, fctx->n_layer, err, err_len) != 0) {
        return -1;
    }
    const ffnskip_params & old = fctx->params;
    // gate nodes exist only for the middle layers: cold regions are topology
    bool topo_changed = old.mode != p->mode || old.cold_start != p->cold_start || old.cold_end != p->cold_end;
    for (int j = 0; j < fctx->n_layer && !topo_changed; ++j) {
        topo_changed = old.remove[j] != p->remove[j];
    }
    fctx->params = *p;
    if (topo_changed) {
        fctx->topo++;
        // the worst-case graph changed: re-reserve the compute buffers now
        // (else they grow during decoding, and llama.cpp warns at free)
        ctx->ffnskip_need_reserve();
    }
    if (p->mode != FFNSKIP_MODE_OFF && !fctx->supported && !fctx->warned) {
        LLAMA_LOG_WARN("ffnskip: FFN skipping is off for this context: %s\n", fctx->reason.c_str());
        fctx->warned = true;
    }
    return 0;
}


int32_t ffnskip_set_signal(llama_context * ctx, int32_t signal, const float * weights, int64_t n,
                           char * err, size_t err_len) {
    if (ctx == nullptr) {
        ffnskip_err(err, err_len, "context is NULL");
        return -1;
    }
    ffnskip_context * fctx = ffnskip_get(ctx);
    const int32_t old = fctx->signal;
    if (signal == FFNSKIP_SIGNAL_COSINE) {
        if (weights != nullptr || n != 0) {
            ffnskip_err(err, err_len, "the cosine signal takes no weights (got %lld)", (long long) n);
            return -1;
        }
        fctx->signal  = FFNSKIP_SIGNAL_COSINE;
        fctx->probe_d = 0;
        fctx->probe.clear();
    } else if (signal == FFNSKIP_SIGNAL_PROBE) {
        const llama_model & model = *fctx->model;
        const int64_t d = model.hparams.n_embd;
        const int64_t L = fctx->n_layer;
        if (weights == nullptr || n != L * (d + 1)) {
            ffnskip_err(err, err_len, "the probe signal needs n_layer x (n_embd + 1) = %lld x %lld = %lld weights, got %lld",
                        (long long) L, (long long) (d + 1), (long long) (L * (d + 1)), (long long) n);
            return -1;
        }
        for (int64_t i = 0; i < n; ++i) {
            if (!std::isfinite(weights[i])) {
                ffnskip_err(err, err_len, "probe weight %lld (layer %lld) is not finite", (long long) i,
                            (long long) (i / (d + 1)));
                return -1;
            }
        }
        for (int32_t il = 0; il < fctx->n_layer; ++il) {
            const llama_layer & layer = model.layers[il];
            for (const ggml_tensor * w : { layer.ffn_up, layer.ffn_gate, layer.ffn_down, layer.ffn_gate_inp,
                                           layer.ffn_up_exps, layer.ffn_gate_exps, layer.ffn_down_exps }) {
                if (!ffnskip_backend_has_signal(w, FFNSKIP_SIGNAL_PROBE)) {
                    ffnskip_err(err, err_len, "the probe signal has no gate kernel on the backend of FFN weight %s "
                                "('%s'; it runs on the CPU, Vulkan and CUDA backends, issue 14)", ggml_get_name(w),
                                w->buffer ? ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer)) : "none");
                    return -1;
                }
            }
        }
        fctx->signal  = FFNSKIP_SIGNAL_PROBE;
        fctx->probe_d = (int32_t) d;
        fctx->probe.assign(weights, weights + n);
    } else {
        ffnskip_err(err, err_len, "unknown signal %d (0 cosine, 1 probe)", signal);
        return -1;
    }
    if (old != fctx->signal) {
        // the probe's graph input and sources: a topology change
        fctx->topo++;
        ctx->ffnskip_need_reserve();
    }
    return 0;
}

int32_t ffnskip_get_signal(llama_context * ctx) {
    return ctx == nullptr ? -1 : ffnskip_get(ctx)->signal;
}

int32_t ffnskip_get_params(llama_context * ctx, ffnskip_params * p) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (fctx == nullptr || p == nullptr) {
        return -1;
    }
    *p = fctx->params;
    return 0;
}

int32_t ffnskip_supported(llama_context * ctx, char * reason, size_t reason_len) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (fctx == nullptr) {
        ffnskip_err(reason, reason_len, "context is NULL");
        return 0;
    }
    // unsupported: why; supported: empty, or the unverified path in effect
    ffnskip_err(reason, reason_len, "%s", fctx->reason.c_str());
    return fctx->supported ? 1 : 0;
}

int32_t ffnskip_set_token_kind(llama_context * ctx, int32_t kind) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (fctx == nullptr || kind < FFNSKIP_TOKENS_AUTO || kind > FFNSKIP_TOKENS_GENERATED) {
        return -1;
    }
    fctx->token_kind = kind;
    return 0;
}

int32_t ffnskip_get_token_kind(llama_context * ctx) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    return fctx != nullptr ? fctx->token_kind : FFNSKIP_TOKENS_AUTO;
}

int64_t ffnskip_affected_pos(llama_context * ctx) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (fctx == nullptr || fctx->affected_pos == INT64_MAX) {
        return -1;
    }
    return fctx->affected_pos;
}

void ffnskip_set_affected_pos(llama_context * ctx, int64_t pos) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (fctx != nullptr) {
        fctx->affected_pos = pos < 0 ? INT64_MAX : pos;
    }
}

void ffnskip_add_rejected(llama_context * ctx, uint64_t n) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (fctx != nullptr) {
        fctx->stats.rejected_tokens += n;
    }
}

int32_t ffnskip_cuda_graph_counts(uint64_t counts[3]) {
    if (counts == nullptr) {
        return -1;
    }
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("CUDA");
    if (reg == nullptr) {
        return -1;
    }
    typedef void (*counts_fn)(uint64_t out[3]);
    counts_fn fn = (counts_fn) ggml_backend_reg_get_proc_address(reg, "ffnskip_cuda_graph_counts");
    if (fn == nullptr) {
        return -1;
    }
    fn(counts);
    return 0;
}

int32_t ffnskip_get_stats(llama_context * ctx, ffnskip_stats * out) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (fctx == nullptr || out == nullptr) {
        return -1;
    }
    *out = fctx->stats;
    return 0;
}

void ffnskip_reset_stats(llama_context * ctx) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (fctx == nullptr) {
        return;
    }
    std::memset(&fctx->stats, 0, sizeof(fctx->stats));
    fctx->stats.n_layer   = std::min(fctx->n_layer, (int32_t) FFNSKIP_MAX_LAYERS);
    fctx->stats.supported = fctx->supported ? 1 : 0;
}

int32_t ffnskip_get_trace(llama_context * ctx, uint8_t * decision, float * cos, int32_t max_tokens) {
    ffnskip_context * fctx = ffnskip_get(ctx);
    if (fctx == nullptr) {
        return 0;
    }
    const int32_t n = std::min(max_tokens, fctx->trace_tokens);
    const size_t count = (size_t) std::max(n, 0) * (size_t) fctx->n_layer;
    if (decision != nullptr && count > 0) {
        std::memcpy(decision, fctx->trace_decision.data(), count);
    }
    if (cos != nullptr && count > 0) {
        std::memcpy(cos, fctx->trace_cos.data(), count * sizeof(float));
    }
    return fctx->trace_tokens;
}
