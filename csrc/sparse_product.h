// Dot products and weighted averages over a few selected keys per query, the core of top-k
// attention and of improved clustered attention (Vyas et al. 2020, "Fast Transformers with
// Clustered Attention", arXiv 2007.04825), on the CPU.
//
// Every query l of a head reads one row of key indices idx_l (k entries in [0, S)):
//   - per query:    idx_l = topk[l]                     (sparse_*)
//   - per cluster:  idx_l = topk[groups[l]]             (clustered_sparse_*)
// and a query whose group lies outside [0, C), or whose position is past the head's limit
// (padding), has no row: its outputs are zero and it passes no gradient. The key indices
// are read from data and trusted nowhere: every index of topk is bounds-checked inside the
// kernel's parallel loop over heads (`Index::fill`; no separate scan before the kernel), a
// row holding an index outside [0, S) is skipped like a query without keys (nothing outside
// a buffer is read or written) and reported through `IndexError`, on which the binding
// raises after the kernel. Then
//
//   sparse_dot_product:       out[l, t] = q_l . k_{idx_l[t]}
//       backward:             dq_l = sum_t g[l, t] k_{idx_l[t]},   dk_j += g[l, t] q_l
//   sparse_weighted_average:  out_l = sum_t a[l, t] v_{idx_l[t]}
//       backward:             da[l, t] = g_l . v_{idx_l[t]},      dv_j += a[l, t] g_l
//
// so three leaves do all the work (compiled once per instruction set): `rows_dot` (a dot
// product per selected row), `rows_gather` and `rows_scatter` (an axpy over the features per
// selected row). A head is handled by one thread, so the scatter has no races.
//
// Layout: (N, H, rows, features) operands are a pointer plus the element strides of their
// first three dimensions (features contiguous); index tensors are contiguous int64.
// No pybind11 and no torch here: bindings.cpp converts and checks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_dispatch.h"
#include "vector_dot.h"
#include "parallel.h"
#include "weighted_rows.h"

namespace attention_core {
namespace sparse {

// ---------------------------------------------------------------------------------------
// The leaves
// ---------------------------------------------------------------------------------------

// out[r] = x . y[r] for four rows y[0..3]: x is loaded once per step for four products.
template <typename T>
inline void dot4(const T* x, const T* const* y, int64_t n, T* out) {
    int64_t i = 0;
    T sum[4] = {0, 0, 0, 0};
#if defined(__GNUC__)
    constexpr int V = 32 / sizeof(T);
    typedef T vec __attribute__((vector_size(32)));
    vec acc[4] = {};
    for (; i + V <= n; i += V) {
        vec xv;
        std::memcpy(&xv, x + i, sizeof(vec));
        for (int r = 0; r < 4; ++r) {
            vec yv;
            std::memcpy(&yv, y[r] + i, sizeof(vec));
            acc[r] += xv * yv;
        }
    }
    for (int r = 0; r < 4; ++r) {
        for (int j = 0; j < V; ++j) sum[r] += acc[r][j];
    }
#endif
    for (; i < n; ++i) {
        for (int r = 0; r < 4; ++r) sum[r] += x[i] * y[r][i];
    }
    for (int r = 0; r < 4; ++r) out[r] = sum[r];
}

// One head. rows[l] points at the k key indices of query l, or is null (no keys).
template <typename T>
struct Rows {
    const int64_t* const* rows;
    int64_t L;
    int64_t k;
    int64_t F;
    const T* w;  // (L, k): weights of gather and scatter, rows w_step apart
    int64_t w_step;
    const T* x;  // rows_dot/rows_scatter: (L, F) per query; rows_gather: (S, F) per key
    int64_t x_step;
    const T* y;  // rows_dot: (S, F) per key
    int64_t y_step;
    T* out;  // rows_dot: (L, k); rows_gather: (L, F); rows_scatter: (S, F), accumulated
    int64_t out_step;
};

// out[l, t] = x_l . y_{rows[l][t]} (zero for a query without keys)
template <typename T>
inline void rows_dot(const Rows<T>& p) {
    for (int64_t l = 0; l < p.L; ++l) {
        T* ol = p.out + l * p.out_step;
        const int64_t* index = p.rows[l];
        if (!index) {
            std::fill(ol, ol + p.k, T(0));
            continue;
        }
        const T* xl = p.x + l * p.x_step;
        int64_t t = 0;
        for (; t + 4 <= p.k; t += 4) {
            const T* y[4];
            for (int r = 0; r < 4; ++r) y[r] = p.y + index[t + r] * p.y_step;
            dot4(xl, y, p.F, ol + t);
        }
        for (; t < p.k; ++t) ol[t] = dot(xl, p.y + index[t] * p.y_step, p.F);
    }
}

// The k selected rows of one query: weights w[t], rows x_{index[t]}.
template <typename T>
struct SelectedRows {
    const T* w;
    const int64_t* index;
    const T* x;
    int64_t x_step;
    int64_t n;
    int64_t count() const { return n; }
    T weight(int64_t t) const { return w[t]; }
    const T* row(int64_t t) const { return x + index[t] * x_step; }
};

// out_l = sum_t w[l, t] x_{rows[l][t]} (zero for a query without keys), summed in registers
template <typename T, int W>
inline void rows_gather(const Rows<T>& p) {
    for (int64_t l = 0; l < p.L; ++l) {
        T* __restrict ol = p.out + l * p.out_step;
        const int64_t* index = p.rows[l];
        if (!index) {
            std::fill(ol, ol + p.F, T(0));
            continue;
        }
        weighted_rows<T, W>(ol, p.F, SelectedRows<T>{p.w + l * p.w_step, index, p.x, p.x_step, p.k});
    }
}

// out_{rows[l][t]} += w[l, t] x_l
template <typename T>
inline void rows_scatter(const Rows<T>& p) {
    for (int64_t l = 0; l < p.L; ++l) {
        const int64_t* index = p.rows[l];
        if (!index) continue;
        const T* wl = p.w + l * p.w_step;
        const T* __restrict xl = p.x + l * p.x_step;
        for (int64_t t = 0; t < p.k; ++t) {
            const T a = wl[t];
            T* __restrict oj = p.out + index[t] * p.out_step;
            for (int64_t f = 0; f < p.F; ++f) oj[f] += a * xl[f];
        }
    }
}

template <typename T>
struct Leaves {
    void (*dot)(const Rows<T>&);
    void (*gather)(const Rows<T>&);
    void (*scatter)(const Rows<T>&);
};

template <typename T>
inline void dot_baseline(const Rows<T>& p) {
    rows_dot<T>(p);
}
template <typename T>
inline void gather_baseline(const Rows<T>& p) {
    rows_gather<T, 32>(p);
}
template <typename T>
inline void scatter_baseline(const Rows<T>& p) {
    rows_scatter<T>(p);
}

#if ATTENTION_CORE_X86_DISPATCH
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void dot_avx2(const Rows<T>& p) {
    rows_dot<T>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void gather_avx2(const Rows<T>& p) {
    rows_gather<T, 32>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void scatter_avx2(const Rows<T>& p) {
    rows_scatter<T>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void dot_avx512(const Rows<T>& p) {
    rows_dot<T>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void gather_avx512(const Rows<T>& p) {
    rows_gather<T, 256 / sizeof(T)>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void scatter_avx512(const Rows<T>& p) {
    rows_scatter<T>(p);
}
#endif

template <typename T>
Leaves<T> leaves_for(CpuLevel level) {
#if ATTENTION_CORE_X86_DISPATCH
    if (level == CpuLevel::avx512) return {&dot_avx512<T>, &gather_avx512<T>, &scatter_avx512<T>};
    if (level == CpuLevel::avx2) return {&dot_avx2<T>, &gather_avx2<T>, &scatter_avx2<T>};
#endif
    (void)level;
    return {&dot_baseline<T>, &gather_baseline<T>, &scatter_baseline<T>};
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

// The first key index found outside [0, S) by any thread (the binding raises on it).
struct IndexError {
    std::atomic<bool> found{false};
    std::atomic<int64_t> value{0};
    void report(int64_t v) {
        bool expected = false;
        if (found.compare_exchange_strong(expected, true)) value.store(v);
    }
};

// Whether all n indices lie in [0, S); the first one that does not is reported.
inline bool indices_in_range(const int64_t* index, int64_t n, int64_t S, IndexError* error) {
    const uint64_t size = static_cast<uint64_t>(S);
    bool bad = false;  // one unsigned compare catches negatives too; no branch per index
    for (int64_t t = 0; t < n; ++t) bad |= static_cast<uint64_t>(index[t]) >= size;
    if (!bad) return true;
    for (int64_t t = 0; t < n; ++t) {
        if (index[t] < 0 || index[t] >= S) {
            if (error) error->report(index[t]);
            break;
        }
    }
    return false;
}

// Which key indices each query reads.
struct Index {
    const int64_t* topk;    // (N, H, R, k) contiguous: R = L per query, or C per cluster
    int64_t R;
    const int64_t* groups;  // (N, H, L) contiguous cluster of each query, or null (per query)
    const int64_t* limits;  // (N, H) contiguous: queries l >= limits[n, h] have no keys; or null
    IndexError* error;      // where an index outside [0, S) is reported, or null

    // rows[l] for the head `item` (of L queries with k indices each, keys in [0, S)). Every
    // index of the head's topk slice is checked here, in the kernel's parallel loop, also
    // the rows no query reads (clusters without queries, queries past the limit), so the
    // op rejects exactly what a scan of all of topk would. Per query each row is checked
    // just before the leaf reads it (in cache) and a bad row is left null (skipped); per
    // cluster the head's C rows (few, read by many queries) are checked first and a head
    // with a bad one is skipped whole. Bad indices are reported (the op raises after).
    void fill(std::vector<const int64_t*>& rows, int64_t item, int64_t L, int64_t S,
              int64_t k) const {
        rows.assign(L, nullptr);
        const int64_t end = limits ? std::clamp<int64_t>(limits[item], 0, L) : L;
        const int64_t* head = topk + item * R * k;
        if (!groups) {
            for (int64_t l = 0; l < R; ++l) {
                const int64_t* row = head + l * k;
                if (indices_in_range(row, k, S, error) && l < end) rows[l] = row;
            }
            return;
        }
        if (!indices_in_range(head, R * k, S, error)) return;
        for (int64_t l = 0; l < end; ++l) {
            const int64_t r = groups[item * L + l];
            if (r >= 0 && r < R) rows[l] = head + r * k;
        }
    }
};

inline int64_t useful_threads(int64_t threads, int64_t heads, int64_t flops) {
    constexpr int64_t kMinFlopsPerThread = int64_t{1} << 18;
    return std::max<int64_t>(1, std::min({threads, heads, flops / kMinFlopsPerThread}));
}

template <typename T>
void zero_rows(T* y, int64_t step, int64_t rows, int64_t F) {
    for (int64_t r = 0; r < rows; ++r) std::fill(y + r * step, y + r * step + F, T(0));
}

template <typename T>
struct Problem {
    int64_t N, H, L, S, F, k;
    Index index;
};

// sparse_dot_product forward: out (N, H, L, k) from q (N, H, L, F) and keys (N, H, S, F).
template <typename T>
struct DotForward : Problem<T> {
    Operand<const T> q, keys;
    Operand<T> out;
};

template <typename T>
void dot_forward(const DotForward<T>& a, int64_t threads) {
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, a.N * a.H, 2 * a.N * a.H * a.L * a.k * a.F);
    parallel_for(a.N * a.H, workers, [&](int64_t, int64_t begin, int64_t end) {
        std::vector<const int64_t*> rows;
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / a.H, h = item % a.H;
            a.index.fill(rows, item, a.L, a.S, a.k);
            leaves.dot({rows.data(), a.L, a.k, a.F, nullptr, 0, a.q.head(n, h), a.q.s.l,
                        a.keys.head(n, h), a.keys.s.l, a.out.head(n, h), a.out.s.l});
        }
    });
}

// sparse_dot_product backward: dq (N, H, L, F) and dkeys (N, H, S, F) from grad (N, H, L, k).
template <typename T>
struct DotBackward : Problem<T> {
    Operand<const T> grad, q, keys;
    Operand<T> dq, dkeys;
};

template <typename T>
void dot_backward(const DotBackward<T>& a, int64_t threads) {
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, a.N * a.H, 4 * a.N * a.H * a.L * a.k * a.F);
    parallel_for(a.N * a.H, workers, [&](int64_t, int64_t begin, int64_t end) {
        std::vector<const int64_t*> rows;
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / a.H, h = item % a.H;
            a.index.fill(rows, item, a.L, a.S, a.k);
            const T* g = a.grad.head(n, h);
            leaves.gather({rows.data(), a.L, a.k, a.F, g, a.grad.s.l, a.keys.head(n, h),
                           a.keys.s.l, nullptr, 0, a.dq.head(n, h), a.dq.s.l});
            T* dk = a.dkeys.head(n, h);
            zero_rows(dk, a.dkeys.s.l, a.S, a.F);
            leaves.scatter({rows.data(), a.L, a.k, a.F, g, a.grad.s.l, a.q.head(n, h), a.q.s.l,
                            nullptr, 0, dk, a.dkeys.s.l});
        }
    });
}

// sparse_weighted_average forward: out (N, H, L, F) from weights (N, H, L, k) and values
// (N, H, S, F).
template <typename T>
struct AverageForward : Problem<T> {
    Operand<const T> weights, values;
    Operand<T> out;
};

template <typename T>
void average_forward(const AverageForward<T>& a, int64_t threads) {
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, a.N * a.H, 2 * a.N * a.H * a.L * a.k * a.F);
    parallel_for(a.N * a.H, workers, [&](int64_t, int64_t begin, int64_t end) {
        std::vector<const int64_t*> rows;
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / a.H, h = item % a.H;
            a.index.fill(rows, item, a.L, a.S, a.k);
            leaves.gather({rows.data(), a.L, a.k, a.F, a.weights.head(n, h), a.weights.s.l,
                           a.values.head(n, h), a.values.s.l, nullptr, 0, a.out.head(n, h),
                           a.out.s.l});
        }
    });
}

// sparse_weighted_average backward: dweights (N, H, L, k) and dvalues (N, H, S, F) from grad
// (N, H, L, F).
template <typename T>
struct AverageBackward : Problem<T> {
    Operand<const T> grad, weights, values;
    Operand<T> dweights, dvalues;
};

template <typename T>
void average_backward(const AverageBackward<T>& a, int64_t threads) {
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, a.N * a.H, 4 * a.N * a.H * a.L * a.k * a.F);
    parallel_for(a.N * a.H, workers, [&](int64_t, int64_t begin, int64_t end) {
        std::vector<const int64_t*> rows;
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / a.H, h = item % a.H;
            a.index.fill(rows, item, a.L, a.S, a.k);
            const T* g = a.grad.head(n, h);
            leaves.dot({rows.data(), a.L, a.k, a.F, nullptr, 0, g, a.grad.s.l,
                        a.values.head(n, h), a.values.s.l, a.dweights.head(n, h),
                        a.dweights.s.l});
            T* dv = a.dvalues.head(n, h);
            zero_rows(dv, a.dvalues.s.l, a.S, a.F);
            leaves.scatter({rows.data(), a.L, a.k, a.F, a.weights.head(n, h), a.weights.s.l, g,
                            a.grad.s.l, nullptr, 0, dv, a.dvalues.s.l});
        }
    });
}

}  // namespace sparse
}  // namespace attention_core
