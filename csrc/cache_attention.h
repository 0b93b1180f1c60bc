// Softmax attention of a few query rows over a slice of a key/value cache, in one pass per
// (batch, head): for query i of batch b and head h,
//
//   s_j = scale q_i . k_j + bias[b, h, i, j - start]      (start <= j < end)
//   out_i = sum_j softmax(s)_j v_j                         (zeros when every s_j is -inf)
//
// Keys are read either row-major (features contiguous: the few-row products of
// row_products.h, blocks of keys read once for all queries) or feature-major (keys contiguous for each feature, as a cache that appends along its last
// dimension stores them: an axpy per feature), whichever the strides say. The (batch, head)
// pairs split over torch's thread pool (parallel_for). No pybind11 and no torch here: the
// bindings validate.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "causal_chunked.h"
#include "cpu_dispatch.h"
#include "parallel.h"
#include "row_products.h"

namespace attention_core {
namespace cache_attention {

template <typename T>
struct Problem {
    const T* q;  // (B, W, H, E), features contiguous
    int64_t q_b, q_w, q_h;
    const T* k;  // (B, H, C, E): element (j, e) at j * k_j + e * k_e
    int64_t k_b, k_h, k_j, k_e;
    const T* v;  // (B, H, C, M), features contiguous
    int64_t v_b, v_h, v_j;
    const T* bias;  // (B or broadcast, H, W, J), last dimension contiguous, or null
    int64_t bias_b, bias_h, bias_w;
    T* out;  // (B, W, H, M) contiguous
    int64_t B, W, H, E, M, start, end;
    T scale;
};

// Scores of the W query rows of one (batch, head) pair over the J keys, into `scores` (W x J):
// scale q . k + bias. Contiguous key rows: the few-row products of row_products.h (blocks of
// keys read once for every query, on the pre-scaled queries `qs`); otherwise per-key loops.
template <typename T, int BYTES>
inline void scores_of(const Problem<T>& p, const T* q, const T* keys, const T* bias, T* qs,
                      T* scores) {
    const int64_t W = p.W, J = p.end - p.start, E = p.E;
    if (p.k_e == 1 && (p.k_j == E || J <= 1)) {
        for (int64_t i = 0; i < W; ++i) {
            for (int64_t e = 0; e < E; ++e) qs[i * E + e] = q[i * p.q_w + e] * p.scale;
        }
        rows::Product<T> product{qs, E, W, E, keys, nullptr, bias, p.bias_w, scores, J};
        rows::Dot<T, BYTES>::columns(product, 0, J);
        return;
    }
    for (int64_t i = 0; i < W; ++i) {
        const T* __restrict qi = q + i * p.q_w;
        T* __restrict s = scores + i * J;
        if (p.k_e == 1) {  // row-major keys at another stride: a dot product per key
            for (int64_t j = 0; j < J; ++j) {
                const T* __restrict key = keys + j * p.k_j;
                T dot = T(0);
#pragma omp simd reduction(+ : dot)
                for (int64_t e = 0; e < E; ++e) dot += qi[e] * key[e];
                s[j] = dot;
            }
        } else {  // feature-major keys (k_j == 1): an axpy per feature
            for (int64_t j = 0; j < J; ++j) s[j] = T(0);
            for (int64_t e = 0; e < E; ++e) {
                const T a = qi[e];
                const T* __restrict column = keys + e * p.k_e;
                for (int64_t j = 0; j < J; ++j) s[j] += a * column[j];
            }
        }
        const T* __restrict bi = bias ? bias + i * p.bias_w : nullptr;
        for (int64_t j = 0; j < J; ++j) s[j] = s[j] * p.scale + (bi ? bi[j] : T(0));
    }
}

// softmax of one row of J scores in place; false when every score is -inf (or NaN).
template <typename T>
inline bool softmax_row(T* __restrict s, int64_t J) {
    T top = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < J; ++j) top = s[j] > top ? s[j] : top;
    if (!(top > -std::numeric_limits<T>::infinity())) return false;
    T total = T(0);
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < J; ++j) {
        // scores minus their maximum are <= 0: the branch-free exponential of the chunked
        // causal product (vectorises; -inf gives at most 1.6e-38 in float)
        const T e = causal::chunked::exp_nonpositive(std::min(s[j] - top, T(0)));
        s[j] = e;
        total += e;
    }
    const T inv = T(1) / total;
    for (int64_t j = 0; j < J; ++j) s[j] *= inv;
    return true;
}

// out (M) = sum_j weights[j] values[j], the values' rows `ld` apart: blocks of up to four
// vectors of out stay in registers while the rows stream past.
template <typename T, int BYTES>
inline void weighted_sum(const T* __restrict weights, const T* __restrict values, int64_t ld,
                         int64_t J, int64_t M, T* __restrict out) {
    using Dot = rows::Dot<T, BYTES>;
    using vec = typename Dot::vec;
    constexpr int V = Dot::V;
    int64_t m0 = 0;
    for (; m0 + 4 * V <= M; m0 += 4 * V) {
        vec acc[4] = {};
        for (int64_t j = 0; j < J; ++j) {
            const T weight = weights[j];
            for (int u = 0; u < 4; ++u) {
                vec v;
                Dot::load(v, values + j * ld + m0 + u * V);
                acc[u] += weight * v;
            }
        }
        std::memcpy(out + m0, acc, sizeof(acc));
    }
    for (; m0 + V <= M; m0 += V) {
        vec acc = {};
        for (int64_t j = 0; j < J; ++j) {
            vec v;
            Dot::load(v, values + j * ld + m0);
            acc += weights[j] * v;
        }
        std::memcpy(out + m0, &acc, sizeof(acc));
    }
    for (; m0 < M; ++m0) {
        T acc = T(0);
        for (int64_t j = 0; j < J; ++j) acc += weights[j] * values[j * ld + m0];
        out[m0] = acc;
    }
}

// Pairs [begin, end) of the flattened (batch, head) range; `scratch` holds W (J + E) elements.
template <typename T, int BYTES>
void run_items(const Problem<T>& p, int64_t begin, int64_t end, T* __restrict scratch) {
    const int64_t J = p.end - p.start, M = p.M, W = p.W;
    T* __restrict scores = scratch;
    T* __restrict qs = scratch + W * J;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / p.H, h = item % p.H;
        const T* keys = p.k + b * p.k_b + h * p.k_h + p.start * p.k_j;
        const T* values = p.v + b * p.v_b + h * p.v_h + p.start * p.v_j;
        const T* bias = p.bias ? p.bias + b * p.bias_b + h * p.bias_h : nullptr;
        scores_of<T, BYTES>(p, p.q + b * p.q_b + h * p.q_h, keys, bias, qs, scores);
        for (int64_t i = 0; i < W; ++i) {
            T* __restrict out = p.out + ((b * W + i) * p.H + h) * M;
            for (int64_t m = 0; m < M; ++m) out[m] = T(0);
            if (!softmax_row(scores + i * J, J)) continue;  // sees no key: zeros
            weighted_sum<T, BYTES>(scores + i * J, values, p.v_j, J, M, out);
        }
    }
}

template <typename T>
void run_baseline(const Problem<T>& p, int64_t begin, int64_t end, T* scratch) {
    run_items<T, 16>(p, begin, end, scratch);
}
#if ATTENTION_CORE_X86_DISPATCH
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void run_avx2(const Problem<T>& p, int64_t begin, int64_t end,
                                         T* scratch) {
    run_items<T, 16>(p, begin, end, scratch);  // see residual_step.h: 16-byte vectors
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void run_avx512(const Problem<T>& p, int64_t begin, int64_t end,
                                             T* scratch) {
    run_items<T, 64>(p, begin, end, scratch);
}
#endif

// Below this many multiply-adds per thread the pairs run on one thread.
constexpr int64_t kWorkPerThread = 32768;

template <typename T>
void cache_attention(const Problem<T>& p, int64_t threads) {
    const int64_t items = p.B * p.H;
    if (items <= 0 || p.W <= 0) return;
    void (*run)(const Problem<T>&, int64_t, int64_t, T*) = &run_baseline<T>;
#if ATTENTION_CORE_X86_DISPATCH
    const CpuLevel level = cpu_level();
    if (level == CpuLevel::avx512) run = &run_avx512<T>;
    if (level == CpuLevel::avx2) run = &run_avx2<T>;
#endif
    const int64_t J = p.end - p.start;
    const int64_t work = items * p.W * std::max<int64_t>(J, 1) * (p.E + p.M);
    const int64_t workers = std::min(threads, std::max<int64_t>(1, work / kWorkPerThread));
    parallel_for(items, workers, [&](int64_t, int64_t begin, int64_t end) {
        std::vector<T> scratch(static_cast<size_t>(p.W * (std::max<int64_t>(J, 1) + p.E)));
        run(p, begin, end, scratch.data());
    });
}

}  // namespace cache_attention
}  // namespace attention_core
