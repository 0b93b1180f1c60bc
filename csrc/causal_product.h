// Causal dot product, the heart of causal linear attention (Katharopoulos et al. 2020,
// "Transformers are RNNs", arXiv 2006.16236), and its normalised form, on the CPU.
//
//   numerator:    num_i = sum_{j <= i} (q_i . k_j) v_j = S_i^T q_i,   S_i = S0 + sum_{j<=i} k_j v_j^T
//   normaliser:   r_i = 1 / (q_i . z_i + eps),                         z_i = z0 + sum_{j<=i} k_j
//   output:       out_i = num_i              (causal_dot_product)
//                 out_i = r_i num_i          (normalised: causal linear attention)
//
// One recurrence does all the heavy work (see `Recurrence`): walk the tokens in order (or in
// reverse), add an outer product to a (rows x cols) state and read the state with a vector.
// The forward pass is one recurrence. The backward pass stores no per-position state: it
// recomputes the states with three more recurrences (a forward sweep for dQ and two reverse
// sweeps for dK and dV) plus two cheap sweeps for the normaliser, so memory stays
// O(L (E + M)) per head. Heads (batch x heads) are spread over std::threads.
//
// Layout: every (N, H, L, features) operand is given by a pointer and the element strides of
// its n, h and l dimensions; the feature dimension must be contiguous. States are contiguous
// (N, H, E, M) and (N, H, E). No pybind11 and no torch here: bindings.cpp converts and checks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "causal_chunked.h"
#include "cpu_dispatch.h"
#include "parallel.h"

namespace attention_core {
namespace causal {

// ---------------------------------------------------------------------------------------
// The recurrence
// ---------------------------------------------------------------------------------------

// For each token t (t = 0..length-1, or reversed):
//     state += kv_scale[t] * k_t v_t^T                    (rows x cols)
//     out_t  = [out_t +] q_scale[t] * state^T q_t          (cols)
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

// Columns [c0, c0 + W) and rows [r0, r1) of the state, for every token. W is a compile-time
// width, so `vv` and `acc` live in vector registers and the row loop is a stream of loads,
// fused multiply-adds and stores over one contiguous row of the state. `state` points at
// column c0 of row 0 and rows are `ld` apart. A Partial tile has only `width` < W real columns
// (the last one of a row): its state is a zero-padded copy, so the padding stays zero.
//
// GCC vectorises the w-loops when W >= 32; smaller constant trip counts get fully unrolled
// first and then stay scalar, hence the tail handling below instead of narrower tiles.
template <typename T, int W, bool Partial>
inline void recurrence_tile(const Recurrence<T>& p, int64_t c0, int64_t width, T* state,
                            int64_t ld, int64_t r0, int64_t r1) {
    const bool fresh = r0 == 0 && !p.accumulate;
    T* __restrict st = state;
    for (int64_t i = 0; i < p.length; ++i) {
        const int64_t t = p.reverse ? p.length - 1 - i : i;
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

template <typename T, int W, bool Partial>
inline void recurrence_column(const Recurrence<T>& p, int64_t c0, int64_t width, T* state,
                              int64_t ld) {
    const int64_t block = std::max<int64_t>(1, kStateBlockBytes / (W * int64_t(sizeof(T))));
    for (int64_t r0 = 0; r0 < p.rows; r0 += block) {
        recurrence_tile<T, W, Partial>(p, c0, width, state, ld, r0, std::min(p.rows, r0 + block));
    }
}

template <typename T, int W>
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
    for (; c0 + W <= p.cols; c0 += W) recurrence_column<T, W, false>(p, c0, W, p.state + c0, p.cols);
    const int64_t width = p.cols - c0;
    if (width == 0) return;
    // the last columns: through a zero-padded copy of their part of the state
    std::vector<T> padded(p.rows * W, T(0));
    for (int64_t e = 0; e < p.rows; ++e) {
        std::copy(p.state + e * p.cols + c0, p.state + (e + 1) * p.cols, padded.data() + e * W);
    }
    recurrence_column<T, W, true>(p, c0, width, padded.data(), W);
    for (int64_t e = 0; e < p.rows; ++e) {
        std::copy(padded.data() + e * W, padded.data() + e * W + width, p.state + e * p.cols + c0);
    }
}

// ---------------------------------------------------------------------------------------
// The normaliser sweeps (cheap: O(E + M) per token)
// ---------------------------------------------------------------------------------------

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
    constexpr int P = 32;  // independent partial sums (32: see recurrence_tile)
    T part[P] = {};
    int64_t i = 0;
    for (; i + P <= n; i += P) {
        for (int j = 0; j < P; ++j) part[j] += a[i + j] * b[i + j];
    }
    T sum = 0;
    for (; i < n; ++i) sum += a[i] * b[i];
    for (int j = 0; j < P; ++j) sum += part[j];
    return sum;
}

// Forward in time: z_i = z + sum_{j<=i} k_j and r_i = 1 / (q_i . z_i + eps). With `g` set (the
// backward pass) also dd_i = -(g_i . out_i) r_i, the gradient of the denominator, and
// dq_i = dd_i z_i. `z` holds z0 on entry and z_final on exit.
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

template <typename T>
inline void normalizer_sweep(const NormalizerSweep<T>& p) {
    T* __restrict z = p.z;
    for (int64_t t = 0; t < p.length; ++t) {
        const T* __restrict kt = p.k + t * p.k_step;
        for (int64_t e = 0; e < p.E; ++e) z[e] += kt[e];
        const T r = T(1) / (dot(p.q + t * p.q_step, z, p.E) + p.eps);
        p.r[t] = r;
        if (p.g) {
            const T dd = -dot(p.g + t * p.g_step, p.out + t * p.out_step, p.M) * r;
            p.dd[t] = dd;
            T* __restrict dq = p.dq + t * p.dq_step;
            for (int64_t e = 0; e < p.E; ++e) dq[e] = dd * z[e];
        }
    }
}

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
// One compiled copy of the leaves per instruction set
// ---------------------------------------------------------------------------------------

template <typename T>
struct Leaves {
    void (*recurrence)(const Recurrence<T>&);
    void (*normalizer_sweep)(const NormalizerSweep<T>&);
    void (*normalizer_reverse)(const NormalizerReverse<T>&);
};

// Tile widths: 32 elements (the smallest that GCC vectorises; measured best for AVX2), 256 bytes
// with AVX-512's 32 registers.
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
    run_recurrence<T, 256 / sizeof(T)>(p);
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

// ---------------------------------------------------------------------------------------
// Forward and backward over batch x heads
// ---------------------------------------------------------------------------------------

// Element strides of the n, h and l dimensions of an (N, H, L, features) operand.
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
struct Problem {
    int64_t N, H, L, E, M;
    bool normalize;
    T eps;
    Operand<const T> q, k, v;  // (N, H, L, E), (N, H, L, E), (N, H, L, M)
    const T* S0;               // (N, H, E, M) contiguous, or null for zeros
    const T* z0;               // (N, H, E) contiguous, or null (normalised only)
    // q and k are the inputs of the feature map elu(x) + 1, applied in the kernel (chunked
    // form only, which then runs at every length)
    bool elu = false;
};

template <typename T>
struct ForwardArgs : Problem<T> {
    Operand<T> out;  // (N, H, L, M)
    T* S;            // (N, H, E, M) contiguous: the final state
    T* z;            // (N, H, E) contiguous: the final normaliser state (normalised only)
};

template <typename T>
struct BackwardArgs : Problem<T> {
    Operand<const T> grad;  // (N, H, L, M): gradient of out
    Operand<const T> out;   // (N, H, L, M): the forward output (normalised only)
    const T* gS;            // (N, H, E, M) gradient of the final state, or null
    const T* gz;            // (N, H, E) gradient of the final normaliser state, or null
    Operand<T> dq, dk, dv;  // like q, k, v
    T* dS0;                 // (N, H, E, M) contiguous
    T* dz0;                 // (N, H, E) contiguous (normalised only)
};

// Fewer threads than asked when the work is too small to pay for starting them.
inline int64_t useful_threads(int64_t threads, int64_t heads, int64_t flops) {
    constexpr int64_t kMinFlopsPerThread = int64_t{1} << 20;
    return std::max<int64_t>(1, std::min({threads, heads, flops / kMinFlopsPerThread}));
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

// Which form runs. The per-token recurrence does exactly the product's 4 E M operations per
// token with its state in L1, and wins on compact rows; the chunked form does about 1.5x the
// operations in GEMM-shaped leaves but reads every row once into a packed chunk, so it wins
// when rows are strided (the (N, L, H, E) layout of the attention modules reads through
// H E-element strides, which costs the recurrence about 1.5-2x) and is the form that applies
// the feature map (`elu`). Short sequences and the recurrent step stay on the recurrence.
constexpr int64_t kChunkedMinLength = 128;

template <typename T>
bool use_chunked(const Problem<T>& a) {
    if (a.elu) return true;
    const bool strided = a.q.s.l != a.E || a.k.s.l != a.E || a.v.s.l != a.M;
    return strided && a.L >= kChunkedMinLength;
}

template <typename T>
chunked::Head<T> chunked_head(const Problem<T>& a, int64_t n, int64_t h) {
    return {a.q.head(n, h), a.q.s.l, a.k.head(n, h), a.k.s.l, a.v.head(n, h), a.v.s.l,
            a.L,            a.E,     a.M,            a.normalize, a.elu,      a.eps};
}

template <typename T>
void forward_chunked(const ForwardArgs<T>& a, int64_t threads) {
    const int64_t N = a.N, H = a.H, E = a.E, M = a.M;
    const chunked::Leaves<T> leaves = chunked::leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, N * H, 4 * N * H * a.L * E * M);
    parallel_for(N * H, workers, [&](int64_t, int64_t begin, int64_t end) {
        chunked::Workspace<T> ws;
        ws.reserve(a.L, E, M, leaves.NR);
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / H, h = item % H;
            chunked::HeadForward<T> p{};
            static_cast<chunked::Head<T>&>(p) = chunked_head(a, n, h);
            p.out = a.out.head(n, h);
            p.out_step = a.out.s.l;
            p.S = a.S + item * E * M;
            copy_or_zero(p.S, a.S0 ? a.S0 + item * E * M : nullptr, E * M);
            if (a.normalize) {
                p.z = a.z + item * E;
                copy_or_zero(p.z, a.z0 ? a.z0 + item * E : nullptr, E);
            }
            leaves.forward(p, ws);
        }
    });
}

template <typename T>
void backward_chunked(const BackwardArgs<T>& a, int64_t threads) {
    const int64_t N = a.N, H = a.H, E = a.E, M = a.M;
    const chunked::Leaves<T> leaves = chunked::leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, N * H, 12 * N * H * a.L * E * M);
    parallel_for(N * H, workers, [&](int64_t, int64_t begin, int64_t end) {
        chunked::Workspace<T> ws;
        ws.reserve(a.L, E, M, leaves.NR);
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / H, h = item % H;
            chunked::HeadBackward<T> p{};
            static_cast<chunked::Head<T>&>(p) = chunked_head(a, n, h);
            p.grad = a.grad.head(n, h);
            p.grad_step = a.grad.s.l;
            if (a.normalize) {
                p.out = a.out.head(n, h);
                p.out_step = a.out.s.l;
                p.z0 = a.z0 ? a.z0 + item * E : nullptr;
                p.gz = a.gz ? a.gz + item * E : nullptr;
                p.dz0 = a.dz0 + item * E;
            }
            p.S0 = a.S0 ? a.S0 + item * E * M : nullptr;
            p.gS = a.gS ? a.gS + item * E * M : nullptr;
            p.dq = a.dq.head(n, h);
            p.dq_step = a.dq.s.l;
            p.dk = a.dk.head(n, h);
            p.dk_step = a.dk.s.l;
            p.dv = a.dv.head(n, h);
            p.dv_step = a.dv.s.l;
            p.dS0 = a.dS0 + item * E * M;
            leaves.backward(p, ws);
        }
    });
}

template <typename T>
void forward_recurrence(const ForwardArgs<T>& a, int64_t threads);
template <typename T>
void backward_recurrence(const BackwardArgs<T>& a, int64_t threads);

template <typename T>
void forward(const ForwardArgs<T>& a, int64_t threads) {
    if (use_chunked(a)) {
        forward_chunked(a, threads);
    } else {
        forward_recurrence(a, threads);
    }
}

template <typename T>
void backward(const BackwardArgs<T>& a, int64_t threads) {
    if (use_chunked(a)) {
        backward_chunked(a, threads);
    } else {
        backward_recurrence(a, threads);
    }
}

// The per-token recurrence over batch x heads.
template <typename T>
void forward_recurrence(const ForwardArgs<T>& a, int64_t threads) {
    const int64_t N = a.N, H = a.H, L = a.L, E = a.E, M = a.M;
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, N * H, 4 * N * H * L * E * M);
    parallel_for(N * H, workers, [&](int64_t, int64_t begin, int64_t end) {
        std::vector<T> r(a.normalize ? L : 0);
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / H, h = item % H;
            const T* q = a.q.head(n, h);
            const T* k = a.k.head(n, h);
            T* S = a.S + item * E * M;
            copy_or_zero(S, a.S0 ? a.S0 + item * E * M : nullptr, E * M);
            if (a.normalize) {
                T* z = a.z + item * E;
                copy_or_zero(z, a.z0 ? a.z0 + item * E : nullptr, E);
                leaves.normalizer_sweep({q, a.q.s.l, k, a.k.s.l, nullptr, 0, nullptr, 0, nullptr,
                                         0, z, r.data(), nullptr, L, E, M, a.eps});
            }
            leaves.recurrence({q, a.q.s.l, k, a.k.s.l, a.v.head(n, h), a.v.s.l,
                               a.out.head(n, h), a.out.s.l, a.normalize ? r.data() : nullptr,
                               nullptr, S, E, M, L, false, false});
        }
    });
}

template <typename T>
void backward_recurrence(const BackwardArgs<T>& a, int64_t threads) {
    const int64_t N = a.N, H = a.H, L = a.L, E = a.E, M = a.M;
    const bool norm = a.normalize;
    const Leaves<T> leaves = leaves_for<T>(cpu_level());
    const int64_t workers = useful_threads(threads, N * H, 12 * N * H * L * E * M);
    parallel_for(N * H, workers, [&](int64_t, int64_t begin, int64_t end) {
        std::vector<T> r(norm ? L : 0), dd(norm ? L : 0), z(norm ? E : 0), state(E * M);
        const T* r_or_null = norm ? r.data() : nullptr;
        for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / H, h = item % H;
            const T* q = a.q.head(n, h);
            const T* k = a.k.head(n, h);
            const T* v = a.v.head(n, h);
            const T* g = a.grad.head(n, h);
            T* dq = a.dq.head(n, h);
            T* dk = a.dk.head(n, h);
            T* dv = a.dv.head(n, h);
            const int64_t ql = a.q.s.l, kl = a.k.s.l, vl = a.v.s.l, gl = a.grad.s.l;
            if (norm) {  // r_i, dd_i and the denominator's part of dq
                copy_or_zero(z.data(), a.z0 ? a.z0 + item * E : nullptr, E);
                leaves.normalizer_sweep({q, ql, k, kl, g, gl, a.out.head(n, h), a.out.s.l, dq,
                                         a.dq.s.l, z.data(), r.data(), dd.data(), L, E, M,
                                         a.eps});
            }
            // dq_i += r_i (S0 + sum_{j<=i} k_j v_j^T) g_i, with the state stored as (M x E)
            transpose_or_zero(state.data(), a.S0 ? a.S0 + item * E * M : nullptr, E, M);
            leaves.recurrence({g, gl, v, vl, k, kl, dq, a.dq.s.l, r_or_null, nullptr,
                               state.data(), M, E, L, norm, false});
            if (norm) {  // the denominator's part of dk, and dz0
                T* w = a.dz0 + item * E;
                copy_or_zero(w, a.gz ? a.gz + item * E : nullptr, E);
                leaves.normalizer_reverse({q, ql, dd.data(), dk, a.dk.s.l, w, L, E});
            }
            // dv_i = (gS + sum_{j>=i} q_j (r_j g_j)^T)^T k_i; the state ends as dS0
            T* R = a.dS0 + item * E * M;
            copy_or_zero(R, a.gS ? a.gS + item * E * M : nullptr, E * M);
            leaves.recurrence({k, kl, q, ql, g, gl, dv, a.dv.s.l, nullptr, r_or_null, R, E, M, L,
                               false, true});
            // dk_i += (gS + sum_{j>=i} q_j (r_j g_j)^T) v_i, with the state stored as (M x E)
            transpose_or_zero(state.data(), a.gS ? a.gS + item * E * M : nullptr, E, M);
            leaves.recurrence({v, vl, g, gl, q, ql, dk, a.dk.s.l, nullptr, r_or_null,
                               state.data(), M, E, L, norm, true});
        }
    });
}

}  // namespace causal
}  // namespace attention_core
