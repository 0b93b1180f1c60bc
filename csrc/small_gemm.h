// Register-blocked products of small, padded, row-major matrices that live in L1/L2: the
// GEMM-shaped leaves of the chunked causal product (causal_chunked.h).
//
//   C (m x n) [+]= A (m x k) B (k x n)
//
// m is a multiple of MR and n a multiple of NR = NV vectors of V elements: callers pad their
// buffers with zeros, so the micro-kernel has no edge cases. A tile of MR x NR outputs stays in
// MR * NV vector registers while k runs; each step loads NV vectors of a row of B and
// broadcasts MR elements of a column of A (GCC/Clang vector extensions: one source for every
// instruction set, compiled per target by the caller's `target` attribute).
//
// Band restricts the k range of a row tile to what a triangular A holds: `lower` (A zero above
// its diagonal) stops at the tile's last row, `upper` (A zero below it) starts at its first.
// No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace attention_core {
namespace gemm {

enum class Band { full, lower, upper };

template <typename T, int V, int MR_, int NV>
struct Kernel {
    static constexpr int MR = MR_;
    static constexpr int NR = V * NV;
    typedef T vec __attribute__((vector_size(V * sizeof(T))));

    // by reference: a vector return value would depend on the caller's target (ABI)
    static inline void load(vec& v, const T* p) { std::memcpy(&v, p, sizeof(vec)); }
    static inline void store(T* p, const vec& v) { std::memcpy(p, &v, sizeof(vec)); }

    // C[MR x NR] [+]= A[MR x (k0..k1)] B[(k0..k1) x NR]
    static inline void tile(const T* __restrict A, int64_t lda, const T* __restrict B,
                            int64_t ldb, T* __restrict C, int64_t ldc, int64_t k0, int64_t k1,
                            bool accumulate) {
        vec acc[MR][NV];
        for (int r = 0; r < MR; ++r) {
            for (int j = 0; j < NV; ++j) {
                if (accumulate) {
                    load(acc[r][j], C + r * ldc + j * V);
                } else {
                    acc[r][j] = vec{};
                }
            }
        }
        for (int64_t kk = k0; kk < k1; ++kk) {
            vec b[NV];
            for (int j = 0; j < NV; ++j) load(b[j], B + kk * ldb + j * V);
            for (int r = 0; r < MR; ++r) {
                const T a = A[r * lda + kk];
                for (int j = 0; j < NV; ++j) acc[r][j] += a * b[j];
            }
        }
        for (int r = 0; r < MR; ++r) {
            for (int j = 0; j < NV; ++j) store(C + r * ldc + j * V, acc[r][j]);
        }
    }

    static void product(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
                        int64_t ldb, T* C, int64_t ldc, bool accumulate, Band band) {
        for (int64_t r0 = 0; r0 < m; r0 += MR) {
            const int64_t k0 = band == Band::upper ? std::min(k, r0) : 0;
            const int64_t k1 = band == Band::lower ? std::min(k, r0 + MR) : k;
            for (int64_t j0 = 0; j0 < n; j0 += NR) {
                tile(A + r0 * lda, lda, B + j0, ldb, C + r0 * ldc + j0, ldc, k0, k1, accumulate);
            }
        }
    }

    // The square (m x m) C = A B with the entries above (lower) or below (upper) the diagonal
    // set to zero; tiles wholly on the zero side are not computed.
    static void triangle(int64_t m, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
                         T* C, int64_t ldc, Band band) {
        for (int64_t r0 = 0; r0 < m; r0 += MR) {
            for (int64_t j0 = 0; j0 < m; j0 += NR) {
                const bool zero = band == Band::lower ? j0 >= r0 + MR : j0 + NR <= r0;
                if (!zero) {
                    tile(A + r0 * lda, lda, B + j0, ldb, C + r0 * ldc + j0, ldc, 0, k, false);
                }
            }
            for (int64_t i = r0; i < r0 + MR; ++i) {
                T* row = C + i * ldc;
                if (band == Band::lower) {
                    std::fill(row + i + 1, row + m, T(0));
                } else {
                    std::fill(row, row + i, T(0));
                }
            }
        }
    }
};

}  // namespace gemm
}  // namespace attention_core
