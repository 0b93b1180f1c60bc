// pybind11 binding of csrc/step_chain.h (included by bindings.cpp): decode and validate a
// program of step ops, then run it with the GIL released.
//
// A program is a flat array of int64 (given by address and length: a program is made once and
// run at every step, and converting a list of a few hundred integers at every call cost more
// than the small ops it runs): per op its kind (kLinear, kFeedForward, kLinearStep,
// kLayerNorm, kWeightedSum, kCacheAttention, kCacheWrite) and then its fields, for the first
// three in the order of the op's own binding (linear_args, feed_forward_args, step_args),
// where every address is two fields, (base, offset): the address bases[base] plus `offset`
// elements, or null for base -1. A position field is an index into the call's `indices` (the
// positions that change from call to call: a cache's range, where a write goes). `scalars`
// holds one number per op: its eps, or the attention's scale. Each op's fields are checked by
// the op's own argument check; the program's structure (kinds, lengths, base indices, offsets,
// flags, positions) here. The Python caller (attention_core.step_chain) has checked the
// tensors behind the bases and the positions against their limits.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "binding_checks.h"
#include "cache_attention_bindings.h"
#include "linear_step_bindings.h"
#include "residual_step_bindings.h"
#include "step_chain.h"

namespace attention_core {
namespace step_chain {

constexpr int64_t kLinear = 0, kFeedForward = 1, kLinearStep = 2, kLayerNorm = 3,
                  kWeightedSum = 4, kCacheAttention = 5, kCacheWrite = 6;
constexpr int64_t kMaxSources = 256;  // the most values a weighted sum adds

// Reads the fields of one op from a program, in order.
template <typename T>
class Fields {
  public:
    Fields(const int64_t* program, size_t length, const std::vector<int64_t>& bases,
           const std::vector<int64_t>& indices, size_t at, size_t count, int64_t op)
        : program_(program), bases_(bases), indices_(indices), at_(at), op_(op) {
        if (at + count > length) {
            std::ostringstream msg;
            msg << "program ends inside op " << op << ": it needs " << count << " fields";
            throw std::invalid_argument(msg.str());
        }
    }

    int64_t next() { return program_[at_++]; }

    size_t at() const { return at_; }

    std::uintptr_t address() {
        const int64_t base = next(), offset = next();
        if (base == -1) return 0;
        if (base < 0 || base >= static_cast<int64_t>(bases_.size()) || offset < 0) {
            std::ostringstream msg;
            msg << "op " << op_ << ": address (" << base << ", " << offset
                << ") outside the bases (" << bases_.size() << ") or before its base";
            throw std::invalid_argument(msg.str());
        }
        const std::uintptr_t start = static_cast<std::uintptr_t>(bases_[base]);
        return start == 0 ? 0 : start + static_cast<std::uintptr_t>(offset) * sizeof(T);
    }

    bool flag() {
        const int64_t value = next();
        if (value != 0 && value != 1) {
            std::ostringstream msg;
            msg << "op " << op_ << ": a flag must be 0 or 1; got " << value;
            throw std::invalid_argument(msg.str());
        }
        return value == 1;
    }

    // A size or count field: non-negative.
    int64_t size() {
        const int64_t value = next();
        if (value < 0) {
            std::ostringstream msg;
            msg << "op " << op_ << ": a size must be non-negative; got " << value;
            throw std::invalid_argument(msg.str());
        }
        return value;
    }

    // A position field: the call's indices[i].
    int64_t position() {
        const int64_t i = next();
        if (i < 0 || i >= static_cast<int64_t>(indices_.size())) {
            std::ostringstream msg;
            msg << "op " << op_ << ": position " << i << " outside the call's indices ("
                << indices_.size() << ")";
            throw std::invalid_argument(msg.str());
        }
        if (indices_[i] < 0) {
            std::ostringstream msg;
            msg << "indices[" << i << "] must be non-negative; got " << indices_[i];
            throw std::invalid_argument(msg.str());
        }
        return indices_[i];
    }

  private:
    const int64_t* program_;
    const std::vector<int64_t>& bases_;
    const std::vector<int64_t>& indices_;
    size_t at_;
    int64_t op_;
};

constexpr size_t kLinearFields = 20, kFeedForwardFields = 22, kLinearStepFields = 27,
                 kLayerNormFields = 11, kCacheAttentionFields = 32, kCacheWriteFields = 15;

// A weighted sum's field count: R, K, n, the coefficients, n sources (address, ld), out.
inline size_t weighted_sum_fields(int64_t n) { return 7 + 3 * static_cast<size_t>(n); }

// W = R / B query rows per batch element, R a multiple of B.
inline int64_t rows_per_batch(const char* op, int64_t R, int64_t B) {
    if (B < 1 || R % B != 0) {
        std::ostringstream msg;
        msg << op << ": the rows (" << R << ") must be a multiple of the cache's batch (" << B
            << ")";
        throw std::invalid_argument(msg.str());
    }
    return R / B;
}

template <typename T>
LayerNormRows<T> layer_norm_args(Fields<T>& f, double eps) {
    const std::uintptr_t x = f.address();
    const int64_t ldx = f.size(), R = f.size(), K = f.size();
    const std::uintptr_t weight = f.address(), bias = f.address(), out = f.address();
    require_eps(eps);
    if (R > 1 && ldx < K) throw std::invalid_argument("layer norm: rows overlap (ld < width)");
    require_address("layer norm x", x, R * K);
    require_address("layer norm out", out, R * K);
    return LayerNormRows<T>{as_ptr<const T>(x), ldx, R, K,
                            residual_step::LayerNorm<T>{as_ptr<const T>(weight),
                                                        as_ptr<const T>(bias),
                                                        static_cast<T>(eps)},
                            as_ptr<T>(out)};
}

template <typename T>
WeightedSum<T> weighted_sum_args(Fields<T>& f) {
    const int64_t R = f.size(), K = f.size(), n = f.size();
    const std::uintptr_t coefficients = f.address();
    require_address("weighted sum coefficients", coefficients, n);
    WeightedSum<T> p{{}, {}, R, K, as_ptr<const T>(coefficients), nullptr};
    for (int64_t i = 0; i < n; ++i) {
        const std::uintptr_t x = f.address();
        const int64_t ld = f.size();
        require_address("weighted sum value", x, R * K);
        if (R > 1 && ld < K) throw std::invalid_argument("weighted sum: rows overlap (ld < width)");
        p.x.push_back(as_ptr<const T>(x));
        p.ld.push_back(ld);
    }
    const std::uintptr_t out = f.address();
    require_address("weighted sum out", out, R * K);
    p.out = as_ptr<T>(out);
    return p;
}

template <typename T>
cache_attention::Problem<T> cache_attention_args(Fields<T>& f, double scale, int64_t threads) {
    const std::uintptr_t q = f.address();
    const int64_t ldq = f.size(), R = f.size();
    const std::uintptr_t k = f.address();
    const std::array<int64_t, 4> k_strides{f.size(), f.size(), f.size(), f.size()};
    const std::uintptr_t v = f.address();
    const std::array<int64_t, 3> v_strides{f.size(), f.size(), f.size()};
    std::uintptr_t bias = f.address();
    const int64_t bias_b = f.size(), bias_h = f.size(), bias_w = f.size();
    const int64_t bias_rows = f.size(), bias_columns = f.size();
    const std::uintptr_t out = f.address();
    const int64_t B = f.size(), H = f.size(), E = f.size(), M = f.size(), C = f.size();
    const int64_t start = f.position(), end = f.position();
    const int64_t column = f.position();
    if (!std::isfinite(scale)) throw std::invalid_argument("cache attention: scale must be finite");
    const int64_t W = rows_per_batch("cache attention", R, B);
    if (R > 1 && ldq < H * E) throw std::invalid_argument("cache attention: query rows overlap");
    // the op's own checks first (0 <= start <= end <= C among them); nothing reads the bias
    // before the check below
    const std::uintptr_t bias_at =
        bias == 0 ? 0 : bias + static_cast<std::uintptr_t>(column) * sizeof(T);
    const cache_attention::Problem<T> p = cache_attention::attention_args<T>(
        q, {W * ldq, ldq, E}, k, k_strides, v, v_strides, bias_at, {bias_b, bias_h, bias_w}, out,
        {B, W, H, E, M, C}, start, end, scale, threads);
    // (end - start and bias_columns - column cannot overflow: 0 <= start <= end, column >= 0)
    if (bias != 0 && (W > bias_rows || column > bias_columns ||
                      end - start > bias_columns - column)) {
        std::ostringstream msg;
        msg << "cache attention: the bias (" << bias_rows << " rows, " << bias_columns
            << " columns) must hold " << W << " rows and " << end - start
            << " columns from column " << column;
        throw std::invalid_argument(msg.str());
    }
    return p;
}

template <typename T>
CacheWrite<T> cache_write_args(Fields<T>& f) {
    const std::uintptr_t x = f.address();
    const int64_t ldx = f.size(), R = f.size(), B = f.size(), H = f.size(), E = f.size();
    const std::uintptr_t cache = f.address();
    const int64_t c_b = f.size(), c_h = f.size(), c_j = f.size(), c_e = f.size();
    const int64_t C = f.size(), position = f.position();
    const int64_t W = rows_per_batch("cache write", R, B);
    if (position > C || W > C - position) {  // (no overflow: 0 <= position, W)
        std::ostringstream msg;
        msg << "cache write: " << W << " positions from position " << position
            << " outside the cache (" << C << " positions)";
        throw std::invalid_argument(msg.str());
    }
    if (R > 1 && ldx < H * E) throw std::invalid_argument("cache write: rows overlap");
    require_address("cache write x", x, R * H * E);
    require_address("cache", cache, R * H * E);
    return CacheWrite<T>{as_ptr<const T>(x), ldx, B, W, H, E, as_ptr<T>(cache),
                         c_b, c_h, c_j, c_e, position};
}

template <typename T>
Op<T> decode(int64_t kind, Fields<T>& f, double eps, int64_t threads) {
    if (kind == kLayerNorm) return layer_norm_args<T>(f, eps);
    if (kind == kWeightedSum) return weighted_sum_args<T>(f);
    if (kind == kCacheAttention) return cache_attention_args<T>(f, eps, threads);
    if (kind == kCacheWrite) return cache_write_args<T>(f);
    if (kind == kLinear) {
        const std::uintptr_t x = f.address();
        const int64_t ldx = f.next();
        const std::uintptr_t a = f.address();
        const int64_t lda = f.next(), R = f.next(), D = f.next(), K = f.next();
        const std::uintptr_t W = f.address(), b = f.address();
        const bool norm = f.flag();
        const std::uintptr_t norm_weight = f.address(), norm_bias = f.address();
        const std::uintptr_t out = f.address();
        return residual_step::linear_args<T>(x, ldx, a, lda, R, D, K, W, b, norm, norm_weight,
                                             norm_bias, eps, out, threads);
    }
    if (kind == kFeedForward) {
        const std::uintptr_t x = f.address();
        const int64_t ldx = f.next(), R = f.next(), D = f.next(), F = f.next();
        const std::uintptr_t W1 = f.address(), b1 = f.address(), W2 = f.address();
        const std::uintptr_t b2 = f.address(), norm_weight = f.address();
        const std::uintptr_t norm_bias = f.address();
        const int64_t activation = f.next();
        const bool norm_first = f.flag();
        const std::uintptr_t out = f.address();
        if (activation < 0 || activation > 2) {
            std::ostringstream msg;
            msg << "activation must be 0 (relu), 1 (gelu) or 2 (geglu); got " << activation;
            throw std::invalid_argument(msg.str());
        }
        return residual_step::feed_forward_args<T>(x, ldx, R, D, F, W1, b1, W2, b2, norm_weight,
                                                   norm_bias, eps, static_cast<int>(activation),
                                                   norm_first, out, threads);
    }
    const std::uintptr_t q = f.address();
    const std::array<int64_t, 2> q_strides{f.next(), f.next()};
    const std::uintptr_t k = f.address();
    const std::array<int64_t, 2> k_strides{f.next(), f.next()};
    const std::uintptr_t v = f.address();
    const std::array<int64_t, 2> v_strides{f.next(), f.next()};
    const std::uintptr_t S = f.address(), Z = f.address(), out = f.address();
    const std::uintptr_t S_new = f.address(), Z_new = f.address();
    const int64_t N = f.next(), H = f.next(), E = f.next(), M = f.next();
    const bool elu = f.flag();
    return linear_step::step_args<T>(q, q_strides, k, k_strides, v, v_strides, S, Z, out, S_new,
                                     Z_new, N, H, E, M, eps, elu, threads);
}

template <typename T>
void bound_chain(std::uintptr_t program_address, int64_t length,
                 const std::vector<int64_t>& bases, const std::vector<double>& scalars,
                 const std::vector<int64_t>& indices, int64_t threads) {
    require_threads(threads);
    check_positive("length", length);
    require_address("program", program_address, length);
    const int64_t* program = reinterpret_cast<const int64_t*>(program_address);
    const size_t size = static_cast<size_t>(length);
    std::vector<Op<T>> ops;
    size_t at = 0;
    for (int64_t op = 0; at < size; ++op) {
        const int64_t kind = program[at++];
        size_t count = 0;
        if (kind == kLinear) count = kLinearFields;
        if (kind == kFeedForward) count = kFeedForwardFields;
        if (kind == kLinearStep) count = kLinearStepFields;
        if (kind == kLayerNorm) count = kLayerNormFields;
        if (kind == kCacheAttention) count = kCacheAttentionFields;
        if (kind == kCacheWrite) count = kCacheWriteFields;
        if (kind == kWeightedSum) {
            const int64_t n = at + 3 <= size ? program[at + 2] : -1;
            if (n < 1 || n > kMaxSources) {
                std::ostringstream msg;
                msg << "op " << op << ": a weighted sum must add 1 to " << kMaxSources
                    << " values; got " << n;
                throw std::invalid_argument(msg.str());
            }
            count = weighted_sum_fields(n);
        }
        if (count == 0) {
            std::ostringstream msg;
            msg << "op " << op << ": kind must be 0 (linear), 1 (feed forward), 2 (linear "
                << "attention step), 3 (layer norm), 4 (weighted sum), 5 (cache attention) or "
                << "6 (cache write); got " << kind;
            throw std::invalid_argument(msg.str());
        }
        if (static_cast<size_t>(op) >= scalars.size()) {
            std::ostringstream msg;
            msg << "scalars holds " << scalars.size() << " values; op " << op << " needs one";
            throw std::invalid_argument(msg.str());
        }
        Fields<T> fields(program, size, bases, indices, at, count, op);
        ops.push_back(decode<T>(kind, fields, scalars[op], threads));
        at += count;
        if (fields.at() != at) throw std::logic_error("step chain: field count mismatch");
    }
    if (ops.size() != scalars.size()) {
        std::ostringstream msg;
        msg << "scalars holds " << scalars.size() << " values for " << ops.size() << " ops";
        throw std::invalid_argument(msg.str());
    }
    pybind11::gil_scoped_release release;
    run<T>(ops, threads);
}

inline void bind(pybind11::module_& m) {
    namespace py = pybind11;
    m.def("step_chain_f32", &bound_chain<float>, py::arg("program"), py::arg("length"),
          py::arg("bases"), py::arg("scalars"), py::arg("indices"), py::arg("threads"));
    m.def("step_chain_f64", &bound_chain<double>, py::arg("program"), py::arg("length"),
          py::arg("bases"), py::arg("scalars"), py::arg("indices"), py::arg("threads"));
}

}  // namespace step_chain
}  // namespace attention_core
