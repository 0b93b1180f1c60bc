// The chunked (GEMM-shaped) form of the causal product, for long sequences (see
// causal_product.h for the maths and the per-token recurrence used for short ones).
//
// The tokens of one head are cut into chunks of C = 64. Within a chunk the causal sum is a
// masked product of small matrices; across chunks it is a state carried forward:
//
//   A   = tril(Q_c K_c^T)                        (C x C scores)
//   num = Q_c S + A V_c,        S += K_c^T V_c   (S: E x M state before / after the chunk)
//   den = rowsum(A) + Q_c z + eps,   z += colsum(K_c)        (normalised form only)
//
// Every operand chunk is first copied into a zero-padded contiguous buffer (the copy reads
// the strided (N, L, H, E) layout once per element, and applies the feature map elu(x) + 1
// when asked), so all products run through the register-blocked leaves of small_gemm.h.
//
// Backward (g' = r g, the gradient of the numerator; dd_i = -(g_i . out_i) r_i, that of the
// denominator), in two sweeps that recompute the chunk products instead of storing them:
//   forward in time, with S^T and z before the chunk:
//     B   = tril(G'_c V_c^T + dd 1^T)
//     dQ  = G'_c S^T + dd z^T + B K_c,           S^T += V_c^T K_c,  z += colsum(K_c)
//   reverse in time, with R = gS + sum_{later} Q^T G' and w = gz + sum_{later} Q^T dd:
//     dV  = K_c R + triu(K_c Q_c^T) G'_c
//     dK  = V_c R^T + 1 w^T + triu(V_c G'_c^T + 1 dd^T) Q_c,   R += Q_c^T G'_c,  w += Q_c^T dd
//   and dS0 = R, dz0 = w at the end. r and dd are kept per token (O(L) per thread).
//
// No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "causal_recurrence.h"
#include "cpu_dispatch.h"
#include "feature_map.h"
#include "small_gemm.h"
#include "vector_dot.h"

namespace attention_core {
namespace causal {
namespace chunked {

constexpr int64_t kChunk = 64;

// One head's operands: rows of a (L, features) operand are `*_step` elements apart, features
// contiguous. With `elu` set, q and k are the inputs of the feature map elu(x) + 1.
template <typename T>
struct Head {
    const T* q;
    int64_t q_step;
    const T* k;
    int64_t k_step;
    const T* v;
    int64_t v_step;
    int64_t L, E, M;
    bool normalize;
    bool elu;
    T eps;
};

template <typename T>
struct HeadForward : Head<T> {
    T* out;
    int64_t out_step;
    T* S;  // (E, M) contiguous: the initial state on entry, the final one on exit
    T* z;  // (E,): likewise (normalised only)
};

template <typename T>
struct HeadBackward : Head<T> {
    const T* grad;
    int64_t grad_step;
    const T* out;  // the forward output (normalised only)
    int64_t out_step;
    const T* S0;  // (E, M) or null
    const T* z0;  // (E,) or null
    const T* gS;  // (E, M) or null
    const T* gz;  // (E,) or null
    T* dq;
    int64_t dq_step;
    T* dk;
    int64_t dk_step;
    T* dv;
    int64_t dv_step;
    T* dS0;  // (E, M)
    T* dz0;  // (E,) (normalised only)
};

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// phi(x) = elu(x) + 1 and its exp (feature_map.h)
using feature_map::elu_plus_one;
using feature_map::exp_nonpositive;

// Per-thread buffers, zero-padded: rows of C, columns rounded up to the kernel's NR.
template <typename T>
struct Workspace {
    int64_t Ep = 0, Mp = 0;
    std::vector<T> q, qt, k, kt, v, vt, g, gt, a, b, o, state, state_t, z, w, r, dd;

    void reserve(int64_t L, int64_t E, int64_t M, int64_t NR) {
        Ep = round_up(std::max<int64_t>(E, 1), NR);
        Mp = round_up(std::max<int64_t>(M, 1), NR);
        for (auto* buffer : {&q, &k, &o}) buffer->assign(kChunk * std::max(Ep, Mp), T(0));
        for (auto* buffer : {&v, &g}) buffer->assign(kChunk * Mp, T(0));
        for (auto* buffer : {&qt, &kt}) buffer->assign(Ep * kChunk, T(0));
        for (auto* buffer : {&vt, &gt}) buffer->assign(Mp * kChunk, T(0));
        for (auto* buffer : {&a, &b}) buffer->assign(kChunk * kChunk, T(0));
        state.assign(Ep * Mp, T(0));
        state_t.assign(Ep * Mp, T(0));
        z.assign(Ep, T(0));
        w.assign(Ep, T(0));
        r.resize(L);
        dd.resize(L);
    }
};

// dst (C x ld) = c rows of src (`cols` features), zero rows below c; with `elu` the feature
// map is applied, with `scale` row i is multiplied by scale[i].
template <typename T>
inline void pack_rows(T* dst, int64_t ld, const T* src, int64_t step, int64_t c, int64_t cols,
                      bool elu, const T* scale) {
    for (int64_t i = 0; i < c; ++i) {
        const T* __restrict s = src + i * step;
        T* __restrict d = dst + i * ld;
        if (elu) {
            for (int64_t f = 0; f < cols; ++f) d[f] = elu_plus_one(s[f]);
        } else if (scale) {
            const T factor = scale[i];
            for (int64_t f = 0; f < cols; ++f) d[f] = s[f] * factor;
        } else {
            std::copy(s, s + cols, d);
        }
    }
    if (c < kChunk) std::fill(dst + c * ld, dst + kChunk * ld, T(0));
}

// dst (rows x C) = the transpose of the packed (C x ld) src's first `rows` columns.
template <typename T>
inline void transpose_chunk(T* dst, const T* src, int64_t ld, int64_t rows) {
    for (int64_t f = 0; f < rows; ++f) {
        T* __restrict d = dst + f * kChunk;
        for (int64_t i = 0; i < kChunk; ++i) d[i] = src[i * ld + f];
    }
}

// The gradient of elu(x) + 1 applied to a gradient row: d *= (x > 0 ? 1 : exp(x)).
template <typename T>
inline void elu_backward_row(T* __restrict d, const T* __restrict x, int64_t n) {
    for (int64_t f = 0; f < n; ++f) {
        const T positive = static_cast<T>(x[f] > T(0));
        d[f] *= positive + (T(1) - positive) * exp_nonpositive(std::min(x[f], T(0)));
    }
}

template <typename T, class K>
void forward_head(const HeadForward<T>& p, Workspace<T>& ws) {
    const int64_t L = p.L, E = p.E, M = p.M, Ep = ws.Ep, Mp = ws.Mp, C = kChunk;
    T* S = ws.state.data();
    std::fill(ws.state.begin(), ws.state.end(), T(0));
    for (int64_t e = 0; e < E; ++e) std::copy(p.S + e * M, p.S + (e + 1) * M, S + e * Mp);
    T* z = ws.z.data();
    if (p.normalize) std::copy(p.z, p.z + E, z);
    for (int64_t c0 = 0; c0 < L; c0 += C) {
        const int64_t c = std::min(C, L - c0);
        pack_rows(ws.q.data(), Ep, p.q + c0 * p.q_step, p.q_step, c, E, p.elu, (const T*)nullptr);
        pack_rows(ws.k.data(), Ep, p.k + c0 * p.k_step, p.k_step, c, E, p.elu, (const T*)nullptr);
        pack_rows(ws.v.data(), Mp, p.v + c0 * p.v_step, p.v_step, c, M, false, (const T*)nullptr);
        transpose_chunk(ws.kt.data(), ws.k.data(), Ep, Ep);
        T* A = ws.a.data();
        T* O = ws.o.data();
        K::triangle(C, Ep, ws.q.data(), Ep, ws.kt.data(), C, A, C, gemm::Band::lower);
        K::product(C, Mp, Ep, ws.q.data(), Ep, S, Mp, O, Mp, false, gemm::Band::full);
        K::product(C, Mp, C, A, C, ws.v.data(), Mp, O, Mp, true, gemm::Band::lower);
        for (int64_t i = 0; i < c; ++i) {
            T* __restrict out = p.out + (c0 + i) * p.out_step;
            const T* o = O + i * Mp;
            if (p.normalize) {
                T den = dot(ws.q.data() + i * Ep, z, E) + p.eps;
                for (int64_t j = 0; j <= i; ++j) den += A[i * C + j];
                const T r = T(1) / den;
                for (int64_t m = 0; m < M; ++m) out[m] = o[m] * r;
            } else {
                std::copy(o, o + M, out);
            }
        }
        if (p.normalize) {
            for (int64_t i = 0; i < c; ++i) {
                const T* krow = ws.k.data() + i * Ep;
                for (int64_t e = 0; e < E; ++e) z[e] += krow[e];
            }
        }
        K::product(Ep, Mp, C, ws.kt.data(), C, ws.v.data(), Mp, S, Mp, true, gemm::Band::full);
    }
    for (int64_t e = 0; e < E; ++e) std::copy(S + e * Mp, S + e * Mp + M, p.S + e * M);
    if (p.normalize) std::copy(z, z + E, p.z);
}

template <typename T, class K>
void backward_head(const HeadBackward<T>& p, Workspace<T>& ws) {
    const int64_t L = p.L, E = p.E, M = p.M, Ep = ws.Ep, Mp = ws.Mp, C = kChunk;
    const bool norm = p.normalize;
    T* r = ws.r.data();
    T* dd = ws.dd.data();
    T* A = ws.a.data();
    T* B = ws.b.data();
    T* O = ws.o.data();
    T* z = ws.z.data();
    // sweep 1, forward in time: r, dd and dQ, with the state kept transposed (M x E)
    T* St = ws.state_t.data();
    std::fill(ws.state_t.begin(), ws.state_t.end(), T(0));
    if (p.S0) {
        for (int64_t e = 0; e < E; ++e) {
            for (int64_t m = 0; m < M; ++m) St[m * Ep + e] = p.S0[e * M + m];
        }
    }
    std::fill(ws.z.begin(), ws.z.end(), T(0));
    if (norm && p.z0) std::copy(p.z0, p.z0 + E, z);
    for (int64_t c0 = 0; c0 < L; c0 += C) {
        const int64_t c = std::min(C, L - c0);
        pack_rows(ws.q.data(), Ep, p.q + c0 * p.q_step, p.q_step, c, E, p.elu, (const T*)nullptr);
        pack_rows(ws.k.data(), Ep, p.k + c0 * p.k_step, p.k_step, c, E, p.elu, (const T*)nullptr);
        pack_rows(ws.v.data(), Mp, p.v + c0 * p.v_step, p.v_step, c, M, false, (const T*)nullptr);
        pack_rows(ws.g.data(), Mp, p.grad + c0 * p.grad_step, p.grad_step, c, M, false,
                  (const T*)nullptr);
        transpose_chunk(ws.vt.data(), ws.v.data(), Mp, Mp);
        if (norm) {
            transpose_chunk(ws.kt.data(), ws.k.data(), Ep, Ep);
            K::triangle(C, Ep, ws.q.data(), Ep, ws.kt.data(), C, A, C, gemm::Band::lower);
            for (int64_t i = 0; i < c; ++i) {
                T den = dot(ws.q.data() + i * Ep, z, E) + p.eps;
                for (int64_t j = 0; j <= i; ++j) den += A[i * C + j];
                const T ri = T(1) / den;
                T* gi = ws.g.data() + i * Mp;
                const T* oi = p.out + (c0 + i) * p.out_step;
                r[c0 + i] = ri;
                dd[c0 + i] = -dot(gi, oi, M) * ri;
                for (int64_t m = 0; m < M; ++m) gi[m] *= ri;
            }
        }
        K::triangle(C, Mp, ws.g.data(), Mp, ws.vt.data(), C, B, C, gemm::Band::lower);
        if (norm) {
            for (int64_t i = 0; i < c; ++i) {
                for (int64_t j = 0; j <= i; ++j) B[i * C + j] += dd[c0 + i];
            }
        }
        K::product(C, Ep, Mp, ws.g.data(), Mp, St, Ep, O, Ep, false, gemm::Band::full);
        K::product(C, Ep, C, B, C, ws.k.data(), Ep, O, Ep, true, gemm::Band::lower);
        for (int64_t i = 0; i < c; ++i) {
            T* __restrict dq = p.dq + (c0 + i) * p.dq_step;
            const T* o = O + i * Ep;
            if (norm) {
                const T d = dd[c0 + i];
                for (int64_t e = 0; e < E; ++e) dq[e] = o[e] + d * z[e];
            } else {
                std::copy(o, o + E, dq);
            }
            if (p.elu) elu_backward_row(dq, p.q + (c0 + i) * p.q_step, E);
        }
        if (norm) {
            for (int64_t i = 0; i < c; ++i) {
                const T* krow = ws.k.data() + i * Ep;
                for (int64_t e = 0; e < E; ++e) z[e] += krow[e];
            }
        }
        K::product(Mp, Ep, C, ws.vt.data(), C, ws.k.data(), Ep, St, Ep, true, gemm::Band::full);
    }
    // sweep 2, reverse in time: dK, dV, dS0 and dz0
    T* R = ws.state.data();
    T* Rt = ws.state_t.data();
    std::fill(ws.state.begin(), ws.state.end(), T(0));
    if (p.gS) {
        for (int64_t e = 0; e < E; ++e) std::copy(p.gS + e * M, p.gS + (e + 1) * M, R + e * Mp);
    }
    T* w = ws.w.data();
    std::fill(ws.w.begin(), ws.w.end(), T(0));
    if (norm && p.gz) std::copy(p.gz, p.gz + E, w);
    const int64_t last = L == 0 ? 0 : (L - 1) / C * C;
    for (int64_t c0 = last; c0 >= 0 && L > 0; c0 -= C) {
        const int64_t c = std::min(C, L - c0);
        const T* scale = norm ? r + c0 : nullptr;
        pack_rows(ws.q.data(), Ep, p.q + c0 * p.q_step, p.q_step, c, E, p.elu, (const T*)nullptr);
        pack_rows(ws.k.data(), Ep, p.k + c0 * p.k_step, p.k_step, c, E, p.elu, (const T*)nullptr);
        pack_rows(ws.v.data(), Mp, p.v + c0 * p.v_step, p.v_step, c, M, false, (const T*)nullptr);
        pack_rows(ws.g.data(), Mp, p.grad + c0 * p.grad_step, p.grad_step, c, M, false, scale);
        transpose_chunk(ws.qt.data(), ws.q.data(), Ep, Ep);
        transpose_chunk(ws.gt.data(), ws.g.data(), Mp, Mp);
        for (int64_t m = 0; m < Mp; ++m) {  // R^T for dK
            for (int64_t e = 0; e < Ep; ++e) Rt[m * Ep + e] = R[e * Mp + m];
        }
        // dV = K R + triu(K Q^T) G'
        K::triangle(C, Ep, ws.k.data(), Ep, ws.qt.data(), C, A, C, gemm::Band::upper);
        K::product(C, Mp, Ep, ws.k.data(), Ep, R, Mp, O, Mp, false, gemm::Band::full);
        K::product(C, Mp, C, A, C, ws.g.data(), Mp, O, Mp, true, gemm::Band::upper);
        for (int64_t i = 0; i < c; ++i) {
            std::copy(O + i * Mp, O + i * Mp + M, p.dv + (c0 + i) * p.dv_step);
        }
        // dK = V R^T + w + triu(V G'^T + 1 dd^T) Q
        K::triangle(C, Mp, ws.v.data(), Mp, ws.gt.data(), C, B, C, gemm::Band::upper);
        if (norm) {
            for (int64_t j = 0; j < c; ++j) {
                for (int64_t i = j; i < c; ++i) B[j * C + i] += dd[c0 + i];
            }
        }
        K::product(C, Ep, Mp, ws.v.data(), Mp, Rt, Ep, O, Ep, false, gemm::Band::full);
        K::product(C, Ep, C, B, C, ws.q.data(), Ep, O, Ep, true, gemm::Band::upper);
        for (int64_t i = 0; i < c; ++i) {
            T* __restrict dk = p.dk + (c0 + i) * p.dk_step;
            const T* o = O + i * Ep;
            if (norm) {
                for (int64_t e = 0; e < E; ++e) dk[e] = o[e] + w[e];
            } else {
                std::copy(o, o + E, dk);
            }
            if (p.elu) elu_backward_row(dk, p.k + (c0 + i) * p.k_step, E);
        }
        K::product(Ep, Mp, C, ws.qt.data(), C, ws.g.data(), Mp, R, Mp, true, gemm::Band::full);
        if (norm) {
            for (int64_t i = 0; i < c; ++i) {
                const T d = dd[c0 + i];
                const T* qrow = ws.q.data() + i * Ep;
                for (int64_t e = 0; e < E; ++e) w[e] += d * qrow[e];
            }
        }
    }
    for (int64_t e = 0; e < E; ++e) std::copy(R + e * Mp, R + e * Mp + M, p.dS0 + e * M);
    if (norm) std::copy(w, w + E, p.dz0);
}

// ---------------------------------------------------------------------------------------
// One compiled copy per instruction set
// ---------------------------------------------------------------------------------------

template <typename T>
struct Leaves {
    void (*forward)(const HeadForward<T>&, Workspace<T>&);
    void (*backward)(const HeadBackward<T>&, Workspace<T>&);
    int64_t NR;  // the column multiple that buffers are padded to
};

template <typename T>
using BaselineKernel = gemm::Kernel<T, 16 / sizeof(T), 4, 2>;

template <typename T>
inline void forward_baseline(const HeadForward<T>& p, Workspace<T>& ws) {
    forward_head<T, BaselineKernel<T>>(p, ws);
}
template <typename T>
inline void backward_baseline(const HeadBackward<T>& p, Workspace<T>& ws) {
    backward_head<T, BaselineKernel<T>>(p, ws);
}

#if ATTENTION_CORE_X86_DISPATCH
template <typename T>
using Avx2Kernel = gemm::Kernel<T, 32 / sizeof(T), 4, 2>;
template <typename T>
using Avx512Kernel = gemm::Kernel<T, 64 / sizeof(T), 8, 2>;

template <typename T>
ATTENTION_CORE_TARGET_AVX2 void forward_avx2(const HeadForward<T>& p, Workspace<T>& ws) {
    forward_head<T, Avx2Kernel<T>>(p, ws);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX2 void backward_avx2(const HeadBackward<T>& p, Workspace<T>& ws) {
    backward_head<T, Avx2Kernel<T>>(p, ws);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void forward_avx512(const HeadForward<T>& p, Workspace<T>& ws) {
    forward_head<T, Avx512Kernel<T>>(p, ws);
}
template <typename T>
ATTENTION_CORE_TARGET_AVX512 void backward_avx512(const HeadBackward<T>& p, Workspace<T>& ws) {
    backward_head<T, Avx512Kernel<T>>(p, ws);
}
#endif

template <typename T>
Leaves<T> leaves_for(CpuLevel level) {
#if ATTENTION_CORE_X86_DISPATCH
    if (level == CpuLevel::avx512) {
        return {&forward_avx512<T>, &backward_avx512<T>, Avx512Kernel<T>::NR};
    }
    if (level == CpuLevel::avx2) return {&forward_avx2<T>, &backward_avx2<T>, Avx2Kernel<T>::NR};
#endif
    (void)level;
    return {&forward_baseline<T>, &backward_baseline<T>, BaselineKernel<T>::NR};
}

}  // namespace chunked
}  // namespace causal
}  // namespace attention_core
