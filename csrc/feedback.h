// Inference forward of a Feedback Transformer (Fan et al. 2021, "Addressing Some Limitations
// of Transformers with Feedback Memory", arXiv 2002.09402) in one call, on the CPU.
//
// The model's steps are sequential: a window of w tokens runs through every layer, its merged
// states become w memory slots, and only then can the next window start. At the widths the
// model is used with, a window is a few rows: each op is tiny and, run op by op from Python,
// costs more in dispatch than in arithmetic. This kernel runs the whole window loop in C++
// with a team of std::threads that meet at a spin barrier between the phases of a layer:
//
//   per window (rows r = b w + i, b < B, i < w):
//     layer 0: qkv = the precomputed projection of the embedding rows (one product over all
//              tokens, made by the caller)
//     layer l: qkv = LN(x) Wqkv^T                        (query part pre-scaled)
//              att = softmax(q [k_mem; k_win]^T + bias) [v_mem; v_win]
//                     (memory slots lo .. hi-1 of the store, window keys strictly earlier)
//              x  += att Wout^T + bout
//              x  += softmax(LN_c(x) Wc^T [context keys]^T, mask) [context values] Wco^T + bco
//                     (layers with cross attention; context keys/values projected by the caller)
//              x  += (LN'(x) Win^T + bin) * gelu(LN'(x) Wgate^T + bgate) Wff^T + bff
//              merged += mix[l + 1] x   (merged starts as mix[0] times the embedding)
//     memory:  [k; v] = LN(merged or x) Wkv^T, written to store slots hi .. hi + w - 1
//
// Every weight is first copied (by the team, at the start of the call) as panels of 32 output
// columns: panel p holds W[32 p + c, k] at [p][k][c] (zero-padded past N), so a product streams
// each panel once, contiguously, and the inner loop is a multiply-add of one broadcast input
// value into 32 accumulators per row, with no horizontal sums. Threads split the panels of a product, the (batch, head)
// pairs of the attention, and rows of the copies. No pybind11 and no torch here.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu_dispatch.h"
#include "parallel.h"

namespace attention_core {
namespace feedback {

constexpr int64_t kPanel = 32;  // output columns per packed panel
constexpr int kRows = 4;        // rows per block of a product

// A weight W (N, K), row-major at `weight`, with bias (N,) or null; `panels` receives its copy
// as ceil(N / 32) panels of (K, 32), zero-padded past N, made at the start of the call
// (pack_panel), so the weights are read as they are now, every call.
struct Packed {
    const float* weight;
    const float* bias;
    int64_t N;
    int64_t K;
    float* panels = nullptr;
    int64_t count() const { return (N + kPanel - 1) / kPanel; }
    int64_t size() const { return count() * K * kPanel; }
};

// Panel p of w: panels[p][k][c] = W[32 p + c][k] (0 past N), written in blocks of 16 k.
inline void pack_panel(const Packed& w, int64_t p) {
    float* dst = w.panels + p * w.K * kPanel;
    const int64_t c0 = p * kPanel, width = std::min(kPanel, w.N - c0);
    for (int64_t k0 = 0; k0 < w.K; k0 += 16) {
        const int64_t k1 = std::min(w.K, k0 + 16);
        for (int64_t c = 0; c < kPanel; ++c) {
            const float* src = c < width ? w.weight + (c0 + c) * w.K : nullptr;
            for (int64_t k = k0; k < k1; ++k) dst[k * kPanel + c] = src ? src[k] : 0.0f;
        }
    }
}

struct Layer {
    Packed qkv;       // (o, dim), the query part scaled by dim_head^-1/2 (N = 0 in layer 0)
    Packed out;       // (dim, inner) with bias
    const float* ff_norm_weight;
    const float* ff_norm_bias;
    Packed ff_value;  // (hidden, dim) with bias: the first half of the GEGLU input product
    Packed ff_gate;   // (hidden, dim) with bias: its second half, passed through gelu
    Packed ff_out;    // (dim, hidden) with bias
    // cross attention (Args::context_len > 0): its pre-norm, the query weight scaled by
    // dim_head^-1/2, the output weight with bias, and the context's keys and values
    // (B heads, context_len, dim_head), projected once by the caller
    const float* cross_norm_weight = nullptr;
    const float* cross_norm_bias = nullptr;
    Packed cross_q{};
    Packed cross_out{};
    const float* context_keys = nullptr;
    const float* context_values = nullptr;
};

struct Args {
    int64_t B, n, dim, heads, dim_head, hidden, depth;
    int64_t window;  // W, steps per window
    int64_t mem_len;  // M
    int64_t m0;       // memory slots already in the store (slots 0 .. m0 - 1)
    int64_t capacity;  // store slots
    int64_t o;         // width of a qkv row: inner, or 3 inner with the window's keys/values
    float norm_eps, ff_norm_eps, cross_norm_eps;
    int64_t context_len;          // S: context positions of the cross attention (0: none)
    const uint8_t* context_mask;  // (B, S), nonzero = visible, or null: all visible
    const float* h;      // (B, n, dim) embeddings
    const float* proj0;  // (B, n, o) layer 0's projection of h
    const float* norm_weight;  // the shared attention pre-norm
    const float* norm_bias;
    const Layer* layers;  // depth of them
    const float* mix;     // (depth + 1) softmaxed layer weights, or null: the last layer only
    Packed kv;            // (2 inner, dim), the shared key/value projection
    const float* bias;    // (heads, W, M + W): queries 0 .. W-1 over keys at -M .. W-1
    float* keys;          // (B heads, capacity, dim_head) store
    float* values;
    float* out;           // (B, n, dim) last layer outputs
};

// ---------------------------------------------------------------------------------------
// Element-wise helpers, written so that loops over them vectorise
// ---------------------------------------------------------------------------------------

// exp(x) for x <= 0 (and not far above): Cody-Waite range reduction and the minimax
// polynomial of Cephes' expf, about 1 ulp; inputs below -87 give a tiny positive number.
inline float exp_approx(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// gelu(x) = x / 2 (1 + erf(x / sqrt 2)) with erf from Abramowitz and Stegun 7.1.26
// (absolute error below 1.5e-7).
inline float gelu_approx(float x) {
    const float z = std::fabs(x) * 0.70710678118654752f;
    const float t = 1.0f / (1.0f + 0.3275911f * z);
    float p = 1.061405429f;
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    const float erf_abs = 1.0f - p * t * exp_approx(-z * z);
    const float erf = x < 0 ? -erf_abs : erf_abs;
    return 0.5f * x * (1.0f + erf);
}

// Sums in 16 independent lanes (a loop the compiler vectorises without reassociating a
// single running sum), then across the lanes.
constexpr int kLanes = 16;

inline float lane_total(const float (&part)[kLanes]) {
    float total = 0.0f;
    for (int l = 0; l < kLanes; ++l) total += part[l];
    return total;
}

inline float sum(const float* __restrict x, int64_t n) {
    float part[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) {
        for (int l = 0; l < kLanes; ++l) part[l] += x[k + l];
    }
    float total = lane_total(part);
    for (; k < n; ++k) total += x[k];
    return total;
}

inline float dot(const float* __restrict x, const float* __restrict y, int64_t n) {
    float part[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) {
        for (int l = 0; l < kLanes; ++l) part[l] += x[k + l] * y[k + l];
    }
    float total = lane_total(part);
    for (; k < n; ++k) total += x[k] * y[k];
    return total;
}

// y = (x - mean) / sqrt(var + eps) * weight + bias over one row of `dim` (y is scratch for
// the centred row first).
inline void layer_norm(const float* __restrict x, const float* __restrict weight,
                       const float* __restrict bias, float eps, int64_t dim,
                       float* __restrict y) {
    const float mean = sum(x, dim) / static_cast<float>(dim);
    for (int64_t k = 0; k < dim; ++k) y[k] = x[k] - mean;
    const float var = dot(y, y, dim) / static_cast<float>(dim);
    const float rstd = 1.0f / std::sqrt(var + eps);
    for (int64_t k = 0; k < dim; ++k) y[k] = y[k] * rstd * weight[k] + bias[k];
}

// ---------------------------------------------------------------------------------------
// Products with packed weights
// ---------------------------------------------------------------------------------------

// acc[r][c] = sum_k a[r lda + k] panel[k 32 + c] for R (compile-time) rows.
template <int R>
inline void panel_product(const float* __restrict a, int64_t lda, const float* __restrict panel,
                          int64_t K, float (&acc)[kRows][kPanel]) {
    float sums[R][kPanel] = {};
    for (int64_t k = 0; k < K; ++k) {
        const float* __restrict w = panel + k * kPanel;
        for (int r = 0; r < R; ++r) {
            const float x = a[r * lda + k];
            for (int c = 0; c < kPanel; ++c) sums[r][c] += x * w[c];
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < kPanel; ++c) acc[r][c] = sums[r][c];
    }
}

// For rows r < rows and panels p0 .. p1 - 1 of w: calls emit(r, c0, width, values) with the
// `width` (<= 32) values of columns c0 .. c0 + width - 1 of row r, bias added.
template <typename Emit>
inline void product(const float* a, int64_t lda, int64_t rows, const Packed& w, int64_t p0,
                    int64_t p1, Emit&& emit) {
    float acc[kRows][kPanel];
    for (int64_t p = p0; p < p1; ++p) {
        const float* panel = w.panels + p * w.K * kPanel;
        const int64_t c0 = p * kPanel;
        const int64_t width = std::min(kPanel, w.N - c0);
        for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
            const float* block = a + r0 * lda;
            const int64_t count = std::min<int64_t>(kRows, rows - r0);
            switch (count) {
                case 4: panel_product<4>(block, lda, panel, w.K, acc); break;
                case 3: panel_product<3>(block, lda, panel, w.K, acc); break;
                case 2: panel_product<2>(block, lda, panel, w.K, acc); break;
                default: panel_product<1>(block, lda, panel, w.K, acc); break;
            }
            for (int64_t r = 0; r < count; ++r) {
                if (w.bias) {
                    for (int64_t c = 0; c < width; ++c) acc[r][c] += w.bias[c0 + c];
                }
                emit(r0 + r, c0, width, acc[r]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The attention of one (batch row, head) pair over the memory and the window
// ---------------------------------------------------------------------------------------

struct Window {
    int64_t start, w, lo, hi;  // tokens start .. start + w - 1; memory slots lo .. hi - 1
};

constexpr int64_t kTile = 64;  // keys (scores) or features (values) per register tile

// Calls body(width): with a compile-time kTile for a full tile (so that its loops vectorise at
// full width), with the run-time width for the last, partial one.
template <typename Body>
inline void with_tile_width(int64_t width, Body&& body) {
    if (width == kTile) {
        body(std::integral_constant<int64_t, kTile>{});
    } else {
        body(width);
    }
}

// s[q][j] = x_q . key_j for Q queries and m keys stored feature-major, key j's feature e at
// kt[e * ld + j]: tiles of 64 keys, one broadcast multiply-add per feature.
template <int Q>
inline void key_scores(const float* const (&x)[2], int64_t d, const float* __restrict kt,
                       int64_t ld, int64_t m, float* const (&s)[2]) {
    for (int64_t j0 = 0; j0 < m; j0 += kTile) {
        with_tile_width(std::min(kTile, m - j0), [&](auto width) {
            float acc[Q][kTile] = {};
            for (int64_t e = 0; e < d; ++e) {
                const float* __restrict k = kt + e * ld + j0;
                for (int q = 0; q < Q; ++q) {
                    const float xe = x[q][e];
                    for (int64_t c = 0; c < width; ++c) acc[q][c] += xe * k[c];
                }
            }
            for (int q = 0; q < Q; ++q) std::copy(acc[q], acc[q] + width, s[q] + j0);
        });
    }
}

// o[q][e] = sum_j p[q][j] v[j * d + e] for Q queries over m values stored row-major: tiles
// of 64 features, one broadcast multiply-add per value.
template <int Q>
inline void value_sums(const float* const (&p)[2], const float* __restrict v, int64_t m,
                       int64_t d, float* const (&o)[2]) {
    for (int64_t e0 = 0; e0 < d; e0 += kTile) {
        with_tile_width(std::min(kTile, d - e0), [&](auto width) {
            float acc[Q][kTile] = {};
            for (int64_t j = 0; j < m; ++j) {
                const float* __restrict row = v + j * d + e0;
                for (int q = 0; q < Q; ++q) {
                    const float pj = p[q][j];
                    for (int64_t c = 0; c < width; ++c) acc[q][c] += pj * row[c];
                }
            }
            for (int q = 0; q < Q; ++q) std::copy(acc[q], acc[q] + width, o[q] + e0);
        });
    }
}

// The attention of one (batch row, head) pair: queries i0 .. i0 + Q - 1 of the window over
// the m memory slots (keys feature-major in kt, values in the store) and the window's keys
// j < i. scores: 2 (M + W) floats of scratch.
template <int Q>
inline void attend_queries(const Args& a, const Window& win, int64_t b, int64_t head,
                           int64_t i0, const float* qkv, const float* kt, float* att,
                           float* scores) {
    const int64_t d = a.dim_head, inner = a.heads * d, W = a.window, M = a.mem_len;
    const int64_t m = win.hi - win.lo, w = win.w, pair = b * a.heads + head;
    const float* values = a.values + (pair * a.capacity + win.lo) * d;
    const float* x[2];
    float* s[2];
    float* o[2];
    for (int q = 0; q < 2; ++q) {
        const int64_t row = b * w + i0 + std::min(q, Q - 1);
        x[q] = qkv + row * a.o + head * d;
        o[q] = att + row * inner + head * d;
        s[q] = scores + q * (M + W);
    }
    if (m) key_scores<Q>(x, d, kt + pair * d * a.capacity + win.lo, a.capacity, m, s);
    float* p[2] = {s[0], s[1]};
    for (int q = 0; q < Q; ++q) {
        const int64_t i = i0 + q, count = m + i;  // memory slots, then window keys < i
        const float* bias = a.bias + (head * W + i) * (M + W) + M - m;
        for (int64_t j = m; j < count; ++j) {
            s[q][j] = dot(x[q], qkv + (b * w + j - m) * a.o + inner + head * d, d);
        }
        for (int64_t j = 0; j < count; ++j) s[q][j] += bias[j];
        float top = -INFINITY;
        for (int64_t j = 0; j < count; ++j) top = std::max(top, s[q][j]);
        for (int64_t j = 0; j < count; ++j) s[q][j] = exp_approx(s[q][j] - top);
        const float total = count ? sum(s[q], count) : 0.0f;
        const float scale = count ? 1.0f / total : 0.0f;  // no key: a zero output
        for (int64_t j = 0; j < count; ++j) s[q][j] *= scale;
    }
    const float* pc[2] = {p[0], p[1]};
    if (m) {
        value_sums<Q>(pc, values, m, d, o);
    } else {
        for (int q = 0; q < Q; ++q) std::fill(o[q], o[q] + d, 0.0f);
    }
    for (int q = 0; q < Q; ++q) {
        for (int64_t j = m; j < m + i0 + q; ++j) {
            const float* v = qkv + (b * w + j - m) * a.o + 2 * inner + head * d;
            const float pj = p[q][j];
            for (int64_t e = 0; e < d; ++e) o[q][e] += pj * v[e];
        }
    }
}

inline void attend_pair(const Args& a, const Window& win, int64_t b, int64_t head,
                        const float* qkv, const float* kt, float* att, float* scores) {
    int64_t i = 0;
    for (; i + 2 <= win.w; i += 2) attend_queries<2>(a, win, b, head, i, qkv, kt, att, scores);
    if (i < win.w) attend_queries<1>(a, win, b, head, i, qkv, kt, att, scores);
}

// The cross attention of one (batch row, head) pair: the window's queries (rows of cq, width
// inner) over the S context positions of `layer` (keys feature-major in ct, S per feature row),
// masked positions left out; a query that sees none gets zeros. scores: 2 S floats of scratch
// (the buffer holds 2 max(M + W, S)).
inline void cross_pair(const Args& a, const Layer& layer, int64_t w, int64_t b, int64_t head,
                       const float* cq, const float* ct, float* att, float* scores) {
    const int64_t d = a.dim_head, inner = a.heads * d, S = a.context_len;
    const int64_t pair = b * a.heads + head;
    const float* kt = ct + pair * d * S;
    const float* values = layer.context_values + pair * S * d;
    const uint8_t* mask = a.context_mask ? a.context_mask + b * S : nullptr;
    for (int64_t i0 = 0; i0 < w; i0 += 2) {
        const int64_t count = std::min<int64_t>(2, w - i0);
        const float* x[2];
        float* s[2];
        float* o[2];
        for (int q = 0; q < 2; ++q) {
            const int64_t row = b * w + i0 + std::min<int64_t>(q, count - 1);
            x[q] = cq + row * inner + head * d;
            o[q] = att + row * inner + head * d;
            s[q] = scores + q * S;
        }
        if (count == 2) {
            key_scores<2>(x, d, kt, S, S, s);
        } else {
            key_scores<1>(x, d, kt, S, S, s);
        }
        bool empty[2] = {false, false};
        for (int64_t q = 0; q < count; ++q) {
            float top = -INFINITY;
            for (int64_t j = 0; j < S; ++j) {
                if (!mask || mask[j]) top = std::max(top, s[q][j]);
            }
            if (top == -INFINITY) {  // every position masked: zeros, set after the sums
                std::fill(s[q], s[q] + S, 0.0f);
                empty[q] = true;
                continue;
            }
            for (int64_t j = 0; j < S; ++j) s[q][j] = exp_approx(s[q][j] - top);
            if (mask) {
                for (int64_t j = 0; j < S; ++j) s[q][j] = mask[j] ? s[q][j] : 0.0f;
            }
            const float scale = 1.0f / sum(s[q], S);
            for (int64_t j = 0; j < S; ++j) s[q][j] *= scale;
        }
        const float* p[2] = {s[0], s[1]};
        if (count == 2) {
            value_sums<2>(p, values, S, d, o);
        } else {
            value_sums<1>(p, values, S, d, o);
        }
        for (int64_t q = 0; q < count; ++q) {
            if (empty[q]) std::fill(o[q], o[q] + d, 0.0f);  // even if a value is not finite
        }
    }
}

// ---------------------------------------------------------------------------------------
// The window loop
// ---------------------------------------------------------------------------------------

struct Buffers {
    std::vector<float> panels;            // every weight's panels
    std::vector<const Packed*> weights;  // the weights to pack into them
    std::vector<float> x, merged, qkv, att, gated;
    std::vector<float> keys_t;  // (B heads, dim_head, capacity): the store's keys, transposed
    std::vector<float> context_t;  // per layer (B heads, dim_head, S): context keys, transposed
    std::vector<float> cross_q;    // (rows, inner) the cross attention's queries
    // per thread: LN of the rows, attention scores
    std::vector<std::vector<float>> normed, scores;
};

inline void run_team(const Args& a, Buffers& buf, SpinBarrier& barrier, int64_t t,
                     int64_t workers) {
    const int64_t B = a.B, dim = a.dim, d = a.dim_head, inner = a.heads * d;
    const int64_t W = a.window, M = a.mem_len, H = a.hidden;
    float* x = buf.x.data();
    float* merged = buf.merged.data();
    float* qkv = buf.qkv.data();
    float* att = buf.att.data();
    float* gated = buf.gated.data();
    float* normed = buf.normed[t].data();
    float* scores = buf.scores[t].data();
    float* kt = buf.keys_t.data();
    const int64_t C = a.capacity;
    int64_t begin, end;

    // the weights' panels, then the prefix memory's keys transposed
    for (const Packed* w : buf.weights) {
        share(w->count(), t, workers, begin, end);
        for (int64_t p = begin; p < end; ++p) pack_panel(*w, p);
    }
    // the prefix memory's keys, transposed
    share(B * a.heads, t, workers, begin, end);
    for (int64_t pair = begin; M && pair < end; ++pair) {
        for (int64_t slot = 0; slot < a.m0; ++slot) {
            for (int64_t e = 0; e < d; ++e) {
                kt[(pair * d + e) * C + slot] = a.keys[(pair * C + slot) * d + e];
            }
        }
    }
    const int64_t S = a.context_len;
    float* ct = buf.context_t.data();
    for (int64_t l = 0; S && l < a.depth; ++l) {  // and the context's keys transposed
        for (int64_t pair = begin; pair < end; ++pair) {
            const float* src = a.layers[l].context_keys + pair * S * d;
            float* dst = ct + (l * B * a.heads + pair) * d * S;
            for (int64_t j = 0; j < S; ++j) {
                for (int64_t e = 0; e < d; ++e) dst[e * S + j] = src[j * d + e];
            }
        }
    }
    barrier.wait();

    for (int64_t start = 0; start < a.n; start += W) {
        Window win{start, std::min(W, a.n - start), 0, 0};
        win.hi = M ? a.m0 + start : 0;
        win.lo = std::max<int64_t>(0, win.hi - M);
        const int64_t w = win.w, rows = B * w;

        // layer 0's input and projection: rows of the embedding and of proj0
        share(rows, t, workers, begin, end);
        for (int64_t r = begin; r < end; ++r) {
            const int64_t b = r / w, i = r % w;
            const float* src = a.h + (b * a.n + start + i) * dim;
            std::copy(src, src + dim, x + r * dim);
            if (a.mix) {
                for (int64_t k = 0; k < dim; ++k) merged[r * dim + k] = a.mix[0] * src[k];
            }
            const float* p = a.proj0 + (b * a.n + start + i) * a.o;
            std::copy(p, p + a.o, qkv + r * a.o);
        }
        barrier.wait();

        for (int64_t l = 0; l < a.depth; ++l) {
            const Layer& layer = a.layers[l];
            if (l > 0) {  // qkv = LN(x) Wqkv^T
                for (int64_t r = 0; r < rows; ++r) {
                    layer_norm(x + r * dim, a.norm_weight, a.norm_bias, a.norm_eps, dim,
                               normed + r * dim);
                }
                share(layer.qkv.count(), t, workers, begin, end);
                product(normed, dim, rows, layer.qkv, begin, end,
                        [&](int64_t r, int64_t c0, int64_t width, const float* v) {
                            std::copy(v, v + width, qkv + r * a.o + c0);
                        });
                barrier.wait();
            }
            // attention of every (batch row, head) pair
            share(B * a.heads, t, workers, begin, end);
            for (int64_t pair = begin; pair < end; ++pair) {
                attend_pair(a, win, pair / a.heads, pair % a.heads, qkv, kt, att, scores);
            }
            barrier.wait();
            // x += att Wout^T + bout
            share(layer.out.count(), t, workers, begin, end);
            product(att, inner, rows, layer.out, begin, end,
                    [&](int64_t r, int64_t c0, int64_t width, const float* v) {
                        float* y = x + r * dim + c0;
                        for (int64_t c = 0; c < width; ++c) y[c] += v[c];
                    });
            barrier.wait();
            if (S) {  // x += cross attention to the context
                float* cq = buf.cross_q.data();
                for (int64_t r = 0; r < rows; ++r) {
                    layer_norm(x + r * dim, layer.cross_norm_weight, layer.cross_norm_bias,
                               a.cross_norm_eps, dim, normed + r * dim);
                }
                share(layer.cross_q.count(), t, workers, begin, end);
                product(normed, dim, rows, layer.cross_q, begin, end,
                        [&](int64_t r, int64_t c0, int64_t width, const float* v) {
                            std::copy(v, v + width, cq + r * inner + c0);
                        });
                barrier.wait();
                const float* layer_ct = ct + l * B * a.heads * d * S;
                share(B * a.heads, t, workers, begin, end);
                for (int64_t pair = begin; pair < end; ++pair) {
                    cross_pair(a, layer, w, pair / a.heads, pair % a.heads, cq, layer_ct, att,
                               scores);
                }
                barrier.wait();
                share(layer.cross_out.count(), t, workers, begin, end);
                product(att, inner, rows, layer.cross_out, begin, end,
                        [&](int64_t r, int64_t c0, int64_t width, const float* v) {
                            float* y = x + r * dim + c0;
                            for (int64_t c = 0; c < width; ++c) y[c] += v[c];
                        });
                barrier.wait();
            }
            // gated = (LN'(x) Win^T + bin) * gelu(LN'(x) Wgate^T + bgate)
            for (int64_t r = 0; r < rows; ++r) {
                layer_norm(x + r * dim, layer.ff_norm_weight, layer.ff_norm_bias, a.ff_norm_eps,
                           dim, normed + r * dim);
            }
            share(layer.ff_value.count(), t, workers, begin, end);
            for (int64_t p = begin; p < end; ++p) {
                product(normed, dim, rows, layer.ff_value, p, p + 1,
                        [&](int64_t r, int64_t c0, int64_t width, const float* v) {
                            std::copy(v, v + width, gated + r * H + c0);
                        });
                product(normed, dim, rows, layer.ff_gate, p, p + 1,
                        [&](int64_t r, int64_t c0, int64_t width, const float* v) {
                            float* y = gated + r * H + c0;
                            for (int64_t c = 0; c < width; ++c) y[c] *= gelu_approx(v[c]);
                        });
            }
            barrier.wait();
            // x += gated Wff^T + bff; merged += mix[l + 1] x; the last layer writes out
            const bool last = l + 1 == a.depth;
            const float weight = a.mix ? a.mix[l + 1] : 0.0f;
            share(layer.ff_out.count(), t, workers, begin, end);
            product(gated, H, rows, layer.ff_out, begin, end,
                    [&](int64_t r, int64_t c0, int64_t width, const float* v) {
                        float* y = x + r * dim + c0;
                        for (int64_t c = 0; c < width; ++c) y[c] += v[c];
                        if (a.mix) {
                            float* z = merged + r * dim + c0;
                            for (int64_t c = 0; c < width; ++c) z[c] += weight * y[c];
                        }
                        if (last) {
                            const int64_t b = r / w, i = r % w;
                            std::copy(y, y + width, a.out + (b * a.n + start + i) * dim + c0);
                        }
                    });
            barrier.wait();
        }
        if (!M) continue;

        // the window's memory: [k; v] = LN(merged) Wkv^T into store slots hi .. hi + w - 1
        const float* source = a.mix ? merged : x;
        for (int64_t r = 0; r < rows; ++r) {
            layer_norm(source + r * dim, a.norm_weight, a.norm_bias, a.norm_eps, dim,
                       normed + r * dim);
        }
        share(a.kv.count(), t, workers, begin, end);
        product(normed, dim, rows, a.kv, begin, end,
                [&](int64_t r, int64_t c0, int64_t width, const float* v) {
                    const int64_t b = r / w, slot = win.hi + r % w;
                    for (int64_t c = 0; c < width; ++c) {
                        const int64_t column = c0 + c;
                        const int64_t head = column % inner / d, e = column % d;
                        const int64_t pair = b * a.heads + head;
                        if (column < inner) {
                            a.keys[(pair * C + slot) * d + e] = v[c];
                            kt[(pair * d + e) * C + slot] = v[c];
                        } else {
                            a.values[(pair * C + slot) * d + e] = v[c];
                        }
                    }
                });
        barrier.wait();
    }
}

using TeamFn = void (*)(const Args&, Buffers&, SpinBarrier&, int64_t, int64_t);

// Threads worth running: one per 2^20 multiply-adds of a window (its products and its
// attention over the memory, the window and the context; with less work per thread, the waits
// at the barrier cost more than the work shared), and no more than the hardware runs at once.
inline int64_t team_size(const Args& a, int64_t threads) {
    const int64_t inner = a.heads * a.dim_head;
    const int64_t cross = a.context_len ? 2 * inner : 0;
    const int64_t products =
        a.depth * (a.o + inner + cross + 3 * a.hidden) * a.dim + 2 * inner * a.dim;
    const int64_t attention = a.depth * 2 * inner * (a.mem_len + a.window + a.context_len);
    int64_t size = std::min(threads, (a.B * a.window * (products + attention)) >> 20);
    const int64_t cores = static_cast<int64_t>(std::thread::hardware_concurrency());
    if (cores > 0) size = std::min(size, cores);
    return std::max<int64_t>(1, size);
}

// Runs `team_fn` (run_team compiled for an instruction set) on up to `threads` threads (fewer
// if the work is small or the system refuses some), or on `forced` threads if positive (for
// tests): every allocation happens here, so the team itself cannot throw.
inline void run_with_team(const Args& args, int64_t threads, int64_t forced, TeamFn team_fn) {
    Args a = args;
    std::vector<Layer> layers(args.layers, args.layers + args.depth);
    a.layers = layers.data();
    const int64_t rows = a.B * a.window;
    const int64_t wanted = forced > 0 ? forced : team_size(a, threads);
    Buffers buf;
    std::vector<Packed*> weights;
    for (Layer& layer : layers) {
        for (Packed* w : {&layer.qkv, &layer.out, &layer.ff_value, &layer.ff_gate, &layer.ff_out,
                          &layer.cross_q, &layer.cross_out}) {
            if (w->N) weights.push_back(w);
        }
    }
    if (a.kv.N) weights.push_back(&a.kv);
    int64_t total = 0;
    for (const Packed* w : weights) total += w->size();
    buf.panels.resize(total);
    float* next = buf.panels.data();
    for (Packed* w : weights) {
        w->panels = next;
        next += w->size();
    }
    buf.weights.assign(weights.begin(), weights.end());
    buf.x.resize(rows * a.dim);
    buf.merged.resize(a.mix ? rows * a.dim : 0);
    buf.qkv.resize(rows * a.o);
    buf.att.resize(rows * a.heads * a.dim_head);
    buf.gated.resize(rows * a.hidden);
    buf.normed.assign(wanted, std::vector<float>(rows * a.dim));
    buf.keys_t.resize(a.mem_len ? a.B * a.heads * a.dim_head * a.capacity : 0);
    buf.scores.assign(wanted,
                      std::vector<float>(2 * std::max(a.mem_len + a.window, a.context_len)));
    buf.context_t.resize(a.depth * a.B * a.heads * a.dim_head * a.context_len);
    buf.cross_q.resize(a.context_len ? rows * a.heads * a.dim_head : 0);

    std::atomic<int64_t> team{0};  // the team size, once every thread that could start has
    SpinBarrier* barrier = nullptr;
    std::vector<std::thread> pool;
    pool.reserve(wanted - 1);
    for (int64_t t = 1; t < wanted; ++t) {
        try {
            pool.emplace_back([&, t] {
                int64_t size;
                while ((size = team.load(std::memory_order_acquire)) == 0) std::this_thread::yield();
                team_fn(a, buf, *barrier, t, size);
            });
        } catch (...) {
            break;  // the system refused a thread: a smaller team
        }
    }
    const int64_t size = static_cast<int64_t>(pool.size()) + 1;
    SpinBarrier shared(size);
    barrier = &shared;
    team.store(size, std::memory_order_release);
    team_fn(a, buf, shared, 0, size);
    for (auto& thread : pool) thread.join();
}

// run_team once per instruction set (cpu_dispatch.h); each thread of the team calls it.
inline void team_baseline(const Args& a, Buffers& buf, SpinBarrier& barrier, int64_t t,
                          int64_t workers) {
    run_team(a, buf, barrier, t, workers);
}
#if ATTENTION_CORE_X86_DISPATCH
ATTENTION_CORE_TARGET_AVX512 inline void team_avx512(const Args& a, Buffers& buf,
                                                     SpinBarrier& barrier, int64_t t,
                                                     int64_t workers) {
    run_team(a, buf, barrier, t, workers);
}
ATTENTION_CORE_TARGET_AVX2 inline void team_avx2(const Args& a, Buffers& buf,
                                                 SpinBarrier& barrier, int64_t t,
                                                 int64_t workers) {
    run_team(a, buf, barrier, t, workers);
}
#endif

// Runs the forward pass on up to `threads` threads (exactly `team` if positive) with the best
// instruction set of this CPU.
inline void forward(const Args& a, int64_t threads, int64_t team = 0) {
    TeamFn team_fn = &team_baseline;
#if ATTENTION_CORE_X86_DISPATCH
    const CpuLevel level = cpu_level();
    if (level == CpuLevel::avx512) team_fn = &team_avx512;
    if (level == CpuLevel::avx2) team_fn = &team_avx2;
#endif
    run_with_team(a, threads, team, team_fn);
}

}  // namespace feedback
}  // namespace attention_core
