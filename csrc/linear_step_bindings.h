// pybind11 binding of csrc/linear_step.h (included by bindings.cpp): converts and validates
// sizes, strides and addresses, releases the GIL around the kernel.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "binding_checks.h"
#include "linear_step.h"

namespace attention_core {
namespace linear_step {

// The step's arguments, checked (also for csrc/step_chain_bindings.h). q, k, v: addresses
// with the element strides of their n and h dimensions (features contiguous); S, Z: contiguous
// or 0 for zeros; out, S_new, Z_new: contiguous outputs.
template <typename T>
Problem<T> step_args(std::uintptr_t q, const std::array<int64_t, 2>& q_strides, std::uintptr_t k,
                     const std::array<int64_t, 2>& k_strides, std::uintptr_t v,
                     const std::array<int64_t, 2>& v_strides, std::uintptr_t S, std::uintptr_t Z,
                     std::uintptr_t out, std::uintptr_t S_new, std::uintptr_t Z_new, int64_t N,
                     int64_t H, int64_t E, int64_t M, double eps, bool elu, int64_t threads) {
    if (N < 0 || H < 0 || E < 0 || M < 0) {
        std::ostringstream msg;
        msg << "sizes must be non-negative; got (N, H, E, M) = (" << N << ", " << H << ", " << E
            << ", " << M << ")";
        throw std::invalid_argument(msg.str());
    }
    require_threads(threads);
    require_eps(eps);
    for (int64_t stride : {q_strides[0], q_strides[1], k_strides[0], k_strides[1],
                           v_strides[0], v_strides[1]}) {
        if (stride < 0) throw std::invalid_argument("strides must be non-negative");
    }
    require_address("query", q, N * H * E);
    require_address("key", k, N * H * E);
    require_address("value", v, N * H * M);
    require_address("out", out, N * H * M);
    require_address("S_new", S_new, N * H * E * M);
    require_address("Z_new", Z_new, N * H * E);
    auto ptr = [](std::uintptr_t a) { return reinterpret_cast<T*>(a); };
    return Problem<T>{ptr(q), q_strides[0], q_strides[1], ptr(k), k_strides[0], k_strides[1],
                      ptr(v), v_strides[0], v_strides[1], ptr(S), ptr(Z), ptr(out), ptr(S_new),
                      ptr(Z_new), N, H, E, M, static_cast<T>(eps), elu};
}

template <typename T>
void bound_step(std::uintptr_t q, const std::array<int64_t, 2>& q_strides, std::uintptr_t k,
                const std::array<int64_t, 2>& k_strides, std::uintptr_t v,
                const std::array<int64_t, 2>& v_strides, std::uintptr_t S, std::uintptr_t Z,
                std::uintptr_t out, std::uintptr_t S_new, std::uintptr_t Z_new, int64_t N,
                int64_t H, int64_t E, int64_t M, double eps, bool elu, int64_t threads) {
    const Problem<T> p = step_args<T>(q, q_strides, k, k_strides, v, v_strides, S, Z, out, S_new,
                                      Z_new, N, H, E, M, eps, elu, threads);
    pybind11::gil_scoped_release release;
    linear_attention_step<T>(p, threads);
}

inline void bind(pybind11::module_& m) {
    namespace py = pybind11;
#define ATTENTION_CORE_LINEAR_STEP_ARGS                                                     \
    py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"),   \
        py::arg("v_strides"), py::arg("S"), py::arg("Z"), py::arg("out"), py::arg("S_new"), \
        py::arg("Z_new"), py::arg("N"), py::arg("H"), py::arg("E"), py::arg("M"),           \
        py::arg("eps"), py::arg("elu"), py::arg("threads")
    m.def("linear_attention_step_f32", &bound_step<float>, ATTENTION_CORE_LINEAR_STEP_ARGS);
    m.def("linear_attention_step_f64", &bound_step<double>, ATTENTION_CORE_LINEAR_STEP_ARGS);
#undef ATTENTION_CORE_LINEAR_STEP_ARGS
}

}  // namespace linear_step
}  // namespace attention_core
