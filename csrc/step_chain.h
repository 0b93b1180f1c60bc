// A chain of step ops (residual_step.h, linear_step.h, cache_attention.h and the row ops
// below) run one after another in one call: the products, norms and attention steps of a few
// rows, where a call from Python per op costs more than the op (see attention_core.step_chain).
// The ops and their order are the caller's; nothing here knows a model. No pybind11 and no
// torch here: the bindings validate.
#pragma once

#include <cstdint>
#include <variant>
#include <vector>

#include "cache_attention.h"
#include "linear_step.h"
#include "residual_step.h"

namespace attention_core {
namespace step_chain {

// out = LN(x) over the K columns of each of R rows.
template <typename T>
struct LayerNormRows {
    const T* x;  // (R, K), rows `ldx` apart
    int64_t ldx, R, K;
    residual_step::LayerNorm<T> norm;
    T* out;  // (R, K) contiguous
};

// out = sum_i coefficients[i] x_i, in the order of the sources.
template <typename T>
struct WeightedSum {
    std::vector<const T*> x;  // each (R, K), rows ld[i] apart
    std::vector<int64_t> ld;
    int64_t R, K;
    const T* coefficients;  // (n,)
    T* out;                 // (R, K) contiguous
};

// cache[b, h, position + w, e] = x[b W + w, h E + e] for the R = B W rows of x.
template <typename T>
struct CacheWrite {
    const T* x;  // (R, H E), rows `ldx` apart
    int64_t ldx, B, W, H, E;
    T* cache;  // (B, H, C, E): element at b * c_b + h * c_h + j * c_j + e * c_e
    int64_t c_b, c_h, c_j, c_e, position;
};

template <typename T>
using Op = std::variant<residual_step::Linear<T>, residual_step::FeedForward<T>,
                        linear_step::Problem<T>, LayerNormRows<T>, WeightedSum<T>,
                        cache_attention::Problem<T>, CacheWrite<T>>;

template <typename T>
void weighted_sum(const WeightedSum<T>& p) {
    for (int64_t r = 0; r < p.R; ++r) {
        T* __restrict out = p.out + r * p.K;
        for (size_t i = 0; i < p.x.size(); ++i) {
            const T* __restrict x = p.x[i] + r * p.ld[i];
            const T c = p.coefficients[i];
            if (i == 0) {
                for (int64_t k = 0; k < p.K; ++k) out[k] = c * x[k];
            } else {
                for (int64_t k = 0; k < p.K; ++k) out[k] += c * x[k];
            }
        }
    }
}

template <typename T>
void cache_write(const CacheWrite<T>& p) {
    for (int64_t b = 0; b < p.B; ++b) {
        for (int64_t w = 0; w < p.W; ++w) {
            const T* __restrict row = p.x + (b * p.W + w) * p.ldx;
            for (int64_t h = 0; h < p.H; ++h) {
                T* __restrict dst = p.cache + b * p.c_b + h * p.c_h + (p.position + w) * p.c_j;
                const T* __restrict src = row + h * p.E;
                for (int64_t e = 0; e < p.E; ++e) dst[e * p.c_e] = src[e];
            }
        }
    }
}

// Runs the ops in order, each on torch's thread pool (`threads` threads), as the op's own call
// would; the row ops (a few rows of a few hundred columns) on the calling thread.
template <typename T>
void run(const std::vector<Op<T>>& ops, int64_t threads) {
    for (const Op<T>& op : ops) {
        if (const auto* linear = std::get_if<residual_step::Linear<T>>(&op)) {
            residual_step::residual_linear<T>(*linear, threads);
        } else if (const auto* feed_forward = std::get_if<residual_step::FeedForward<T>>(&op)) {
            residual_step::residual_feed_forward<T>(*feed_forward, threads);
        } else if (const auto* step = std::get_if<linear_step::Problem<T>>(&op)) {
            linear_step::linear_attention_step<T>(*step, threads);
        } else if (const auto* norm = std::get_if<LayerNormRows<T>>(&op)) {
            residual_step::norm_rows<T>(norm->out, norm->K, norm->x, norm->ldx, norm->R, norm->K,
                                        norm->norm);
        } else if (const auto* sum = std::get_if<WeightedSum<T>>(&op)) {
            weighted_sum<T>(*sum);
        } else if (const auto* attention = std::get_if<cache_attention::Problem<T>>(&op)) {
            cache_attention::cache_attention<T>(*attention, threads);
        } else {
            cache_write<T>(std::get<CacheWrite<T>>(op));
        }
    }
}

}  // namespace step_chain
}  // namespace attention_core
