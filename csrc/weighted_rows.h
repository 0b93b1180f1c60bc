// y = sum_t w_t x_t over a few rows x_t of F features: the gather leaf of the local and
// sparse products (local_product.h, sparse_product.h).
//
// The sum is kept in registers: the features are cut into tiles of W (a compile-time width,
// so GCC/Clang vectorise the w-loops), and each tile runs over all the rows with two
// independent accumulators (even and odd t) to hide the latency of the fused multiply-adds;
// y is written once. Which rows and weights take part is the caller's `Rows`:
//   int64_t count() const;      the number of terms
//   T weight(int64_t t) const;  w_t
//   const T* row(int64_t t) const;  x_t (F contiguous features)
// No pybind11 and no torch here.
#pragma once

#include <cstdint>

namespace attention_core {

template <typename T, int W, class Rows>
inline void weighted_rows(T* __restrict y, int64_t F, const Rows& rows) {
    const int64_t n = rows.count();
    int64_t f0 = 0;
    for (; f0 + W <= F; f0 += W) {
        T even[W] = {};
        T odd[W] = {};
        int64_t t = 0;
        for (; t + 2 <= n; t += 2) {
            const T a = rows.weight(t);
            const T b = rows.weight(t + 1);
            const T* __restrict x = rows.row(t) + f0;
            const T* __restrict z = rows.row(t + 1) + f0;
            for (int w = 0; w < W; ++w) even[w] += a * x[w];
            for (int w = 0; w < W; ++w) odd[w] += b * z[w];
        }
        if (t < n) {
            const T a = rows.weight(t);
            const T* __restrict x = rows.row(t) + f0;
            for (int w = 0; w < W; ++w) even[w] += a * x[w];
        }
        for (int w = 0; w < W; ++w) y[f0 + w] = even[w] + odd[w];
    }
    if (f0 == F) return;
    const int64_t width = F - f0;  // the last, narrower tile
    T acc[W] = {};
    for (int64_t t = 0; t < n; ++t) {
        const T a = rows.weight(t);
        const T* __restrict x = rows.row(t) + f0;
        for (int64_t w = 0; w < width; ++w) acc[w] += a * x[w];
    }
    for (int64_t w = 0; w < width; ++w) y[f0 + w] = acc[w];
}

}  // namespace attention_core
