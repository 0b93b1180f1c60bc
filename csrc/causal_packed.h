// The per-token recurrence (causal_recurrence.h) run chunk by chunk over packed copies of the
// rows, for operands whose rows are not adjacent in memory (the (N, L, H, E) layout of the
// attention modules reads through H E-element strides) and for the fused feature map.
//
// Each chunk of 64 tokens of q, k, v (and grad) is first copied into contiguous buffers,
// applying elu(x) + 1 to q and k when asked; the recurrence and the normaliser sweeps then run
// on the chunk with their states carried from chunk to chunk, so the result is the one
// recurrence over the whole sequence. The caller walks chunks in the outer loop and a
// worker's heads in the inner one: in the (N, L, H, E) layout the heads of a chunk share the
// same pages, so the memory of a chunk is read while it is in the TLB and caches (walking one
// head at a time over the whole sequence touches a new page every few tokens: that, not the
// arithmetic, made strided rows 1.7-2x slower). The backward pass runs its forward sweep chunk
// by chunk from the first, and its three reverse sweeps chunk by chunk from the last, all
// three on the same packed chunk; r and dd are kept per token (O(L) per head). The gradient
// of the feature map is applied to dQ and dK rows once a chunk's rows are complete.
//
// No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "causal_chunked.h"
#include "causal_recurrence.h"

namespace attention_core {
namespace causal {
namespace packed {

using chunked::HeadBackward;
using chunked::HeadForward;
constexpr int64_t kChunk = 64;  // tokens per packed chunk

template <typename T>
struct Workspace {
    std::vector<T> q, k, v, g, dq, dk, r;

    void reserve(int64_t E, int64_t M) {
        for (auto* buffer : {&q, &k, &dq, &dk}) buffer->assign(kChunk * E, T(0));
        for (auto* buffer : {&v, &g}) buffer->assign(kChunk * M, T(0));
        r.resize(kChunk);
    }
};

// q, k (feature map applied) and v rows [c0, c0 + c) into the workspace.
template <typename T>
void pack_chunk(const chunked::Head<T>& p, Workspace<T>& ws, int64_t c0, int64_t c) {
    const T* none = nullptr;
    chunked::pack_rows(ws.q.data(), p.E, p.q + c0 * p.q_step, p.q_step, c, p.E, p.elu, none);
    chunked::pack_rows(ws.k.data(), p.E, p.k + c0 * p.k_step, p.k_step, c, p.E, p.elu, none);
    chunked::pack_rows(ws.v.data(), p.M, p.v + c0 * p.v_step, p.v_step, c, p.M, false, none);
}

// Rows [c0, c0 + c) of a packed gradient into the strided dst, through the feature map's
// gradient (x: the map's input rows) when it is fused.
template <typename T>
void unpack_gradient(T* dst, int64_t dst_step, const T* packed, int64_t cols, const T* x,
                     int64_t x_step, bool elu, int64_t c) {
    for (int64_t i = 0; i < c; ++i) {
        T* d = dst + i * dst_step;
        std::copy(packed + i * cols, packed + (i + 1) * cols, d);
        if (elu) chunked::elu_backward_row(d, x + i * x_step, cols);
    }
}

// Per-head state that the backward pass carries from chunk to chunk (the forward pass keeps
// its states in the head's S and z outputs).
template <typename T>
struct HeadState {
    std::vector<T> state_t, z, r, dd;  // (M x E), (E), (L), (L)
};

template <typename T>
void forward_chunk(const HeadForward<T>& p, Workspace<T>& ws, const Leaves<T>& leaves,
                   int64_t c0) {
    const int64_t E = p.E, M = p.M, c = std::min(kChunk, p.L - c0);
    pack_chunk(p, ws, c0, c);
    if (p.normalize) {
        leaves.normalizer_sweep({ws.q.data(), E, ws.k.data(), E, nullptr, 0, nullptr, 0, nullptr,
                                 0, p.z, ws.r.data(), nullptr, c, E, M, p.eps});
    }
    leaves.recurrence({ws.q.data(), E, ws.k.data(), E, ws.v.data(), M, p.out + c0 * p.out_step,
                       p.out_step, p.normalize ? ws.r.data() : nullptr, nullptr, p.S, E, M, c,
                       false, false});
}

template <typename T>
void backward_start(const HeadBackward<T>& p, HeadState<T>& h) {
    h.state_t.resize(p.E * p.M);
    transpose_or_zero(h.state_t.data(), p.S0, p.E, p.M);
    h.z.resize(p.E);
    copy_or_zero(h.z.data(), p.normalize ? p.z0 : nullptr, p.E);
    h.r.resize(p.L);
    h.dd.resize(p.L);
}

// dq_i = dd_i z_i + r_i S_i g_i for the chunk at c0, forward in time (the state as M x E).
template <typename T>
void backward_forward_chunk(const HeadBackward<T>& p, HeadState<T>& h, Workspace<T>& ws,
                            const Leaves<T>& leaves, int64_t c0) {
    const int64_t E = p.E, M = p.M, c = std::min(kChunk, p.L - c0);
    const bool norm = p.normalize;
    pack_chunk(p, ws, c0, c);
    chunked::pack_rows(ws.g.data(), M, p.grad + c0 * p.grad_step, p.grad_step, c, M, false,
                       static_cast<const T*>(nullptr));
    T* r = h.r.data() + c0;
    if (norm) {
        leaves.normalizer_sweep({ws.q.data(), E, ws.k.data(), E, ws.g.data(), M,
                                 p.out + c0 * p.out_step, p.out_step, ws.dq.data(), E,
                                 h.z.data(), r, h.dd.data() + c0, c, E, M, p.eps});
    }
    leaves.recurrence({ws.g.data(), M, ws.v.data(), M, ws.k.data(), E, ws.dq.data(), E,
                       norm ? r : nullptr, nullptr, h.state_t.data(), M, E, c, norm, false});
    unpack_gradient(p.dq + c0 * p.dq_step, p.dq_step, ws.dq.data(), E, p.q + c0 * p.q_step,
                    p.q_step, p.elu, c);
}

template <typename T>
void backward_turn(const HeadBackward<T>& p, HeadState<T>& h) {
    copy_or_zero(p.dS0, p.gS, p.E * p.M);
    transpose_or_zero(h.state_t.data(), p.gS, p.E, p.M);
    if (p.normalize) copy_or_zero(p.dz0, p.gz, p.E);
}

// dk (the normaliser's part, then the state's), dv, dS0 and dz0 for the chunk at c0, reverse
// in time.
template <typename T>
void backward_reverse_chunk(const HeadBackward<T>& p, HeadState<T>& h, Workspace<T>& ws,
                            const Leaves<T>& leaves, int64_t c0) {
    const int64_t E = p.E, M = p.M, c = std::min(kChunk, p.L - c0);
    const bool norm = p.normalize;
    pack_chunk(p, ws, c0, c);
    chunked::pack_rows(ws.g.data(), M, p.grad + c0 * p.grad_step, p.grad_step, c, M, false,
                       static_cast<const T*>(nullptr));
    const T* r = norm ? h.r.data() + c0 : nullptr;
    if (norm) {
        leaves.normalizer_reverse(
            {ws.q.data(), E, h.dd.data() + c0, ws.dk.data(), E, p.dz0, c, E});
    }
    leaves.recurrence({ws.k.data(), E, ws.q.data(), E, ws.g.data(), M, p.dv + c0 * p.dv_step,
                       p.dv_step, nullptr, r, p.dS0, E, M, c, false, true});
    leaves.recurrence({ws.v.data(), M, ws.g.data(), M, ws.q.data(), E, ws.dk.data(), E, nullptr,
                       r, h.state_t.data(), M, E, c, norm, true});
    unpack_gradient(p.dk + c0 * p.dk_step, p.dk_step, ws.dk.data(), E, p.k + c0 * p.k_step,
                    p.k_step, p.elu, c);
}

}  // namespace packed
}  // namespace causal
}  // namespace attention_core
