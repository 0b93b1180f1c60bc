// The normaliser of causal linear attention, r_i = 1 / (q_i . z_i + eps) with
// z_i = z0 + sum_{j<=i} k_j, and its backward sweeps: O(E + M) work per token against the
// recurrence's O(E M) (causal_recurrence.h). Compiled into each instruction set's leaves by
// its callers. No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "prefetch.h"

namespace attention_core {
namespace causal {

// ---------------------------------------------------------------------------------------
// The arguments of the per-token forms' sweeps (causal_product.h)
// ---------------------------------------------------------------------------------------

// Forward in time: z_i = z + sum_{j<=i} k_j and r_i = 1 / (q_i . z_i + eps). With `g` set (the
// backward pass) also dd_i = -(g_i . out_i) r_i, the gradient of the denominator, and
// dq_i = dd_i z_i. `z` holds z0 on entry and z_final on exit. Runs as the chunk normalisers
// below, over every row (`normalizer_sweep`).
template <typename T>
struct NormalizerSweep {
    const T* q;
    int64_t q_step;
    const T* k;
    int64_t k_step;
    const T* g;  // backward only (else null)
    int64_t g_step;
    const T* out;
    int64_t out_step;
    T* dq;
    int64_t dq_step;
    T* z;
    T* r;
    T* dd;
    int64_t length;
    int64_t E;
    int64_t M;
    T eps;
};

// Reverse in time: w_i = w + sum_{j>=i} dd_j q_j, written to dk_i; `w` holds the gradient of
// z_final on entry and the gradient of z0 on exit.
template <typename T>
struct NormalizerReverse {
    const T* q;
    int64_t q_step;
    const T* dd;
    T* dk;
    int64_t dk_step;
    T* w;
    int64_t length;
    int64_t E;
};

template <typename T>
inline void normalizer_reverse(const NormalizerReverse<T>& p) {
    T* __restrict w = p.w;
    for (int64_t t = p.length - 1; t >= 0; --t) {
        const T* __restrict qt = p.q + t * p.q_step;
        T* __restrict dk = p.dk + t * p.dk_step;
        const T dd = p.dd[t];
        for (int64_t e = 0; e < p.E; ++e) {
            w[e] += dd * qt[e];
            dk[e] = w[e];
        }
    }
}

// ---------------------------------------------------------------------------------------
// The normaliser of a chunk of rows, vectorised across tokens
// ---------------------------------------------------------------------------------------

// A full 64-byte vector of T, and the integer vector of the same shape that indexes its lanes.
typedef float float_lanes __attribute__((vector_size(64)));
typedef double double_lanes __attribute__((vector_size(64)));
typedef int32_t float_lane_index __attribute__((vector_size(64)));
typedef int64_t double_lane_index __attribute__((vector_size(64)));

template <typename T>
struct Lanes {
    static constexpr int V = 64 / sizeof(T);
    using vec = std::conditional_t<sizeof(T) == 4, float_lanes, double_lanes>;
    using index = std::conditional_t<sizeof(T) == 4, float_lane_index, double_lane_index>;

    static vec load(const T* p) {
        vec x;
        std::memcpy(&x, p, sizeof(vec));
        return x;
    }
    static void store(T* p, const vec& x) { std::memcpy(p, &x, sizeof(vec)); }

    // Two vectors holding B lanes per token (V / B tokens each) -> one holding B / 2 lanes per
    // token, the tokens of a first: each token's halves added.
    template <int B>
    static vec halve(const vec& a, const vec& b) {
        constexpr int per = V / B;
        index low{}, high{};
        for (int j = 0; j < 2 * per; ++j) {
            const int first = (j < per ? 0 : V) + (j % per) * B;
            for (int l = 0; l < B / 2; ++l) {
                low[j * (B / 2) + l] = first + l;
                high[j * (B / 2) + l] = first + B / 2 + l;
            }
        }
#if defined(__clang__)  // no __builtin_shuffle: the same lanes picked one by one
        vec sum;
        for (int i = 0; i < V; ++i) {
            const int lo = low[i], hi = high[i];
            sum[i] = (lo < V ? a[lo] : b[lo - V]) + (hi < V ? a[hi] : b[hi - V]);
        }
        return sum;
#else
        return __builtin_shuffle(a, b, low) + __builtin_shuffle(a, b, high);
#endif
    }

    template <int B>
    static void reduce(vec* x, int n) {
        if constexpr (B > 1) {
            for (int i = 0; i < n / 2; ++i) x[i] = halve<B>(x[2 * i], x[2 * i + 1]);
            reduce<B / 2>(x, n / 2);
        }
    }

    // sums[t] = the sum of the V lanes at lanes + t V, for t < count: V tokens at a time, by a
    // tree of two-vector shuffles (about three instructions a token, against a serial sum of
    // V scalars each).
    static void sums(const T* lanes, int64_t count, T* out) {
        for (int64_t t0 = 0; t0 < count; t0 += V) {
            const int64_t n = std::min<int64_t>(V, count - t0);
            vec x[V];
            for (int i = 0; i < V; ++i) x[i] = i < n ? load(lanes + (t0 + i) * V) : vec{};
            reduce<V>(x, V);
            std::memcpy(out + t0, &x[0], n * sizeof(T));
        }
    }
};

// lanes_t = the V partial sums of q_t . z_t over the V-element blocks of E, with z advanced by
// k_t, for the `length` rows of q and k (rows `*_step` apart). With E = NB V (NB <= 4), z
// stays in registers: the chain of one add a token, instead of a store and a reload.
template <typename T, int NB>
inline void normalizer_lanes_blocks(const T* q, int64_t q_step, const T* k, int64_t k_step,
                                    int64_t length, T* __restrict z, T* __restrict lanes) {
    using L = Lanes<T>;
    constexpr int V = L::V;
    typename L::vec z0 = L::load(z), z1{}, z2{}, z3{};
    if constexpr (NB > 1) z1 = L::load(z + V);
    if constexpr (NB > 2) z2 = L::load(z + 2 * V);
    if constexpr (NB > 3) z3 = L::load(z + 3 * V);
    for (int64_t t = 0; t < length; ++t) {
        const T* qt = q + t * q_step;
        const T* kt = k + t * k_step;
        z0 += L::load(kt);
        typename L::vec acc = L::load(qt) * z0;
        if constexpr (NB > 1) {
            z1 += L::load(kt + V);
            acc += L::load(qt + V) * z1;
        }
        if constexpr (NB > 2) {
            z2 += L::load(kt + 2 * V);
            acc += L::load(qt + 2 * V) * z2;
        }
        if constexpr (NB > 3) {
            z3 += L::load(kt + 3 * V);
            acc += L::load(qt + 3 * V) * z3;
        }
        L::store(lanes + t * V, acc);
    }
    L::store(z, z0);
    if constexpr (NB > 1) L::store(z + V, z1);
    if constexpr (NB > 2) L::store(z + 2 * V, z2);
    if constexpr (NB > 3) L::store(z + 3 * V, z3);
}

// The same for any E: z in memory, the features past the last whole vector added into lane 0.
template <typename T>
inline void normalizer_lanes_any(const T* q, int64_t q_step, const T* k, int64_t k_step,
                                 int64_t length, int64_t E, T* __restrict z,
                                 T* __restrict lanes) {
    using L = Lanes<T>;
    constexpr int V = L::V;
    const int64_t whole = E / V * V;
    for (int64_t t = 0; t < length; ++t) {
        const T* __restrict qt = q + t * q_step;
        const T* __restrict kt = k + t * k_step;
        typename L::vec acc{};
        for (int64_t e = 0; e < whole; e += V) {
            const typename L::vec ze = L::load(z + e) + L::load(kt + e);
            L::store(z + e, ze);
            acc += L::load(qt + e) * ze;
        }
        T rest = T(0);
        for (int64_t e = whole; e < E; ++e) {
            z[e] += kt[e];
            rest += qt[e] * z[e];
        }
        acc[0] += rest;
        L::store(lanes + t * V, acc);
    }
}

// The normaliser over `length` rows: z advanced by every k_t (z holds the state before the
// first row on entry, after the last on exit) and r_t = 1 / (q_t . z_t + eps), in blocks of
// kNormalizerRows rows. The forward pass of the packed form runs it per chunk.
constexpr int64_t kNormalizerRows = 64;

template <typename T>
inline void chunk_normalizer(const T* q, int64_t q_step, const T* k, int64_t k_step,
                             int64_t length, int64_t E, T eps, T* z, T* r) {
    using L = Lanes<T>;
    alignas(64) T lanes[kNormalizerRows * L::V];
    const int64_t blocks = E == 0 || E % L::V ? 0 : E / L::V;
    for (int64_t t0 = 0; t0 < length; t0 += kNormalizerRows) {
        const int64_t n = std::min(kNormalizerRows, length - t0);
        const T* qt = q + t0 * q_step;
        const T* kt = k + t0 * k_step;
        switch (blocks) {
            case 1: normalizer_lanes_blocks<T, 1>(qt, q_step, kt, k_step, n, z, lanes); break;
            case 2: normalizer_lanes_blocks<T, 2>(qt, q_step, kt, k_step, n, z, lanes); break;
            case 3: normalizer_lanes_blocks<T, 3>(qt, q_step, kt, k_step, n, z, lanes); break;
            case 4: normalizer_lanes_blocks<T, 4>(qt, q_step, kt, k_step, n, z, lanes); break;
            default: normalizer_lanes_any<T>(qt, q_step, kt, k_step, n, E, z, lanes);
        }
        Lanes<T>::sums(lanes, n, r + t0);
        for (int64_t t = t0; t < t0 + n; ++t) r[t] = T(1) / (r[t] + eps);
    }
}

// The backward pass's normaliser over `length` rows, forward in time: r_t as in
// chunk_normalizer, dd_t = -(g_t . out_t) r_t (the gradient of the denominator) and
// dq_t = dd_t z_t, the denominator's part of dq, written to the rows of dq (`dq_step` apart).
// z_t is written to the dq row as it is formed and scaled by dd_t once the row's sums are
// known; the sums of both products run through the lane tree, in blocks of kNormalizerRows.
template <typename T>
inline void chunk_normalizer_backward(const T* q, int64_t q_step, const T* k, int64_t k_step,
                                      const T* g, int64_t g_step, const T* out,
                                      int64_t out_step, int64_t length, int64_t E, int64_t M,
                                      T eps, T* __restrict z, T* r, T* dd, T* dq,
                                      int64_t dq_step) {
    using L = Lanes<T>;
    constexpr int V = L::V;
    alignas(64) T lanes[kNormalizerRows * V];
    alignas(64) T products[kNormalizerRows * V];
    const int64_t whole_e = E / V * V, whole_m = M / V * V;
    for (int64_t t0 = 0; t0 < length; t0 += kNormalizerRows) {
        const int64_t n = std::min(kNormalizerRows, length - t0);
        for (int64_t i = 0; i < n; ++i) {
            const int64_t t = t0 + i;
            if (t + kPrefetchRows < length) {  // the rows that come from memory
                const int64_t a = t + kPrefetchRows;
                prefetch_row(q + a * q_step, E);
                prefetch_row(k + a * k_step, E);
                prefetch_row(g + a * g_step, M);
                prefetch_row(out + a * out_step, M);
                prefetch_row(dq + a * dq_step, E, true);
            }
            const T* __restrict qt = q + t * q_step;
            const T* __restrict kt = k + t * k_step;
            T* __restrict zt = dq + t * dq_step;
            typename L::vec acc{};
            for (int64_t e = 0; e < whole_e; e += V) {
                const typename L::vec ze = L::load(z + e) + L::load(kt + e);
                L::store(z + e, ze);
                L::store(zt + e, ze);
                acc += L::load(qt + e) * ze;
            }
            T rest = T(0);
            for (int64_t e = whole_e; e < E; ++e) {
                z[e] += kt[e];
                zt[e] = z[e];
                rest += qt[e] * z[e];
            }
            acc[0] += rest;
            L::store(lanes + i * V, acc);
            const T* __restrict gt = g + t * g_step;
            const T* __restrict ot = out + t * out_step;
            typename L::vec prod{};
            for (int64_t m = 0; m < whole_m; m += V) prod += L::load(gt + m) * L::load(ot + m);
            T more = T(0);
            for (int64_t m = whole_m; m < M; ++m) more += gt[m] * ot[m];
            prod[0] += more;
            L::store(products + i * V, prod);
        }
        L::sums(lanes, n, r + t0);
        L::sums(products, n, dd + t0);
        for (int64_t t = t0; t < t0 + n; ++t) {
            r[t] = T(1) / (r[t] + eps);
            dd[t] = -dd[t] * r[t];
            T* __restrict dqt = dq + t * dq_step;
            const T d = dd[t];
            for (int64_t e = 0; e < E; ++e) dqt[e] *= d;
        }
    }
}

// The forward sweep of the per-token forms over a whole sequence: the chunk normalisers'
// work, over every row.
template <typename T>
inline void normalizer_sweep(const NormalizerSweep<T>& p) {
    if (p.g) {
        chunk_normalizer_backward<T>(p.q, p.q_step, p.k, p.k_step, p.g, p.g_step, p.out,
                                     p.out_step, p.length, p.E, p.M, p.eps, p.z, p.r, p.dd,
                                     p.dq, p.dq_step);
    } else {
        chunk_normalizer<T>(p.q, p.q_step, p.k, p.k_step, p.length, p.E, p.eps, p.z, p.r);
    }
}

}  // namespace causal
}  // namespace attention_core
