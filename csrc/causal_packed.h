// The per-token recurrence (causal_recurrence.h) run chunk by chunk, for operands whose rows
// are not adjacent in memory (the (N, L, H, E) layout of the attention modules reads through
// H E-element strides) and for the fused feature map: causal linear attention with
// phi(x) = elu(x) + 1 applied inside the kernel, numerator and normaliser in one pass.
//
// The heads of a group (see group_size) are walked chunk by chunk: for each chunk of 64
// tokens, one head after the other. (Walking one head at a time over the whole sequence
// touches a new page every few tokens: that, not the arithmetic, made strided rows 1.7-2x
// slower.) Each sweep of a head's chunk first maps its q and k rows into contiguous buffers
// when the map is fused (and reads them in place otherwise), then runs the normaliser over
// them, vectorised across tokens (causal_normalizer.h), then the recurrence, which reads the
// other operands and writes its output rows where they lie. The loops outside the recurrence
// prefetch the strided rows a few tokens ahead (prefetch.h); the recurrence prefetches its
// own.
// - Forward: r_t = 1 / (phi(q_t) . z_t + eps), and the output rows scaled by r_t. States are
//   carried from chunk to chunk, so the result is the one recurrence over the whole sequence.
// - Backward: a forward sweep chunk by chunk from the first (r, dd and dq) and reverse sweeps
//   from the last (dk, dv and the initial states' gradients). With the fused map dq and dk
//   are formed in a buffer and written out times phi'(x) = min(phi(x), 1), read from the
//   mapped rows (no second exp). The map is recomputed in each sweep (nothing of size L E is
//   stored); r and dd are kept per token (O(L) per head).
// An earlier form first gathered the chunk's rows of every head of the group token by token:
// the gather ran at memory speed with nothing to overlap it. Against it, this form measured
// (2 threads, B=1, H=8, E=M=64, float32) 1.2-1.3x faster for the fused layer's forward,
// 1.2-1.3x for strided rows without the map, forward and backward alike, and about the same
// for the fused layer's backward. Prefetching the next head's rows during a recurrence
// measured no gain (the rows were not there yet when the next head's loops read them), so
// nothing is prefetched across heads.
//
// Every chunk kernel is compiled once per instruction set (`Leaves`, as in causal_recurrence.h),
// the feature map and the recurrence included. No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "causal_chunked.h"
#include "causal_normalizer.h"
#include "causal_recurrence.h"
#include "cpu_dispatch.h"
#include "feature_map.h"
#include "prefetch.h"

namespace attention_core {
namespace causal {
namespace packed {

using chunked::HeadBackward;
using chunked::HeadForward;
constexpr int64_t kChunk = 64;  // tokens per chunk

// A buffer of at least n elements (grown, never shrunk: its rows are written before they
// are read, so nothing needs clearing).
template <typename T>
inline T* at_least(std::vector<T>& buffer, int64_t n) {
    if (int64_t(buffer.size()) < n) buffer.resize(n);
    return buffer.data();
}

template <typename T>
struct Workspace {
    std::vector<T> r;  // r of the forward pass's chunk
    // One head's chunk (C x E): mapped q and k, and the dq or dk that the backward pass forms
    // before it writes them out times phi'.
    std::vector<T> hq, hk, hd;

    void reserve_forward(int64_t E) {
        at_least(r, kChunk);
        for (auto* buffer : {&hq, &hk}) at_least(*buffer, kChunk * E);
    }

    void reserve_backward(int64_t E) {
        for (auto* buffer : {&hq, &hk, &hd}) at_least(*buffer, kChunk * E);
    }
};

// The workspace of the calling thread, kept between calls (the threads of torch's pool live
// on): allocating and clearing it per call was a fixed cost of every call. Bounded by the
// group size below.
template <typename T>
inline Workspace<T>& thread_workspace() {
    static thread_local Workspace<T> workspace;
    return workspace;
}

// Heads walked together, chunk by chunk: about 1 MiB of chunk rows (3 rows of max(E, M) per
// token and head), at least one head. The size was set for an earlier form that gathered
// those rows into buffers; it now bounds the heads whose states (E M each) cycle through the
// caches from one chunk to the next, and how far apart in time the heads of one token's
// row (adjacent in the (N, L, H, E) layout) are read.
template <typename T>
inline int64_t group_size(int64_t E, int64_t M) {
    constexpr int64_t kGroupBytes = int64_t{1} << 20;
    const int64_t head_bytes = kChunk * 3 * std::max(E, M) * int64_t(sizeof(T));
    return std::max<int64_t>(1, kGroupBytes / std::max<int64_t>(1, head_bytes));
}

// Per-head state that the backward pass carries from chunk to chunk (the forward pass keeps
// its states in the head's S and z outputs).
template <typename T>
struct HeadState {
    std::vector<T> state_t, z, r, dd;  // (M x E), (E), (L), (L)
};

// dst (rows x cols, contiguous) = phi of `rows` rows of src, `step` elements apart; the rows
// kPrefetchRows ahead are brought towards the caches meanwhile.
template <bool Avx512, typename T>
inline void map_rows(T* __restrict dst, const T* src, int64_t step, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) {
        if (i + kPrefetchRows < rows) prefetch_row(src + (i + kPrefetchRows) * step, cols);
        feature_map::elu_plus_one_row<Avx512>(dst + i * cols, src + i * step, cols);
    }
}

// dst rows (`step` apart) = the contiguous gradient rows of `packed` times
// phi'(x) = min(phi(x), 1), read from the contiguous mapped rows (no second exp).
template <typename T>
inline void map_gradient_rows(T* dst, int64_t step, const T* packed, const T* mapped,
                              int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) {
        if (i + kPrefetchRows < rows) prefetch_row(dst + (i + kPrefetchRows) * step, cols, true);
        T* __restrict d = dst + i * step;
        const T* __restrict p = packed + i * cols;
        const T* __restrict x = mapped + i * cols;
        for (int64_t f = 0; f < cols; ++f) d[f] = p[f] * std::min(x[f], T(1));
    }
}

// One head's chunk of rows as a sweep reads them: q and k mapped into the workspace when the
// map is fused (rows `E` apart), read in place otherwise.
template <typename T>
struct MappedRows {
    const T* q;
    int64_t q_step;
    const T* k;
    int64_t k_step;
};

template <bool Avx512, typename T, class Head>
inline MappedRows<T> chunk_rows(const Head& p, Workspace<T>& ws, int64_t c0, int64_t c) {
    const T* q = p.q + c0 * p.q_step;
    const T* k = p.k + c0 * p.k_step;
    if (!p.elu) return {q, p.q_step, k, p.k_step};
    map_rows<Avx512>(ws.hq.data(), q, p.q_step, c, p.E);
    map_rows<Avx512>(ws.hk.data(), k, p.k_step, c, p.E);
    return {ws.hq.data(), p.E, ws.hk.data(), p.E};
}

// The chunk kernels of one instruction set: the recurrence runs with tiles of W columns and U
// tokens per sweep (see run_recurrence); Avx512 selects the feature map's AVX-512 form.
template <typename T, int W, int U, bool Avx512 = false>
struct Chunks {
    // The chunk at c0 of `count` heads, one head after the other, each head's S and z carried
    // from chunk to chunk: the head's q and k rows mapped into the workspace when the map is
    // fused (read where they lie otherwise), its normaliser over those rows, then its
    // recurrence, which reads v where it lies and writes each output row, scaled by r_t,
    // straight into the output.
    static void forward(const HeadForward<T>* heads, int64_t count, Workspace<T>& ws,
                        int64_t c0) {
        for (int64_t h = 0; h < count; ++h) {
            const HeadForward<T>& p = heads[h];
            const int64_t c = std::min(kChunk, p.L - c0);
            const auto [q, q_step, k, k_step] = chunk_rows<Avx512>(p, ws, c0, c);
            T* r = p.normalize ? ws.r.data() : nullptr;
            if (r) chunk_normalizer<T>(q, q_step, k, k_step, c, p.E, p.eps, p.z, r);
            run_recurrence<T, W, U>({q, q_step, k, k_step, p.v + c0 * p.v_step, p.v_step,
                                     p.out + c0 * p.out_step, p.out_step, r, nullptr, p.S, p.E,
                                     p.M, c, false, false});
        }
    }

    // dq_t = dd_t z_t + r_t S_t g_t for the chunk at c0 of `count` heads, forward in time,
    // one head after the other (each head's state as M x E). With the fused map dq is formed
    // in the workspace and written out times phi'(q).
    static void backward_forward(const HeadBackward<T>* heads, HeadState<T>* states,
                                 int64_t count, Workspace<T>& ws, int64_t c0) {
        for (int64_t h = 0; h < count; ++h) {
            const HeadBackward<T>& p = heads[h];
            HeadState<T>& st = states[h];
            const int64_t E = p.E, M = p.M, c = std::min(kChunk, p.L - c0);
            const bool norm = p.normalize;
            const auto [q, q_step, k, k_step] = chunk_rows<Avx512>(p, ws, c0, c);
            const T* g = p.grad + c0 * p.grad_step;
            T* d = p.elu ? ws.hd.data() : p.dq + c0 * p.dq_step;
            const int64_t d_step = p.elu ? E : p.dq_step;
            T* r = st.r.data() + c0;
            if (norm) {
                chunk_normalizer_backward<T>(q, q_step, k, k_step, g, p.grad_step,
                                             p.out + c0 * p.out_step, p.out_step, c, E, M, p.eps,
                                             st.z.data(), r, st.dd.data() + c0, d, d_step);
            }
            run_recurrence<T, W, U>({g, p.grad_step, p.v + c0 * p.v_step, p.v_step, k, k_step,
                                     d, d_step, norm ? r : nullptr, nullptr, st.state_t.data(),
                                     M, E, c, norm, false});
            if (p.elu) map_gradient_rows(p.dq + c0 * p.dq_step, p.dq_step, d, q, c, E);
        }
    }

    // dk (the normaliser's part, then the state's), dv, dS0 and dz0 for the chunk at c0 of
    // `count` heads, reverse in time, one head after the other.
    static void backward_reverse(const HeadBackward<T>* heads, HeadState<T>* states,
                                 int64_t count, Workspace<T>& ws, int64_t c0) {
        for (int64_t h = 0; h < count; ++h) {
            const HeadBackward<T>& p = heads[h];
            HeadState<T>& st = states[h];
            const int64_t E = p.E, M = p.M, c = std::min(kChunk, p.L - c0);
            const bool norm = p.normalize;
            const auto [q, q_step, k, k_step] = chunk_rows<Avx512>(p, ws, c0, c);
            const T* g = p.grad + c0 * p.grad_step;
            const T* v = p.v + c0 * p.v_step;
            T* d = p.elu ? ws.hd.data() : p.dk + c0 * p.dk_step;
            const int64_t d_step = p.elu ? E : p.dk_step;
            const T* r = norm ? st.r.data() + c0 : nullptr;
            if (norm) normalizer_reverse<T>({q, q_step, st.dd.data() + c0, d, d_step, p.dz0, c, E});
            run_recurrence<T, W, U>({k, k_step, q, q_step, g, p.grad_step, p.dv + c0 * p.dv_step,
                                     p.dv_step, nullptr, r, p.dS0, E, M, c, false, true});
            run_recurrence<T, W, U>({v, p.v_step, g, p.grad_step, q, q_step, d, d_step, nullptr,
                                     r, st.state_t.data(), M, E, c, norm, true});
            if (p.elu) map_gradient_rows(p.dk + c0 * p.dk_step, p.dk_step, d, k, c, E);
        }
    }
};

template <typename T>
void backward_start(const HeadBackward<T>& p, HeadState<T>& h) {
    h.state_t.resize(p.E * p.M);
    transpose_or_zero(h.state_t.data(), p.S0, p.E, p.M);
    h.z.resize(p.E);
    copy_or_zero(h.z.data(), p.normalize ? p.z0 : nullptr, p.E);
    h.r.resize(p.L);
    h.dd.resize(p.L);
}

template <typename T>
void backward_turn(const HeadBackward<T>& p, HeadState<T>& h) {
    copy_or_zero(p.dS0, p.gS, p.E * p.M);
    transpose_or_zero(h.state_t.data(), p.gS, p.E, p.M);
    if (p.normalize) copy_or_zero(p.dz0, p.gz, p.E);
}

// ---------------------------------------------------------------------------------------
// One compiled copy of the chunk kernels per instruction set
// ---------------------------------------------------------------------------------------

template <typename T>
struct Leaves {
    void (*forward)(const HeadForward<T>*, int64_t, Workspace<T>&, int64_t);
    void (*backward_forward)(const HeadBackward<T>*, HeadState<T>*, int64_t, Workspace<T>&,
                             int64_t);
    void (*backward_reverse)(const HeadBackward<T>*, HeadState<T>*, int64_t, Workspace<T>&,
                             int64_t);
};

// The tile widths and tokens per sweep of causal_recurrence.h's leaves.
template <typename T>
using BaselineChunks = Chunks<T, 32, 1>;

template <typename T>
void forward_baseline(const HeadForward<T>* heads, int64_t count, Workspace<T>& ws, int64_t c0) {
    BaselineChunks<T>::forward(heads, count, ws, c0);
}
template <typename T>
void backward_forward_baseline(const HeadBackward<T>* heads, HeadState<T>* states,
    int64_t count, Workspace<T>& ws, int64_t c0) {
    BaselineChunks<T>::backward_forward(heads, states, count, ws, c0);
}
template <typename T>
void backward_reverse_baseline(const HeadBackward<T>* heads, HeadState<T>* states,
    int64_t count, Workspace<T>& ws, int64_t c0) {
    BaselineChunks<T>::backward_reverse(heads, states, count, ws, c0);
}

#if ATTENTION_CORE_X86_DISPATCH
template <typename T>
using Avx2Chunks = Chunks<T, 32, 1>;
template <typename T>
using Avx512Chunks = Chunks<T, 256 / sizeof(T), 3, true>;

template <typename T>
ATTENTION_CORE_TARGET_AVX2 void forward_avx2(const HeadForward<T>* heads, int64_t count,
                                             Workspace<T>& ws, int64_t c0) {
    Avx2Chunks<T>::forward(heads, count, ws, c0);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void backward_forward_avx2(const HeadBackward<T>* heads, HeadState<T>* states,
    int64_t count, Workspace<T>& ws, int64_t c0) {
    Avx2Chunks<T>::backward_forward(heads, states, count, ws, c0);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void backward_reverse_avx2(const HeadBackward<T>* heads, HeadState<T>* states,
    int64_t count, Workspace<T>& ws, int64_t c0) {
    Avx2Chunks<T>::backward_reverse(heads, states, count, ws, c0);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void forward_avx512(const HeadForward<T>* heads, int64_t count,
                                                 Workspace<T>& ws, int64_t c0) {
    Avx512Chunks<T>::forward(heads, count, ws, c0);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void backward_forward_avx512(const HeadBackward<T>* heads, HeadState<T>* states,
    int64_t count, Workspace<T>& ws, int64_t c0) {
    Avx512Chunks<T>::backward_forward(heads, states, count, ws, c0);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void backward_reverse_avx512(const HeadBackward<T>* heads, HeadState<T>* states,
    int64_t count, Workspace<T>& ws, int64_t c0) {
    Avx512Chunks<T>::backward_reverse(heads, states, count, ws, c0);
}
#endif

template <typename T>
Leaves<T> leaves_for(CpuLevel level) {
#if ATTENTION_CORE_X86_DISPATCH
    if (level == CpuLevel::avx512) {
        return {&forward_avx512<T>, &backward_forward_avx512<T>, &backward_reverse_avx512<T>};
    }
    if (level == CpuLevel::avx2) {
        return {&forward_avx2<T>, &backward_forward_avx2<T>, &backward_reverse_avx2<T>};
    }
#endif
    (void)level;
    return {&forward_baseline<T>, &backward_forward_baseline<T>, &backward_reverse_baseline<T>};
}

}  // namespace packed
}  // namespace causal
}  // namespace attention_core
