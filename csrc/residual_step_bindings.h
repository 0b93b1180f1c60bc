// pybind11 bindings of csrc/residual_step.h (included by bindings.cpp): convert and validate
// sizes, strides and addresses, release the GIL around the kernels. The Python op
// (attention_core.residual_step) has checked shapes, dtypes and devices of the tensors.
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>

#include "binding_checks.h"
#include "residual_step.h"

namespace attention_core {
namespace residual_step {

inline void require_sizes(std::initializer_list<int64_t> sizes, int64_t threads, double eps) {
    for (int64_t size : sizes) {
        if (size < 0) throw std::invalid_argument("sizes and strides must be non-negative");
    }
    require_threads(threads);
    require_eps(eps);
}

template <typename T>
const T* maybe(std::uintptr_t address) {
    return reinterpret_cast<const T*>(address);
}

// The feed-forward sublayer's arguments, checked (also for csrc/step_chain_bindings.h).
template <typename T>
FeedForward<T> feed_forward_args(std::uintptr_t x, int64_t ldx, int64_t R, int64_t D, int64_t F,
                                 std::uintptr_t W1, std::uintptr_t b1, std::uintptr_t W2,
                                 std::uintptr_t b2, std::uintptr_t norm_weight,
                                 std::uintptr_t norm_bias, double eps, int activation,
                                 bool norm_first, std::uintptr_t out, int64_t threads) {
    require_sizes({ldx, R, D, F}, threads, eps);
    if (R > 1 && ldx < D) throw std::invalid_argument("x rows overlap: ldx < D");
    if (activation < 0 || activation > 2) {
        std::ostringstream msg;
        msg << "activation must be 0 (relu), 1 (gelu) or 2 (geglu); got " << activation;
        throw std::invalid_argument(msg.str());
    }
    const int64_t first_rows = activation == 2 ? 2 * F : F;
    require_address("x", x, R * D);
    require_address("W1", W1, first_rows * D);
    require_address("W2", W2, D * F);
    require_address("out", out, R * D);
    return FeedForward<T>{maybe<T>(x), ldx, R, D, F, maybe<T>(W1), maybe<T>(b1), maybe<T>(W2),
                          maybe<T>(b2),
                          LayerNorm<T>{maybe<T>(norm_weight), maybe<T>(norm_bias),
                                       static_cast<T>(eps)},
                          static_cast<Activation>(activation), norm_first,
                          reinterpret_cast<T*>(out)};
}

template <typename T>
void bound_feed_forward(std::uintptr_t x, int64_t ldx, int64_t R, int64_t D, int64_t F,
                        std::uintptr_t W1, std::uintptr_t b1, std::uintptr_t W2,
                        std::uintptr_t b2, std::uintptr_t norm_weight, std::uintptr_t norm_bias,
                        double eps, int activation, bool norm_first, std::uintptr_t out,
                        int64_t threads) {
    const FeedForward<T> p = feed_forward_args<T>(x, ldx, R, D, F, W1, b1, W2, b2, norm_weight,
                                                  norm_bias, eps, activation, norm_first, out,
                                                  threads);
    pybind11::gil_scoped_release release;
    residual_feed_forward<T>(p, threads);
}

// The residual linear sublayer's arguments, checked (also for csrc/step_chain_bindings.h).
// x, the residual, may be 0: no residual (a plain product, with the norm when `norm` is set).
template <typename T>
Linear<T> linear_args(std::uintptr_t x, int64_t ldx, std::uintptr_t a, int64_t lda, int64_t R,
                      int64_t D, int64_t K, std::uintptr_t W, std::uintptr_t b, bool norm,
                      std::uintptr_t norm_weight, std::uintptr_t norm_bias, double eps,
                      std::uintptr_t out, int64_t threads) {
    require_sizes({ldx, lda, R, D, K}, threads, eps);
    if (R > 1 && ((x != 0 && ldx < D) || lda < K)) {
        throw std::invalid_argument("rows overlap: ld < width");
    }
    require_address("inputs", a, R * K);
    require_address("weight", W, D * K);
    require_address("out", out, R * D);
    return Linear<T>{maybe<T>(x), ldx, maybe<T>(a), lda, R, D, K, maybe<T>(W), maybe<T>(b), norm,
                     LayerNorm<T>{maybe<T>(norm_weight), maybe<T>(norm_bias),
                                  static_cast<T>(eps)},
                     reinterpret_cast<T*>(out)};
}

template <typename T>
void bound_linear(std::uintptr_t x, int64_t ldx, std::uintptr_t a, int64_t lda, int64_t R,
                  int64_t D, int64_t K, std::uintptr_t W, std::uintptr_t b, bool norm,
                  std::uintptr_t norm_weight, std::uintptr_t norm_bias, double eps,
                  std::uintptr_t out, int64_t threads) {
    require_address("x", x, R * D);
    const Linear<T> p = linear_args<T>(x, ldx, a, lda, R, D, K, W, b, norm, norm_weight,
                                       norm_bias, eps, out, threads);
    pybind11::gil_scoped_release release;
    residual_linear<T>(p, threads);
}

inline void bind(pybind11::module_& m) {
    namespace py = pybind11;
#define ATTENTION_CORE_FEED_FORWARD_ARGS                                                     \
    py::arg("x"), py::arg("ldx"), py::arg("R"), py::arg("D"), py::arg("F"), py::arg("W1"),   \
        py::arg("b1"), py::arg("W2"), py::arg("b2"), py::arg("norm_weight"),                 \
        py::arg("norm_bias"), py::arg("eps"), py::arg("activation"), py::arg("norm_first"), \
        py::arg("out"), py::arg("threads")
#define ATTENTION_CORE_LINEAR_ARGS                                                          \
    py::arg("x"), py::arg("ldx"), py::arg("a"), py::arg("lda"), py::arg("R"), py::arg("D"), \
        py::arg("K"), py::arg("W"), py::arg("b"), py::arg("norm"), py::arg("norm_weight"),  \
        py::arg("norm_bias"), py::arg("eps"), py::arg("out"), py::arg("threads")
    m.def("residual_feed_forward_f32", &bound_feed_forward<float>,
          ATTENTION_CORE_FEED_FORWARD_ARGS);
    m.def("residual_feed_forward_f64", &bound_feed_forward<double>,
          ATTENTION_CORE_FEED_FORWARD_ARGS);
    m.def("residual_linear_f32", &bound_linear<float>, ATTENTION_CORE_LINEAR_ARGS);
    m.def("residual_linear_f64", &bound_linear<double>, ATTENTION_CORE_LINEAR_ARGS);
#undef ATTENTION_CORE_FEED_FORWARD_ARGS
#undef ATTENTION_CORE_LINEAR_ARGS
}

}  // namespace residual_step
}  // namespace attention_core
