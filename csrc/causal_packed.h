// The per-token recurrence (causal_recurrence.h) run chunk by chunk, for operands whose rows
// are not adjacent in memory (the (N, L, H, E) layout of the attention modules reads through
// H E-element strides) and for the fused feature map: causal linear attention with
// phi(x) = elu(x) + 1 applied inside the kernel, numerator and normaliser in one pass.
//
// The heads of a group (see group_size) are walked chunk by chunk: for each chunk of 64
// tokens, one head after the other. (Walking one head at a time over the whole sequence
// touches a new page every few tokens: that, not the arithmetic, made strided rows 1.7-2x
// slower.) In the forward pass a head's chunk runs in three steps: its q and k rows mapped
// into a contiguous buffer when the map is fused (read in place otherwise), the normaliser
// over those rows (z += phi(k_t), r_t = 1 / (phi(q_t) . z + eps), vectorised across tokens,
// causal_normalizer.h), then the recurrence, which reads v in place and writes each output
// row scaled by r_t straight into the strided output, while it brings the next head's rows
// towards the caches. States are carried from chunk to chunk, so the result is the one
// recurrence over the whole sequence. (An earlier form first gathered the rows of every head
// of the group token by token, v included: the gather ran at memory speed with nothing to
// overlap it, and the layer took 1.5-1.7x its bare numerator in place of about 1.4x.)
//
// The backward pass runs its forward sweep chunk by chunk from the first and its reverse
// sweeps chunk by chunk from the last. Each sweep gathers the chunk's q and k rows of every
// head of the group (mapped) the same way, runs the heads' sweeps (reading g, v and out and
// writing dv where they lie, a head at a time) into packed dq or dk rows, then writes those
// back token by token, in memory order again. (Gathering g, v and out as well measured the
// same at L = 4096 and 16384 and 6-10% slower at L = 1024, one thread.) The map is
// recomputed (nothing of size L E is stored); r and dd are kept per token (O(L) per head).
// The gradient of phi is phi(x) for x <= 0 and 1 above, that is min(phi(x), 1): it is read
// from the mapped rows when the dQ and dK rows are written back, without a second exp.
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
    // Mapped q and k: the chunk of one head (forward pass) or of every head of a group (heads
    // x C x E, backward pass); the packed dq or dk of a group (backward pass).
    std::vector<T> hq, hk, hd;

    void reserve_forward(int64_t E) {
        at_least(r, kChunk);
        for (auto* buffer : {&hq, &hk}) at_least(*buffer, kChunk * E);
    }

    void reserve_backward(int64_t E, int64_t heads) {
        for (auto* buffer : {&hq, &hk, &hd}) at_least(*buffer, heads * kChunk * E);
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

// Heads walked together: as many as keep a group's chunk buffers of the backward pass (at
// most 3 rows of max(E, M) per token and head) within about 1 MiB, so that they stay in L2
// while the group's sweeps run; at least one. (In the forward pass it bounds the states that
// cycle through the caches, E M per head.)
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

// dst = src for `cols` elements: a loop the compiler vectorises and inlines (a call of
// memmove per row of a few hundred bytes costs more than the copy).
template <typename T>
inline void copy_row(T* __restrict dst, const T* __restrict src, int64_t cols) {
    for (int64_t f = 0; f < cols; ++f) dst[f] = src[f];
}

// dst = phi(src) (or a copy) for `cols` features (Avx512: see feature_map.h).
template <bool Avx512, typename T>
inline void map_row(T* __restrict dst, const T* __restrict src, int64_t cols, bool elu) {
    if (elu) {
        feature_map::elu_plus_one_row<Avx512>(dst, src, cols);
    } else {
        copy_row(dst, src, cols);
    }
}

// The gathers prefetch the rows kPrefetchRows tokens ahead (a hint).
constexpr int64_t kPrefetchRows = 4;

template <typename T>
inline void prefetch_row(const T* row, int64_t cols) {
    const char* bytes = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < cols * int64_t(sizeof(T)); b += 64) __builtin_prefetch(bytes + b);
}

// dst (rows x cols, contiguous) = phi of `rows` rows of src, `step` elements apart; the rows
// kMapPrefetchRows ahead are brought towards the caches meanwhile (a hint).
constexpr int64_t kMapPrefetchRows = 8;

template <bool Avx512, typename T>
inline void map_rows(T* __restrict dst, const T* src, int64_t step, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) {
        if (i + kMapPrefetchRows < rows) prefetch_row(src + (i + kMapPrefetchRows) * step, cols);
        feature_map::elu_plus_one_row<Avx512>(dst + i * cols, src + i * step, cols);
    }
}

// The q and k rows of tokens [c0, c0 + c) of every head into the workspace, mapped.
template <bool Avx512, typename T>
inline void gather_backward(const HeadBackward<T>* heads, int64_t count, Workspace<T>& ws,
                            int64_t c0, int64_t c) {
    const int64_t E = heads[0].E, L = heads[0].L;
    for (int64_t i = 0; i < c; ++i) {
        const int64_t t = c0 + i, ahead = t + kPrefetchRows < L ? t + kPrefetchRows : -1;
        for (int64_t h = 0; h < count; ++h) {
            const HeadBackward<T>& p = heads[h];
            if (ahead >= 0) {
                prefetch_row(p.q + ahead * p.q_step, E);
                prefetch_row(p.k + ahead * p.k_step, E);
            }
            const int64_t e_row = (h * kChunk + i) * E;
            map_row<Avx512>(ws.hq.data() + e_row, p.q + t * p.q_step, E, p.elu);
            map_row<Avx512>(ws.hk.data() + e_row, p.k + t * p.k_step, E, p.elu);
        }
    }
}

// A packed gradient row (cols) into dst, times phi'(x) = min(phi(x), 1) read from the mapped
// row when the map is fused.
template <typename T>
inline void unpack_row(T* __restrict dst, const T* __restrict packed, const T* __restrict mapped,
                       int64_t cols, bool elu) {
    if (elu) {
        for (int64_t f = 0; f < cols; ++f) dst[f] = packed[f] * std::min(mapped[f], T(1));
    } else {
        copy_row(dst, packed, cols);
    }
}

// The packed gradients of tokens [c0, c0 + c) of every head into their strided outputs:
// ws.hd into dq (forward sweep) or dk (reverse sweep).
template <typename T>
inline void scatter_backward(const HeadBackward<T>* heads, int64_t count, const Workspace<T>& ws,
                             int64_t c0, int64_t c, bool reverse) {
    const int64_t E = heads[0].E;
    const std::vector<T>& mapped = reverse ? ws.hk : ws.hq;
    for (int64_t i = 0; i < c; ++i) {
        const int64_t t = c0 + i;
        for (int64_t h = 0; h < count; ++h) {
            const HeadBackward<T>& p = heads[h];
            const int64_t row = (h * kChunk + i) * E;
            T* dst = reverse ? p.dk + t * p.dk_step : p.dq + t * p.dq_step;
            unpack_row(dst, ws.hd.data() + row, mapped.data() + row, E, p.elu);
        }
    }
}

// The chunk kernels of one instruction set: the recurrence runs with tiles of W columns and U
// tokens per sweep (see run_recurrence); Avx512 selects the feature map's AVX-512 form.
template <typename T, int W, int U, bool Avx512 = false>
struct Chunks {
    // The chunk at c0 of `count` heads, one head after the other, each head's S and z carried
    // from chunk to chunk: the head's q and k rows mapped into the workspace when the map is
    // fused (read where they lie otherwise), its normaliser over those rows, then its
    // recurrence, which reads v where it lies and writes each output row, scaled by r_t,
    // straight into the output. While a head's recurrence runs, the rows of the next head (or
    // of the first head's next chunk) are brought towards the caches.
    static void forward(const HeadForward<T>* heads, int64_t count, Workspace<T>& ws,
                        int64_t c0) {
        for (int64_t h = 0; h < count; ++h) {
            const HeadForward<T>& p = heads[h];
            const int64_t E = p.E, M = p.M, c = std::min(kChunk, p.L - c0);
            const T* q = p.q + c0 * p.q_step;
            const T* k = p.k + c0 * p.k_step;
            int64_t q_step = p.q_step, k_step = p.k_step;
            if (p.elu) {
                map_rows<Avx512>(ws.hq.data(), q, q_step, c, E);
                map_rows<Avx512>(ws.hk.data(), k, k_step, c, E);
                q = ws.hq.data();
                k = ws.hk.data();
                q_step = k_step = E;
            }
            T* r = p.normalize ? ws.r.data() : nullptr;
            if (r) chunk_normalizer<T>(q, q_step, k, k_step, c, E, p.eps, p.z, r);
            Recurrence<T> sweep{q, q_step, k, k_step, p.v + c0 * p.v_step, p.v_step,
                                p.out + c0 * p.out_step, p.out_step, r, nullptr, p.S, E, M, c,
                                false, false};
            if (h + 1 < count) {
                prefetch_next(sweep, heads[h + 1], c0);
            } else if (c0 + kChunk < p.L) {
                prefetch_next(sweep, heads[0], c0 + kChunk);
            }
            run_recurrence<T, W, U>(sweep);
        }
    }

    // The rows of head p's chunk at c0 (q, k, v and out) as the `ahead` streams of a sweep.
    static void prefetch_next(Recurrence<T>& sweep, const HeadForward<T>& p, int64_t c0) {
        const T* rows[4] = {p.q, p.k, p.v, p.out};
        const int64_t steps[4] = {p.q_step, p.k_step, p.v_step, p.out_step};
        const int64_t widths[4] = {p.E, p.E, p.M, p.M};
        for (int s = 0; s < 4; ++s) {
            sweep.ahead[s] = rows[s] + c0 * steps[s];
            sweep.ahead_step[s] = steps[s];
            sweep.ahead_bytes[s] = widths[s] * int64_t(sizeof(T));
        }
        sweep.ahead_length = std::min(kChunk, p.L - c0);
    }

    // Head h's rows of the chunk at c0 as both backward sweeps read them: its gathered
    // (mapped) queries and keys, the gradient and the values where they lie (with their row
    // steps), and its dq or dk rows in the workspace.
    struct ChunkRows {
        const T* q;
        const T* k;
        const T* g;
        const T* v;
        int64_t gs, vs;
        T* d;
    };
    static ChunkRows chunk_rows(const HeadBackward<T>& p, Workspace<T>& ws, int64_t h, int64_t c0,
                                int64_t E) {
        return {ws.hq.data() + h * kChunk * E, ws.hk.data() + h * kChunk * E,
                p.grad + c0 * p.grad_step,      p.v + c0 * p.v_step,
                p.grad_step,                    p.v_step,
                ws.hd.data() + h * kChunk * E};
    }

    // dq_i = dd_i z_i + r_i S_i g_i for the chunk at c0 of `count` heads, forward in time
    // (each head's state as M x E).
    static void backward_forward(const HeadBackward<T>* heads, HeadState<T>* states,
                                 int64_t count, Workspace<T>& ws, int64_t c0) {
        if (count == 0) return;
        const int64_t E = heads[0].E, M = heads[0].M, c = std::min(kChunk, heads[0].L - c0);
        const bool norm = heads[0].normalize;
        gather_backward<Avx512>(heads, count, ws, c0, c);
        for (int64_t h = 0; h < count; ++h) {
            const HeadBackward<T>& p = heads[h];
            HeadState<T>& st = states[h];
            const auto [q, k, g, v, gs, vs, d] = chunk_rows(p, ws, h, c0, E);
            T* r = st.r.data() + c0;
            if (norm) {
                normalizer_sweep<T>({q, E, k, E, g, gs, p.out + c0 * p.out_step, p.out_step, d, E,
                                     st.z.data(), r, st.dd.data() + c0, c, E, M, p.eps});
            }
            run_recurrence<T, W, U>({g, gs, v, vs, k, E, d, E, norm ? r : nullptr, nullptr,
                                     st.state_t.data(), M, E, c, norm, false});
        }
        scatter_backward(heads, count, ws, c0, c, false);
    }

    // dk (the normaliser's part, then the state's), dv, dS0 and dz0 for the chunk at c0 of
    // `count` heads, reverse in time.
    static void backward_reverse(const HeadBackward<T>* heads, HeadState<T>* states,
                                 int64_t count, Workspace<T>& ws, int64_t c0) {
        if (count == 0) return;
        const int64_t E = heads[0].E, M = heads[0].M, c = std::min(kChunk, heads[0].L - c0);
        const bool norm = heads[0].normalize;
        gather_backward<Avx512>(heads, count, ws, c0, c);
        for (int64_t h = 0; h < count; ++h) {
            const HeadBackward<T>& p = heads[h];
            HeadState<T>& st = states[h];
            const auto [q, k, g, v, gs, vs, d] = chunk_rows(p, ws, h, c0, E);
            T* dv = p.dv + c0 * p.dv_step;
            const T* r = norm ? st.r.data() + c0 : nullptr;
            if (norm) normalizer_reverse<T>({q, E, st.dd.data() + c0, d, E, p.dz0, c, E});
            run_recurrence<T, W, U>(
                {k, E, q, E, g, gs, dv, p.dv_step, nullptr, r, p.dS0, E, M, c, false, true});
            run_recurrence<T, W, U>(
                {v, vs, g, gs, q, E, d, E, nullptr, r, st.state_t.data(), M, E, c, norm, true});
        }
        scatter_backward(heads, count, ws, c0, c, true);
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
