// pybind11 binding of csrc/step_chain.h (included by bindings.cpp): decode and validate a
// program of step ops, then run it with the GIL released.
//
// A program is a flat array of int64 (given by address and length: a program is made once and
// run at every step, and converting a list of a few hundred integers at every call cost more
// than the small ops it runs): per op its kind (kLinear, kFeedForward,
// kLinearStep) and then its fields in the order of the op's own binding (linear_args,
// feed_forward_args, step_args), where every address is two fields, (base, offset): the
// address bases[base] plus `offset` elements, or null for base -1. `scalars` holds one eps per
// op. Each op's fields are checked by the op's own argument check; the program's structure
// (kinds, lengths, base indices, offsets, flags) here. The Python caller
// (attention_core.step_chain) has checked the tensors behind the bases.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "binding_checks.h"
#include "linear_step_bindings.h"
#include "residual_step_bindings.h"
#include "step_chain.h"

namespace attention_core {
namespace step_chain {

constexpr int64_t kLinear = 0, kFeedForward = 1, kLinearStep = 2;

// Reads the fields of one op from a program, in order.
template <typename T>
class Fields {
  public:
    Fields(const int64_t* program, size_t length, const std::vector<int64_t>& bases, size_t at,
           size_t count, int64_t op)
        : program_(program), bases_(bases), at_(at), op_(op) {
        if (at + count > length) {
            std::ostringstream msg;
            msg << "program ends inside op " << op << ": it needs " << count << " fields";
            throw std::invalid_argument(msg.str());
        }
    }

    int64_t next() { return program_[at_++]; }

    size_t position() const { return at_; }

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

  private:
    const int64_t* program_;
    const std::vector<int64_t>& bases_;
    size_t at_;
    int64_t op_;
};

constexpr size_t kLinearFields = 20, kFeedForwardFields = 22, kLinearStepFields = 27;

template <typename T>
Op<T> decode(int64_t kind, Fields<T>& f, double eps, int64_t threads) {
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
                 int64_t threads) {
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
        if (count == 0) {
            std::ostringstream msg;
            msg << "op " << op << ": kind must be 0 (linear), 1 (feed forward) or 2 (linear "
                << "attention step); got " << kind;
            throw std::invalid_argument(msg.str());
        }
        if (static_cast<size_t>(op) >= scalars.size()) {
            std::ostringstream msg;
            msg << "scalars holds " << scalars.size() << " eps values; op " << op << " needs one";
            throw std::invalid_argument(msg.str());
        }
        Fields<T> fields(program, size, bases, at, count, op);
        ops.push_back(decode<T>(kind, fields, scalars[op], threads));
        at += count;
        if (fields.position() != at) throw std::logic_error("step chain: field count mismatch");
    }
    if (ops.size() != scalars.size()) {
        std::ostringstream msg;
        msg << "scalars holds " << scalars.size() << " eps values for " << ops.size() << " ops";
        throw std::invalid_argument(msg.str());
    }
    pybind11::gil_scoped_release release;
    run<T>(ops, threads);
}

inline void bind(pybind11::module_& m) {
    namespace py = pybind11;
    m.def("step_chain_f32", &bound_chain<float>, py::arg("program"), py::arg("length"),
          py::arg("bases"), py::arg("scalars"), py::arg("threads"));
    m.def("step_chain_f64", &bound_chain<double>, py::arg("program"), py::arg("length"),
          py::arg("bases"), py::arg("scalars"), py::arg("threads"));
}

}  // namespace step_chain
}  // namespace attention_core
