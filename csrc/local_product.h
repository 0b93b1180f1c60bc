// Banded (local) dot products and weighted averages, the core of local attention (Parmar et
// al. 2018, "Image Transformer", arXiv 1802.05751; Beltagy et al. 2020, "Longformer", arXiv
// 2004.05150), on the CPU.
//
// Slot k (k = 0 .. C-1) of query l is key j = l - C/2 + k, with C the local context. For one
// head (batch x heads are spread over std::threads):
//
//   local_dot_product:       out[l, k] = q_l . k_j + mask[l, j]   (j valid, else -inf)
//       backward:            dq_l = sum_k g[l, k] k_j,   dk_j += g[l, k] q_l
//   local_weighted_average:  out_l = sum_k a[l, k] v_j            (0 <= j < S)
//       backward:            da[l, k] = g_l . v_j,       dv_j += a[l, k] g_l
//
// so three loops do all the work (the "leaves", compiled once per instruction set):
// - band_scores: x_l . y_{l - C/2 + k} for every slot. y is first copied transposed into a
//   zero-padded (F x P) buffer whose column l + k holds key l - C/2 + k, so the slots of a
//   block of 16 queries are 16 + C - 1 contiguous columns: one register-blocked product
//   (small_gemm.h) per block, with no horizontal sums, and keys outside [0, S) read zeros;
// - band_gather: out_l = sum_k w[l, k] y_j, a weighted sum of rows kept in registers
//   (weighted_rows.h);
// - band_scatter: dy_j = sum of w[l, k] x_l over the slots (l, k) that reach key j, written
//   as a gather per key (the weights read along a diagonal), so it is the same leaf.
// Memory is O(L C) for the scores and O(S F) per thread for the padded copy, never O(L S).
//
// Layout: every (N, H, L, features) operand is a pointer plus the element strides of its n, h
// and l dimensions; the feature dimension is contiguous. Scores (N, H, L, C) likewise.
// No pybind11 and no torch here: bindings.cpp converts and checks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_dispatch.h"
#include "parallel.h"
#include "small_gemm.h"
#include "weighted_rows.h"

namespace attention_core {
namespace local {

// ---------------------------------------------------------------------------------------
// The leaves
// ---------------------------------------------------------------------------------------

// out[l * out_step + k] = sum_f x[l * x_step + f] * yt[f * P + l + k], l < L, k < C.
// yt needs P >= score_columns(L, C, NR) columns, and `work` score_work_size(C, F, NR)
// elements (see band_scores).
template <typename T>
struct BandScores {
    const T* x;
    int64_t x_step;
    const T* yt;
    int64_t P;
    T* out;
    int64_t out_step;
    int64_t L;
    int64_t C;
    int64_t F;
    T* work;
};

constexpr int64_t kQueryBlock = 16;  // queries per product in band_scores

inline int64_t round_up_to(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// The columns of one block's product: slot k of query l0 + r is column r + k.
inline int64_t block_columns(int64_t C, int64_t NR) {
    return round_up_to(std::max<int64_t>(C + kQueryBlock - 1, 1), NR);
}

inline int64_t score_columns(int64_t L, int64_t C, int64_t NR) {
    return round_up_to(L, kQueryBlock) + block_columns(C, NR);
}

inline int64_t score_work_size(int64_t C, int64_t F, int64_t NR) {
    return kQueryBlock * (F + block_columns(C, NR));
}

// The scores of kQueryBlock queries at a time as one register-blocked product (small_gemm.h):
// their (B x F) rows, copied zero-padded, times the (F x n) columns [l0, l0 + n) of yt, which
// hold every key that any of them reaches; the band (query r: columns r .. r + C - 1) is then
// copied out. About (C + B) / C of the band's multiply-adds, but each loaded key vector serves
// MR queries instead of one (the per-query sweep was bound by its loads).
template <typename T, class K>
inline void band_scores(const BandScores<T>& p) {
    constexpr int64_t B = kQueryBlock;
    static_assert(B % K::MR == 0, "the block must be a whole number of row tiles");
    const int64_t n = block_columns(p.C, K::NR), F = p.F;
    T* q = p.work;          // (B, F)
    T* tile = p.work + B * F;  // (B, n)
    for (int64_t l0 = 0; l0 < p.L; l0 += B) {
        const int64_t rows = std::min(B, p.L - l0);
        for (int64_t r = 0; r < rows; ++r) {
            const T* xr = p.x + (l0 + r) * p.x_step;
            std::copy(xr, xr + F, q + r * F);
        }
        std::fill(q + rows * F, q + B * F, T(0));
        K::product(B, n, F, q, F, p.yt + l0, p.P, tile, n, false, gemm::Band::full);
        for (int64_t r = 0; r < rows; ++r) {
            const T* band = tile + r * n + r;
            std::copy(band, band + p.C, p.out + (l0 + r) * p.out_step);
        }
    }
}

// Slots whose key j = l - C/2 + k lies in [0, limit) take part; the others are skipped.
template <typename T>
struct BandAxpy {
    const T* w;  // (L, C) weights, rows w_step apart
    int64_t w_step;
    const T* x;  // gather: (S, F) rows read; scatter: (L, F) rows read
    int64_t x_step;
    T* y;  // gather: (L, F) rows written; scatter: (S, F) rows written
    int64_t y_step;
    int64_t L;
    int64_t C;
    int64_t F;
    int64_t limit;
    int64_t S;  // scatter: the rows of y (rows from `limit` on are zero)
};

inline void slot_range(int64_t l, int64_t C, int64_t limit, int64_t& k_begin, int64_t& k_end) {
    const int64_t first = l - C / 2;  // key of slot 0
    k_begin = std::max<int64_t>(0, -first);
    k_end = std::max<int64_t>(k_begin, std::min<int64_t>(C, limit - first));
}

// The slots [k_begin, k_end) of query l: weights w[l, k], rows x_{l - C/2 + k}.
template <typename T>
struct QuerySlots {
    const T* w;
    const T* x;
    int64_t x_step;
    int64_t count() const { return n; }
    T weight(int64_t t) const { return w[t]; }
    const T* row(int64_t t) const { return x + t * x_step; }
    int64_t n;
};

// The queries that reach key j, slot k from k_end - 1 down to k_begin: query
// l = j + C/2 - k, weight w[l, k], row x_l.
template <typename T>
struct KeySlots {
    const T* w;  // at (l_first, k_last)
    int64_t w_diagonal;  // w_step - 1: from (l, k) to (l + 1, k - 1)
    const T* x;  // at l_first
    int64_t x_step;
    int64_t n;
    int64_t count() const { return n; }
    T weight(int64_t t) const { return w[t * w_diagonal]; }
    const T* row(int64_t t) const { return x + t * x_step; }
};

// y_l = sum_k w[l, k] x_{l - C/2 + k}
template <typename T, int W>
inline void band_gather(const BandAxpy<T>& p) {
    for (int64_t l = 0; l < p.L; ++l) {
        int64_t k_begin, k_end;
        slot_range(l, p.C, p.limit, k_begin, k_end);
        const QuerySlots<T> slots{p.w + l * p.w_step + k_begin,
                                  p.x + (l - p.C / 2 + k_begin) * p.x_step, p.x_step,
                                  k_end - k_begin};
        weighted_rows<T, W>(p.y + l * p.y_step, p.F, slots);
    }
}

// y_j = sum_{l, k: l - C/2 + k = j} w[l, k] x_l for j < limit, 0 for limit <= j < S: the
// scatter of the slots written as a gather per key, so every row of y is written once from
// registers.
template <typename T, int W>
inline void band_scatter(const BandAxpy<T>& p) {
    for (int64_t j = 0; j < p.S; ++j) {
        T* y = p.y + j * p.y_step;
        // k = j + C/2 - l with 0 <= l < L and 0 <= k < C
        const int64_t k_last = std::min<int64_t>(p.C - 1, j + p.C / 2);
        const int64_t k_first = std::max<int64_t>(0, j + p.C / 2 - (p.L - 1));
        if (j >= p.limit || k_first > k_last) {
            std::fill(y, y + p.F, T(0));
            continue;
        }
        const int64_t l_first = j + p.C / 2 - k_last;
        const KeySlots<T> slots{p.w + l_first * p.w_step + k_last, p.w_step - 1,
                                p.x + l_first * p.x_step, p.x_step, k_last - k_first + 1};
        weighted_rows<T, W>(y, p.F, slots);
    }
}

// ---------------------------------------------------------------------------------------
// One compiled copy of the leaves per instruction set
// ---------------------------------------------------------------------------------------

template <typename T>
struct Leaves {
    void (*scores)(const BandScores<T>&);
    void (*gather)(const BandAxpy<T>&);
    void (*scatter)(const BandAxpy<T>&);
    int64_t NR;  // the column multiple of `scores`' product
};

// The register tiles of `scores` (small_gemm.h) and the widths of the weighted sums.
template <typename T>
using BaselineScores = gemm::Kernel<T, 16 / sizeof(T), 4, 2>;

// Baseline: 32 elements per tile, the smallest width GCC vectorises (see causal_product.h).
template <typename T>
inline void scores_baseline(const BandScores<T>& p) {
    band_scores<T, BaselineScores<T>>(p);
}
template <typename T>
inline void gather_baseline(const BandAxpy<T>& p) {
    band_gather<T, 32>(p);
}
template <typename T>
inline void scatter_baseline(const BandAxpy<T>& p) {
    band_scatter<T, 32>(p);
}

#if ATTENTION_CORE_X86_DISPATCH
template <typename T>
using Avx2Scores = gemm::Kernel<T, 32 / sizeof(T), 4, 2>;
template <typename T>
using Avx512Scores = gemm::Kernel<T, 64 / sizeof(T), 8, 3>;  // 24 accumulators

template <typename T>
ATTENTION_CORE_TARGET_AVX2 void scores_avx2(const BandScores<T>& p) {
    band_scores<T, Avx2Scores<T>>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void gather_avx2(const BandAxpy<T>& p) {
    band_gather<T, 32>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void scatter_avx2(const BandAxpy<T>& p) {
    band_scatter<T, 32>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void scores_avx512(const BandScores<T>& p) {
    band_scores<T, Avx512Scores<T>>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void gather_avx512(const BandAxpy<T>& p) {
    band_gather<T, 256 / sizeof(T)>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void scatter_avx512(const BandAxpy<T>& p) {
    band_scatter<T, 256 / sizeof(T)>(p);
}
#endif

template <typename T>
Leaves<T> leaves_for(CpuLevel level) {
#if ATTENTION_CORE_X86_DISPATCH
    if (level == CpuLevel::avx512) {
        return {&scores_avx512<T>, &gather_avx512<T>, &scatter_avx512<T>, Avx512Scores<T>::NR};
    }
    if (level == CpuLevel::avx2) {
        return {&scores_avx2<T>, &gather_avx2<T>, &scatter_avx2<T>, Avx2Scores<T>::NR};
    }
#endif
    (void)level;
    return {&scores_baseline<T>, &gather_baseline<T>, &scatter_baseline<T>,
            BaselineScores<T>::NR};
}

// ---------------------------------------------------------------------------------------
// Over batch x heads
// ---------------------------------------------------------------------------------------

struct Strides {
    int64_t n, h, l;
};

template <typename T>
struct Operand {
    T* data;
    Strides s;
    T* head(int64_t n, int64_t h) const { return data + n * s.n + h * s.h; }
};

// The zero-padded transposed copy of a head's (S, F) rows y: yt[f * P + C/2 + j] = y_j.
template <typename T>
struct PaddedTranspose {
    std::vector<T> data;
    int64_t P = 0;

    void fill(const T* y, int64_t y_step, int64_t S, int64_t F, int64_t L, int64_t C,
              int64_t NR) {
        P = score_columns(L, C, NR);
        data.assign(F * P, T(0));
        const int64_t left = C / 2;
        const int64_t count = std::max<int64_t>(0, std::min<int64_t>(S, P - left));
        // blocks of kBlock keys: their rows stay in L1 while each feature's kBlock
        // contiguous elements are written (one element per row of the copy cost a cache
        // line per write)
        constexpr int64_t kBlock = 16;
        for (int64_t j0 = 0; j0 < count; j0 += kBlock) {
            const int64_t width = std::min<int64_t>(kBlock, count - j0);
            const T* block = y + j0 * y_step;
            for (int64_t f = 0; f < F; ++f) {
                T* __restrict column = data.data() + f * P + left + j0;
                for (int64_t j = 0; j < width; ++j) column[j] = block[j * y_step + f];
            }
        }
    }
};

// Fewer threads than asked when the work is too small to pay for starting them.
inline int64_t useful_threads(int64_t threads, int64_t heads, int64_t flops) {
    constexpr int64_t kMinFlopsPerThread = int64_t{1} << 18;
    return std::max<int64_t>(1, std::min({threads, heads, flops / kMinFlopsPerThread}));
}

// local_dot_product forward. mask is (L, S) with element strides (mask_l, mask_s); lengths
// (N,) holds the valid keys of each sequence.
template <typename T>
struct DotForward {
    int64_t N, H, L, S, E, C;
    Operand<const T> q, k;  // (N, H, L, E), (N, H, S, E)
    const T* mask;
    int64_t mask_l, mask_s;
    const int64_t* lengths;
    Operand<T> out;  // (N, H, L, C)
};

template <typename T>
void dot_forward(const DotForward<T>& a, int64_t threads) {
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, a.N * a.H, 2 * a.N * a.H * a.L * a.C * a.E);
    const T minus_inf = -std::numeric_limits<T>::infinity();
    parallel_for(a.N * a.H, workers, [&](int64_t, int64_t begin, int64_t end) {
        PaddedTranspose<T> kt;
        std::vector<T> work(score_work_size(a.C, a.E, leaves.NR));
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / a.H, h = item % a.H;
            const int64_t limit = std::clamp<int64_t>(a.lengths[n], 0, a.S);
            T* out = a.out.head(n, h);
            kt.fill(a.k.head(n, h), a.k.s.l, limit, a.E, a.L, a.C, leaves.NR);
            leaves.scores({a.q.head(n, h), a.q.s.l, kt.data.data(), kt.P, out, a.out.s.l, a.L,
                           a.C, a.E, work.data()});
            for (int64_t l = 0; l < a.L; ++l) {
                T* ol = out + l * a.out.s.l;
                int64_t k_begin, k_end;
                slot_range(l, a.C, limit, k_begin, k_end);
                std::fill(ol, ol + k_begin, minus_inf);
                const T* mask_row = a.mask + l * a.mask_l;
                if (a.mask_s == 1) {  // contiguous mask rows: a vector add
                    const T* __restrict m = mask_row + (l - a.C / 2 + k_begin);
                    for (int64_t k = k_begin; k < k_end; ++k) ol[k] += m[k - k_begin];
                } else {
                    for (int64_t k = k_begin; k < k_end; ++k) {
                        ol[k] += mask_row[(l - a.C / 2 + k) * a.mask_s];
                    }
                }
                std::fill(ol + k_end, ol + a.C, minus_inf);
            }
        }
    });
}

// local_dot_product backward: gradients of q and k (slots outside the window or the key
// lengths carry no gradient).
template <typename T>
struct DotBackward {
    int64_t N, H, L, S, E, C;
    Operand<const T> grad;  // (N, H, L, C)
    Operand<const T> q, k;
    const int64_t* lengths;
    Operand<T> dq, dk;  // like q, k
};

template <typename T>
void dot_backward(const DotBackward<T>& a, int64_t threads) {
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, a.N * a.H, 4 * a.N * a.H * a.L * a.C * a.E);
    parallel_for(a.N * a.H, workers, [&](int64_t, int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / a.H, h = item % a.H;
            const int64_t limit = std::clamp<int64_t>(a.lengths[n], 0, a.S);
            const T* g = a.grad.head(n, h);
            leaves.gather({g, a.grad.s.l, a.k.head(n, h), a.k.s.l, a.dq.head(n, h), a.dq.s.l,
                           a.L, a.C, a.E, limit, 0});
            leaves.scatter({g, a.grad.s.l, a.q.head(n, h), a.q.s.l, a.dk.head(n, h), a.dk.s.l,
                            a.L, a.C, a.E, limit, a.S});
        }
    });
}

// local_weighted_average forward: out_l = sum_k a[l, k] v_{l - C/2 + k}.
template <typename T>
struct AverageForward {
    int64_t N, H, L, S, D, C;
    Operand<const T> attention;  // (N, H, L, C)
    Operand<const T> v;          // (N, H, S, D)
    Operand<T> out;              // (N, H, L, D)
};

template <typename T>
void average_forward(const AverageForward<T>& a, int64_t threads) {
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, a.N * a.H, 2 * a.N * a.H * a.L * a.C * a.D);
    parallel_for(a.N * a.H, workers, [&](int64_t, int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / a.H, h = item % a.H;
            leaves.gather({a.attention.head(n, h), a.attention.s.l, a.v.head(n, h), a.v.s.l,
                           a.out.head(n, h), a.out.s.l, a.L, a.C, a.D, a.S, 0});
        }
    });
}

// local_weighted_average backward: gradients of the attention (zero outside [0, S)) and v.
template <typename T>
struct AverageBackward {
    int64_t N, H, L, S, D, C;
    Operand<const T> grad;  // (N, H, L, D)
    Operand<const T> attention;
    Operand<const T> v;
    Operand<T> dattention, dv;
};

template <typename T>
void average_backward(const AverageBackward<T>& a, int64_t threads) {
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, a.N * a.H, 4 * a.N * a.H * a.L * a.C * a.D);
    parallel_for(a.N * a.H, workers, [&](int64_t, int64_t begin, int64_t end) {
        PaddedTranspose<T> vt;
        std::vector<T> work(score_work_size(a.C, a.D, leaves.NR));
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / a.H, h = item % a.H;
            const T* g = a.grad.head(n, h);
            vt.fill(a.v.head(n, h), a.v.s.l, a.S, a.D, a.L, a.C, leaves.NR);
            leaves.scores({g, a.grad.s.l, vt.data.data(), vt.P, a.dattention.head(n, h),
                           a.dattention.s.l, a.L, a.C, a.D, work.data()});
            leaves.scatter({a.attention.head(n, h), a.attention.s.l, g, a.grad.s.l,
                            a.dv.head(n, h), a.dv.s.l, a.L, a.C, a.D, a.S, a.S});
        }
    });
}

}  // namespace local
}  // namespace attention_core
