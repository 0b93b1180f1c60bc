// Run-time choice of instruction set for the CPU kernels, without -march=native.
//
// A kernel is written once as plain C++ (contiguous arrays, __restrict pointers, loops of a
// compile-time width that GCC and Clang vectorise on their own). Each entry point is then
// compiled several times with a different `target` attribute, and `cpu_level()` picks the
// best one the running CPU supports. The wheel therefore runs on baseline x86-64, uses AVX2/FMA
// or AVX-512 where present, and compiles unchanged on other architectures (one generic build).
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ATTENTION_CORE_X86_DISPATCH 1
// `flatten` inlines every call of the entry point into it, so the whole kernel is compiled for
// the entry point's target, not only its first level.
#define ATTENTION_CORE_TARGET_AVX512                                                   \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"), \
                   flatten))
#define ATTENTION_CORE_TARGET_AVX2 __attribute__((target("avx2,fma"), flatten))
#else
#define ATTENTION_CORE_X86_DISPATCH 0
#endif

#include <algorithm>

namespace attention_core {

enum class CpuLevel : int { baseline = 0, avx2 = 1, avx512 = 2 };

// What the CPU (and operating system) can run.
inline CpuLevel supported_cpu_level() {
#if ATTENTION_CORE_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
        return CpuLevel::avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuLevel::avx2;
#endif
    return CpuLevel::baseline;
}

// The fastest level for the kernels. AVX-512 is skipped on AMD CPUs: Zen 4 executes 512-bit
// operations in two halves, and the AVX-512 kernels measured 5-10% slower than the AVX2 ones
// there (set_cpu_level(2) still selects them).
inline CpuLevel detected_cpu_level() {
    const CpuLevel supported = supported_cpu_level();
#if ATTENTION_CORE_X86_DISPATCH
    if (supported == CpuLevel::avx512 && __builtin_cpu_is("amd")) return CpuLevel::avx2;
#endif
    return supported;
}

// The level requested with `set_cpu_level` (-1: automatic); tests and benchmarks use it to run
// every variant.
inline int& cpu_level_override() {
    static int level = -1;
    return level;
}

// The level the kernels use: the detected one, or the requested one clamped to what the CPU
// supports.
inline CpuLevel cpu_level() {
    static const CpuLevel detected = detected_cpu_level();
    static const CpuLevel supported = supported_cpu_level();
    const int wanted = cpu_level_override();
    if (wanted < 0) return detected;
    return static_cast<CpuLevel>(std::min(wanted, static_cast<int>(supported)));
}

}  // namespace attention_core
