// pybind11 binding of csrc/cache_attention.h (included by bindings.cpp): converts and
// validates sizes, strides, the key range and addresses, releases the GIL around the kernel.
// The Python op (attention_core.cache_attention) has checked shapes, dtypes and devices.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "binding_checks.h"
#include "cache_attention.h"

namespace attention_core {
namespace cache_attention {

// sizes: (B, W, H, E, M, C); q, v strides of their first three dimensions, k of all four,
// bias of its first three (0 to broadcast) or address 0 for none; out (B, W, H, M) contiguous.
// Checks the sizes, the range and the addresses and returns the kernel's problem (also the
// check of the step chain's op, step_chain_bindings.h).
template <typename T>
Problem<T> attention_args(std::uintptr_t q, const std::array<int64_t, 3>& q_strides,
                          std::uintptr_t k, const std::array<int64_t, 4>& k_strides,
                          std::uintptr_t v, const std::array<int64_t, 3>& v_strides,
                          std::uintptr_t bias, const std::array<int64_t, 3>& bias_strides,
                          std::uintptr_t out, const std::array<int64_t, 6>& sizes, int64_t start,
                          int64_t end, double scale, int64_t threads) {
    const auto [B, W, H, E, M, C] = sizes;
    for (int64_t size : sizes) {
        if (size < 0) throw std::invalid_argument("sizes must be non-negative");
    }
    if (start < 0 || end < start || end > C) {
        std::ostringstream msg;
        msg << "start and end must satisfy 0 <= start <= end <= " << C << " (the cache length); got "
            << start << " and " << end;
        throw std::invalid_argument(msg.str());
    }
    if (k_strides[3] != 1 && k_strides[2] != 1 && E > 1 && end - start > 1) {
        throw std::invalid_argument("keys must have contiguous features or contiguous positions");
    }
    require_threads(threads);
    require_address("query", q, B * W * H * E);
    require_address("keys", k, (end - start) * B * H * E);
    require_address("values", v, (end - start) * B * H * M);
    require_address("out", out, B * W * H * M);
    auto ptr = [](std::uintptr_t a) { return reinterpret_cast<const T*>(a); };
    Problem<T> p{ptr(q),         q_strides[0],    q_strides[1],    q_strides[2],  ptr(k),
                 k_strides[0],   k_strides[1],    k_strides[2],    k_strides[3],  ptr(v),
                 v_strides[0],   v_strides[1],    v_strides[2],    ptr(bias),     bias_strides[0],
                 bias_strides[1], bias_strides[2], reinterpret_cast<T*>(out), B,  W,
                 H,              E,               M,               start,         end,
                 static_cast<T>(scale)};
    if (E <= 1) p.k_e = 1;  // one feature: the row-major loop reads it at any stride
    return p;
}

template <typename T>
void bound_attention(std::uintptr_t q, const std::array<int64_t, 3>& q_strides,
                     std::uintptr_t k, const std::array<int64_t, 4>& k_strides,
                     std::uintptr_t v, const std::array<int64_t, 3>& v_strides,
                     std::uintptr_t bias, const std::array<int64_t, 3>& bias_strides,
                     std::uintptr_t out, const std::array<int64_t, 6>& sizes, int64_t start,
                     int64_t end, double scale, int64_t threads) {
    const Problem<T> p = attention_args<T>(q, q_strides, k, k_strides, v, v_strides, bias,
                                           bias_strides, out, sizes, start, end, scale, threads);
    pybind11::gil_scoped_release release;
    cache_attention<T>(p, threads);
}

inline void bind(pybind11::module_& m) {
    namespace py = pybind11;
#define ATTENTION_CORE_CACHE_ATTENTION_ARGS                                                \
    py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"),  \
        py::arg("v_strides"), py::arg("bias"), py::arg("bias_strides"), py::arg("out"),    \
        py::arg("sizes"), py::arg("start"), py::arg("end"), py::arg("scale"),             \
        py::arg("threads")
    m.def("cache_attention_f32", &bound_attention<float>, ATTENTION_CORE_CACHE_ATTENTION_ARGS);
    m.def("cache_attention_f64", &bound_attention<double>, ATTENTION_CORE_CACHE_ATTENTION_ARGS);
#undef ATTENTION_CORE_CACHE_ATTENTION_ARGS
}

}  // namespace cache_attention
}  // namespace attention_core
