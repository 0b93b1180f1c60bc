// Dense products of a few rows by a weight matrix, and the row-wise pieces around them (layer
// norm, activations): the building blocks of a transformer sublayer applied to one step.
//
//   y[r, c] = add[r, c] + bias[c] + sum_k x[r, k] W[c, k]     (r < R, c in [c0, c1))
//
// W is (N, K) row-major, as nn.Linear stores it, so each output is a dot product of two
// contiguous rows. With R small (one step of a few sequences) the product is bound by reading
// W: a block of 4 weight rows is read once for all R input rows, 4 (or 2) x 4 dot products at
// a time in vector registers (GCC/Clang vector extensions, compiled per target by the caller's `target`
// attribute). Where torch's BLAS is installed (blas.h) and measured faster, the whole product
// runs there instead (`blas_product`). No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "blas.h"
#include "causal_chunked.h"

namespace attention_core {
namespace rows {

// y = add + x W^T + bias on the columns a worker owns. add and bias may be null (zero).
template <typename T>
struct Product {
    const T* x;
    int64_t ldx;  // element stride between rows of x (features contiguous)
    int64_t R, K;
    const T* W;  // (N, K) contiguous
    const T* bias;
    const T* add;
    int64_t ld_add;
    T* y;
    int64_t ldy;
};

template <typename T, int BYTES>
struct Dot {
    static constexpr int V = BYTES / static_cast<int>(sizeof(T));
    typedef T vec __attribute__((vector_size(BYTES)));

    static inline void load(vec& v, const T* p) { std::memcpy(&v, p, sizeof(vec)); }
    // The sum of the lanes of v, by halving (log2 V vector adds instead of V - 1 dependent
    // scalar adds).
    static inline T sum(const vec& v) {
        if constexpr (V <= 2) {
            return V == 1 ? v[0] : v[0] + v[1];
        } else {
            typedef typename Dot<T, BYTES / 2>::vec half;
            half lo, hi;
            std::memcpy(&lo, &v, sizeof(half));
            std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(half), sizeof(half));
            return Dot<T, BYTES / 2>::sum(lo + hi);
        }
    }

    // out[r][c] = sum_k x[r, k] W[c, k] for RB rows and CB weight rows.
    template <int RB, int CB>
    static inline void block(const T* __restrict x, int64_t ldx, const T* __restrict W,
                             int64_t K, T (&out)[RB][CB]) {
        vec acc[RB][CB];
        for (int r = 0; r < RB; ++r) {
            for (int c = 0; c < CB; ++c) acc[r][c] = vec{};
        }
        int64_t k = 0;
        for (; k + V <= K; k += V) {
            vec w[CB];
            for (int c = 0; c < CB; ++c) {
                load(w[c], W + c * K + k);
                // the next block's weight rows (read from memory while this block computes)
                __builtin_prefetch(W + (CB + c) * K + k);
            }
            for (int r = 0; r < RB; ++r) {
                vec a;
                load(a, x + r * ldx + k);
                for (int c = 0; c < CB; ++c) acc[r][c] += a * w[c];
            }
        }
        for (int r = 0; r < RB; ++r) {
            for (int c = 0; c < CB; ++c) {
                T s = sum(acc[r][c]);
                for (int64_t kk = k; kk < K; ++kk) s += x[r * ldx + kk] * W[c * K + kk];
                out[r][c] = s;
            }
        }
    }

    template <int RB, int CB>
    static inline void store(const Product<T>& p, int64_t r0, int64_t c0) {
        T out[RB][CB];
        block<RB, CB>(p.x + r0 * p.ldx, p.ldx, p.W + c0 * p.K, p.K, out);
        for (int r = 0; r < RB; ++r) {
            T* y = p.y + (r0 + r) * p.ldy + c0;
            const T* add = p.add ? p.add + (r0 + r) * p.ld_add + c0 : nullptr;
            for (int c = 0; c < CB; ++c) {
                T v = out[r][c];
                if (p.bias) v += p.bias[c0 + c];
                if (add) v += add[c];
                y[c] = v;
            }
        }
    }

    // Rows per block: 4 x 4 accumulators fill 16 of AVX-512's 32 registers; with 16
    // registers (AVX2, SSE) 2 x 4 leave room for the loaded rows.
    static constexpr int RB = BYTES >= 64 ? 4 : 2;

    template <int CB>
    static inline void column_block(const Product<T>& p, int64_t c0) {
        int64_t r0 = 0;
        for (; r0 + RB <= p.R; r0 += RB) store<RB, CB>(p, r0, c0);
        switch (p.R - r0) {
            case 3: store<3, CB>(p, r0, c0); break;
            case 2: store<2, CB>(p, r0, c0); break;
            case 1: store<1, CB>(p, r0, c0); break;
            default: break;
        }
    }

    // Columns [c0, c1): blocks of 4 weight rows, each read once for every row of x.
    static void columns(const Product<T>& p, int64_t c0, int64_t c1) {
        int64_t c = c0;
        for (; c + 4 <= c1; c += 4) column_block<4>(p, c);
        for (; c < c1; ++c) column_block<1>(p, c);
    }
};

// The fewest rows at which torch's BLAS (MKL) beat `Dot::columns` on the pool, measured with
// float32 products of 384 x 1536 and 1536 x 384 weights on an AVX-512 Xeon: with 1 thread the
// two were even at 16-20 rows, MKL 1.1x faster at 24 and 1.35x at 48, the own kernel up to
// 1.6x faster below 16; with 2 threads even at 32-48 rows, MKL 1.2x faster at 48 (and in the
// 8-layer step of batch 10 the own kernels were faster with either thread count).
constexpr int64_t kBlasMinRowsOneThread = 20;
constexpr int64_t kBlasMinRowsThreaded = 40;

// The row count from which products run on BLAS when set by `set_blas_min_rows` (-1: the
// measured thresholds above); benchmarks and tests use it to run either path at any size.
inline std::atomic<int64_t>& blas_min_rows_override() {
    static std::atomic<int64_t> rows{-1};
    return rows;
}

// Whether torch's BLAS (blas.h) computes an R x N x K product faster than `Dot::columns` on
// `threads` threads of the pool. `lds`: the strides of the rows of x, y (and add), which must
// fit BLAS integers too.
template <typename T>
inline bool blas_wins(int64_t R, int64_t N, int64_t K, int64_t threads,
                      std::initializer_list<int64_t> lds) {
    const int64_t wanted = blas_min_rows_override().load(std::memory_order_relaxed);
    const int64_t min_rows = wanted >= 0      ? wanted
                             : threads > 1 ? kBlasMinRowsThreaded
                                           : kBlasMinRowsOneThread;
    return R >= min_rows && blas::gemm_function<T>() != nullptr && blas::fits({R, N, K}) &&
           blas::fits(lds);
}

// The whole product p over the columns [0, N) through torch's BLAS: y = add + bias first
// (when either is set), then y += x W^T. Requires the sizes and strides that
// `blas_wins` checks.
template <typename T>
inline void blas_product(const Product<T>& p, int64_t N) {
    const bool accumulate = p.add != nullptr || p.bias != nullptr;
    if (accumulate) {
        for (int64_t r = 0; r < p.R; ++r) {
            T* __restrict y = p.y + r * p.ldy;
            const T* add = p.add ? p.add + r * p.ld_add : nullptr;
            for (int64_t c = 0; c < N; ++c) {
                y[c] = (add ? add[c] : T(0)) + (p.bias ? p.bias[c] : T(0));
            }
        }
    }
    blas::rows_times_transposed<T>(p.x, p.ldx, p.R, p.K, p.W, N, accumulate ? T(1) : T(0), p.y,
                                   p.ldy);
}

// Layer norm of one row of K elements: (x - mean) / sqrt(var + eps) * weight + bias, with the
// biased variance (as torch.nn.LayerNorm); weight and bias may be null (no affine part).
template <typename T>
inline void layer_norm_row(T* __restrict dst, const T* __restrict src, int64_t K,
                           const T* weight, const T* bias, T eps) {
    T mean = T(0);
    for (int64_t k = 0; k < K; ++k) mean += src[k];
    mean /= static_cast<T>(K);
    T var = T(0);
    for (int64_t k = 0; k < K; ++k) {
        const T d = src[k] - mean;
        var += d * d;
    }
    var /= static_cast<T>(K);
    const T inv = T(1) / std::sqrt(var + eps);
    for (int64_t k = 0; k < K; ++k) {
        T v = (src[k] - mean) * inv;
        if (weight) v *= weight[k];
        if (bias) v += bias[k];
        dst[k] = v;
    }
}

// gelu(x) = x / 2 (1 + erf(x / sqrt 2)), the exact (erf) form, torch's default. double:
// std::erf. float: erf from Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7, under
// float32's resolution near 1), written without branches or library calls so that the loops
// over it vectorise (std::erf per element cost more than the products around it).
template <typename T>
inline T gelu(T x) {
    return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
}

template <>
inline float gelu<float>(float x) {
    const float s = x * 0.70710678118654752440f;
    const float a = std::fabs(s);
    const float t = 1.0f / (1.0f + 0.3275911f * a);
    const float poly =
        t * (0.254829592f +
             t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    const float erf_abs = 1.0f - poly * causal::chunked::exp_nonpositive(-a * a);
    return 0.5f * x * (1.0f + std::copysign(erf_abs, s));
}

enum class Activation : int { relu = 0, gelu = 1, geglu = 2 };

// hidden[i] = act(hidden[i]) for relu and gelu, over n contiguous elements.
template <typename T>
inline void activate(T* __restrict hidden, int64_t n, Activation activation) {
    if (activation == Activation::relu) {
        for (int64_t i = 0; i < n; ++i) hidden[i] = hidden[i] > T(0) ? hidden[i] : T(0);
    } else {
        for (int64_t i = 0; i < n; ++i) hidden[i] = gelu(hidden[i]);
    }
}

// value[i] *= gelu(gate[i]) over n contiguous elements (GEGLU).
template <typename T>
inline void gate_values(T* __restrict value, const T* __restrict gate, int64_t n) {
    for (int64_t i = 0; i < n; ++i) value[i] *= gelu(gate[i]);
}

}  // namespace rows
}  // namespace attention_core
