/* The running CPU's instruction set, per ISA macro name (x86-64, GCC/clang).
 *
 * Built as libffnskip-cpucheck for the baseline ISA (cmake/cpu-features.cmake)
 * so it loads on any x86-64. ffnskip_gguf/_cpucheck.py asks it, before any
 * library compiled with -march=native is loaded, whether this CPU has each
 * macro a native build recorded in cpu-features.txt (e.g. "__AVX2__").
 * __builtin_cpu_supports reads cpuid, and for AVX and AVX-512 also whether
 * the OS saves their registers (XCR0), so an emulator (qemu-user -cpu ...)
 * answers for the CPU it emulates. */
#include <string.h>

#if defined(_WIN32)
#define FFNSKIP_CPUCHECK_API __declspec(dllexport)
#else
#define FFNSKIP_CPUCHECK_API __attribute__((visibility("default")))
#endif

/* macro the compiler defines -> feature name of __builtin_cpu_supports (GCC 12) */
#define FFNSKIP_CPU_FEATURES(X) \
    X("__SSE3__", "sse3") X("__SSSE3__", "ssse3") X("__SSE4_1__", "sse4.1") X("__SSE4_2__", "sse4.2") \
    X("__SSE4A__", "sse4a") X("__POPCNT__", "popcnt") X("__LZCNT__", "lzcnt") X("__ABM__", "abm") \
    X("__MOVBE__", "movbe") X("__BMI__", "bmi") X("__BMI2__", "bmi2") X("__ADX__", "adx") \
    X("__AES__", "aes") X("__PCLMUL__", "pclmul") X("__SHA__", "sha") X("__RDRND__", "rdrnd") \
    X("__RDSEED__", "rdseed") X("__XSAVE__", "xsave") X("__GFNI__", "gfni") X("__VAES__", "vaes") \
    X("__VPCLMULQDQ__", "vpclmulqdq") X("__AVX__", "avx") X("__AVX2__", "avx2") X("__FMA__", "fma") \
    X("__F16C__", "f16c") X("__AVXVNNI__", "avxvnni") X("__AVX512F__", "avx512f") \
    X("__AVX512CD__", "avx512cd") X("__AVX512VL__", "avx512vl") X("__AVX512DQ__", "avx512dq") \
    X("__AVX512BW__", "avx512bw") X("__AVX512VBMI__", "avx512vbmi") X("__AVX512VBMI2__", "avx512vbmi2") \
    X("__AVX512IFMA__", "avx512ifma") X("__AVX512VNNI__", "avx512vnni") X("__AVX512BF16__", "avx512bf16") \
    X("__AVX512BITALG__", "avx512bitalg") X("__AVX512VPOPCNTDQ__", "avx512vpopcntdq") \
    X("__AVX512FP16__", "avx512fp16") X("__AMX_TILE__", "amx-tile") X("__AMX_INT8__", "amx-int8") \
    X("__AMX_BF16__", "amx-bf16")

/* 1: this CPU has the feature the macro names, 0: it lacks it,
 * -1: a macro this table does not know (not checked), -2: NULL. */
FFNSKIP_CPUCHECK_API int ffnskip_cpu_has(const char * macro) {
    if (macro == NULL) {
        return -2;
    }
    __builtin_cpu_init();
#define FFNSKIP_CPU_CHECK(m, f) if (strcmp(macro, m) == 0) { return __builtin_cpu_supports(f) ? 1 : 0; }
    FFNSKIP_CPU_FEATURES(FFNSKIP_CPU_CHECK)
#undef FFNSKIP_CPU_CHECK
    return -1;
}
