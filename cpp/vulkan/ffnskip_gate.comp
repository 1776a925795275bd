#version 450

// ffnskip_gate.comp - GGML_OP_FFNSKIP_GATE on Vulkan (ffnskip-gguf).
// Same semantics as ffnskip_gate_ref() in cpp/ffn-skip-ggml.h, which is the
// CPU implementation and the reference of this kernel (cpp/test-ffnskip-ops.cpp).
// One workgroup: the tokens of the ubatch one after another; the three dot
// products of each decode token's cosine are split over the workgroup and
// reduced in shared memory (fp32 partial sums; the CPU sums in double).
// Layout of the state (row r = field r of every token): cpp/ffn-skip-ggml.h.
// The probe signal (issue 14): s = -(w_il . hc_r / |hc_r| + b_il) on the
// input of FFN il, reduced the same way, replaces c_last in the decision.

#extension GL_EXT_control_flow_attributes : enable

layout(local_size_x = 256, local_size_y = 1, local_size_z = 1) in;

layout (binding = 0) readonly buffer IN   {float data_in[];};
layout (binding = 1) readonly buffer POL  {float data_pol[];};
layout (binding = 2) readonly buffer PREV {float data_prev[];};
layout (binding = 3) readonly buffer H    {float data_h[];};
layout (binding = 4) readonly buffer O    {float data_o[];};
layout (binding = 5) buffer D             {float data_d[];};
layout (binding = 6) readonly buffer HC   {float data_hc[];};
layout (binding = 7) readonly buffer PRB  {float data_probe[];};

layout (push_constant) uniform parameter {
    uint n;
    uint L;
    uint il;
    uint tail;
    int  obs;
    uint h_rows;
    uint d;
    uint h_stride;
    uint o_stride;
    uint has_prev;
    uint hc_rows;      // probe: rows of hc (all tokens, or the output tokens)
    uint hc_stride;    // probe: row stride of hc, in floats
    uint probe_stride; // probe: row stride of the weights (one row per layer), in floats
    uint has_probe;
} p;

// rows of the state, input and policy (cpp/ffn-skip-ggml.h)
#define ROW_ALL      0u
#define ROW_CLAST    1u
#define ROW_BUDGET   2u
#define ROW_RUN      3u
#define ROW_RUNS     4u
#define ROW_SKIP     5u
#define ROW_KEEP     6u
#define ROW_KEEP_OUT 7u
#define ROW_TRACE    8u
#define IN_MODE      0u
#define IN_OUT_IDX   1u
#define POL_MAX_SKIP 0u
#define POL_MAX_RUNS 1u
#define POL_CONTINUE 2u
#define POL_SIGNAL   3u
#define POL_LAYERS   4u
#define DEC_NONE     255.0

#define WG 256u

shared float s_xy[WG];
shared float s_xx[WG];
shared float s_yy[WG];

// finite by its bits: robust whatever the driver's float controls
bool finite_f(float x) {
    return (floatBitsToUint(x) & 0x7f800000u) != 0x7f800000u;
}

float nan_f() {
    return uintBitsToFloat(0x7fc00000u);
}

// the row of token t in a tensor holding rows_of_x rows: every token (row t)
// or the output tokens only (the q-th output index); -1 when t has no row.
// Same rule as ffnskip_row_of() in cpp/ffn-skip-ggml.h.
int row_of(uint t, uint rows_of_x, uint n) {
    if (rows_of_x == n) {
        return int(t);
    }
    for (uint q = 0u; q < rows_of_x; ++q) {
        if (uint(data_in[IN_OUT_IDX * n + q]) == t) {
            return int(q);
        }
    }
    return -1;
}

// the workgroup's sums of three per-thread partial sums (fp32, tree order);
// called in uniform control flow only (it holds barriers); s_* are free again
// when it returns
void block_sum3(uint tid, inout float a, inout float b, inout float c) {
    s_xy[tid] = a;
    s_xx[tid] = b;
    s_yy[tid] = c;
    barrier();
    [[unroll]] for (uint s = WG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) {
            s_xy[tid] += s_xy[tid + s];
            s_xx[tid] += s_xx[tid + s];
            s_yy[tid] += s_yy[tid + s];
        }
        barrier();
    }
    a = s_xy[0];
    b = s_xx[0];
    c = s_yy[0];
    barrier(); // s_* are reused by the next reduction
}

void main() {
    const uint tid  = gl_LocalInvocationID.x;
    const uint n    = p.n;
    const uint L    = p.L;
    const uint rows = ROW_TRACE + 2u * L;

    // 1. the previous state (or a fresh trace) into dst
    if (p.has_prev != 0u) {
        for (uint i = tid; i < rows * n; i += WG) {
            data_d[i] = data_prev[i];
        }
    } else {
        for (uint i = tid; i < 2u * L * n; i += WG) {
            data_d[ROW_TRACE * n + i] = i < L * n ? DEC_NONE : nan_f();
        }
    }
    memoryBarrierBuffer();
    barrier();

    bool all = n > 0u;
    for (uint t = 0u; t < n; ++t) {
        const float mode = data_in[IN_MODE * n + t];
        const bool is_decode = mode >= 1.0;
        float clast, budget, run, runs, sk;
        if (p.has_prev == 0u) {
            clast = nan_f(); budget = data_pol[POL_MAX_SKIP]; run = 0.0; runs = 0.0; sk = 0.0;
        } else {
            clast  = data_prev[ROW_CLAST  * n + t];
            budget = data_prev[ROW_BUDGET * n + t];
            run    = data_prev[ROW_RUN    * n + t];
            runs   = data_prev[ROW_RUNS   * n + t];
            sk     = data_prev[ROW_SKIP   * n + t];
        }
        // uniform across the workgroup: every thread reads the same values
        if (p.obs >= 0 && sk == 0.0 && is_decode) {
            const int r = row_of(t, p.h_rows, n);
            if (r >= 0) {
                float xy = 0.0, xx = 0.0, yy = 0.0;
                const uint hb = uint(r) * p.h_stride;
                const uint ob = uint(r) * p.o_stride;
                for (uint i = tid; i < p.d; i += WG) {
                    const float x = data_h[hb + i];
                    const float y = data_o[ob + i];
                    xy += x * y;
                    xx += x * x;
                    yy += y * y;
                }
                block_sum3(tid, xy, xx, yy);
                // zero or non-finite residuals give NaN: never a skip
                const bool ok = finite_f(xy) && finite_f(xx) && finite_f(yy) && xx > 0.0 && yy > 0.0;
                float c = ok ? xy / (sqrt(xx) * sqrt(yy)) : nan_f();
                if (!finite_f(c)) {
                    c = nan_f();
                }
                clast = c;
                if (tid == 0u) {
                    data_d[(ROW_TRACE + L + uint(p.obs)) * n + t] = c;
                }
            }
        }
        // the probe signal of token t (uniform condition: the whole workgroup
        // reduces; the CPU evaluates it only when it is needed, same result)
        // (signal 1 without a probe wired: NaN, never a skip, as on the CPU)
        float sig = clast;
        if (p.tail == 0u && data_pol[POL_SIGNAL] == 1.0) {
            sig = nan_f();
            const int r = (p.has_probe != 0u && mode == 2.0) ? row_of(t, p.hc_rows, n) : -1;
            if (r >= 0) {
                float xw = 0.0, xx = 0.0;
                const uint xb = uint(r) * p.hc_stride;
                const uint wb = p.il * p.probe_stride;
                for (uint i = tid; i < p.d; i += WG) {
                    const float x = data_hc[xb + i];
                    xw += x * data_probe[wb + i];
                    xx += x * x;
                }
                float unused = 0.0;
                block_sum3(tid, xw, xx, unused);
                // zero or non-finite rows give NaN: never a skip (guarded, not
                // left to the driver's division by zero)
                const bool ok = finite_f(xw) && finite_f(xx) && xx > 0.0;
                const float v = ok ? -(xw / sqrt(xx) + data_probe[wb + p.d]) : nan_f();
                sig = finite_f(v) ? v : nan_f();
            }
        }
        // the state machine: thread 0 alone (every thread stays in the loop,
        // so all of them meet the same barriers in the same order)
        if (tid == 0u) {
            data_d[ROW_CLAST * n + t] = clast;
            if (p.tail == 0u) {
                const float thr   = data_pol[POL_LAYERS + p.il];
                const float gated = data_pol[POL_LAYERS + L + p.il];
                const float rem   = data_pol[POL_LAYERS + 2u * L + p.il];
                float dec;
                if (rem != 0.0) {
                    dec = 2.0;
                } else if (mode != 2.0 || gated == 0.0) {
                    dec = 0.0; run = 0.0;
                } else if (run != 0.0 && data_pol[POL_CONTINUE] != 0.0 && budget > 0.0) {
                    dec = 1.0; budget -= 1.0;
                } else if (runs < data_pol[POL_MAX_RUNS] && budget > 0.0 && finite_f(sig) && sig > thr) {
                    dec = 1.0; run = 1.0; runs += 1.0; budget -= 1.0;
                } else {
                    dec = 0.0; run = 0.0;
                }
                data_d[ROW_BUDGET * n + t] = budget;
                data_d[ROW_RUN    * n + t] = run;
                data_d[ROW_RUNS   * n + t] = runs;
                data_d[ROW_SKIP   * n + t] = dec;
                data_d[ROW_KEEP   * n + t] = dec == 0.0 ? 1.0 : 0.0;
                data_d[(ROW_TRACE + p.il) * n + t] = is_decode ? dec : DEC_NONE;
                all = all && dec != 0.0;
            }
        }
    }
    if (tid == 0u && p.tail == 0u) {
        for (uint r = 0u; r < n; ++r) {
            const float ft = data_in[IN_OUT_IDX * n + r];
            const uint t = uint(ft);
            data_d[ROW_KEEP_OUT * n + r] = (ft >= 0.0 && t < n) ? data_d[ROW_KEEP * n + t] : 1.0;
            data_d[ROW_ALL * n + r] = 0.0;
        }
        if (n > 0u) {
            data_d[ROW_ALL * n] = all ? 1.0 : 0.0;
        }
    }
}
