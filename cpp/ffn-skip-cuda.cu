// ffn-skip-cuda.cu - the FFN-skip gate on ggml's CUDA backend: the kernel of
// GGML_OP_FFNSKIP_GATE, the fallback zeroing of a skipped down projection, the
// CUDA graph counters and the registry hook. The build copies this file into
// ggml/src/ggml-cuda/ (cmake/fetch-llama-cpp.cmake), where ggml-cuda compiles
// every .cu; the hooks inside ggml-cuda (dispatch, supports_op, predicated
// mat-vec kernels, fusions) are patches/0007. Design: cpp/ffn-skip-cuda.cuh.
#include "common.cuh"

#include "ffn-skip-cuda.cuh"

#include <atomic>
#include <cstring>

#define FFNSKIP_CUDA_BLOCK 256

// version of the predicated CUDA path (bump when its semantics change):
// 2 adds the probe signal (issue 14)
#define FFNSKIP_CUDA_GATE_VERSION 2

static __device__ __forceinline__ float ffnskip_nan() {
    return __int_as_float(0x7fc00000);
}

// Tree sum of the block's s_a[] and s_b[] (and s_c[] unless null) into
// element 0; every thread must call it (it holds the barriers).
static __device__ __forceinline__ void ffnskip_block_sum(double * s_a, double * s_b, double * s_c, const int tid) {
    __syncthreads();
#pragma unroll
    for (int s = FFNSKIP_CUDA_BLOCK / 2; s > 0; s >>= 1) {
        if (tid < s) {
            s_a[tid] += s_a[tid + s];
            s_b[tid] += s_b[tid + s];
            if (s_c != nullptr) {
                s_c[tid] += s_c[tid + s];
            }
        }
        __syncthreads();
    }
}

// Same semantics as ffnskip_gate_ref() (cpp/ffn-skip-ggml.h), the CPU op and
// the reference of this kernel (cpp/test-ffnskip-ops.cpp). One block: the
// tokens of the ubatch one after another; the three dot products of each
// decode token's cosine are split over the block and reduced in shared memory,
// in double as on the CPU (decisions then differ from the CPU only where the
// residuals themselves differ). Layout of state, input and policy: row r holds
// field r of every token (cpp/ffn-skip-ggml.h). The probe signal (issue 14):
// s = -(w_il . hc_r / |hc_r| + b_il) on the input of FFN il, reduced the same
// way, replaces c_last in the decision.
static __global__ void __launch_bounds__(FFNSKIP_CUDA_BLOCK, 1) ffnskip_gate_kernel(
        const float * __restrict__ in, const float * __restrict__ pol, const float * __restrict__ prev,
        const float * __restrict__ h, const float * __restrict__ o, float * __restrict__ d,
        const int n, const int L, const int il, const int tail, const int obs,
        const int h_rows, const int dim, const int64_t h_stride, const int64_t o_stride,
        const float * __restrict__ hc, const float * __restrict__ probe, const int hc_rows, const int64_t hc_stride,
        const int64_t probe_stride) {
    __shared__ double s_xy[FFNSKIP_CUDA_BLOCK];
    __shared__ double s_xx[FFNSKIP_CUDA_BLOCK];
    __shared__ double s_yy[FFNSKIP_CUDA_BLOCK];

    const int tid  = threadIdx.x;
    const int rows = FFNSKIP_STATE_ROWS(L);
    const float * mode   = in + FFNSKIP_IN_MODE * n;
    const float * outidx = in + FFNSKIP_IN_OUT_IDX * n;
#define FFNSKIP_AT(base, row, t) (base)[(int64_t) (row) * n + (t)]

    // 1. the previous state (or a fresh trace) into dst
    if (prev != nullptr) {
        for (int64_t i = tid; i < (int64_t) rows * n; i += FFNSKIP_CUDA_BLOCK) {
            d[i] = prev[i];
        }
    } else {
        for (int64_t i = tid; i < (int64_t) 2 * L * n; i += FFNSKIP_CUDA_BLOCK) {
            d[(int64_t) FFNSKIP_ROW_TRACE * n + i] = i < (int64_t) L * n ? (float) FFNSKIP_DEC_NONE : ffnskip_nan();
        }
    }
    __syncthreads();

    bool all = n > 0;
    for (int t = 0; t < n; ++t) {
        const bool is_decode = mode[t] >= 1.0f;
        float clast, budget, run, runs, sk;
        if (prev == nullptr) {
            // first gate node: the observed layer (if any) is a cold layer that ran
            clast = ffnskip_nan(); budget = pol[FFNSKIP_POL_MAX_SKIP]; run = 0.0f; runs = 0.0f; sk = 0.0f;
        } else {
            clast  = FFNSKIP_AT(prev, FFNSKIP_ROW_CLAST, t);
            budget = FFNSKIP_AT(prev, FFNSKIP_ROW_BUDGET, t);
            run    = FFNSKIP_AT(prev, FFNSKIP_ROW_RUN, t);
            runs   = FFNSKIP_AT(prev, FFNSKIP_ROW_RUNS, t);
            sk     = FFNSKIP_AT(prev, FFNSKIP_ROW_SKIP, t);
        }
        // uniform across the block: every thread reads the same values
        if (obs >= 0 && sk == 0.0f && is_decode) {
            // row of token t in h/o: all tokens, or (last layer) output tokens only
            const int r = (int) ffnskip_row_of(t, n, outidx, h_rows);
            if (r >= 0) {
                const float * x = h + r * h_stride;
                const float * y = o + r * o_stride;
                double xy = 0.0, xx = 0.0, yy = 0.0;
                for (int i = tid; i < dim; i += FFNSKIP_CUDA_BLOCK) {
                    const double a = x[i];
                    const double b = y[i];
                    xy += a * b;
                    xx += a * a;
                    yy += b * b;
                }
                s_xy[tid] = xy;
                s_xx[tid] = xx;
                s_yy[tid] = yy;
                ffnskip_block_sum(s_xy, s_xx, s_yy, tid);
                // zero or non-finite residuals give NaN: never a skip (NaN > tau is false)
                const double c = s_xy[0] / (sqrt(s_xx[0]) * sqrt(s_yy[0]));
                __syncthreads(); // s_* are reused by the next token
                clast = isfinite(c) ? (float) c : ffnskip_nan();
                if (tid == 0) {
                    FFNSKIP_AT(d, FFNSKIP_ROW_TRACE + L + obs, t) = clast;
                }
            }
        }
        // the probe signal of token t (uniform condition: the whole block
        // reduces; the CPU evaluates it only when it is needed, same result)
        // (signal 1 without a probe wired: NaN, never a skip, as on the CPU)
        float sig = clast;
        if (!tail && pol[FFNSKIP_POL_SIGNAL] == 1.0f) {
            sig = ffnskip_nan();
            const int r = hc != nullptr && mode[t] == 2.0f ? (int) ffnskip_row_of(t, n, outidx, hc_rows) : -1;
            if (r >= 0) {
                const float * x = hc + r * hc_stride;
                const float * w = probe + (int64_t) il * probe_stride;
                double xw = 0.0, xx = 0.0;
                for (int i = tid; i < dim; i += FFNSKIP_CUDA_BLOCK) {
                    const double a = x[i];
                    xw += a * (double) w[i];
                    xx += a * a;
                }
                s_xy[tid] = xw;
                s_xx[tid] = xx;
                ffnskip_block_sum(s_xy, s_xx, nullptr, tid);
                const double v = -(s_xy[0] / sqrt(s_xx[0]) + (double) w[dim]);
                __syncthreads(); // s_* are reused by the next token
                sig = isfinite(v) ? (float) v : ffnskip_nan();
            }
        }
        // the state machine: thread 0 alone (every thread stays in the loop,
        // so all of them meet the same barriers in the same order)
        if (tid == 0) {
            FFNSKIP_AT(d, FFNSKIP_ROW_CLAST, t) = clast;
            if (!tail) {
                const float thr   = pol[FFNSKIP_POL_LAYERS + il];
                const float gated = pol[FFNSKIP_POL_LAYERS + L + il];
                const float rem   = pol[FFNSKIP_POL_LAYERS + 2 * L + il];
                float dec;
                if (rem != 0.0f) {
                    dec = 2.0f; // statically removed: no FFN in the graph, run state untouched
                } else if (mode[t] != 2.0f || gated == 0.0f) {
                    dec = 0.0f; run = 0.0f;
                } else if (run != 0.0f && pol[FFNSKIP_POL_CONTINUE] != 0.0f && budget > 0.0f) {
                    dec = 1.0f; budget -= 1.0f;
                } else if (runs < pol[FFNSKIP_POL_MAX_RUNS] && budget > 0.0f && sig > thr) {
                    dec = 1.0f; run = 1.0f; runs += 1.0f; budget -= 1.0f;
                } else {
                    dec = 0.0f; run = 0.0f;
                }
                FFNSKIP_AT(d, FFNSKIP_ROW_BUDGET, t) = budget;
                FFNSKIP_AT(d, FFNSKIP_ROW_RUN, t)    = run;
                FFNSKIP_AT(d, FFNSKIP_ROW_RUNS, t)   = runs;
                FFNSKIP_AT(d, FFNSKIP_ROW_SKIP, t)   = dec;
                FFNSKIP_AT(d, FFNSKIP_ROW_KEEP, t)   = dec == 0.0f ? 1.0f : 0.0f;
                FFNSKIP_AT(d, FFNSKIP_ROW_TRACE + il, t) = is_decode ? dec : (float) FFNSKIP_DEC_NONE;
                all = all && dec != 0.0f;
            }
        }
    }
    if (tid == 0 && !tail) {
        for (int r = 0; r < n; ++r) {
            const float ft = outidx[r];
            const int t = (int) ft;
            FFNSKIP_AT(d, FFNSKIP_ROW_KEEP_OUT, r) = (ft >= 0.0f && t < n) ? FFNSKIP_AT(d, FFNSKIP_ROW_KEEP, t) : 1.0f;
            FFNSKIP_AT(d, FFNSKIP_ROW_ALL, r) = 0.0f;
        }
        if (n > 0) {
            FFNSKIP_AT(d, FFNSKIP_ROW_ALL, 0) = all ? 1.0f : 0.0f;
        }
    }
#undef FFNSKIP_AT
}

bool ffnskip_cuda_supports_gate(const ggml_tensor * op) {
    const ggml_tensor * in  = op->src[0];
    const ggml_tensor * pol = op->src[1];
    const ggml_tensor * h   = op->src[3];
    const ggml_tensor * o   = op->src[4];
    if (op->type != GGML_TYPE_F32 || !ggml_is_contiguous(op) || in == nullptr || pol == nullptr) {
        return false;
    }
    if (in->type != GGML_TYPE_F32 || !ggml_is_contiguous(in) || pol->type != GGML_TYPE_F32 || !ggml_is_contiguous(pol)) {
        return false;
    }
    if (op->src[2] != nullptr && (op->src[2]->type != GGML_TYPE_F32 || !ggml_is_contiguous(op->src[2]))) {
        return false;
    }
    for (const ggml_tensor * t : { h, o }) {
        if (t != nullptr && (t->type != GGML_TYPE_F32 || t->nb[0] != sizeof(float) || t->nb[1] % sizeof(float) != 0)) {
            return false;
        }
    }
    const ggml_tensor * hc = op->src[5];
    const ggml_tensor * pr = op->src[6];
    if ((hc == nullptr) != (pr == nullptr)) {
        return false;
    }
    if (hc != nullptr) {
        // the probe signal (issue 14)
        if (hc->type != GGML_TYPE_F32 || hc->nb[0] != sizeof(float) || hc->nb[1] % sizeof(float) != 0 ||
            hc->ne[1] > op->ne[0] || pr->type != GGML_TYPE_F32 || !ggml_is_contiguous(pr) ||
            pr->ne[0] != hc->ne[0] + 1 || pr->ne[1] != op->op_params[FFNSKIP_OPP_N_LAYER] ||
            (h != nullptr && h->ne[0] != hc->ne[0])) {
            return false;
        }
    }
    return true;
}

void ggml_cuda_op_ffnskip_gate(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * in   = dst->src[0];
    const ggml_tensor * pol  = dst->src[1];
    const ggml_tensor * prev = dst->src[2];
    const ggml_tensor * h    = dst->src[3];
    const ggml_tensor * o    = dst->src[4];
    const ggml_tensor * hc   = dst->src[5]; // probe signal (issue 14): input of FFN il, or null
    const ggml_tensor * prb  = dst->src[6]; // probe signal: F32 [d + 1, L], or null
    const int32_t il   = dst->op_params[FFNSKIP_OPP_IL];
    const int32_t tail = dst->op_params[FFNSKIP_OPP_TAIL];
    const int32_t obs  = dst->op_params[FFNSKIP_OPP_OBS];
    const int32_t L    = dst->op_params[FFNSKIP_OPP_N_LAYER];
    const int64_t n    = dst->ne[0];
    GGML_ASSERT(L > 0 && il >= 0 && il <= L && obs < L);
    GGML_ASSERT(n <= INT32_MAX);
    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst) && dst->ne[1] == FFNSKIP_STATE_ROWS(L));
    GGML_ASSERT(in->type == GGML_TYPE_F32 && ggml_is_contiguous(in) && in->ne[0] == n && in->ne[1] == FFNSKIP_INPUT_ROWS);
    GGML_ASSERT(pol->type == GGML_TYPE_F32 && ggml_is_contiguous(pol) && ggml_nelements(pol) == FFNSKIP_POL_ROWS(L));
    GGML_ASSERT(prev == nullptr || (prev->type == GGML_TYPE_F32 && ggml_is_contiguous(prev) && ggml_are_same_shape(prev, dst)));
    GGML_ASSERT(!tail || prev != nullptr);
    GGML_ASSERT((obs < 0) == (h == nullptr) && (h == nullptr) == (o == nullptr));
    if (h != nullptr) {
        GGML_ASSERT(h->type == GGML_TYPE_F32 && o->type == GGML_TYPE_F32);
        GGML_ASSERT(h->ne[0] == o->ne[0] && h->ne[1] == o->ne[1] && h->nb[0] == sizeof(float) && o->nb[0] == sizeof(float));
        GGML_ASSERT(h->ne[1] <= n && h->nb[1] % sizeof(float) == 0 && o->nb[1] % sizeof(float) == 0);
    }
    GGML_ASSERT((hc == nullptr) == (prb == nullptr));
    if (hc != nullptr) {
        GGML_ASSERT(hc->type == GGML_TYPE_F32 && hc->nb[0] == sizeof(float) && hc->nb[1] % sizeof(float) == 0);
        GGML_ASSERT(hc->ne[1] <= n);
        GGML_ASSERT(prb->type == GGML_TYPE_F32 && ggml_is_contiguous(prb) && prb->ne[0] == hc->ne[0] + 1 && prb->ne[1] == L);
        GGML_ASSERT(h == nullptr || h->ne[0] == hc->ne[0]); // one width for both reductions
    }
    ffnskip_gate_kernel<<<1, FFNSKIP_CUDA_BLOCK, 0, ctx.stream()>>>(
        (const float *) in->data, (const float *) pol->data, prev ? (const float *) prev->data : nullptr,
        h ? (const float *) h->data : nullptr, o ? (const float *) o->data : nullptr, (float *) dst->data,
        (int) n, L, il, tail, obs, h ? (int) h->ne[1] : 0, h ? (int) h->ne[0] : hc ? (int) hc->ne[0] : 0,
        h ? (int64_t) (h->nb[1] / sizeof(float)) : 0, o ? (int64_t) (o->nb[1] / sizeof(float)) : 0,
        hc ? (const float *) hc->data : nullptr, prb ? (const float *) prb->data : nullptr, hc ? (int) hc->ne[1] : 0,
        hc ? (int64_t) (hc->nb[1] / sizeof(float)) : 0, prb ? (int64_t) (prb->nb[1] / sizeof(float)) : 0);
    CUDA_CHECK(cudaGetLastError());
}

static __global__ void ffnskip_zero_if_skip_kernel(const float * __restrict__ state, float * __restrict__ dst,
                                                   const int64_t ne) {
    if (state[0] == 0.0f) {
        return;
    }
    for (int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x; i < ne; i += (int64_t) gridDim.x * blockDim.x) {
        dst[i] = 0.0f;
    }
}

void ffnskip_cuda_zero_if_skip(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    GGML_ASSERT(ffnskip_mul_mat_is_predicated(dst));
    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst));
    GGML_ASSERT(dst->src[2]->type == GGML_TYPE_F32 && dst->src[2]->nb[0] == sizeof(float));
    const int64_t ne = ggml_nelements(dst);
    const int64_t nb = std::min<int64_t>((ne + 255) / 256, 1024);
    ffnskip_zero_if_skip_kernel<<<(unsigned) std::max<int64_t>(nb, 1), 256, 0, ctx.stream()>>>(
        (const float *) dst->src[2]->data, (float *) dst->data, ne);
    CUDA_CHECK(cudaGetLastError());
}

static std::atomic<uint64_t> ffnskip_cuda_graph_n[3];

void ffnskip_cuda_count_graph(bool use_cuda_graph, bool update_required) {
    const int k = !use_cuda_graph ? 0 : (update_required ? 1 : 2);
    ffnskip_cuda_graph_n[k].fetch_add(1, std::memory_order_relaxed);
}

static void ffnskip_cuda_graph_counts(uint64_t counts[3]) {
    for (int k = 0; k < 3; ++k) {
        counts[k] = ffnskip_cuda_graph_n[k].load(std::memory_order_relaxed);
    }
}

static int32_t ffnskip_cuda_gate(void) {
    return FFNSKIP_CUDA_GATE_VERSION;
}

// Signals the gate kernel computes (bit i: enum ffnskip_signal value i):
// cosine and probe (issue 14).
static int32_t ffnskip_cuda_gate_signals(void) {
    return (1 << 0) | (1 << 1); // FFNSKIP_SIGNAL_COSINE, FFNSKIP_SIGNAL_PROBE (cpp/ffn-skip.h)
}

void * ffnskip_cuda_reg_get_proc_address(ggml_backend_reg * reg, const char * name) {
    GGML_UNUSED(reg);
    if (name == nullptr) {
        return nullptr;
    }
    if (std::strcmp(name, "ffnskip_cuda_gate") == 0) {
        return (void *) ffnskip_cuda_gate;
    }
    if (std::strcmp(name, "ffnskip_gate_signals") == 0) {
        return (void *) ffnskip_cuda_gate_signals;
    }
    if (std::strcmp(name, "ffnskip_cuda_graph_counts") == 0) {
        return (void *) ffnskip_cuda_graph_counts;
    }
    return nullptr;
}
