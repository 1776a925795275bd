/* The running CPU's instruction set, per ISA macro name (x86-64, GCC/clang).
 *
 * Built as libffnskip-cpucheck for the x86-64 baseline
 * (cmake/cpu-features.cmake) so it loads on any x86-64. ffnskip_gguf/
 * _cpucheck.py asks it, before any library compiled with -march=native is
 * loaded, whether this CPU has each macro a native build recorded in
 * cpu-features.txt (e.g. "__AVX2__").
 *
 * The bits are read with cpuid and xgetbv directly (Intel SDM vol. 2A,
 * CPUID leaves 1, 7.0, 7.1 and 0x80000001; XCR0 for the OS-saved register
 * state), not with __builtin_cpu_supports, whose accepted names differ
 * between compilers (GCC 11 lacks avx512fp16; clang before 19 rejects
 * movbe, sha, f16c, amx-*; clang 19 turns unknown names into 0). An emulator
 * (qemu-user -cpu ...) answers for the CPU it emulates. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(_WIN32)
#define FFNSKIP_CPUCHECK_API __declspec(dllexport)
#else
#define FFNSKIP_CPUCHECK_API __attribute__((visibility("default")))
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

enum { R_EAX, R_EBX, R_ECX, R_EDX };

struct ffnskip_cpu_regs {
    uint32_t l1[4], l7[4], l7s1[4], e1[4];
    uint64_t xcr0;
};

static void ffnskip_cpu_read(struct ffnskip_cpu_regs * r) {
    memset(r, 0, sizeof(*r));
    const unsigned max = __get_cpuid_max(0, NULL);
    if (max >= 1) {
        __cpuid(1, r->l1[R_EAX], r->l1[R_EBX], r->l1[R_ECX], r->l1[R_EDX]);
    }
    if (max >= 7) {
        __cpuid_count(7, 0, r->l7[R_EAX], r->l7[R_EBX], r->l7[R_ECX], r->l7[R_EDX]);
        if (r->l7[R_EAX] >= 1) {
            __cpuid_count(7, 1, r->l7s1[R_EAX], r->l7s1[R_EBX], r->l7s1[R_ECX], r->l7s1[R_EDX]);
        }
    }
    if (__get_cpuid_max(0x80000000u, NULL) >= 0x80000001u) {
        __cpuid(0x80000001u, r->e1[R_EAX], r->e1[R_EBX], r->e1[R_ECX], r->e1[R_EDX]);
    }
    /* XCR0 only when the OS enabled xgetbv (OSXSAVE, leaf 1 ECX bit 27) */
    if (r->l1[R_ECX] & (1u << 27)) {
        uint32_t lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        r->xcr0 = ((uint64_t) hi << 32) | lo;
    }
}

#define XCR0_AVX    0x6ull                /* SSE + AVX (YMM) state */
#define XCR0_AVX512 (0x6ull | 0xE0ull)    /* + opmask, ZMM_Hi256, Hi16_ZMM */
#define XCR0_AMX    (0x3ull << 17)        /* XTILECFG, XTILEDATA */

/* macro -> (register, bit, XCR0 state it also needs) */
struct ffnskip_cpu_feature {
    const char * macro;
    int leaf;          /* 1: leaf 1, 7: leaf 7.0, 71: leaf 7.1, 81: 0x80000001 */
    int reg;
    int bit;
    uint64_t xcr0;
};

static const struct ffnskip_cpu_feature ffnskip_cpu_features[] = {
    { "__SSE3__",            1, R_ECX,  0, 0 },
    { "__PCLMUL__",          1, R_ECX,  1, 0 },
    { "__SSSE3__",           1, R_ECX,  9, 0 },
    { "__FMA__",             1, R_ECX, 12, XCR0_AVX },
    { "__CX16__",            1, R_ECX, 13, 0 },
    { "__SSE4_1__",          1, R_ECX, 19, 0 },
    { "__SSE4_2__",          1, R_ECX, 20, 0 },
    { "__MOVBE__",           1, R_ECX, 22, 0 },
    { "__POPCNT__",          1, R_ECX, 23, 0 },
    { "__AES__",             1, R_ECX, 25, 0 },
    { "__XSAVE__",           1, R_ECX, 26, 0 },
    { "__AVX__",             1, R_ECX, 28, XCR0_AVX },
    { "__F16C__",            1, R_ECX, 29, XCR0_AVX },
    { "__RDRND__",           1, R_ECX, 30, 0 },
    { "__FSGSBASE__",        7, R_EBX,  0, 0 },
    { "__BMI__",             7, R_EBX,  3, 0 },
    { "__AVX2__",            7, R_EBX,  5, XCR0_AVX },
    { "__BMI2__",            7, R_EBX,  8, 0 },
    { "__AVX512F__",         7, R_EBX, 16, XCR0_AVX512 },
    { "__AVX512DQ__",        7, R_EBX, 17, XCR0_AVX512 },
    { "__RDSEED__",          7, R_EBX, 18, 0 },
    { "__ADX__",             7, R_EBX, 19, 0 },
    { "__AVX512IFMA__",      7, R_EBX, 21, XCR0_AVX512 },
    { "__CLFLUSHOPT__",      7, R_EBX, 23, 0 },
    { "__CLWB__",            7, R_EBX, 24, 0 },
    { "__AVX512CD__",        7, R_EBX, 28, XCR0_AVX512 },
    { "__SHA__",             7, R_EBX, 29, 0 },
    { "__AVX512BW__",        7, R_EBX, 30, XCR0_AVX512 },
    { "__AVX512VL__",        7, R_EBX, 31, XCR0_AVX512 },
    { "__AVX512VBMI__",      7, R_ECX,  1, XCR0_AVX512 },
    { "__AVX512VBMI2__",     7, R_ECX,  6, XCR0_AVX512 },
    { "__GFNI__",            7, R_ECX,  8, 0 },
    { "__VAES__",            7, R_ECX,  9, XCR0_AVX },
    { "__VPCLMULQDQ__",      7, R_ECX, 10, XCR0_AVX },
    { "__AVX512VNNI__",      7, R_ECX, 11, XCR0_AVX512 },
    { "__AVX512BITALG__",    7, R_ECX, 12, XCR0_AVX512 },
    { "__AVX512VPOPCNTDQ__", 7, R_ECX, 14, XCR0_AVX512 },
    { "__RDPID__",           7, R_ECX, 22, 0 },
    { "__AMX_BF16__",        7, R_EDX, 22, XCR0_AMX },
    { "__AVX512FP16__",      7, R_EDX, 23, XCR0_AVX512 },
    { "__AMX_TILE__",        7, R_EDX, 24, XCR0_AMX },
    { "__AMX_INT8__",        7, R_EDX, 25, XCR0_AMX },
    { "__AVXVNNI__",        71, R_EAX,  4, XCR0_AVX },
    { "__AVX512BF16__",     71, R_EAX,  5, XCR0_AVX512 },
    { "__LAHF_SAHF__",      81, R_ECX,  0, 0 },
    { "__ABM__",            81, R_ECX,  5, 0 },
    { "__LZCNT__",          81, R_ECX,  5, 0 },
    { "__SSE4A__",          81, R_ECX,  6, 0 },
    { "__PRFCHW__",         81, R_ECX,  8, 0 },
};
#endif

/* 1: this CPU (and OS) has the feature the macro names, 0: it lacks it,
 * -1: a macro this table does not know (not checked), -2: NULL. */
FFNSKIP_CPUCHECK_API int ffnskip_cpu_has(const char * macro) {
    if (macro == NULL) {
        return -2;
    }
#if defined(__x86_64__) || defined(__i386__)
    struct ffnskip_cpu_regs r;
    ffnskip_cpu_read(&r);
    for (size_t i = 0; i < sizeof(ffnskip_cpu_features) / sizeof(ffnskip_cpu_features[0]); ++i) {
        const struct ffnskip_cpu_feature * f = &ffnskip_cpu_features[i];
        if (strcmp(macro, f->macro) != 0) {
            continue;
        }
        const uint32_t * regs = f->leaf == 1 ? r.l1 : f->leaf == 7 ? r.l7 : f->leaf == 71 ? r.l7s1 : r.e1;
        const int has = (regs[f->reg] >> f->bit) & 1u;
        return has && (r.xcr0 & f->xcr0) == f->xcr0 ? 1 : 0;
    }
#endif
    return -1;
}
