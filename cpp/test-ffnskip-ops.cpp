// test-ffnskip-ops.cpp - backend-op check of the FFN-skip ops, in the style of
// llama.cpp's test-backend-ops: every case runs on the backend under test and
// on the CPU backend (the reference) and the results are compared.
//
//   test-ffnskip-ops <backend name, e.g. Vulkan0>
//
// Cases:
//  - GGML_OP_FFNSKIP_GATE on random inputs: first/middle/tail nodes, 1..8
//    tokens, all tokens or only output rows observed, zero vectors and
//    NaN/inf in the residual. Every state field and the trace must equal the
//    CPU's, cosines within COS_TOL (fp32 vs double partial sums), and a token
//    whose cosine is NaN never starts a run of skips. The same with the
//    probe signal (issue 14): s = -(w . hc / |hc| + b) on a second residual
//    hc (zero rows and NaN entries included) decides instead of c_last.
//  - the predicated MUL_MAT (FFN up/gate/down) for f32, f16, q4_0, q4_1,
//    q8_0, q4_K, q6_K weights at 1 and 4 tokens, alone and followed by the
//    residual ADD (fused on backends that fuse): predicate off -> the
//    backend's dense result (NMSE as test-backend-ops); predicate on -> zeros
//    (down) or exactly the addend, for every token.
// Prints the device description first (the tests check it is the device they
// meant to test) and one line per case; exit status 0 when all pass.
#include "ffn-skip-ggml.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

static const double COS_TOL = 1e-5;

struct runner {
    ggml_backend_t backend;
};

// Builds the graph with build(ctx) on backend, sets inputs with set(tensors),
// runs before() once the tensors are allocated (a sentinel in an output),
// computes and returns the output's data (and, optionally, more tensors').
template <typename Build, typename Set>
static std::vector<std::vector<float>> run_graph(ggml_backend_t backend, Build build, Set set, int n_out,
                                                 const std::function<void()> & before = nullptr) {
    ggml_init_params ip = { 64 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    std::vector<ggml_tensor *> outs;
    std::vector<ggml_tensor *> ins;
    build(ctx, ins, outs);
    GGML_ASSERT((int) outs.size() >= n_out);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    for (ggml_tensor * o : outs) {
        ggml_set_output(o);
        ggml_build_forward_expand(gf, o);
    }
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    GGML_ASSERT(buf != nullptr);
    set(ins);
    if (before) {
        before();
    }
    GGML_ASSERT(ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS);
    std::vector<std::vector<float>> res;
    for (int i = 0; i < n_out; ++i) {
        ggml_tensor * o = outs[i];
        GGML_ASSERT(o->type == GGML_TYPE_F32);
        std::vector<float> v(ggml_nelements(o));
        ggml_backend_tensor_get(o, v.data(), 0, ggml_nbytes(o));
        res.push_back(std::move(v));
    }
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return res;
}

static bool same_f(float a, float b) {
    return (std::isnan(a) && std::isnan(b)) || a == b;
}

// --- the gate op -----------------------------------------------------------

struct gate_case {
    int n, L, il, tail, obs, h_rows, d;
    bool has_prev;
    int special; // 0 random, 1 zero rows, 2 NaN entries, 3 inf entries
    bool probe;  // the probe signal decides (src[5], src[6])
};

// decisions of the probe cases, over all of them: both kinds must occur, or
// the probe cases test nothing
static int g_probe_skips = 0, g_probe_runs = 0;

static int test_gate(ggml_backend_t be, ggml_backend_t cpu, const gate_case & c, std::mt19937 & rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const int n = c.n, L = c.L, R = FFNSKIP_STATE_ROWS(L);
    std::vector<float> in((size_t) n * FFNSKIP_INPUT_ROWS), pol(FFNSKIP_POL_ROWS(L)), prev((size_t) n * R);
    for (int t = 0; t < n; ++t) {
        in[FFNSKIP_IN_MODE * n + t] = (float) (rng() % 4 == 0 ? rng() % 2 : 2); // mostly gated decode
    }
    // output rows: all tokens, or the last h_rows tokens in order
    for (int r = 0; r < n; ++r) {
        in[FFNSKIP_IN_OUT_IDX * n + r] = (float) (c.h_rows == n ? r : (r < c.h_rows ? n - c.h_rows + r : r));
    }
    pol[FFNSKIP_POL_MAX_SKIP] = (float) (rng() % 4);
    pol[FFNSKIP_POL_MAX_RUNS] = (float) (1 + rng() % 2);
    pol[FFNSKIP_POL_CONTINUE] = (float) (rng() % 2);
    const float thr_set[3] = { 0.5f, 0.9f, 0.995f };
    const float thr_probe[3] = { -0.5f, 0.0f, 0.7f }; // probe scores are ~N(0, 1) here
    pol[FFNSKIP_POL_SIGNAL] = c.probe ? 1.0f : 0.0f;
    for (int j = 0; j < L; ++j) {
        pol[FFNSKIP_POL_LAYERS + j]         = c.probe ? thr_probe[rng() % 3] : thr_set[rng() % 3];
        pol[FFNSKIP_POL_LAYERS + L + j]     = rng() % 5 == 0 ? 0.0f : 1.0f;
        pol[FFNSKIP_POL_LAYERS + 2 * L + j] = rng() % 7 == 0 ? 1.0f : 0.0f;
    }
    for (int t = 0; t < n; ++t) {
        prev[FFNSKIP_ROW_ALL * n + t]    = 0.0f;
        prev[FFNSKIP_ROW_CLAST * n + t]  = rng() % 3 == 0 ? NAN : 0.7f + 0.3f * std::fabs(u(rng));
        prev[FFNSKIP_ROW_BUDGET * n + t] = (float) (rng() % 3);
        prev[FFNSKIP_ROW_RUN * n + t]    = (float) (rng() % 2);
        prev[FFNSKIP_ROW_RUNS * n + t]   = (float) (rng() % 2);
        prev[FFNSKIP_ROW_SKIP * n + t]   = (float) (rng() % 3 == 0 ? rng() % 3 : 0);
        prev[FFNSKIP_ROW_KEEP * n + t]   = 1.0f;
        prev[FFNSKIP_ROW_KEEP_OUT * n + t] = 1.0f;
        for (int j = 0; j < L; ++j) {
            prev[(FFNSKIP_ROW_TRACE + j) * n + t]     = (float) (rng() % 3);
            prev[(FFNSKIP_ROW_TRACE + L + j) * n + t] = u(rng);
        }
    }
    // h and o: o = h + small noise, so cosines fall on both sides of the thresholds
    std::vector<float> h((size_t) c.d * std::max(c.h_rows, 1)), o(h.size());
    for (int r = 0; r < c.h_rows; ++r) {
        const float noise = r % 3 == 0 ? 0.02f : r % 3 == 1 ? 0.3f : 1.5f;
        for (int i = 0; i < c.d; ++i) {
            h[(size_t) r * c.d + i] = u(rng);
            o[(size_t) r * c.d + i] = h[(size_t) r * c.d + i] + noise * u(rng);
        }
        if (c.special == 1 && r % 2 == 0) {
            std::fill(h.begin() + (size_t) r * c.d, h.begin() + (size_t) (r + 1) * c.d, 0.0f);
        }
        if (c.special == 2) {
            h[(size_t) r * c.d + (size_t) (rng() % c.d)] = NAN;
        }
        if (c.special == 3) {
            o[(size_t) r * c.d + (size_t) (rng() % c.d)] = r % 2 ? INFINITY : -INFINITY;
        }
    }
    // the probe: hc (rows as h: all tokens, or the output tokens) and the
    // weights F32 [d + 1, L], w ~ N(0, 1) so that w . u ~ N(0, 1) for unit u
    const int hc_rows = c.obs >= 0 ? c.h_rows : n;
    std::vector<float> hc, w;
    if (c.probe) {
        std::normal_distribution<float> g(0.0f, 1.0f);
        hc.resize((size_t) c.d * hc_rows);
        for (int r = 0; r < hc_rows; ++r) {
            for (int i = 0; i < c.d; ++i) {
                hc[(size_t) r * c.d + i] = u(rng);
            }
            if (c.special == 1 && r % 2 == 1) {
                std::fill(hc.begin() + (size_t) r * c.d, hc.begin() + (size_t) (r + 1) * c.d, 0.0f);
            }
            if (c.special == 2 && r % 2 == 1) {
                hc[(size_t) r * c.d + (size_t) (rng() % c.d)] = NAN;
            }
        }
        w.resize((size_t) (c.d + 1) * L);
        for (int j = 0; j < L; ++j) {
            for (int i = 0; i < c.d; ++i) {
                w[(size_t) j * (c.d + 1) + i] = g(rng);
            }
            w[(size_t) j * (c.d + 1) + c.d] = 0.1f * g(rng);
        }
    }

    auto build = [&](ggml_context * ctx, std::vector<ggml_tensor *> & ins, std::vector<ggml_tensor *> & outs) {
        ggml_tensor * t_in   = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, FFNSKIP_INPUT_ROWS);
        ggml_tensor * t_pol  = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, FFNSKIP_POL_ROWS(L));
        ggml_tensor * t_prev = c.has_prev ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, R) : nullptr;
        ggml_tensor * t_h    = c.obs >= 0 ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.d, c.h_rows) : nullptr;
        ggml_tensor * t_o    = c.obs >= 0 ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.d, c.h_rows) : nullptr;
        ggml_tensor * t_hc   = c.probe ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.d, hc_rows) : nullptr;
        ggml_tensor * t_w    = c.probe ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.d + 1, L) : nullptr;
        ins = { t_in, t_pol, t_prev, t_h, t_o, t_hc, t_w };
        ggml_tensor * g = ggml_ffnskip_gate(ctx, t_in, t_pol, t_prev, t_h, t_o, c.il, c.tail, c.obs, L);
        if (c.probe) {
            ffnskip_gate_set_probe(g, t_hc, t_w);
        }
        outs = { g };
    };
    auto set = [&](std::vector<ggml_tensor *> & ins) {
        ggml_backend_tensor_set(ins[0], in.data(), 0, ggml_nbytes(ins[0]));
        ggml_backend_tensor_set(ins[1], pol.data(), 0, ggml_nbytes(ins[1]));
        if (ins[2]) ggml_backend_tensor_set(ins[2], prev.data(), 0, ggml_nbytes(ins[2]));
        if (ins[3]) ggml_backend_tensor_set(ins[3], h.data(), 0, ggml_nbytes(ins[3]));
        if (ins[4]) ggml_backend_tensor_set(ins[4], o.data(), 0, ggml_nbytes(ins[4]));
        if (ins[5]) ggml_backend_tensor_set(ins[5], hc.data(), 0, ggml_nbytes(ins[5]));
        if (ins[6]) ggml_backend_tensor_set(ins[6], w.data(), 0, ggml_nbytes(ins[6]));
    };
    const std::vector<float> a = run_graph(be, build, set, 1)[0];
    const std::vector<float> b = run_graph(cpu, build, set, 1)[0];

    int bad = 0;
    double max_cos_err = 0.0;
    for (int row = 0; row < R; ++row) {
        for (int t = 0; t < n; ++t) {
            const float x = a[(size_t) row * n + t], y = b[(size_t) row * n + t];
            const bool is_cos = row == FFNSKIP_ROW_CLAST || row >= FFNSKIP_ROW_TRACE + L;
            if (is_cos && !std::isnan(x) && !std::isnan(y)) {
                const double e = std::fabs((double) x - (double) y);
                max_cos_err = std::max(max_cos_err, e);
                if (e > COS_TOL) {
                    bad++;
                }
            } else if (!same_f(x, y)) {
                if (bad < 5) {
                    fprintf(stderr, "  row %d token %d: backend %g cpu %g\n", row, t, (double) x, (double) y);
                }
                bad++;
            }
        }
    }
    // a NaN cosine never starts a run of skips
    if (!c.tail && !c.probe) {
        for (int t = 0; t < n; ++t) {
            const float run_before = c.has_prev ? prev[FFNSKIP_ROW_RUN * n + t] : 0.0f;
            if (std::isnan(a[(size_t) FFNSKIP_ROW_CLAST * n + t]) && run_before == 0.0f &&
                a[(size_t) FFNSKIP_ROW_SKIP * n + t] == 1.0f) {
                fprintf(stderr, "  token %d: NaN cosine started a skip\n", t);
                bad++;
            }
        }
    }
    int n_skip = 0;
    for (int t = 0; t < n && !c.tail; ++t) {
        n_skip += a[(size_t) FFNSKIP_ROW_SKIP * n + t] == 1.0f;
        if (c.probe && in[FFNSKIP_IN_MODE * n + t] == 2.0f) {
            (a[(size_t) FFNSKIP_ROW_SKIP * n + t] == 1.0f ? g_probe_skips : g_probe_runs)++;
        }
    }
    printf("%s gate%s n=%d L=%d il=%d tail=%d obs=%d h_rows=%d d=%d prev=%d special=%d skips=%d max_cos_err=%.2e\n",
           bad ? "FAIL" : "OK", c.probe ? " probe" : "", n, L, c.il, c.tail, c.obs, c.h_rows, c.d, c.has_prev ? 1 : 0,
           c.special, n_skip, max_cos_err);
    return bad ? 1 : 0;
}

// --- the predicated matmul --------------------------------------------------

static int test_mul_mat(ggml_backend_t be, ggml_backend_t cpu, ggml_type wt, int n_tok, int magic, bool with_add,
                        bool skip, std::mt19937 & rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const int K = 256, M = 96, R = FFNSKIP_STATE_ROWS(4);
    std::vector<float> wf((size_t) K * M), x((size_t) K * n_tok), r((size_t) M * n_tok), st((size_t) n_tok * R, 0.0f);
    for (float & v : wf) v = u(rng);
    for (float & v : x) v = u(rng);
    for (float & v : r) v = u(rng);
    st[0] = skip ? 1.0f : 0.0f; // the all-skip predicate
    std::vector<uint8_t> wq(ggml_row_size(wt, K) * M);
    if (wt == GGML_TYPE_F32) {
        std::memcpy(wq.data(), wf.data(), wq.size());
    } else {
        ggml_quantize_chunk(wt, wf.data(), wq.data(), 0, M, K, nullptr);
    }

    ggml_tensor * y_node = nullptr;
    auto build = [&](ggml_context * ctx, std::vector<ggml_tensor *> & ins, std::vector<ggml_tensor *> & outs) {
        ggml_tensor * w   = ggml_new_tensor_2d(ctx, wt, K, M);
        ggml_tensor * xt  = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, n_tok);
        ggml_tensor * rt  = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, M, n_tok);
        ggml_tensor * stt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_tok, R);
        ggml_tensor * y   = ggml_mul_mat(ctx, w, xt);
        y->src[2] = stt;
        y->op_params[FFNSKIP_OP_PARAM_SLOT] = magic;
        y_node = y;
        ins = { w, xt, rt, stt };
        outs = { with_add ? ggml_add(ctx, y, rt) : y };
    };
    auto set = [&](std::vector<ggml_tensor *> & ins) {
        ggml_backend_tensor_set(ins[0], wq.data(), 0, ggml_nbytes(ins[0]));
        ggml_backend_tensor_set(ins[1], x.data(), 0, ggml_nbytes(ins[1]));
        ggml_backend_tensor_set(ins[2], r.data(), 0, ggml_nbytes(ins[2]));
        ggml_backend_tensor_set(ins[3], st.data(), 0, ggml_nbytes(ins[3]));
    };
    // a skipped no-op matmul of one token (the decode path of every backend)
    // must not store anything: a sentinel in its output survives
    const float SENTINEL = 12345.0f;
    const bool check_untouched = skip && magic == FFNSKIP_MUL_MAT_MAGIC_NOOP && !with_add && n_tok == 1;
    auto before = [&]() {
        std::vector<float> s((size_t) M * n_tok, SENTINEL);
        ggml_backend_tensor_set(y_node, s.data(), 0, s.size() * sizeof(float));
    };
    const std::vector<float> a = run_graph(be, build, set, 1, check_untouched ? std::function<void()>(before) : nullptr)[0];
    int bad = 0;
    double nmse = 0.0;
    if (skip) {
        if (magic == FFNSKIP_MUL_MAT_MAGIC) {
            // exactly zeros, or exactly the addend
            for (size_t i = 0; i < a.size(); ++i) {
                const float want = with_add ? r[i] : 0.0f;
                if (a[i] != want) {
                    bad++;
                }
            }
        } else if (check_untouched) {
            for (float v : a) {
                if (v != SENTINEL) {
                    bad++;
                }
            }
        }
        // else: a no-op matmul of several tokens may or may not store (the
        // graph masks multi-token rows); only check it ran
    } else {
        const std::vector<float> b = run_graph(cpu, build, set, 1)[0];
        double num = 0.0, den = 0.0;
        for (size_t i = 0; i < a.size(); ++i) {
            num += ((double) a[i] - b[i]) * ((double) a[i] - b[i]);
            den += (double) b[i] * b[i];
        }
        nmse = num / den;
        if (!(nmse < 5e-4)) {
            bad++;
        }
    }
    printf("%s mul_mat %s n=%d %s%s predicate=%d nmse=%.2e\n", bad ? "FAIL" : "OK", ggml_type_name(wt), n_tok,
           magic == FFNSKIP_MUL_MAT_MAGIC ? "down" : "up/gate", with_add ? "+add" : "", skip ? 1 : 0, nmse);
    return bad ? 1 : 0;
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s <backend name, e.g. Vulkan0>\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, nullptr, _IOLBF, 0); // lines survive a crash (see tests/test_vulkan.py)
    ggml_backend_load_all();
    ggml_backend_dev_t dev = ggml_backend_dev_by_name(argv[1]);
    if (dev == nullptr) {
        fprintf(stderr, "backend device %s not found\n", argv[1]);
        return 2;
    }
    printf("device: %s: %s\n", ggml_backend_dev_name(dev), ggml_backend_dev_description(dev));
    ggml_backend_t be  = ggml_backend_dev_init(dev, nullptr);
    ggml_backend_t cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    GGML_ASSERT(be != nullptr && cpu != nullptr);

    std::mt19937 rng(1234);
    int failed = 0, total = 0;
    const gate_case gates[] = {
        // n, L, il, tail, obs, h_rows, d, prev, special
        { 1, 6, 1, 0,  0, 1,  576, false, 0 },
        { 1, 6, 2, 0,  1, 1,  576, true,  0 },
        { 1, 6, 5, 1,  4, 1,  576, true,  0 },
        { 1, 6, 1, 0, -1, 0,   64, false, 0 },
        { 3, 6, 3, 0,  2, 3,  896, true,  0 },
        { 8, 6, 4, 0,  3, 8, 1000, true,  0 },
        { 8, 6, 5, 1,  4, 2,  576, true,  0 }, // last layer: output rows only
        { 5, 6, 2, 0,  1, 5,  576, true,  1 }, // zero vectors
        { 5, 6, 2, 0,  1, 5,  576, true,  2 }, // NaN in h
        { 5, 6, 3, 0,  2, 5,  576, true,  3 }, // inf in o
        { 4, 30, 7, 0, 6, 4,  576, true,  0 },
        // the probe signal (issue 14)
        { 1, 6, 2, 0,  1, 1,  576, true,  0, true },
        { 1, 6, 1, 0, -1, 0,   64, false, 0, true }, // no observed layer: hc has every token
        { 3, 6, 3, 0,  2, 3,  896, true,  0, true },
        { 8, 6, 4, 0,  3, 8, 1000, true,  0, true },
        { 8, 6, 5, 0,  4, 2,  576, true,  0, true }, // output rows only
        { 6, 6, 2, 0,  1, 6,  576, true,  1, true }, // zero rows of hc: NaN, never a skip
        { 6, 6, 3, 0,  2, 6,  576, true,  2, true }, // NaN in hc
        { 8, 30, 12, 0, 11, 8, 576, true, 0, true },
    };
    for (int rep = 0; rep < 3; ++rep) {
        for (const gate_case & c : gates) {
            failed += test_gate(be, cpu, c, rng);
            total++;
        }
    }
    printf("%s probe cases: %d gated decode tokens skipped, %d ran\n",
           g_probe_skips > 0 && g_probe_runs > 0 ? "OK" : "FAIL", g_probe_skips, g_probe_runs);
    failed += !(g_probe_skips > 0 && g_probe_runs > 0);
    total++;
    const ggml_type types[] = { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q8_0,
                                GGML_TYPE_Q4_K, GGML_TYPE_Q6_K };
    // CUDA zeroes a skipped down projection on every matmul path (cuBLAS,
    // mmq: ffnskip_cuda_mm_guard), so its multi-token skips are exact too;
    // other backends leave multi-token rows to the graph's mask
    const bool cuda = std::strncmp(ggml_backend_dev_name(dev), "CUDA", 4) == 0;
    std::vector<int> n_toks = { 1, 4 };
    if (cuda) {
        n_toks.push_back(16);
        n_toks.push_back(64);
    }
    for (ggml_type wt : types) {
        for (int n_tok : n_toks) {
            for (int magic : { FFNSKIP_MUL_MAT_MAGIC, FFNSKIP_MUL_MAT_MAGIC_NOOP }) {
                for (bool with_add : { false, true }) {
                    for (bool skip : { false, true }) {
                        failed += test_mul_mat(be, cpu, wt, n_tok, magic, with_add, skip, rng);
                        total++;
                    }
                }
            }
        }
    }
    printf("%d/%d cases passed\n", total - failed, total);
    ggml_backend_free(be);
    ggml_backend_free(cpu);
    return failed ? 1 : 0;
}
