// One step of recurrent (causal) linear attention: for every batch element n and head h,
//
//   S' = S + phi(k) v^T          (E x M)
//   Z' = Z + phi(k)              (E)
//   out = phi(q)^T S' / (phi(q) . Z' + eps)
//
// with phi(x) = elu(x) + 1 when `elu` is set (for float, exp through a polynomial within about
// 1 ulp) and phi(x) = x otherwise (queries and keys mapped by any other feature map
// beforehand). One pass over the state: each row of S is read once, updated, written to S' and
// used for the output while it is in registers (on AVX2/AVX-512, rows of whole 64-byte blocks
// are written with streaming stores). The old state is never written (callers keep
// it, e.g. for beam search). No pybind11 include: the bindings validate sizes and pointers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "causal_chunked.h"
#include "cpu_dispatch.h"
#include "parallel.h"

#if ATTENTION_CORE_X86_DISPATCH
#include <immintrin.h>
#endif

namespace attention_core {
namespace linear_step {

template <typename T>
struct Problem {
    const T* q;
    int64_t q_n, q_h;  // element strides of the n and h dimensions (features contiguous)
    const T* k;
    int64_t k_n, k_h;
    const T* v;
    int64_t v_n, v_h;
    const T* S;  // (N, H, E, M) contiguous, or null for zeros (the first step)
    const T* Z;  // (N, H, E) contiguous, or null
    T* out;      // (N, H, M) contiguous
    T* S_new;    // (N, H, E, M) contiguous
    T* Z_new;    // (N, H, E) contiguous
    int64_t N, H, E, M;
    T eps;
    bool elu;
};

// phi(x) of n contiguous elements: elu(x) + 1 (the branch-free form shared with the chunked
// causal product, so the loop vectorises) or a copy.
template <typename T>
inline void features(T* __restrict dst, const T* __restrict src, int64_t n, bool elu) {
    if (elu) {
        for (int64_t i = 0; i < n; ++i) dst[i] = causal::chunked::elu_plus_one(src[i]);
    } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
    }
}

#if ATTENTION_CORE_X86_DISPATCH
// dst[0, n) = src[0, n) with non-temporal stores (dst 64-byte aligned, n a multiple of 64
// bytes): the new state is written without first reading its cache lines from memory, where
// the weights of the layers between two steps have evicted them (measured in an 8-layer step
// of batch 10: 112-117 us against 148 us per call with one thread).
ATTENTION_CORE_TARGET_AVX512 inline void stream_row_avx512(float* dst, const float* src,
                                                           int64_t n) {
    for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
}
ATTENTION_CORE_TARGET_AVX512 inline void stream_row_avx512(double* dst, const double* src,
                                                           int64_t n) {
    for (int64_t i = 0; i < n; i += 8) _mm512_stream_pd(dst + i, _mm512_loadu_pd(src + i));
}
ATTENTION_CORE_TARGET_AVX2 inline void stream_row_avx2(float* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
}
ATTENTION_CORE_TARGET_AVX2 inline void stream_row_avx2(double* dst, const double* src,
                                                       int64_t n) {
    for (int64_t i = 0; i < n; i += 4) _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
}
#endif

// The widest state row written with streaming stores (a stack buffer holds it first).
constexpr int64_t kStreamMaxRow = 256;

// How the rows of S' are written: plainly, or through a buffer and streaming stores.
enum class Store { plain, avx2_stream, avx512_stream };

// Heads [begin, end) of the flattened (n, h) range; `phi` is scratch of 2 E elements.
template <typename T, Store store = Store::plain>
inline void run_heads(const Problem<T>& p, int64_t begin, int64_t end, T* __restrict phi) {
    const int64_t E = p.E, M = p.M;
    T* __restrict phi_q = phi;
    T* __restrict phi_k = phi + E;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / p.H, h = item % p.H;
        const T* __restrict q = p.q + n * p.q_n + h * p.q_h;
        const T* __restrict k = p.k + n * p.k_n + h * p.k_h;
        const T* __restrict v = p.v + n * p.v_n + h * p.v_h;
        const T* __restrict S = p.S ? p.S + item * E * M : nullptr;
        const T* __restrict Z = p.Z ? p.Z + item * E : nullptr;
        T* __restrict out = p.out + item * M;
        T* __restrict S_new = p.S_new + item * E * M;
        T* __restrict Z_new = p.Z_new + item * E;
        features(phi_q, q, E, p.elu);
        features(phi_k, k, E, p.elu);
        T denominator = T(0);
        for (int64_t e = 0; e < E; ++e) {
            Z_new[e] = (Z ? Z[e] : T(0)) + phi_k[e];
            denominator += phi_q[e] * Z_new[e];
        }
        for (int64_t m = 0; m < M; ++m) out[m] = T(0);
        constexpr bool stream = store != Store::plain;
        T buffer[stream ? kStreamMaxRow : 1];
        for (int64_t e = 0; e < E; ++e) {
            const T a = phi_q[e], b = phi_k[e];
            T* __restrict row = stream ? buffer : S_new + e * M;
            if (S) {
                const T* __restrict old = S + e * M;
                for (int64_t m = 0; m < M; ++m) {
                    const T s = old[m] + b * v[m];
                    row[m] = s;
                    out[m] += a * s;
                }
            } else {
                for (int64_t m = 0; m < M; ++m) {
                    const T s = b * v[m];
                    row[m] = s;
                    out[m] += a * s;
                }
            }
#if ATTENTION_CORE_X86_DISPATCH
            if constexpr (store == Store::avx512_stream) stream_row_avx512(S_new + e * M, row, M);
            if constexpr (store == Store::avx2_stream) stream_row_avx2(S_new + e * M, row, M);
#endif
        }
        const T scale = T(1) / (denominator + p.eps);
        for (int64_t m = 0; m < M; ++m) out[m] *= scale;
    }
}

template <typename T>
inline void run_baseline(const Problem<T>& p, int64_t begin, int64_t end, T* phi) {
    run_heads<T>(p, begin, end, phi);
}
#if ATTENTION_CORE_X86_DISPATCH
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void run_avx2(const Problem<T>& p, int64_t begin, int64_t end,
                                         T* phi) {
    run_heads<T>(p, begin, end, phi);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void run_avx512(const Problem<T>& p, int64_t begin, int64_t end,
                                             T* phi) {
    run_heads<T>(p, begin, end, phi);
}
// The streaming variants end with a store fence: the rows are in memory before the pool's
// barrier lets another thread read them.
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void run_avx2_streaming(const Problem<T>& p, int64_t begin,
                                                   int64_t end, T* phi) {
    run_heads<T, Store::avx2_stream>(p, begin, end, phi);
    _mm_sfence();
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void run_avx512_streaming(const Problem<T>& p, int64_t begin,
                                                       int64_t end, T* phi) {
    run_heads<T, Store::avx512_stream>(p, begin, end, phi);
    _mm_sfence();
}
#endif

// Whether the rows of S' can be streamed: 64-byte aligned rows of whole 64-byte blocks that
// fit the buffer.
template <typename T>
inline bool streamable(const Problem<T>& p) {
    return p.M * static_cast<int64_t>(sizeof(T)) % 64 == 0 && p.M <= kStreamMaxRow &&
           reinterpret_cast<std::uintptr_t>(p.S_new) % 64 == 0;
}

// Below this many state elements per thread a step runs on one thread: waking the pool costs
// more than the loop (a 12-head, 32 x 32 state of batch 10 is 122,880 elements).
constexpr int64_t kElementsPerThread = 32768;

template <typename T>
void linear_attention_step(const Problem<T>& p, int64_t threads) {
    const int64_t items = p.N * p.H;
    if (items <= 0) return;
    void (*run)(const Problem<T>&, int64_t, int64_t, T*) = &run_baseline<T>;
#if ATTENTION_CORE_X86_DISPATCH
    const CpuLevel level = cpu_level();
    const bool stream = streamable(p);
    if (level == CpuLevel::avx512) run = stream ? &run_avx512_streaming<T> : &run_avx512<T>;
    if (level == CpuLevel::avx2) run = stream ? &run_avx2_streaming<T> : &run_avx2<T>;
#endif
    const int64_t per_item = p.E * std::max<int64_t>(p.M, 1);
    const int64_t useful = std::max<int64_t>(1, items * per_item / kElementsPerThread);
    const int64_t workers = std::min(threads, useful);
    parallel_for(items, workers, [&](int64_t, int64_t begin, int64_t end) {
        std::vector<T> phi(2 * static_cast<size_t>(p.E));
        run(p, begin, end, phi.data());
    });
}

}  // namespace linear_step
}  // namespace attention_core
