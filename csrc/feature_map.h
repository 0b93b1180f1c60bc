// The default feature map of linear attention, phi(x) = elu(x) + 1, applied to rows inside
// the causal kernels (causal_packed.h, causal_chunked.h, linear_step.h), per instruction set.
//
//   phi(x) = x + 1 for x > 0,  exp(x) for x <= 0;  equivalently max(x, 0) + exp(min(x, 0)).
//
// Two forms of exp(x) for x <= 0, the same maths: x = n ln2 + r with n = round(x / ln2) and
// |r| <= ln2 / 2, exp(r) by Cephes' degree-7 polynomial (about 1 ulp), times 2^n.
// - `exp_nonpositive`: plain C++ without branches or library calls, so that loops over rows
//   vectorise for whatever target the caller is compiled for (baseline SSE2, AVX2); 2^n is
//   built from its exponent bits, so inputs below -87 give exp(-87) ~ 1.6e-38 instead of a
//   denormal. double: std::exp.
// - `elu_plus_one_row_avx512` (float, AVX-512F): the same polynomial with `vscalefps` for
//   the 2^n (no integer conversion and no clamp to the normal range: denormal results are
//   exact to a rounding and inputs below -104 give 0, as expf does) and with the selection
//   by max/min: about 14 vector instructions per 16 elements against about 35 (the map was
//   about a quarter of the fused layer kernel's samples with the plain form). NaN
//   propagates.
// `elu_plus_one_row<Avx512>` picks the form; the caller's dispatch (cpu_dispatch.h) sets
// Avx512 only in its AVX-512 variant. No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_dispatch.h"

#if ATTENTION_CORE_X86_DISPATCH
#include <immintrin.h>
#endif

namespace attention_core {
namespace feature_map {

template <typename T>
inline T exp_nonpositive(T x) {
    return std::exp(x);
}

template <>
inline float exp_nonpositive<float>(float x) {
    x = std::max(x, -87.0f);
    const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);  // round, x <= 0
    const float nf = static_cast<float>(n);
    float r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (n + 127) << 23;  // 2^n, n >= -126
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

// max(x, 0) + exp(min(x, 0)): no control flow, so the loops over rows vectorise; x + 1 for
// x > 0 (exp(0) = 1 exactly), 0 for -inf, NaN for NaN.
template <typename T>
inline T elu_plus_one(T x) {
    return std::max(x, T(0)) + exp_nonpositive(std::min(x, T(0)));
}

#if ATTENTION_CORE_X86_DISPATCH
#define ATTENTION_CORE_AVX512_MATH __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))

ATTENTION_CORE_AVX512_MATH inline __m512 elu_plus_one_avx512(__m512 x) {
    const __m512 zero = _mm512_setzero_ps();
    // x second: max and min return their second operand when either is NaN
    const __m512 positive = _mm512_max_ps(zero, x);
    const __m512 m = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(zero, x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(m, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), m);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_add_ps(positive, _mm512_scalef_ps(p, n));
}

ATTENTION_CORE_AVX512_MATH inline void elu_plus_one_row_avx512(float* dst, const float* src,
                                                               int64_t n) {
    int64_t f = 0;
    for (; f + 16 <= n; f += 16) {
        _mm512_storeu_ps(dst + f, elu_plus_one_avx512(_mm512_loadu_ps(src + f)));
    }
    if (f < n) {  // masked lanes are neither read nor written
        const __mmask16 lanes = static_cast<__mmask16>((1u << (n - f)) - 1u);
        _mm512_mask_storeu_ps(dst + f, lanes,
                              elu_plus_one_avx512(_mm512_maskz_loadu_ps(lanes, src + f)));
    }
}
#endif

// dst[f] = phi(src[f]) for f < n; Avx512 (set only by AVX-512 callers) selects the vscalefps
// form for float.
template <bool Avx512, typename T>
inline void elu_plus_one_row(T* __restrict dst, const T* __restrict src, int64_t n) {
#if ATTENTION_CORE_X86_DISPATCH
    if constexpr (Avx512 && std::is_same_v<T, float>) {
        elu_plus_one_row_avx512(dst, src, n);
        return;
    }
#endif
    for (int64_t f = 0; f < n; ++f) dst[f] = elu_plus_one(src[f]);
}

// phi over n contiguous elements with the variant of the CPU level in use (cpu_dispatch.h):
// the entry point of the tests, which compare every level with torch.
template <typename T>
inline void elu_plus_one_baseline(T* dst, const T* src, int64_t n) {
    elu_plus_one_row<false>(dst, src, n);
}
#if ATTENTION_CORE_X86_DISPATCH
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void elu_plus_one_avx2(T* dst, const T* src, int64_t n) {
    elu_plus_one_row<false>(dst, src, n);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void elu_plus_one_avx512(T* dst, const T* src, int64_t n) {
    elu_plus_one_row<true>(dst, src, n);
}
#endif

template <typename T>
void elu_plus_one(T* dst, const T* src, int64_t n, CpuLevel level) {
#if ATTENTION_CORE_X86_DISPATCH
    if (level == CpuLevel::avx512) return elu_plus_one_avx512(dst, src, n);
    if (level == CpuLevel::avx2) return elu_plus_one_avx2(dst, src, n);
#endif
    (void)level;
    elu_plus_one_baseline(dst, src, n);
}

}  // namespace feature_map
}  // namespace attention_core
