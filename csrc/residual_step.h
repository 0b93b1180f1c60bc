// Residual sublayers of a transformer applied to a few rows (one step of a few sequences), each
// in one call: the dense products (row_products.h) with the layer norm, the activation, the
// biases and the residual add fused into their passes.
//
//   residual_feed_forward, pre-norm (norm_first):   y = x + W2 act(W1 LN(x) + b1) + b2
//                          post-norm:               y = LN(x + W2 act(W1 x + b1) + b2)
//     act: relu, gelu, or geglu (W1 x + b1 = [value, gate], act = value * gelu(gate))
//   residual_linear:       y = x + a W^T + b, then LN(y) when `norm` is set
//
// The products run on torch's BLAS where it is installed and faster (blas.h, row_products.h),
// otherwise on the own kernels with their output columns split over torch's thread pool
// (parallel_for); the row-wise passes run on the calling thread. No pybind11 and no torch
// here: the bindings validate.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_dispatch.h"
#include "parallel.h"
#include "row_products.h"

namespace attention_core {
namespace residual_step {

using rows::Activation;
using rows::Product;

template <typename T>
struct LayerNorm {
    const T* weight;  // (K,) or null
    const T* bias;    // (K,) or null
    T eps;
};

template <typename T>
struct FeedForward {
    const T* x;  // (R, D), rows `ldx` elements apart
    int64_t ldx;
    int64_t R, D, F;  // rows, model width, hidden width (value width for geglu)
    const T* W1;      // (F, D), or (2 F, D) for geglu: value rows, then gate rows
    const T* b1;      // or null
    const T* W2;      // (D, F)
    const T* b2;      // or null
    LayerNorm<T> norm;
    Activation activation;
    bool norm_first;
    T* out;  // (R, D) contiguous
};

template <typename T>
struct Linear {
    const T* x;  // residual (R, D)
    int64_t ldx;
    const T* a;  // input (R, K)
    int64_t lda;
    int64_t R, D, K;
    const T* W;  // (D, K)
    const T* b;  // or null
    bool norm;
    LayerNorm<T> layer_norm;
    T* out;  // (R, D) contiguous
};

// What a worker runs on its columns, compiled once per instruction set (cpu_dispatch.h).
template <typename T, int BYTES>
struct Workers {
    // hidden[:, c0:c1] = act(a W1[c0:c1]^T + b1[c0:c1]); with geglu the gate rows F + c of
    // W1 go through a scratch block and hidden = value * gelu(gate).
    static void hidden_columns(const FeedForward<T>& p, const T* a, int64_t lda, T* hidden,
                               int64_t c0, int64_t c1) {
        const int64_t R = p.R, D = p.D, F = p.F, width = c1 - c0;
        Product<T> value{a, lda, R, D, p.W1, p.b1, nullptr, 0, hidden, F};
        rows::Dot<T, BYTES>::columns(value, c0, c1);
        if (p.activation != Activation::geglu) {
            for (int64_t r = 0; r < R; ++r) rows::activate(hidden + r * F + c0, width, p.activation);
            return;
        }
        std::vector<T> gate(static_cast<size_t>(R * width));
        Product<T> gates{a,       lda, R, D, p.W1 + (F + c0) * D, p.b1 ? p.b1 + F + c0 : nullptr,
                         nullptr, 0,   gate.data(), width};
        rows::Dot<T, BYTES>::columns(gates, 0, width);
        for (int64_t r = 0; r < R; ++r) {
            rows::gate_values(hidden + r * F + c0, gate.data() + r * width, width);
        }
    }
    static void columns(const Product<T>& p, int64_t c0, int64_t c1) {
        rows::Dot<T, BYTES>::columns(p, c0, c1);
    }
    // After the first product through BLAS (without its bias): act(hidden + b1) in place on
    // rows [r0, r1) of F, `ld` apart; with geglu each row holds [value, gate] (ld = 2 F) and
    // value becomes value * gelu(gate).
    static void activate_rows(const FeedForward<T>& p, T* hidden, int64_t ld, int64_t r0,
                              int64_t r1) {
        const int64_t width = p.activation == Activation::geglu ? 2 * p.F : p.F;
        for (int64_t r = r0; r < r1; ++r) {
            T* __restrict row = hidden + r * ld;
            if (p.b1) {
                for (int64_t c = 0; c < width; ++c) row[c] += p.b1[c];
            }
            if (p.activation == Activation::geglu) {
                rows::gate_values(row, row + p.F, p.F);
            } else {
                rows::activate(row, p.F, p.activation);
            }
        }
    }
};

template <typename T>
struct WorkerSet {
    void (*hidden_columns)(const FeedForward<T>&, const T*, int64_t, T*, int64_t, int64_t);
    void (*columns)(const Product<T>&, int64_t, int64_t);
    void (*activate_rows)(const FeedForward<T>&, T*, int64_t, int64_t, int64_t);
};

#define ATTENTION_CORE_RESIDUAL_WORKERS(NAME, TARGET, BYTES)                                \
    template <typename T>                                                                   \
    TARGET void NAME##_hidden(const FeedForward<T>& p, const T* a, int64_t lda, T* hidden,  \
                              int64_t c0, int64_t c1) {                                     \
        Workers<T, BYTES>::hidden_columns(p, a, lda, hidden, c0, c1);                       \
    }                                                                                       \
    template <typename T>                                                                   \
    TARGET void NAME##_columns(const Product<T>& p, int64_t c0, int64_t c1) {               \
        Workers<T, BYTES>::columns(p, c0, c1);                                              \
    }                                                                                       \
    template <typename T>                                                                   \
    TARGET void NAME##_activate(const FeedForward<T>& p, T* hidden, int64_t ld, int64_t r0,  \
                                int64_t r1) {                                               \
        Workers<T, BYTES>::activate_rows(p, hidden, ld, r0, r1);                            \
    }
#define ATTENTION_CORE_NO_TARGET
ATTENTION_CORE_RESIDUAL_WORKERS(baseline, ATTENTION_CORE_NO_TARGET, 16)
#if ATTENTION_CORE_X86_DISPATCH
// AVX2 with 16-byte vectors: with 32-byte ones GCC kept the loaded weight rows on the stack
// (2.4x slower than the baseline build, measured); 16-byte ones stay in registers.
ATTENTION_CORE_RESIDUAL_WORKERS(avx2, ATTENTION_CORE_TARGET_AVX2, 16)
ATTENTION_CORE_RESIDUAL_WORKERS(avx512, ATTENTION_CORE_TARGET_AVX512, 64)
#endif
#undef ATTENTION_CORE_NO_TARGET
#undef ATTENTION_CORE_RESIDUAL_WORKERS

template <typename T>
WorkerSet<T> workers() {
#if ATTENTION_CORE_X86_DISPATCH
    const CpuLevel level = cpu_level();
    if (level == CpuLevel::avx512) {
        return {&avx512_hidden<T>, &avx512_columns<T>, &avx512_activate<T>};
    }
    if (level == CpuLevel::avx2) return {&avx2_hidden<T>, &avx2_columns<T>, &avx2_activate<T>};
#endif
    return {&baseline_hidden<T>, &baseline_columns<T>, &baseline_activate<T>};
}

// Below this many activations per thread the pass after a BLAS product runs on one thread.
constexpr int64_t kActivationsPerThread = 16384;

// Below this many multiply-adds per thread a product runs on one thread (waking the pool costs
// more than the work).
constexpr int64_t kWorkPerThread = 65536;
constexpr int64_t kColumnBlock = 4;

inline int64_t product_workers(int64_t R, int64_t N, int64_t K, int64_t threads) {
    const int64_t useful = std::max<int64_t>(1, R * N * K / kWorkPerThread);
    return std::min({threads, useful, (N + kColumnBlock - 1) / kColumnBlock});
}

// Runs fn(c0, c1) on column ranges (multiples of 4 wide) of [0, N) split over the pool.
template <typename Fn>
void split_columns(int64_t R, int64_t N, int64_t K, int64_t threads, Fn&& fn) {
    const int64_t blocks = (N + kColumnBlock - 1) / kColumnBlock;
    parallel_for(blocks, product_workers(R, N, K, threads), [&](int64_t, int64_t b0, int64_t b1) {
        fn(b0 * kColumnBlock, std::min(N, b1 * kColumnBlock));
    });
}

template <typename T>
void norm_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t R, int64_t K,
               const LayerNorm<T>& norm) {
    for (int64_t r = 0; r < R; ++r) {
        rows::layer_norm_row(dst + r * ld_dst, src + r * ld_src, K, norm.weight, norm.bias,
                             norm.eps);
    }
}

// hidden (R x F, rows `ld` apart) = act(a W1^T + b1), the first product on torch's BLAS
// (blas.h) or on the own kernels split over the pool. With geglu on BLAS the rows are
// [value, gate] (ld = 2 F) and the values become value * gelu(gate).
// (The buffer is left uninitialised: every element is written before it is read.)
template <typename T>
std::unique_ptr<T[]> hidden_rows(const FeedForward<T>& p, const WorkerSet<T>& kernels,
                                 const T* a, int64_t lda, int64_t threads, int64_t& ld) {
    const int64_t R = p.R, D = p.D, F = p.F;
    const bool geglu = p.activation == Activation::geglu;
    const int64_t first = geglu ? 2 * F : F;
    if (rows::blas_wins<T>(R, first, D, threads, {lda, first})) {
        std::unique_ptr<T[]> hidden(new T[static_cast<size_t>(R * first)]);
        // the bias is added by the activation's pass, which reads each row anyway
        rows::blas_product(
            Product<T>{a, lda, R, D, p.W1, nullptr, nullptr, 0, hidden.get(), first}, first);
        const int64_t useful = std::max<int64_t>(1, R * first / kActivationsPerThread);
        const int64_t workers = std::min(threads, useful);
        parallel_for(R, workers, [&](int64_t, int64_t r0, int64_t r1) {
            kernels.activate_rows(p, hidden.get(), first, r0, r1);
        });
        ld = first;
        return hidden;
    }
    std::unique_ptr<T[]> hidden(new T[static_cast<size_t>(R * F)]);
    // workers own hidden columns [c0, c1): with geglu both their value and their gate rows
    split_columns(R, F, geglu ? 2 * D : D, threads, [&](int64_t c0, int64_t c1) {
        kernels.hidden_columns(p, a, lda, hidden.get(), c0, c1);
    });
    ld = F;
    return hidden;
}

template <typename T>
void residual_feed_forward(const FeedForward<T>& p, int64_t threads) {
    const int64_t R = p.R, D = p.D, F = p.F;
    if (R <= 0 || D <= 0) return;
    const WorkerSet<T> kernels = workers<T>();
    // the first product's input: LN(x) (pre-norm) or x itself
    std::vector<T> normed(p.norm_first ? static_cast<size_t>(R * D) : 0);
    const T* a = p.x;
    int64_t lda = p.ldx;
    if (p.norm_first) {
        norm_rows(normed.data(), D, p.x, p.ldx, R, D, p.norm);
        a = normed.data();
        lda = D;
    }
    int64_t ld = F;
    const std::unique_ptr<T[]> hidden = hidden_rows(p, kernels, a, lda, threads, ld);
    const Product<T> second{hidden.get(), ld, R, F, p.W2, p.b2, p.x, p.ldx, p.out, D};
    if (rows::blas_wins<T>(R, D, F, threads, {ld, D})) {
        rows::blas_product(second, D);
    } else {
        split_columns(R, D, F, threads,
                      [&](int64_t c0, int64_t c1) { kernels.columns(second, c0, c1); });
    }
    if (!p.norm_first) norm_rows(p.out, D, p.out, D, R, D, p.norm);
}

template <typename T>
void residual_linear(const Linear<T>& p, int64_t threads) {
    if (p.R <= 0 || p.D <= 0) return;
    const Product<T> product{p.a, p.lda, p.R, p.K, p.W, p.b, p.x, p.ldx, p.out, p.D};
    if (rows::blas_wins<T>(p.R, p.D, p.K, threads, {p.lda, p.D})) {
        rows::blas_product(product, p.D);
    } else {
        const WorkerSet<T> kernels = workers<T>();
        split_columns(p.R, p.D, p.K, threads,
                      [&](int64_t c0, int64_t c1) { kernels.columns(product, c0, c1); });
    }
    if (p.norm) norm_rows(p.out, p.D, p.out, p.D, p.R, p.D, p.layer_norm);
}

}  // namespace residual_step
}  // namespace attention_core
