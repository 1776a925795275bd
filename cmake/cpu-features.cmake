# The instruction set a build needs (docs/PORTABLE.md): `import ffnskip_gguf`
# compares it with the running CPU before loading any library compiled for it
# (python/ffnskip_gguf/_cpucheck.py), so a wheel built with -march=native and
# copied to an older CPU raises ImportError instead of dying with SIGILL.
#
# Writes cpu-features.txt into the library folder:
#   build: native | flags | portable
#   flags: the -m flags of CMAKE_C_FLAGS and (not portable) of the CPU backend
#          (native: -march=native)
#   require: the ISA macros those flags define beyond the x86-64 baseline,
#            e.g. __AVX2__ __FMA__ (a portable build: usually none, its CPU
#            variant modules are scored at run time by ggml's cpu-feats)
# and builds libffnskip-cpucheck (cpp/ffn-skip-cpucheck.c), compiled for the
# x86-64 baseline, which answers per macro whether this CPU has it (cpuid).

set(_ffnskip_cpu_kind "flags")
if(GGML_BACKEND_DL)
    set(_ffnskip_cpu_kind "portable")
elseif(GGML_NATIVE)
    set(_ffnskip_cpu_kind "native")
endif()
set(_ffnskip_x86 FALSE)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$" AND NOT MSVC)
    set(_ffnskip_x86 TRUE)
endif()
# the -m flags every library is compiled with, then (not portable) the CPU backend's
separate_arguments(_all_flags UNIX_COMMAND "${CMAKE_C_FLAGS}")
if(NOT GGML_BACKEND_DL)
    foreach(_t IN LISTS FFNSKIP_CPU_TARGETS)
        get_target_property(_opts ${_t} COMPILE_OPTIONS)
        list(APPEND _all_flags ${_opts})
    endforeach()
endif()
set(_ffnskip_cpu_flags "")
foreach(_o IN LISTS _all_flags)
    if(_o MATCHES "^-m[a-z]")
        list(APPEND _ffnskip_cpu_flags "${_o}")
    endif()
endforeach()
set(_ffnskip_cpu_require "")
if(_ffnskip_x86)
    list(REMOVE_DUPLICATES _ffnskip_cpu_flags)
    # against the x86-64 baseline, not the compiler's default (which may be
    # x86-64-v2 or -v3 on some distributions)
    execute_process(COMMAND ${CMAKE_C_COMPILER} -march=x86-64 -dM -E -x c /dev/null
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
    if(_ffnskip_cpu_kind STREQUAL "native")
        # -march=native is the same command line on every machine: without
        # this, a rebuild in the same build folder on another CPU would keep
        # the old machine's objects under the new machine's record
        string(MD5 _isa_hash "${_ffnskip_cpu_require}")
        string(SUBSTRING "${_isa_hash}" 0 12 _isa_hash)
        foreach(_t IN LISTS FFNSKIP_CPU_TARGETS)
            target_compile_definitions(${_t} PRIVATE FFNSKIP_HOST_ISA=${_isa_hash})
        endforeach()
    endif()
endif()
string(REPLACE ";" " " _flags_s "${_ffnskip_cpu_flags}")
string(REPLACE ";" " " _req_s "${_ffnskip_cpu_require}")
file(WRITE "${CMAKE_BINARY_DIR}/cpu-features.txt"
    "# written by cmake/cpu-features.cmake; read by ffnskip_gguf/_cpucheck.py\n"
    "build: ${_ffnskip_cpu_kind}\nflags: ${_flags_s}\nrequire: ${_req_s}\n")
message(STATUS "ffnskip-gguf: CPU build ${_ffnskip_cpu_kind}; requires: ${_req_s}")
install(FILES "${CMAKE_BINARY_DIR}/cpu-features.txt" COMPONENT ffnskip DESTINATION ${FFNSKIP_LIB_DEST})

if(_ffnskip_x86)
    add_library(ffnskip-cpucheck SHARED cpp/ffn-skip-cpucheck.c)
    # the baseline ISA whatever CMAKE_C_FLAGS say: it must load on any x86-64
    target_compile_options(ffnskip-cpucheck PRIVATE -march=x86-64 -mtune=generic)
    install(TARGETS ffnskip-cpucheck COMPONENT ffnskip LIBRARY DESTINATION ${FFNSKIP_LIB_DEST})
endif()
