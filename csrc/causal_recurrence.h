// The per-token recurrence of the causal product and its normaliser sweeps: the leaves that
// causal_product.h runs over batch x heads (see there for the maths), compiled once per
// instruction set. No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "causal_normalizer.h"
#include "cpu_dispatch.h"
#include "prefetch.h"

namespace attention_core {
namespace causal {

// ---------------------------------------------------------------------------------------
// The recurrence
// ---------------------------------------------------------------------------------------

// For each token t (t = 0..length-1, or reversed):
//     state += kv_scale[t] * k_t v_t^T                    (rows x cols)
//     out_t  = [out_t +] q_scale[t] * state^T q_t          (cols)
// q_scale multiplies q_t, not the read-out: r_t q_t keeps S^T q_t in range for large q and k
// (the normalised result does not depend on their scale; scaling the read-out overflowed
// float32 for q, k = 1e14).
// q_t and k_t have `rows` elements, v_t and out_t `cols`; `*_step` is the distance between two
// tokens of one operand. A null scale means 1.
template <typename T>
struct Recurrence {
    const T* q;
    int64_t q_step;
    const T* k;
    int64_t k_step;
    const T* v;
    int64_t v_step;
    T* out;
    int64_t out_step;
    const T* q_scale;
    const T* kv_scale;
    T* state;
    int64_t rows;
    int64_t cols;
    int64_t length;
    bool accumulate;  // add into out instead of overwriting it
    bool reverse;     // walk the tokens from the last to the first
};

// A block of state rows is swept over the whole sequence while it stays in L1.
constexpr int64_t kStateBlockBytes = 16 * 1024;

// Tokens ahead of the sweep whose rows are prefetched: the rows of long or strided operands
// come from memory, and the hardware prefetchers do not follow strided rows.
constexpr int64_t kPrefetchTokens = 12;

// U tokens per sweep of the state rows, for tiles of W = NV vectors of V elements (GCC/Clang
// vector extensions, so the U x NV value and output vectors stay in registers): a row of the
// state is loaded once, takes U rank-1 updates and U read-outs, and is stored once. The
// one-token tile is bound by its store per row and by the latency of its output sums; with
// U = 3 and W = 64 floats (AVX-512's 32 registers) the sweep is bound by the multiply-adds
// alone and runs about 1.8x faster. Returns the number of tokens done (a multiple of U); the
// caller finishes the others one at a time.
template <typename T, int W, int U>
inline int64_t multi_token_pass(const Recurrence<T>& p, int64_t c0, T* state, int64_t ld,
                                int64_t r0, int64_t r1) {
    constexpr int V = 64 / sizeof(T);
    constexpr int NV = W / V;
    static_assert(W % V == 0, "the tile must be a whole number of 64-byte vectors");
    typedef T vec __attribute__((vector_size(V * sizeof(T))));
    const bool fresh = r0 == 0 && !p.accumulate;
    // with a q_scale, the U rows r0 .. r1 - 1 of q_t times q_scale[t]: the row loop then
    // broadcasts them straight from memory (scaling in the row loop cost a multiply and a
    // register broadcast per row and token, 7-10% of the sweep); r1 - r0 is at most a block
    constexpr int64_t kBlockRows = std::max<int64_t>(1, kStateBlockBytes / (W * sizeof(T)));
    alignas(64) T scaled[U][kBlockRows];
    int64_t i = 0;
    for (; i + U <= p.length; i += U) {
        const T* __restrict q[U];
        const T* __restrict k[U];
        T* out[U];
        vec v[U][NV], acc[U][NV];
        for (int u = 0; u < U; ++u) {
            const int64_t t = p.reverse ? p.length - 1 - i - u : i + u;
            q[u] = p.q + t * p.q_step + r0;  // q[u][e - r0] is feature e
            if (p.q_scale) {  // r_t q_t, the products the row loop used to form
                const T factor = p.q_scale[t];
                for (int64_t e = 0; e < r1 - r0; ++e) scaled[u][e] = q[u][e] * factor;
                q[u] = scaled[u];
            }
            k[u] = p.k + t * p.k_step;
            out[u] = p.out + t * p.out_step + c0;
            const T kv_scale = p.kv_scale ? p.kv_scale[t] : T(1);
            const T* vt = p.v + t * p.v_step + c0;
            for (int j = 0; j < NV; ++j) {
                std::memcpy(&v[u][j], vt + j * V, sizeof(vec));
                v[u][j] *= kv_scale;
                if (fresh) {
                    acc[u][j] = vec{};
                } else {
                    std::memcpy(&acc[u][j], out[u] + j * V, sizeof(vec));
                }
            }
        }
        for (int u = 0; u < U; ++u) {
            const int64_t ahead = i + u + kPrefetchTokens;
            if (ahead >= p.length) break;
            const int64_t t = p.reverse ? p.length - 1 - ahead : ahead;
            prefetch_bytes(p.q + t * p.q_step + r0, (r1 - r0) * int64_t(sizeof(T)));
            prefetch_bytes(p.k + t * p.k_step + r0, (r1 - r0) * int64_t(sizeof(T)));
            prefetch_bytes(p.v + t * p.v_step + c0, W * int64_t(sizeof(T)));
            prefetch_bytes(p.out + t * p.out_step + c0, W * int64_t(sizeof(T)), true);
        }
        for (int64_t e = r0; e < r1; ++e) {
            T* __restrict row = state + e * ld;
            vec s[NV];
            for (int j = 0; j < NV; ++j) std::memcpy(&s[j], row + j * V, sizeof(vec));
            for (int u = 0; u < U; ++u) {
                const T ke = k[u][e];
                const T qe = q[u][e - r0];
                for (int j = 0; j < NV; ++j) {
                    s[j] += ke * v[u][j];
                    acc[u][j] += qe * s[j];
                }
            }
            for (int j = 0; j < NV; ++j) std::memcpy(row + j * V, &s[j], sizeof(vec));
        }
        for (int u = 0; u < U; ++u) {
            for (int j = 0; j < NV; ++j) std::memcpy(out[u] + j * V, &acc[u][j], sizeof(vec));
        }
    }
    return i;
}

// Columns [c0, c0 + W) and rows [r0, r1) of the state, for every token. W is a compile-time
// width, so `vv` and `acc` live in vector registers and the row loop is a stream of loads,
// fused multiply-adds and stores over one contiguous row of the state. `state` points at
// column c0 of row 0 and rows are `ld` apart. A Partial tile has only `width` < W real columns
// (the last one of a row): its state is a zero-padded copy, so the padding stays zero.
//
// GCC vectorises the w-loops when W >= 32; smaller constant trip counts get fully unrolled
// first and then stay scalar, hence the tail handling below instead of narrower tiles.
//
// With U > 1 (full tiles only) the tokens go U at a time through `multi_token_pass` first.
template <typename T, int W, bool Partial, int U = 1>
inline void recurrence_tile(const Recurrence<T>& p, int64_t c0, int64_t width, T* state,
                            int64_t ld, int64_t r0, int64_t r1) {
    const bool fresh = r0 == 0 && !p.accumulate;
    T* __restrict st = state;
    int64_t first = 0;
    if constexpr (U > 1 && !Partial) first = multi_token_pass<T, W, U>(p, c0, state, ld, r0, r1);
    for (int64_t i = first; i < p.length; ++i) {
        const int64_t t = p.reverse ? p.length - 1 - i : i;
        // the rows kPrefetchTokens ahead, whole, once per token (the first tile): the
        // one-token sweep of the AVX2 and baseline leaves (1.2-1.8x faster on strided rows)
        if (c0 == 0 && r0 == 0 && i + kPrefetchTokens < p.length) {
            const int64_t a = p.reverse ? t - kPrefetchTokens : t + kPrefetchTokens;
            prefetch_row(p.q + a * p.q_step + r0, r1 - r0);
            prefetch_row(p.k + a * p.k_step + r0, r1 - r0);
            prefetch_row(p.v + a * p.v_step, p.cols);
            prefetch_row(p.out + a * p.out_step, p.cols, true);
        }
        const T* __restrict qt = p.q + t * p.q_step;
        const T* __restrict kt = p.k + t * p.k_step;
        const T* __restrict vt = p.v + t * p.v_step + c0;
        T* __restrict ot = p.out + t * p.out_step + c0;
        const T kv_scale = p.kv_scale ? p.kv_scale[t] : T(1);
        const T q_scale = p.q_scale ? p.q_scale[t] : T(1);
        T vv[W];
        T acc[W];
        if constexpr (Partial) {
            for (int w = 0; w < W; ++w) vv[w] = w < width ? vt[w] * kv_scale : T(0);
            for (int w = 0; w < W; ++w) acc[w] = fresh || w >= width ? T(0) : ot[w];
        } else {
            for (int w = 0; w < W; ++w) vv[w] = vt[w] * kv_scale;
            for (int w = 0; w < W; ++w) acc[w] = fresh ? T(0) : ot[w];
        }
        for (int64_t e = r0; e < r1; ++e) {
            const T ke = kt[e];
            const T qe = qt[e] * q_scale;
            T* __restrict row = st + e * ld;
            for (int w = 0; w < W; ++w) {
                const T s = row[w] + ke * vv[w];
                row[w] = s;
                acc[w] += qe * s;
            }
        }
        if constexpr (Partial) {
            for (int64_t w = 0; w < width; ++w) ot[w] = acc[w];
        } else {
            for (int w = 0; w < W; ++w) ot[w] = acc[w];
        }
    }
}

template <typename T, int W, bool Partial, int U>
inline void recurrence_column(const Recurrence<T>& p, int64_t c0, int64_t width, T* state,
                              int64_t ld) {
    const int64_t block = std::max<int64_t>(1, kStateBlockBytes / (W * int64_t(sizeof(T))));
    for (int64_t r0 = 0; r0 < p.rows; r0 += block) {
        const int64_t r1 = std::min(p.rows, r0 + block);
        recurrence_tile<T, W, Partial, U>(p, c0, width, state, ld, r0, r1);
    }
}

// The whole recurrence: full tiles of W columns (U tokens per sweep, see multi_token_pass),
// then the last columns through a zero-padded copy.
template <typename T, int W, int U = 1>
inline void run_recurrence(const Recurrence<T>& p) {
    if (p.rows == 0) {  // an empty sum: out_t = 0
        if (!p.accumulate) {
            for (int64_t t = 0; t < p.length; ++t) {
                std::fill(p.out + t * p.out_step, p.out + t * p.out_step + p.cols, T(0));
            }
        }
        return;
    }
    int64_t c0 = 0;
    for (; c0 + W <= p.cols; c0 += W) {
        recurrence_column<T, W, false, U>(p, c0, W, p.state + c0, p.cols);
    }
    const int64_t width = p.cols - c0;
    if (width == 0) return;
    // the last columns: through a zero-padded copy of their part of the state
    std::vector<T> padded(p.rows * W, T(0));
    for (int64_t e = 0; e < p.rows; ++e) {
        std::copy(p.state + e * p.cols + c0, p.state + (e + 1) * p.cols, padded.data() + e * W);
    }
    recurrence_column<T, W, true, 1>(p, c0, width, padded.data(), W);
    for (int64_t e = 0; e < p.rows; ++e) {
        std::copy(padded.data() + e * W, padded.data() + e * W + width, p.state + e * p.cols + c0);
    }
}

// ---------------------------------------------------------------------------------------
// One compiled copy of the leaves per instruction set
// ---------------------------------------------------------------------------------------

template <typename T>
struct Leaves {
    void (*recurrence)(const Recurrence<T>&);
    void (*normalizer_sweep)(const NormalizerSweep<T>&);
    void (*normalizer_reverse)(const NormalizerReverse<T>&);
};

// Tile widths: 32 elements (the smallest that GCC vectorises; measured best for AVX2), 256 bytes
// with AVX-512's 32 registers, which also hold three tokens per sweep (multi_token_pass).
template <typename T>
inline void recurrence_baseline(const Recurrence<T>& p) {
    run_recurrence<T, 32>(p);
}
template <typename T>
inline void normalizer_sweep_baseline(const NormalizerSweep<T>& p) {
    normalizer_sweep<T>(p);
}
template <typename T>
inline void normalizer_reverse_baseline(const NormalizerReverse<T>& p) {
    normalizer_reverse<T>(p);
}

#if ATTENTION_CORE_X86_DISPATCH
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void recurrence_avx2(const Recurrence<T>& p) {
    run_recurrence<T, 32>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void normalizer_sweep_avx2(const NormalizerSweep<T>& p) {
    normalizer_sweep<T>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void normalizer_reverse_avx2(const NormalizerReverse<T>& p) {
    normalizer_reverse<T>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void recurrence_avx512(const Recurrence<T>& p) {
    run_recurrence<T, 256 / sizeof(T), 3>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void normalizer_sweep_avx512(const NormalizerSweep<T>& p) {
    normalizer_sweep<T>(p);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void normalizer_reverse_avx512(const NormalizerReverse<T>& p) {
    normalizer_reverse<T>(p);
}
#endif

template <typename T>
Leaves<T> leaves_for(CpuLevel level) {
#if ATTENTION_CORE_X86_DISPATCH
    if (level == CpuLevel::avx512) {
        return {&recurrence_avx512<T>, &normalizer_sweep_avx512<T>, &normalizer_reverse_avx512<T>};
    }
    if (level == CpuLevel::avx2) {
        return {&recurrence_avx2<T>, &normalizer_sweep_avx2<T>, &normalizer_reverse_avx2<T>};
    }
#endif
    (void)level;
    return {&recurrence_baseline<T>, &normalizer_sweep_baseline<T>,
            &normalizer_reverse_baseline<T>};
}

template <typename T>
void copy_or_zero(T* dst, const T* src, int64_t n) {
    if (src) {
        std::memcpy(dst, src, sizeof(T) * n);
    } else {
        std::fill(dst, dst + n, T(0));
    }
}

// dst (cols x rows) = src^T for a row-major (rows x cols) src, or zeros when src is null.
template <typename T>
void transpose_or_zero(T* dst, const T* src, int64_t rows, int64_t cols) {
    if (!src) {
        std::fill(dst, dst + rows * cols, T(0));
        return;
    }
    for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
    }
}

}  // namespace causal
}  // namespace attention_core
