// pybind11 bindings of csrc/sparse_product.h (included by bindings.cpp): the sparse and clustered sparse products. They convert
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
#include "sparse_product.h"

namespace attention_core {
namespace sparse {

namespace py = pybind11;

template <typename T>
attention_core::sparse::Operand<T> sparse_operand(const char* name, std::uintptr_t address,
                                                  const Strides3& s, int64_t elements) {
    require_address(name, address, elements);
    return {as_ptr<T>(address), {s[0], s[1], s[2]}};
}

// Sizes, and the index rows. The values of topk (N, H, R, k) are not scanned here: the kernel
// bounds-checks each row in its loop, skips a row holding an index outside [0, S) and reports
// it in `error`; `raise_index_error` then raises (after the kernel, the GIL held again).
template <typename T>
void fill_sparse(attention_core::sparse::Problem<T>& p, std::uintptr_t topk, int64_t R,
                 std::uintptr_t groups, std::uintptr_t limits, int64_t N, int64_t H, int64_t L,
                 int64_t S, int64_t F, int64_t k, int64_t threads,
                 attention_core::sparse::IndexError* error) {
    if (N < 0 || H < 0 || L < 0 || S < 0 || F < 0 || k < 0 || R < 0) {
        std::ostringstream msg;
        msg << "sizes must be non-negative; got (N, H, L, S, F, k, R) = (" << N << ", " << H
            << ", " << L << ", " << S << ", " << F << ", " << k << ", " << R << ")";
        throw std::invalid_argument(msg.str());
    }
    require_threads(threads);
    require_address("topk", topk, N * H * R * k);
    const int64_t* index = as_ptr<const int64_t>(topk);
    if (!groups && R != L) {
        std::ostringstream msg;
        msg << "topk must have one row per query without groups; got R=" << R << " and L=" << L;
        throw std::invalid_argument(msg.str());
    }
    p.N = N;
    p.H = H;
    p.L = L;
    p.S = S;
    p.F = F;
    p.k = k;
    p.index = {index, R, as_ptr<const int64_t>(groups), as_ptr<const int64_t>(limits), error};
}

inline void raise_index_error(const attention_core::sparse::IndexError& error, int64_t S) {
    if (!error.found.load()) return;
    std::ostringstream msg;
    msg << "topk must hold key indices in [0, S=" << S << "); got " << error.value.load();
    throw std::invalid_argument(msg.str());
}

template <typename T>
void sparse_dot_forward(std::uintptr_t q, Strides3 qs, std::uintptr_t keys, Strides3 ks,
                        std::uintptr_t out, Strides3 os, std::uintptr_t topk, int64_t R,
                        std::uintptr_t groups, std::uintptr_t limits, int64_t N, int64_t H,
                        int64_t L, int64_t S, int64_t F, int64_t k, int64_t threads) {
    attention_core::sparse::DotForward<T> a{};
    attention_core::sparse::IndexError error;
    fill_sparse<T>(a, topk, R, groups, limits, N, H, L, S, F, k, threads, &error);
    a.q = sparse_operand<const T>("Q", q, qs, N * H * L * F);
    a.keys = sparse_operand<const T>("K", keys, ks, N * H * S * F);
    a.out = sparse_operand<T>("out", out, os, N * H * L * k);
    {
        py::gil_scoped_release release;
        attention_core::sparse::dot_forward<T>(a, threads);
    }
    raise_index_error(error, S);
}

template <typename T>
void sparse_dot_backward(std::uintptr_t grad, Strides3 gs, std::uintptr_t q, Strides3 qs,
                         std::uintptr_t keys, Strides3 ks, std::uintptr_t dq, Strides3 dqs,
                         std::uintptr_t dk, Strides3 dks, std::uintptr_t topk, int64_t R,
                         std::uintptr_t groups, std::uintptr_t limits, int64_t N, int64_t H,
                         int64_t L, int64_t S, int64_t F, int64_t k, int64_t threads) {
    attention_core::sparse::DotBackward<T> a{};
    attention_core::sparse::IndexError error;
    fill_sparse<T>(a, topk, R, groups, limits, N, H, L, S, F, k, threads, &error);
    a.grad = sparse_operand<const T>("grad", grad, gs, N * H * L * k);
    a.q = sparse_operand<const T>("Q", q, qs, N * H * L * F);
    a.keys = sparse_operand<const T>("K", keys, ks, N * H * S * F);
    a.dq = sparse_operand<T>("dQ", dq, dqs, N * H * L * F);
    a.dkeys = sparse_operand<T>("dK", dk, dks, N * H * S * F);
    {
        py::gil_scoped_release release;
        attention_core::sparse::dot_backward<T>(a, threads);
    }
    raise_index_error(error, S);
}

template <typename T>
void sparse_average_forward(std::uintptr_t weights, Strides3 ws, std::uintptr_t values,
                            Strides3 vs, std::uintptr_t out, Strides3 os, std::uintptr_t topk,
                            int64_t R, std::uintptr_t groups, std::uintptr_t limits, int64_t N,
                            int64_t H, int64_t L, int64_t S, int64_t F, int64_t k,
                            int64_t threads) {
    attention_core::sparse::AverageForward<T> a{};
    attention_core::sparse::IndexError error;
    fill_sparse<T>(a, topk, R, groups, limits, N, H, L, S, F, k, threads, &error);
    a.weights = sparse_operand<const T>("weights", weights, ws, N * H * L * k);
    a.values = sparse_operand<const T>("values", values, vs, N * H * S * F);
    a.out = sparse_operand<T>("out", out, os, N * H * L * F);
    {
        py::gil_scoped_release release;
        attention_core::sparse::average_forward<T>(a, threads);
    }
    raise_index_error(error, S);
}

template <typename T>
void sparse_average_backward(std::uintptr_t grad, Strides3 gs, std::uintptr_t weights,
                             Strides3 ws, std::uintptr_t values, Strides3 vs, std::uintptr_t dw,
                             Strides3 dws, std::uintptr_t dv, Strides3 dvs, std::uintptr_t topk,
                             int64_t R, std::uintptr_t groups, std::uintptr_t limits, int64_t N,
                             int64_t H, int64_t L, int64_t S, int64_t F, int64_t k,
                             int64_t threads) {
    attention_core::sparse::AverageBackward<T> a{};
    attention_core::sparse::IndexError error;
    fill_sparse<T>(a, topk, R, groups, limits, N, H, L, S, F, k, threads, &error);
    a.grad = sparse_operand<const T>("grad", grad, gs, N * H * L * F);
    a.weights = sparse_operand<const T>("weights", weights, ws, N * H * L * k);
    a.values = sparse_operand<const T>("values", values, vs, N * H * S * F);
    a.dweights = sparse_operand<T>("dweights", dw, dws, N * H * L * k);
    a.dvalues = sparse_operand<T>("dvalues", dv, dvs, N * H * S * F);
    {
        py::gil_scoped_release release;
        attention_core::sparse::average_backward<T>(a, threads);
    }
    raise_index_error(error, S);
}

inline void bind(py::module_& m) {
#define ATTENTION_CORE_SPARSE_TAIL                                                          \
    py::arg("topk"), py::arg("R"), py::arg("groups"), py::arg("limits"), py::arg("N"),      \
        py::arg("H"), py::arg("L"), py::arg("S"), py::arg("F"), py::arg("k"), py::arg("threads")
#define ATTENTION_CORE_SPARSE_DOT_FORWARD_ARGS                                                \
    py::arg("q"), py::arg("q_strides"), py::arg("keys"), py::arg("keys_strides"), py::arg("out"), \
        py::arg("out_strides"), ATTENTION_CORE_SPARSE_TAIL
#define ATTENTION_CORE_SPARSE_DOT_BACKWARD_ARGS                                                \
    py::arg("grad"), py::arg("grad_strides"), py::arg("q"), py::arg("q_strides"), py::arg("keys"), \
        py::arg("keys_strides"), py::arg("dq"), py::arg("dq_strides"), py::arg("dkeys"),         \
        py::arg("dkeys_strides"), ATTENTION_CORE_SPARSE_TAIL
#define ATTENTION_CORE_SPARSE_AVERAGE_FORWARD_ARGS                                         \
    py::arg("weights"), py::arg("weights_strides"), py::arg("values"),                     \
        py::arg("values_strides"), py::arg("out"), py::arg("out_strides"),                 \
        ATTENTION_CORE_SPARSE_TAIL
#define ATTENTION_CORE_SPARSE_AVERAGE_BACKWARD_ARGS                                            \
    py::arg("grad"), py::arg("grad_strides"), py::arg("weights"), py::arg("weights_strides"), \
        py::arg("values"), py::arg("values_strides"), py::arg("dweights"),                   \
        py::arg("dweights_strides"), py::arg("dvalues"), py::arg("dvalues_strides"),         \
        ATTENTION_CORE_SPARSE_TAIL
    m.def("sparse_dot_product_forward_f32", &sparse_dot_forward<float>,
          ATTENTION_CORE_SPARSE_DOT_FORWARD_ARGS);
    m.def("sparse_dot_product_forward_f64", &sparse_dot_forward<double>,
          ATTENTION_CORE_SPARSE_DOT_FORWARD_ARGS);
    m.def("sparse_dot_product_backward_f32", &sparse_dot_backward<float>,
          ATTENTION_CORE_SPARSE_DOT_BACKWARD_ARGS);
    m.def("sparse_dot_product_backward_f64", &sparse_dot_backward<double>,
          ATTENTION_CORE_SPARSE_DOT_BACKWARD_ARGS);
    m.def("sparse_weighted_average_forward_f32", &sparse_average_forward<float>,
          ATTENTION_CORE_SPARSE_AVERAGE_FORWARD_ARGS);
    m.def("sparse_weighted_average_forward_f64", &sparse_average_forward<double>,
          ATTENTION_CORE_SPARSE_AVERAGE_FORWARD_ARGS);
    m.def("sparse_weighted_average_backward_f32", &sparse_average_backward<float>,
          ATTENTION_CORE_SPARSE_AVERAGE_BACKWARD_ARGS);
    m.def("sparse_weighted_average_backward_f64", &sparse_average_backward<double>,
          ATTENTION_CORE_SPARSE_AVERAGE_BACKWARD_ARGS);
}

}  // namespace sparse
}  // namespace attention_core
