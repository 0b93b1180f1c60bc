// The per-token recurrence (causal_recurrence.h) run chunk by chunk, for operands whose rows
// are not adjacent in memory (the (N, L, H, E) layout of the attention modules reads through
// H E-element strides) and for the fused feature map: causal linear attention with
// phi(x) = elu(x) + 1 applied inside the kernel, numerator and normaliser in one pass.
//
// For each chunk of 64 tokens, q and k are first mapped into contiguous buffers (phi applied
// when asked) while the normaliser runs over the same rows (z += phi(k_t),
// r_t = 1 / (phi(q_t) . z + eps)); the recurrence then reads those buffers and the v rows
// where they lie, and writes each output row scaled by r_t straight into the strided output.
// States are carried from chunk to chunk, so the result is the one recurrence over the whole
// sequence. The caller walks chunks in the outer loop and a worker's heads in the inner one:
// in the (N, L, H, E) layout the heads of a chunk share the same pages, so the memory of a
// chunk is read while it is in the TLB and caches (walking one head at a time over the whole
// sequence touches a new page every few tokens: that, not the arithmetic, made strided rows
// 1.7-2x slower).
//
// The backward pass runs its forward sweep chunk by chunk from the first, and its three
// reverse sweeps chunk by chunk from the last, all three on the same mapped chunk; the map is
// recomputed (nothing of size L E is stored), r and dd are kept per token (O(L) per head).
// The gradient of phi is phi(x) for x <= 0 and 1 above, that is min(phi(x), 1): it is read
// from the mapped rows when a chunk's dQ and dK rows are written, without a second exp.
//
// Every chunk kernel is compiled once per instruction set (`Leaves`, as in causal_recurrence.h),
// the feature map and the recurrence included. No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "causal_chunked.h"
#include "causal_recurrence.h"
#include "cpu_dispatch.h"
#include "feature_map.h"

namespace attention_core {
namespace causal {
namespace packed {

using chunked::HeadBackward;
using chunked::HeadForward;
constexpr int64_t kChunk = 64;  // tokens per chunk

template <typename T>
struct Workspace {
    std::vector<T> q, k, d, r;  // mapped q and k rows, a gradient chunk, r of the chunk
    // the forward pass's chunk of every head of the worker: mapped q and k, v (heads x C x .)
    std::vector<T> hq, hk, hv;

    void reserve(int64_t E, int64_t M, int64_t heads = 0) {
        for (auto* buffer : {&q, &k, &d}) buffer->assign(kChunk * E, T(0));
        r.resize(kChunk);
        for (auto* buffer : {&hq, &hk}) buffer->assign(heads * kChunk * E, T(0));
        hv.assign(heads * kChunk * M, T(0));
    }
};

// Per-head state that the backward pass carries from chunk to chunk (the forward pass keeps
// its states in the head's S and z outputs).
template <typename T>
struct HeadState {
    std::vector<T> state_t, z, r, dd;  // (M x E), (E), (L), (L)
};

// dst = phi(src) (or a copy) for `cols` features (Avx512: see feature_map.h).
template <bool Avx512, typename T>
inline void map_row(T* __restrict dst, const T* __restrict src, int64_t cols, bool elu) {
    if (elu) {
        feature_map::elu_plus_one_row<Avx512>(dst, src, cols);
    } else {
        std::copy(src, src + cols, dst);
    }
}

// Prefetching of the next chunk of this head (visited after the worker's other heads): the
// hardware prefetchers do not follow strided rows. `ahead` is the token of the next chunk that
// corresponds to token t of this one (t + kChunk, or t - kChunk in reverse sweeps).
inline int64_t token_ahead(int64_t t, int64_t L, bool reverse) {
    const int64_t ahead = reverse ? t - kChunk : t + kChunk;
    return ahead >= 0 && ahead < L ? ahead : -1;
}

template <typename T>
inline void prefetch_row(const T* base, int64_t step, int64_t t, int64_t cols,
                         bool write = false) {
    const char* row = reinterpret_cast<const char*>(base + t * step);
    for (int64_t b = 0; b < cols * int64_t(sizeof(T)); b += 64) {
        if (write) {
            __builtin_prefetch(row + b, 1);
        } else {
            __builtin_prefetch(row + b);
        }
    }
}

// The rows that the backward sweeps read (and write) at token `ahead`.
template <typename T>
inline void prefetch_backward(const HeadBackward<T>& p, int64_t ahead, bool reverse) {
    if (ahead < 0) return;
    prefetch_row(p.grad, p.grad_step, ahead, p.M);
    prefetch_row(p.v, p.v_step, ahead, p.M);
    if (reverse) {
        prefetch_row(p.dk, p.dk_step, ahead, p.E, true);
        prefetch_row(p.dv, p.dv_step, ahead, p.M, true);
    } else {
        prefetch_row(p.dq, p.dq_step, ahead, p.E, true);
        if (p.normalize) prefetch_row(p.out, p.out_step, ahead, p.M);
    }
}

// The c rows of the chunk at c0: q and k mapped into ws.q and ws.k (and the rows of the next
// chunk prefetched).
template <bool Avx512, typename T>
inline void map_chunk(const HeadBackward<T>& p, Workspace<T>& ws, int64_t c0, int64_t c,
                      bool reverse) {
    const int64_t E = p.E;
    const T* q = p.q;
    const T* k = p.k;
    const int64_t q_step = p.q_step, k_step = p.k_step, L = p.L;
    for (int64_t i = 0; i < c; ++i) {
        const int64_t ahead = token_ahead(c0 + i, L, reverse);
        if (ahead >= 0) {
            prefetch_row(q, q_step, ahead, E);
            prefetch_row(k, k_step, ahead, E);
            prefetch_backward(p, ahead, reverse);
        }
        map_row<Avx512>(ws.q.data() + i * E, q + (c0 + i) * q_step, E, p.elu);
        map_row<Avx512>(ws.k.data() + i * E, k + (c0 + i) * k_step, E, p.elu);
    }
}

// Rows of a packed gradient (c x cols) into the strided dst, times phi'(x) = min(phi(x), 1)
// read from the mapped rows when the map is fused.
template <typename T>
inline void unpack_gradient(T* dst, int64_t dst_step, const T* packed, const T* mapped,
                            int64_t cols, bool elu, int64_t c) {
    for (int64_t i = 0; i < c; ++i) {
        T* __restrict d = dst + i * dst_step;
        const T* __restrict g = packed + i * cols;
        if (elu) {
            const T* __restrict m = mapped + i * cols;
            for (int64_t f = 0; f < cols; ++f) d[f] = g[f] * std::min(m[f], T(1));
        } else {
            std::copy(g, g + cols, d);
        }
    }
}

// The chunk kernels of one instruction set: the recurrence runs with tiles of W columns and U
// tokens per sweep (see run_recurrence); Avx512 selects the feature map's AVX-512 form.
template <typename T, int W, int U, bool Avx512 = false>
struct Chunks {
    // out rows of the chunk at c0 for `count` heads, with each head's S and z carried. The
    // rows of every head are first gathered token by token (q and k mapped), so that the
    // strided (N, L, H, E) layout is read in its memory order, once; each head's recurrence
    // then runs on contiguous rows that are in the caches.
    static void forward(const HeadForward<T>* heads, int64_t count, Workspace<T>& ws,
                        int64_t c0) {
        if (count == 0) return;
        const HeadForward<T>& first = heads[0];
        const int64_t E = first.E, M = first.M, L = first.L, c = std::min(kChunk, L - c0);
        for (int64_t i = 0; i < c; ++i) {
            const int64_t t = c0 + i;
            for (int64_t h = 0; h < count; ++h) {
                const HeadForward<T>& p = heads[h];
                map_row<Avx512>(ws.hq.data() + (h * kChunk + i) * E, p.q + t * p.q_step, E, p.elu);
                map_row<Avx512>(ws.hk.data() + (h * kChunk + i) * E, p.k + t * p.k_step, E, p.elu);
                const T* v = p.v + t * p.v_step;
                std::copy(v, v + M, ws.hv.data() + (h * kChunk + i) * M);
            }
        }
        T* r = ws.r.data();
        for (int64_t h = 0; h < count; ++h) {
            const HeadForward<T>& p = heads[h];
            const T* q = ws.hq.data() + h * kChunk * E;
            const T* k = ws.hk.data() + h * kChunk * E;
            if (p.normalize) {
                T* __restrict z = p.z;
                for (int64_t i = 0; i < c; ++i) {
                    const T* __restrict ki = k + i * E;
                    for (int64_t e = 0; e < E; ++e) z[e] += ki[e];
                    r[i] = T(1) / (dot(q + i * E, z, E) + p.eps);
                }
            }
            Recurrence<T> sweep{q, E, k, E, ws.hv.data() + h * kChunk * M, M,
                                p.out + c0 * p.out_step, p.out_step, p.normalize ? r : nullptr,
                                nullptr, p.S, E, M, c, false, false};
            // while it computes, the head's rows of the next chunk come from memory
            const int64_t next = c0 + kChunk;
            if (E == M && next < L) {
                sweep.ahead[0] = p.q + next * p.q_step;
                sweep.ahead[1] = p.k + next * p.k_step;
                sweep.ahead[2] = p.v + next * p.v_step;
                sweep.ahead[3] = p.out + next * p.out_step;
                sweep.ahead_step[0] = p.q_step;
                sweep.ahead_step[1] = p.k_step;
                sweep.ahead_step[2] = p.v_step;
                sweep.ahead_step[3] = p.out_step;
                sweep.ahead_bytes = E * int64_t(sizeof(T));
                sweep.ahead_length = std::min(kChunk, L - next);
            }
            run_recurrence<T, W, U>(sweep);
        }
    }

    // dq_i = dd_i z_i + r_i S_i g_i for the chunk at c0, forward in time (the state as M x E).
    static void backward_forward(const HeadBackward<T>& p, HeadState<T>& h, Workspace<T>& ws,
                                 int64_t c0) {
        const int64_t E = p.E, M = p.M, c = std::min(kChunk, p.L - c0);
        const bool norm = p.normalize;
        map_chunk<Avx512>(p, ws, c0, c, false);
        const T* g = p.grad + c0 * p.grad_step;
        T* r = h.r.data() + c0;
        if (norm) {
            normalizer_sweep<T>({ws.q.data(), E, ws.k.data(), E, g, p.grad_step,
                                 p.out + c0 * p.out_step, p.out_step, ws.d.data(), E, h.z.data(),
                                 r, h.dd.data() + c0, c, E, M, p.eps});
        }
        run_recurrence<T, W, U>({g, p.grad_step, p.v + c0 * p.v_step, p.v_step, ws.k.data(), E,
                                 ws.d.data(), E, norm ? r : nullptr, nullptr, h.state_t.data(),
                                 M, E, c, norm, false});
        unpack_gradient(p.dq + c0 * p.dq_step, p.dq_step, ws.d.data(), ws.q.data(), E, p.elu, c);
    }

    // dk (the normaliser's part, then the state's), dv, dS0 and dz0 for the chunk at c0,
    // reverse in time.
    static void backward_reverse(const HeadBackward<T>& p, HeadState<T>& h, Workspace<T>& ws,
                                 int64_t c0) {
        const int64_t E = p.E, M = p.M, c = std::min(kChunk, p.L - c0);
        const bool norm = p.normalize;
        map_chunk<Avx512>(p, ws, c0, c, true);
        const T* g = p.grad + c0 * p.grad_step;
        const T* v = p.v + c0 * p.v_step;
        const T* r = norm ? h.r.data() + c0 : nullptr;
        if (norm) {
            normalizer_reverse<T>({ws.q.data(), E, h.dd.data() + c0, ws.d.data(), E, p.dz0, c, E});
        }
        run_recurrence<T, W, U>({ws.k.data(), E, ws.q.data(), E, g, p.grad_step,
                                 p.dv + c0 * p.dv_step, p.dv_step, nullptr, r, p.dS0, E, M, c,
                                 false, true});
        run_recurrence<T, W, U>({v, p.v_step, g, p.grad_step, ws.q.data(), E, ws.d.data(), E,
                                 nullptr, r, h.state_t.data(), M, E, c, norm, true});
        unpack_gradient(p.dk + c0 * p.dk_step, p.dk_step, ws.d.data(), ws.k.data(), E, p.elu, c);
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
    void (*backward_forward)(const HeadBackward<T>&, HeadState<T>&, Workspace<T>&, int64_t);
    void (*backward_reverse)(const HeadBackward<T>&, HeadState<T>&, Workspace<T>&, int64_t);
};

// The tile widths and tokens per sweep of causal_recurrence.h's leaves.
template <typename T>
using BaselineChunks = Chunks<T, 32, 1>;

template <typename T>
void forward_baseline(const HeadForward<T>* heads, int64_t count, Workspace<T>& ws, int64_t c0) {
    BaselineChunks<T>::forward(heads, count, ws, c0);
}
template <typename T>
void backward_forward_baseline(const HeadBackward<T>& p, HeadState<T>& h, Workspace<T>& ws,
                               int64_t c0) {
    BaselineChunks<T>::backward_forward(p, h, ws, c0);
}
template <typename T>
void backward_reverse_baseline(const HeadBackward<T>& p, HeadState<T>& h, Workspace<T>& ws,
                               int64_t c0) {
    BaselineChunks<T>::backward_reverse(p, h, ws, c0);
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
ATTENTION_CORE_TARGET_AVX2 void backward_forward_avx2(const HeadBackward<T>& p, HeadState<T>& h,
                                                      Workspace<T>& ws, int64_t c0) {
    Avx2Chunks<T>::backward_forward(p, h, ws, c0);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void backward_reverse_avx2(const HeadBackward<T>& p, HeadState<T>& h,
                                                      Workspace<T>& ws, int64_t c0) {
    Avx2Chunks<T>::backward_reverse(p, h, ws, c0);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void forward_avx512(const HeadForward<T>* heads, int64_t count,
                                                 Workspace<T>& ws, int64_t c0) {
    Avx512Chunks<T>::forward(heads, count, ws, c0);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void backward_forward_avx512(const HeadBackward<T>& p,
                                                          HeadState<T>& h, Workspace<T>& ws,
                                                          int64_t c0) {
    Avx512Chunks<T>::backward_forward(p, h, ws, c0);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void backward_reverse_avx512(const HeadBackward<T>& p,
                                                          HeadState<T>& h, Workspace<T>& ws,
                                                          int64_t c0) {
    Avx512Chunks<T>::backward_reverse(p, h, ws, c0);
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
