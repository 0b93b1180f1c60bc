// pybind11 bindings of csrc/causal_product.h (included by bindings.cpp): the causal product, its form and thresholds, and the fused feature map. They convert
// and validate sizes, strides and addresses and release the GIL around the kernels.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "binding_checks.h"
#include "causal_product.h"
#include "cpu_dispatch.h"
#include "feature_map.h"

namespace attention_core {
namespace causal {

namespace py = pybind11;

template <typename T>
attention_core::causal::Operand<T> operand(std::uintptr_t address, const Strides3& s) {
    return {as_ptr<T>(address), {s[0], s[1], s[2]}};
}

inline std::string shape_text(int64_t N, int64_t H, int64_t L, int64_t E, int64_t M) {
    std::ostringstream msg;
    msg << "(N, H, L, E, M) = (" << N << ", " << H << ", " << L << ", " << E << ", " << M << ")";
    return msg.str();
}

template <typename T>
void fill_problem(attention_core::causal::Problem<T>& p, std::uintptr_t q, const Strides3& qs,
                  std::uintptr_t k, const Strides3& ks, std::uintptr_t v, const Strides3& vs,
                  std::uintptr_t S0, std::uintptr_t z0, int64_t N, int64_t H, int64_t L,
                  int64_t E, int64_t M, bool normalize, double eps, int64_t threads) {
    if (N < 0 || H < 0 || L < 0 || E < 0 || M < 0) {
        throw std::invalid_argument("sizes must be non-negative; got " +
                                    shape_text(N, H, L, E, M));
    }
    require_threads(threads);
    require_eps(eps);
    require_address("Q", q, N * H * L * E);
    require_address("K", k, N * H * L * E);
    require_address("V", v, N * H * L * M);
    p.N = N;
    p.H = H;
    p.L = L;
    p.E = E;
    p.M = M;
    p.normalize = normalize;
    p.eps = static_cast<T>(eps);
    p.q = operand<const T>(q, qs);
    p.k = operand<const T>(k, ks);
    p.v = operand<const T>(v, vs);
    p.S0 = as_ptr<const T>(S0);
    p.z0 = as_ptr<const T>(z0);
}

template <typename T>
void causal_product_forward(std::uintptr_t q, Strides3 qs, std::uintptr_t k, Strides3 ks,
                            std::uintptr_t v, Strides3 vs, std::uintptr_t out, Strides3 os,
                            std::uintptr_t S0, std::uintptr_t z0, std::uintptr_t S,
                            std::uintptr_t z, int64_t N, int64_t H, int64_t L, int64_t E,
                            int64_t M, bool normalize, double eps, int64_t threads, bool elu) {
    attention_core::causal::ForwardArgs<T> a{};
    fill_problem<T>(a, q, qs, k, ks, v, vs, S0, z0, N, H, L, E, M, normalize, eps, threads);
    a.elu = elu;
    require_address("out", out, N * H * L * M);
    require_address("S", S, N * H * E * M);
    if (normalize) require_address("z", z, N * H * E);
    a.out = operand<T>(out, os);
    a.S = as_ptr<T>(S);
    a.z = as_ptr<T>(z);
    py::gil_scoped_release release;
    attention_core::causal::forward<T>(a, threads);
}

template <typename T>
void causal_product_backward(std::uintptr_t grad, Strides3 gs, std::uintptr_t q, Strides3 qs,
                             std::uintptr_t k, Strides3 ks, std::uintptr_t v, Strides3 vs,
                             std::uintptr_t out, Strides3 os, std::uintptr_t S0,
                             std::uintptr_t z0, std::uintptr_t gS, std::uintptr_t gz,
                             std::uintptr_t dq, Strides3 dqs, std::uintptr_t dk, Strides3 dks,
                             std::uintptr_t dv, Strides3 dvs, std::uintptr_t dS0,
                             std::uintptr_t dz0, int64_t N, int64_t H, int64_t L, int64_t E,
                             int64_t M, bool normalize, double eps, int64_t threads,
                             bool elu) {
    attention_core::causal::BackwardArgs<T> a{};
    fill_problem<T>(a, q, qs, k, ks, v, vs, S0, z0, N, H, L, E, M, normalize, eps, threads);
    a.elu = elu;
    require_address("grad", grad, N * H * L * M);
    require_address("dQ", dq, N * H * L * E);
    require_address("dK", dk, N * H * L * E);
    require_address("dV", dv, N * H * L * M);
    require_address("dS0", dS0, N * H * E * M);
    if (normalize) {
        require_address("out", out, N * H * L * M);
        require_address("dz0", dz0, N * H * E);
    }
    a.grad = operand<const T>(grad, gs);
    a.out = operand<const T>(out, os);
    a.gS = as_ptr<const T>(gS);
    a.gz = as_ptr<const T>(gz);
    a.dq = operand<T>(dq, dqs);
    a.dk = operand<T>(dk, dks);
    a.dv = operand<T>(dv, dvs);
    a.dS0 = as_ptr<T>(dS0);
    a.dz0 = as_ptr<T>(dz0);
    py::gil_scoped_release release;
    attention_core::causal::backward<T>(a, threads);
}

// The form of the causal product that runs for a shape (causal_product.h), and its
// thresholds: for the tests, which run the chunked form on small shapes.
inline std::string causal_form(int64_t L, int64_t E, int64_t M, bool compact, bool elu) {
    using attention_core::causal::Form;
    switch (attention_core::causal::choose_form(L, E, M, compact, elu)) {
        case Form::chunked: return "chunked";
        case Form::packed: return "packed";
        default: return "recurrence";
    }
}

inline std::array<int64_t, 3> get_chunked_thresholds() {
    const auto& t = attention_core::causal::chunked_thresholds();
    return {t.min_length, t.min_state_compact, t.min_state_strided};
}

inline void set_chunked_thresholds(int64_t min_length, int64_t min_state_compact,
                            int64_t min_state_strided) {
    check_positive("min_length", min_length);
    check_positive("min_state_compact", min_state_compact);
    check_positive("min_state_strided", min_state_strided);
    attention_core::causal::chunked_thresholds() = {min_length, min_state_compact,
                                                    min_state_strided};
}

// phi(x) = elu(x) + 1 of the fused causal kernels over n contiguous elements, with the
// variant of the current CPU level (feature_map.h); for the tests.
template <typename T>
void elu_plus_one(std::uintptr_t x, std::uintptr_t out, int64_t n) {
    check_positive("n", n);
    require_address("x", x, n);
    require_address("out", out, n);
    py::gil_scoped_release release;
    attention_core::feature_map::elu_plus_one<T>(as_ptr<T>(out), as_ptr<const T>(x), n,
                                                 attention_core::cpu_level());
}

inline void bind(py::module_& m) {
#define ATTENTION_CORE_CAUSAL_FORWARD_ARGS                                                  \
    py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"),   \
        py::arg("v_strides"), py::arg("out"), py::arg("out_strides"), py::arg("S0"),        \
        py::arg("z0"), py::arg("S"), py::arg("z"), py::arg("N"), py::arg("H"), py::arg("L"), \
        py::arg("E"), py::arg("M"), py::arg("normalize"), py::arg("eps"), py::arg("threads"), \
        py::arg("elu") = false
#define ATTENTION_CORE_CAUSAL_BACKWARD_ARGS                                                    \
    py::arg("grad"), py::arg("grad_strides"), py::arg("q"), py::arg("q_strides"), py::arg("k"), \
        py::arg("k_strides"), py::arg("v"), py::arg("v_strides"), py::arg("out"),              \
        py::arg("out_strides"), py::arg("S0"), py::arg("z0"), py::arg("gS"), py::arg("gz"),    \
        py::arg("dq"), py::arg("dq_strides"), py::arg("dk"), py::arg("dk_strides"),            \
        py::arg("dv"), py::arg("dv_strides"), py::arg("dS0"), py::arg("dz0"), py::arg("N"),    \
        py::arg("H"), py::arg("L"), py::arg("E"), py::arg("M"), py::arg("normalize"),          \
        py::arg("eps"), py::arg("threads"), py::arg("elu") = false
    m.def("causal_product_forward_f32", &causal_product_forward<float>,
          ATTENTION_CORE_CAUSAL_FORWARD_ARGS);
    m.def("causal_product_forward_f64", &causal_product_forward<double>,
          ATTENTION_CORE_CAUSAL_FORWARD_ARGS);
    m.def("causal_product_backward_f32", &causal_product_backward<float>,
          ATTENTION_CORE_CAUSAL_BACKWARD_ARGS);
    m.def("causal_product_backward_f64", &causal_product_backward<double>,
          ATTENTION_CORE_CAUSAL_BACKWARD_ARGS);
    m.def("causal_form", &causal_form, py::arg("L"), py::arg("E"), py::arg("M"),
          py::arg("compact"), py::arg("elu"),
          "The form of the causal product for a shape: recurrence, packed or chunked");
    m.def("chunked_thresholds", &get_chunked_thresholds,
          "(min_length, min_state_compact, min_state_strided) of the chunked form");
    m.def("set_chunked_thresholds", &set_chunked_thresholds, py::arg("min_length"),
          py::arg("min_state_compact"), py::arg("min_state_strided"),
          "Set the thresholds of the chunked form (for tests)");
    m.def("elu_plus_one_f32", &elu_plus_one<float>, py::arg("x"), py::arg("out"), py::arg("n"),
          "out[i] = elu(x[i]) + 1 for i < n (the fused kernels' feature map)");
    m.def("elu_plus_one_f64", &elu_plus_one<double>, py::arg("x"), py::arg("out"), py::arg("n"),
          "out[i] = elu(x[i]) + 1 for i < n (the fused kernels' feature map)");
}

}  // namespace causal
}  // namespace attention_core
