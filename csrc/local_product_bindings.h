// pybind11 bindings of csrc/local_product.h (included by bindings.cpp): the local dot product and weighted average. They convert
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
#include "local_product.h"

namespace attention_core {
namespace local {

namespace py = pybind11;

template <typename T>
attention_core::local::Operand<T> local_operand(const char* name, std::uintptr_t address,
                                                const Strides3& s, int64_t elements) {
    require_address(name, address, elements);
    return {as_ptr<T>(address), {s[0], s[1], s[2]}};
}

inline void check_local_sizes(int64_t N, int64_t H, int64_t L, int64_t S, int64_t F, int64_t C,
                       int64_t threads) {
    if (N < 0 || H < 0 || L < 0 || S < 0 || F < 0 || C < 1) {
        std::ostringstream msg;
        msg << "sizes must be non-negative and the local context positive; got (N, H, L, S, F, "
               "C) = ("
            << N << ", " << H << ", " << L << ", " << S << ", " << F << ", " << C << ")";
        throw std::invalid_argument(msg.str());
    }
    require_threads(threads);
}

template <typename T>
void local_dot_forward(std::uintptr_t q, Strides3 qs, std::uintptr_t k, Strides3 ks,
                       std::uintptr_t mask, std::array<int64_t, 2> mask_strides,
                       std::uintptr_t lengths, std::uintptr_t out, Strides3 os, int64_t N,
                       int64_t H, int64_t L, int64_t S, int64_t E, int64_t C, int64_t threads) {
    check_local_sizes(N, H, L, S, E, C, threads);
    attention_core::local::DotForward<T> a{N, H, L, S, E, C};
    a.q = local_operand<const T>("Q", q, qs, N * H * L * E);
    a.k = local_operand<const T>("K", k, ks, N * H * S * E);
    require_address("attn_mask", mask, L * S);
    require_address("key_lengths", lengths, N);
    a.mask = as_ptr<const T>(mask);
    a.mask_l = mask_strides[0];
    a.mask_s = mask_strides[1];
    a.lengths = as_ptr<const int64_t>(lengths);
    a.out = local_operand<T>("out", out, os, N * H * L * C);
    py::gil_scoped_release release;
    attention_core::local::dot_forward<T>(a, threads);
}

template <typename T>
void local_dot_backward(std::uintptr_t grad, Strides3 gs, std::uintptr_t q, Strides3 qs,
                        std::uintptr_t k, Strides3 ks, std::uintptr_t lengths, std::uintptr_t dq,
                        Strides3 dqs, std::uintptr_t dk, Strides3 dks, int64_t N, int64_t H,
                        int64_t L, int64_t S, int64_t E, int64_t C, int64_t threads) {
    check_local_sizes(N, H, L, S, E, C, threads);
    attention_core::local::DotBackward<T> a{N, H, L, S, E, C};
    a.grad = local_operand<const T>("grad", grad, gs, N * H * L * C);
    a.q = local_operand<const T>("Q", q, qs, N * H * L * E);
    a.k = local_operand<const T>("K", k, ks, N * H * S * E);
    require_address("key_lengths", lengths, N);
    a.lengths = as_ptr<const int64_t>(lengths);
    a.dq = local_operand<T>("dQ", dq, dqs, N * H * L * E);
    a.dk = local_operand<T>("dK", dk, dks, N * H * S * E);
    py::gil_scoped_release release;
    attention_core::local::dot_backward<T>(a, threads);
}

template <typename T>
void local_average_forward(std::uintptr_t attention, Strides3 as, std::uintptr_t v,
                           Strides3 vs, std::uintptr_t out, Strides3 os, int64_t N, int64_t H,
                           int64_t L, int64_t S, int64_t D, int64_t C, int64_t threads) {
    check_local_sizes(N, H, L, S, D, C, threads);
    attention_core::local::AverageForward<T> a{N, H, L, S, D, C};
    a.attention = local_operand<const T>("attention", attention, as, N * H * L * C);
    a.v = local_operand<const T>("V", v, vs, N * H * S * D);
    a.out = local_operand<T>("out", out, os, N * H * L * D);
    py::gil_scoped_release release;
    attention_core::local::average_forward<T>(a, threads);
}

template <typename T>
void local_average_backward(std::uintptr_t grad, Strides3 gs, std::uintptr_t attention,
                            Strides3 as, std::uintptr_t v, Strides3 vs, std::uintptr_t da,
                            Strides3 das, std::uintptr_t dv, Strides3 dvs, int64_t N, int64_t H,
                            int64_t L, int64_t S, int64_t D, int64_t C, int64_t threads) {
    check_local_sizes(N, H, L, S, D, C, threads);
    attention_core::local::AverageBackward<T> a{N, H, L, S, D, C};
    a.grad = local_operand<const T>("grad", grad, gs, N * H * L * D);
    a.attention = local_operand<const T>("attention", attention, as, N * H * L * C);
    a.v = local_operand<const T>("V", v, vs, N * H * S * D);
    a.dattention = local_operand<T>("dattention", da, das, N * H * L * C);
    a.dv = local_operand<T>("dV", dv, dvs, N * H * S * D);
    py::gil_scoped_release release;
    attention_core::local::average_backward<T>(a, threads);
}

inline void bind(py::module_& m) {
#define ATTENTION_CORE_LOCAL_SIZES \
    py::arg("N"), py::arg("H"), py::arg("L"), py::arg("S"), py::arg("F"), py::arg("C"), \
        py::arg("threads")
#define ATTENTION_CORE_LOCAL_DOT_FORWARD_ARGS                                               \
    py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("mask"), \
        py::arg("mask_strides"), py::arg("lengths"), py::arg("out"), py::arg("out_strides"),  \
        ATTENTION_CORE_LOCAL_SIZES
#define ATTENTION_CORE_LOCAL_DOT_BACKWARD_ARGS                                                \
    py::arg("grad"), py::arg("grad_strides"), py::arg("q"), py::arg("q_strides"), py::arg("k"), \
        py::arg("k_strides"), py::arg("lengths"), py::arg("dq"), py::arg("dq_strides"),         \
        py::arg("dk"), py::arg("dk_strides"), ATTENTION_CORE_LOCAL_SIZES
#define ATTENTION_CORE_LOCAL_AVERAGE_FORWARD_ARGS                                            \
    py::arg("attention"), py::arg("attention_strides"), py::arg("v"), py::arg("v_strides"), \
        py::arg("out"), py::arg("out_strides"), ATTENTION_CORE_LOCAL_SIZES
#define ATTENTION_CORE_LOCAL_AVERAGE_BACKWARD_ARGS                                             \
    py::arg("grad"), py::arg("grad_strides"), py::arg("attention"),                           \
        py::arg("attention_strides"), py::arg("v"), py::arg("v_strides"), py::arg("dattention"), \
        py::arg("dattention_strides"), py::arg("dv"), py::arg("dv_strides"),                  \
        ATTENTION_CORE_LOCAL_SIZES
    m.def("local_dot_product_forward_f32", &local_dot_forward<float>,
          ATTENTION_CORE_LOCAL_DOT_FORWARD_ARGS);
    m.def("local_dot_product_forward_f64", &local_dot_forward<double>,
          ATTENTION_CORE_LOCAL_DOT_FORWARD_ARGS);
    m.def("local_dot_product_backward_f32", &local_dot_backward<float>,
          ATTENTION_CORE_LOCAL_DOT_BACKWARD_ARGS);
    m.def("local_dot_product_backward_f64", &local_dot_backward<double>,
          ATTENTION_CORE_LOCAL_DOT_BACKWARD_ARGS);
    m.def("local_weighted_average_forward_f32", &local_average_forward<float>,
          ATTENTION_CORE_LOCAL_AVERAGE_FORWARD_ARGS);
    m.def("local_weighted_average_forward_f64", &local_average_forward<double>,
          ATTENTION_CORE_LOCAL_AVERAGE_FORWARD_ARGS);
    m.def("local_weighted_average_backward_f32", &local_average_backward<float>,
          ATTENTION_CORE_LOCAL_AVERAGE_BACKWARD_ARGS);
    m.def("local_weighted_average_backward_f64", &local_average_backward<double>,
          ATTENTION_CORE_LOCAL_AVERAGE_BACKWARD_ARGS);
}

}  // namespace local
}  // namespace attention_core
