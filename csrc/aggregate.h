// Aggregate rows by group and broadcast group rows back, the bookkeeping of clustered
// attention (Vyas et al. 2020, "Fast Transformers with Clustered Attention", arXiv
// 2007.04825), on the CPU. For one head (batch x heads are spread over torch's OpenMP threads):
//
//   aggregate:  Y_c = F_c * sum_{l valid, G_l = c} X_l        (C rows)
//   broadcast:  X_l = F_{G_l} * Y_{G_l}  if l is valid, else 0  (L rows)
//
// where position l is valid when G_l lies in [0, C) and l < limit (the head's number of
// non-padding positions; no limit when null). F may be null (all ones). The gradients are
// these same two operations (see attention_core._kernels). Both are one axpy or one scaled
// copy per position, compiled once per instruction set.
//
// Layout: (N, H, rows, E) operands are a pointer plus the element strides of their first three
// dimensions (E contiguous); G (N, H, L), F (N, H, C) and limits (N, H) are contiguous.
// No pybind11 and no torch here: bindings.cpp converts and checks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_dispatch.h"
#include "parallel.h"

namespace attention_core {
namespace aggregate {

// One head: rows of X (L of them) and of Y (C of them).
template <typename T>
struct Head {
    const int64_t* G;
    const T* F;  // or null
    int64_t end;  // positions [end, L) are padding
    int64_t C;
    int64_t E;
    const T* in;
    int64_t in_step;
    T* out;
    int64_t out_step;
};

// out (C rows) = F * group sums of in (L rows); a group without members gives zeros whatever
// its factor (1 / count is infinite there, and 0 * inf would be NaN)
template <typename T>
inline void aggregate_head(const Head<T>& p, int64_t C) {
    std::vector<char> has_members(static_cast<size_t>(C), 0);
    for (int64_t c = 0; c < C; ++c) {
        std::fill(p.out + c * p.out_step, p.out + c * p.out_step + p.E, T(0));
    }
    for (int64_t l = 0; l < p.end; ++l) {
        const int64_t g = p.G[l];
        if (g < 0 || g >= C) continue;
        has_members[g] = 1;
        const T* __restrict x = p.in + l * p.in_step;
        T* __restrict y = p.out + g * p.out_step;
        for (int64_t e = 0; e < p.E; ++e) y[e] += x[e];
    }
    if (!p.F) return;
    for (int64_t c = 0; c < C; ++c) {
        if (!has_members[c]) continue;
        T* __restrict y = p.out + c * p.out_step;
        const T f = p.F[c];
        for (int64_t e = 0; e < p.E; ++e) y[e] *= f;
    }
}

// out (L rows) = F_g * in_g (in: C rows), zero for invalid positions
template <typename T>
inline void broadcast_head(const Head<T>& p, int64_t L) {
    for (int64_t l = 0; l < L; ++l) {
        T* __restrict x = p.out + l * p.out_step;
        const int64_t g = l < p.end ? p.G[l] : -1;
        if (g < 0 || g >= p.C) {
            std::fill(x, x + p.E, T(0));
            continue;
        }
        const T* __restrict y = p.in + g * p.in_step;
        const T f = p.F ? p.F[g] : T(1);
        for (int64_t e = 0; e < p.E; ++e) x[e] = f * y[e];
    }
}

template <typename T>
struct Leaves {
    void (*aggregate)(const Head<T>&, int64_t);
    void (*broadcast)(const Head<T>&, int64_t);
};

template <typename T>
inline void aggregate_baseline(const Head<T>& p, int64_t C) {
    aggregate_head<T>(p, C);
}
template <typename T>
inline void broadcast_baseline(const Head<T>& p, int64_t L) {
    broadcast_head<T>(p, L);
}
#if ATTENTION_CORE_X86_DISPATCH
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void aggregate_avx2(const Head<T>& p, int64_t C) {
    aggregate_head<T>(p, C);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void broadcast_avx2(const Head<T>& p, int64_t L) {
    broadcast_head<T>(p, L);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void aggregate_avx512(const Head<T>& p, int64_t C) {
    aggregate_head<T>(p, C);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void broadcast_avx512(const Head<T>& p, int64_t L) {
    broadcast_head<T>(p, L);
}
#endif

template <typename T>
Leaves<T> leaves_for(CpuLevel level) {
#if ATTENTION_CORE_X86_DISPATCH
    if (level == CpuLevel::avx512) return {&aggregate_avx512<T>, &broadcast_avx512<T>};
    if (level == CpuLevel::avx2) return {&aggregate_avx2<T>, &broadcast_avx2<T>};
#endif
    (void)level;
    return {&aggregate_baseline<T>, &broadcast_baseline<T>};
}

struct Strides {
    int64_t n, h, l;
};

template <typename T>
struct Operand {
    T* data;
    Strides s;
    T* head(int64_t n, int64_t h) const { return data + n * s.n + h * s.h; }
};

template <typename T>
struct Args {
    int64_t N, H, L, C, E;
    const int64_t* G;       // (N, H, L)
    const T* F;             // (N, H, C) or null
    const int64_t* limits;  // (N, H) or null
    Operand<const T> in;    // aggregate: (N, H, L, E); broadcast: (N, H, C, E)
    Operand<T> out;         // aggregate: (N, H, C, E); broadcast: (N, H, L, E)
};

inline int64_t useful_threads(int64_t threads, int64_t heads, int64_t work) {
    constexpr int64_t kMinWorkPerThread = int64_t{1} << 16;
    return std::max<int64_t>(1, std::min({threads, heads, work / kMinWorkPerThread}));
}

template <typename T>
void run(const Args<T>& a, bool broadcast, int64_t threads) {
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, a.N * a.H, a.N * a.H * (a.L + a.C) * a.E);
    parallel_for(a.N * a.H, workers, [&](int64_t, int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / a.H, h = item % a.H;
            const int64_t valid = a.limits ? std::clamp<int64_t>(a.limits[item], 0, a.L) : a.L;
            const Head<T> p{a.G + item * a.L, a.F ? a.F + item * a.C : nullptr, valid, a.C, a.E,
                            a.in.head(n, h), a.in.s.l, a.out.head(n, h), a.out.s.l};
            if (broadcast) {
                leaves.broadcast(p, a.L);
            } else {
                leaves.aggregate(p, a.C);
            }
        }
    });
}

}  // namespace aggregate
}  // namespace attention_core
