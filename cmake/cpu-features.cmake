# The instruction set a build needs (docs/PORTABLE.md): `import ffnskip_gguf`
# compares it with the running CPU before loading any library compiled for it
# (python/ffnskip_gguf/_cpucheck.py), so a wheel built with -march=native and
# copied to an older CPU raises ImportError instead of dying with SIGILL.
#
# Writes cpu-features.txt into the library folder:
#   build: native | flags | portable
#   flags: the CPU backend's -m flags (native: -march=native)
#   require: the ISA macros those flags define beyond the compiler's default,
#            e.g. __AVX2__ __FMA__ (empty for a portable build: each CPU
#            variant module is scored at run time by ggml's cpu-feats)
# and builds libffnskip-cpucheck (cpp/ffn-skip-cpucheck.c), compiled for the
# baseline ISA, which answers per macro whether this CPU has it (cpuid).

set(_ffnskip_cpu_kind "flags")
set(_ffnskip_cpu_flags "")
set(_ffnskip_cpu_require "")
if(GGML_BACKEND_DL)
    set(_ffnskip_cpu_kind "portable")
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|i[3-6]86)$" AND NOT MSVC)
    if(GGML_NATIVE)
        set(_ffnskip_cpu_kind "native")
    endif()
    foreach(_t IN LISTS FFNSKIP_CPU_TARGETS)
        get_target_property(_opts ${_t} COMPILE_OPTIONS)
        foreach(_o IN LISTS _opts)
            if(_o MATCHES "^-m[a-z]")
                list(APPEND _ffnskip_cpu_flags "${_o}")
            endif()
        endforeach()
    endforeach()
    list(REMOVE_DUPLICATES _ffnskip_cpu_flags)
    execute_process(COMMAND ${CMAKE_C_COMPILER} -dM -E -x c /dev/null
        OUTPUT_VARIABLE _base RESULT_VARIABLE _rc1 ERROR_QUIET)
    execute_process(COMMAND ${CMAKE_C_COMPILER} ${_ffnskip_cpu_flags} -dM -E -x c /dev/null
        OUTPUT_VARIABLE _with RESULT_VARIABLE _rc2 ERROR_QUIET)
    if(NOT _rc1 EQUAL 0 OR NOT _rc2 EQUAL 0)
        message(FATAL_ERROR "ffnskip-gguf: could not list the ISA macros of ${CMAKE_C_COMPILER} ${_ffnskip_cpu_flags}")
    endif()
    string(REGEX MATCHALL "#define __[A-Z0-9_]+__ 1" _base_m "${_base}")
    string(REGEX MATCHALL "#define __[A-Z0-9_]+__ 1" _with_m "${_with}")
    foreach(_m IN LISTS _with_m)
        if(NOT _m IN_LIST _base_m)
            string(REGEX REPLACE "#define (__[A-Z0-9_]+__) 1" "\\1" _name "${_m}")
            list(APPEND _ffnskip_cpu_require "${_name}")
        endif()
    endforeach()
    list(SORT _ffnskip_cpu_require)
endif()
string(REPLACE ";" " " _flags_s "${_ffnskip_cpu_flags}")
string(REPLACE ";" " " _req_s "${_ffnskip_cpu_require}")
file(WRITE "${CMAKE_BINARY_DIR}/cpu-features.txt"
    "# written by cmake/cpu-features.cmake; read by ffnskip_gguf/_cpucheck.py\n"
    "build: ${_ffnskip_cpu_kind}\nflags: ${_flags_s}\nrequire: ${_req_s}\n")
message(STATUS "ffnskip-gguf: CPU build ${_ffnskip_cpu_kind}; requires: ${_req_s}")
install(FILES "${CMAKE_BINARY_DIR}/cpu-features.txt" COMPONENT ffnskip DESTINATION ${FFNSKIP_LIB_DEST})

if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$" AND NOT MSVC)
    add_library(ffnskip-cpucheck SHARED cpp/ffn-skip-cpucheck.c)
    # the baseline ISA whatever CMAKE_C_FLAGS say: it must load on any x86-64
    target_compile_options(ffnskip-cpucheck PRIVATE -march=x86-64 -mtune=generic)
    install(TARGETS ffnskip-cpucheck COMPONENT ffnskip LIBRARY DESTINATION ${FFNSKIP_LIB_DEST})
endif()
