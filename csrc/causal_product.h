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
#include "causal_packed.h"
#include "causal_recurrence.h"
#include "cpu_dispatch.h"
#include "parallel.h"

namespace attention_core {
namespace causal {

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
    // q and k are the inputs of the feature map elu(x) + 1, applied in the kernel when the
    // rows are packed (packed and chunked forms: dq and dk are then gradients of the inputs)
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

// Which form runs:
// - recurrence: the per-token recurrence straight on the operands; compact rows.
// - packed: the same recurrence over packed 64-token chunks; rows that are not adjacent in
//   memory (every head's chunk is gathered in memory order, see causal_packed.h) and the fused
//   feature map.
// - chunked: the GEMM-shaped form; it does about 1.5x the operations of the recurrence in
//   register-blocked products.
// Measured with 8 heads, float32, one thread, against the recurrence (packed for strided
// rows and the fused map), chunked / per-token time, forward and backward:
//   E = M = 64:  1.7-3.0x at every L from 256 to 4096;  E = M = 128: 1.2-2.2x;
//   E = M = 256: compact rows 0.80-0.90x from L = 1024 (1.1x at 256), strided 1.1-1.2x;
//   E = M = 512: compact 0.78-0.88x at L = 1024, strided 0.82-0.99x.
// Hence chunked from L = 1024 on with E M >= 256 * 256 on compact rows and E M >= 512 * 512
// on strided rows or with the fused map. The thresholds can be changed for the tests (which
// run the chunked form on small shapes) through `chunked_thresholds()`.
enum class Form { recurrence, packed, chunked };

struct ChunkedThresholds {
    int64_t min_length = 1024;
    int64_t min_state_compact = 256 * 256;  // E M, compact rows without the fused map
    int64_t min_state_strided = 512 * 512;  // E M, strided rows or the fused map
};

inline ChunkedThresholds& chunked_thresholds() {
    static ChunkedThresholds thresholds;
    return thresholds;
}

inline Form choose_form(int64_t L, int64_t E, int64_t M, bool compact, bool elu) {
    const ChunkedThresholds& t = chunked_thresholds();
    const bool plain = compact && !elu;
    const int64_t min_state = plain ? t.min_state_compact : t.min_state_strided;
    if (L >= t.min_length && E * M >= min_state) return Form::chunked;
    return plain ? Form::recurrence : Form::packed;
}

template <typename T>
Form choose_form(const Problem<T>& a) {
    const bool compact = a.q.s.l == a.E && a.k.s.l == a.E && a.v.s.l == a.M;
    return choose_form(a.L, a.E, a.M, compact, a.elu);
}

template <typename T>
chunked::Head<T> head_operands(const Problem<T>& a, int64_t n, int64_t h) {
    return {a.q.head(n, h), a.q.s.l, a.k.head(n, h), a.k.s.l, a.v.head(n, h), a.v.s.l,
            a.L,            a.E,     a.M,            a.normalize, a.elu,      a.eps};
}

// The operands of head `item` (= n H + h), with its final states initialised from S0 and z0.
template <typename T>
chunked::HeadForward<T> forward_head_args(const ForwardArgs<T>& a, int64_t item) {
    const int64_t n = item / a.H, h = item % a.H, E = a.E, M = a.M;
    chunked::HeadForward<T> p{};
    static_cast<chunked::Head<T>&>(p) = head_operands(a, n, h);
    p.out = a.out.head(n, h);
    p.out_step = a.out.s.l;
    p.S = a.S + item * E * M;
    copy_or_zero(p.S, a.S0 ? a.S0 + item * E * M : nullptr, E * M);
    if (a.normalize) {
        p.z = a.z + item * E;
        copy_or_zero(p.z, a.z0 ? a.z0 + item * E : nullptr, E);
    }
    return p;
}

template <typename T>
chunked::HeadBackward<T> backward_head_args(const BackwardArgs<T>& a, int64_t item) {
    const int64_t n = item / a.H, h = item % a.H, E = a.E, M = a.M;
    chunked::HeadBackward<T> p{};
    static_cast<chunked::Head<T>&>(p) = head_operands(a, n, h);
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
    return p;
}

// The chunked form: one head at a time over the whole sequence.
template <typename T>
void forward_chunked(const ForwardArgs<T>& a, int64_t threads) {
    const chunked::Leaves<T> leaves = chunked::leaves_for<T>(cpu_level());
    const int64_t NH = a.N * a.H;
    const int64_t workers = useful_threads(threads, NH, 4 * NH * a.L * a.E * a.M);
    parallel_for(NH, workers, [&](int64_t, int64_t begin, int64_t end) {
        chunked::Workspace<T> ws;
        ws.reserve(a.L, a.E, a.M, leaves.NR);
        for (int64_t item = begin; item < end; ++item) {
            leaves.forward(forward_head_args(a, item), ws);
        }
    });
}

template <typename T>
void backward_chunked(const BackwardArgs<T>& a, int64_t threads) {
    const chunked::Leaves<T> leaves = chunked::leaves_for<T>(cpu_level());
    const int64_t NH = a.N * a.H;
    const int64_t workers = useful_threads(threads, NH, 12 * NH * a.L * a.E * a.M);
    parallel_for(NH, workers, [&](int64_t, int64_t begin, int64_t end) {
        chunked::Workspace<T> ws;
        ws.reserve(a.L, a.E, a.M, leaves.NR);
        for (int64_t item = begin; item < end; ++item) {
            leaves.backward(backward_head_args(a, item), ws);
        }
    });
}

// The packed recurrence: each worker takes its heads in groups (see packed::group_size) and
// walks the chunks of a group in the outer loop and its heads in the inner one (see
// causal_packed.h).
template <typename T>
void forward_packed(const ForwardArgs<T>& a, int64_t threads) {
    const packed::Leaves<T> leaves = packed::leaves_for<T>(cpu_level());
    const int64_t NH = a.N * a.H;
    const int64_t workers = useful_threads(threads, NH, 4 * NH * a.L * a.E * a.M);
    const int64_t group = packed::group_size<T>(a.E, a.M);
    parallel_for(NH, workers, [&](int64_t, int64_t begin, int64_t end) {
        packed::Workspace<T>& ws = packed::thread_workspace<T>();
        std::vector<chunked::HeadForward<T>> heads;
        for (int64_t first = begin; first < end; first += group) {
            const int64_t count = std::min(group, end - first);
            heads.clear();
            for (int64_t item = first; item < first + count; ++item) {
                heads.push_back(forward_head_args(a, item));
            }
            ws.reserve_forward(a.E);
            for (int64_t c0 = 0; c0 < a.L; c0 += packed::kChunk) {
                leaves.forward(heads.data(), count, ws, c0);
            }
        }
    });
}

template <typename T>
void backward_packed(const BackwardArgs<T>& a, int64_t threads) {
    const packed::Leaves<T> leaves = packed::leaves_for<T>(cpu_level());
    const int64_t NH = a.N * a.H, L = a.L, C = packed::kChunk;
    const int64_t workers = useful_threads(threads, NH, 12 * NH * L * a.E * a.M);
    const int64_t group = packed::group_size<T>(a.E, a.M);
    parallel_for(NH, workers, [&](int64_t, int64_t begin, int64_t end) {
        packed::Workspace<T>& ws = packed::thread_workspace<T>();
        std::vector<chunked::HeadBackward<T>> heads;
        std::vector<packed::HeadState<T>> states;
        for (int64_t first = begin; first < end; first += group) {
            const int64_t count = std::min(group, end - first);
            heads.clear();
            for (int64_t item = first; item < first + count; ++item) {
                heads.push_back(backward_head_args(a, item));
            }
            states.resize(count);
            ws.reserve_backward(a.E);
            for (int64_t i = 0; i < count; ++i) packed::backward_start(heads[i], states[i]);
            for (int64_t c0 = 0; c0 < L; c0 += C) {
                leaves.backward_forward(heads.data(), states.data(), count, ws, c0);
            }
            for (int64_t i = 0; i < count; ++i) packed::backward_turn(heads[i], states[i]);
            for (int64_t c0 = (L - 1) / C * C; L > 0 && c0 >= 0; c0 -= C) {
                leaves.backward_reverse(heads.data(), states.data(), count, ws, c0);
            }
        }
    });
}

template <typename T>
void forward_recurrence(const ForwardArgs<T>& a, int64_t threads);
template <typename T>
void backward_recurrence(const BackwardArgs<T>& a, int64_t threads);

template <typename T>
void forward(const ForwardArgs<T>& a, int64_t threads) {
    switch (choose_form(a)) {
        case Form::chunked: return forward_chunked(a, threads);
        case Form::packed: return forward_packed(a, threads);
        default: return forward_recurrence(a, threads);
    }
}

template <typename T>
void backward(const BackwardArgs<T>& a, int64_t threads) {
    switch (choose_form(a)) {
        case Form::chunked: return backward_chunked(a, threads);
        case Form::packed: return backward_packed(a, threads);
        default: return backward_recurrence(a, threads);
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
