// Locality-sensitive hashing with random hyperplanes (the CPU kernel behind
// attention_core.hashing.compute_hashes). Plain C++: no pybind11, no torch.
#pragma once

#include <cstdint>

namespace attention_core {

// X: (n, d) row-major, planes: (bits, d + 1) row-major where the last column is a threshold.
// hashes[i] gets bit b set when <X[i], planes[b, :d]> > planes[b, d] (fast-transformers'
// convention).
template <typename scalar_t>
void compute_hashes(const scalar_t* X, const scalar_t* planes, int64_t* hashes,
                    int64_t n, int64_t d, int64_t bits) {
    for (int64_t i = 0; i < n; ++i) {
        const scalar_t* x = X + i * d;
        int64_t h = 0;
        for (int64_t b = 0; b < bits; ++b) {
            const scalar_t* p = planes + b * (d + 1);
            scalar_t dot = 0;
            for (int64_t k = 0; k < d; ++k) dot += x[k] * p[k];
            if (dot > p[d]) h |= (int64_t{1} << b);
        }
        hashes[i] = h;
    }
}

}  // namespace attention_core
