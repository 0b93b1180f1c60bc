// torch's own BLAS for the dense products of a few rows (row_products.h).
//
// The extension links no libtorch and no BLAS, yet torch's CPU library exports the BLAS it was
// built with (MKL's sgemm_/dgemm_ in the Linux x86-64 wheels: the very functions behind
// torch.mm for float32/float64 CPU tensors). attention_core/_extension.py resolves those two
// symbols from the library torch has already loaded and hands their addresses to `install`
// at import, so the products run on the same code, the same OpenMP pool (torch's libgomp)
// and the same thread count (torch.set_num_threads) as torch's own, with no new link
// dependency and nothing to find at build time. Where torch exports no such symbol (another
// build, another platform), or the symbol fails the check in `install`, the pointers stay
// null and every caller keeps its own kernel.
//
// Fortran BLAS: column-major, every argument by address. The integer arguments are held in
// 64-bit slots: on a little-endian machine an LP64 BLAS (32-bit integers, as torch's MKL) and
// an ILP64 one read the same values from them. The trailing lengths are those of the two
// character arguments (the gfortran convention; C implementations ignore them).
// No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>

namespace attention_core {
namespace blas {

template <typename T>
using Gemm = void (*)(const char* transa, const char* transb, const int* m, const int* n,
                      const int* k, const T* alpha, const T* a, const int* lda, const T* b,
                      const int* ldb, const T* beta, T* c, const int* ldc, size_t transa_len,
                      size_t transb_len);

template <typename T>
inline std::atomic<Gemm<T>>& gemm_pointer() {
    static std::atomic<Gemm<T>> pointer{nullptr};
    return pointer;
}

// The gemm in use for T, or null (no BLAS: the callers' own kernels run).
template <typename T>
inline Gemm<T> gemm_function() {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return gemm_pointer<T>().load(std::memory_order_relaxed);
#else
    return nullptr;  // the 64-bit integer slots assume little-endian
#endif
}

// Whether every size and stride fits the BLAS's 32-bit integers.
inline bool fits(std::initializer_list<int64_t> sizes) {
    for (int64_t size : sizes) {
        if (size < 0 || size > std::numeric_limits<int32_t>::max()) return false;
    }
    return true;
}

// y (R x N, rows ldy apart) = beta y + x W^T, with x (R x K, rows ldx apart) and W (N x K)
// contiguous, as nn.Linear stores it. Column-major, that is y^T = beta y^T + W^T' x^T: gemm
// ("T", "N") of W read as a K x N matrix and x^T read as K x R. Requires gemm_function<T>().
template <typename T>
inline void rows_times_transposed(const T* x, int64_t ldx, int64_t R, int64_t K, const T* W,
                                  int64_t N, T beta, T* y, int64_t ldy) {
    // leading dimensions must be at least the rows of the column-major matrices, even when
    // they are never stepped over (one row of x or y)
    const int64_t m = N, n = R, k = K, lda = std::max<int64_t>(K, 1),
                  ldb = R > 1 ? ldx : std::max<int64_t>(K, 1),
                  ldc = R > 1 ? ldy : std::max<int64_t>(N, 1);
    const T alpha = T(1);
    auto i = [](const int64_t& v) { return reinterpret_cast<const int*>(&v); };
    gemm_function<T>()("T", "N", i(m), i(n), i(k), &alpha, W, i(lda), x, i(ldb), &beta, y,
                       i(ldc), 1, 1);
}

// Sets the gemm of T to `address` (0: none) after checking it on a small product with known
// integer result (all the sums are exact); a function that gets it wrong is not used.
// Returns whether it is in use.
template <typename T>
inline bool install(std::uintptr_t address) {
    gemm_pointer<T>().store(reinterpret_cast<Gemm<T>>(address));
    if (address == 0 || gemm_function<T>() == nullptr) return false;
    // x (3 x 5, rows 6 apart), W (4 x 5): y (3 x 4, rows 5 apart), beta = 1 over y = 1
    T x[3 * 6], W[4 * 5], y[3 * 5], expected[3 * 5];
    for (int r = 0; r < 3; ++r) {
        for (int k = 0; k < 6; ++k) x[r * 6 + k] = static_cast<T>(r + 2 * k - 3);
    }
    for (int c = 0; c < 4; ++c) {
        for (int k = 0; k < 5; ++k) W[c * 5 + k] = static_cast<T>(3 * c - k + 1);
    }
    for (int r = 0; r < 3; ++r) {
        for (int c = 0; c < 5; ++c) {
            y[r * 5 + c] = T(1);
            expected[r * 5 + c] = T(1);
            if (c == 4) continue;  // outside the product: must stay 1
            for (int k = 0; k < 5; ++k) expected[r * 5 + c] += x[r * 6 + k] * W[c * 5 + k];
        }
    }
    rows_times_transposed<T>(x, 6, 3, 5, W, 4, T(1), y, 5);
    if (std::memcmp(y, expected, sizeof(y)) != 0) {
        gemm_pointer<T>().store(nullptr);
        return false;
    }
    return true;
}

}  // namespace blas
}  // namespace attention_core
