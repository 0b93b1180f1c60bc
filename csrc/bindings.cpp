// pybind11 bindings of attention_core._C. This file only converts and validates:
// Python passes the addresses of CPU buffers (tensor.data_ptr()), their sizes and, for
// strided operands, the element strides of the leading dimensions (the last dimension is
// contiguous); the kernels live in the headers. No libtorch and no CUDA are linked.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "causal_product.h"
#include "cpu_dispatch.h"
#include "hashing.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

void check_positive(const char* name, int64_t value) {
    if (value < 0) {
        std::ostringstream msg;
        msg << name << " must be non-negative; got " << value;
        throw std::invalid_argument(msg.str());
    }
}

template <typename scalar_t>
void compute_hashes(std::uintptr_t X, std::uintptr_t planes, std::uintptr_t hashes, int64_t n,
                    int64_t d, int64_t bits) {
    check_positive("n", n);
    check_positive("d", d);
    if (bits < 1 || bits > 63) {
        std::ostringstream msg;
        msg << "bits must be in [1, 63]; got " << bits;
        throw std::invalid_argument(msg.str());
    }
    py::gil_scoped_release release;
    attention_core::compute_hashes<scalar_t>(as_ptr<const scalar_t>(X),
                                             as_ptr<const scalar_t>(planes),
                                             as_ptr<int64_t>(hashes), n, d, bits);
}

// ---------------------------------------------------------------------------------------
// causal product
// ---------------------------------------------------------------------------------------

using Strides3 = std::array<int64_t, 3>;

template <typename T>
attention_core::causal::Operand<T> operand(std::uintptr_t address, const Strides3& s) {
    return {as_ptr<T>(address), {s[0], s[1], s[2]}};
}

// A null address is only allowed for an empty buffer.
void require(const char* name, std::uintptr_t address, int64_t elements) {
    if (address == 0 && elements > 0) {
        std::ostringstream msg;
        msg << name << " must be a buffer address; got a null pointer";
        throw std::invalid_argument(msg.str());
    }
}

std::string shape_text(int64_t N, int64_t H, int64_t L, int64_t E, int64_t M) {
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
    if (threads < 1) {
        std::ostringstream msg;
        msg << "threads must be a positive int; got " << threads;
        throw std::invalid_argument(msg.str());
    }
    if (!std::isfinite(eps) || eps < 0) {
        std::ostringstream msg;
        msg << "eps must be a finite non-negative number; got " << eps;
        throw std::invalid_argument(msg.str());
    }
    require("Q", q, N * H * L * E);
    require("K", k, N * H * L * E);
    require("V", v, N * H * L * M);
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
                            int64_t M, bool normalize, double eps, int64_t threads) {
    attention_core::causal::ForwardArgs<T> a{};
    fill_problem<T>(a, q, qs, k, ks, v, vs, S0, z0, N, H, L, E, M, normalize, eps, threads);
    require("out", out, N * H * L * M);
    require("S", S, N * H * E * M);
    if (normalize) require("z", z, N * H * E);
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
                             int64_t M, bool normalize, double eps, int64_t threads) {
    attention_core::causal::BackwardArgs<T> a{};
    fill_problem<T>(a, q, qs, k, ks, v, vs, S0, z0, N, H, L, E, M, normalize, eps, threads);
    require("grad", grad, N * H * L * M);
    require("dQ", dq, N * H * L * E);
    require("dK", dk, N * H * L * E);
    require("dV", dv, N * H * L * M);
    require("dS0", dS0, N * H * E * M);
    if (normalize) {
        require("out", out, N * H * L * M);
        require("dz0", dz0, N * H * E);
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

int get_cpu_level() { return static_cast<int>(attention_core::cpu_level()); }

void set_cpu_level(int level) {
    if (level < -1 || level > 2) {
        std::ostringstream msg;
        msg << "level must be -1 (detect), 0 (baseline), 1 (avx2) or 2 (avx512); got " << level;
        throw std::invalid_argument(msg.str());
    }
    attention_core::cpu_level_override() = level;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "Compiled CPU kernels of attention_core (private; use the Python modules).";
    m.def("compute_hashes_f32", &compute_hashes<float>, py::arg("X"), py::arg("planes"),
          py::arg("hashes"), py::arg("n"), py::arg("d"), py::arg("bits"));
    m.def("compute_hashes_f64", &compute_hashes<double>, py::arg("X"), py::arg("planes"),
          py::arg("hashes"), py::arg("n"), py::arg("d"), py::arg("bits"));

#define ATTENTION_CORE_CAUSAL_FORWARD_ARGS                                                  \
    py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"),   \
        py::arg("v_strides"), py::arg("out"), py::arg("out_strides"), py::arg("S0"),        \
        py::arg("z0"), py::arg("S"), py::arg("z"), py::arg("N"), py::arg("H"), py::arg("L"), \
        py::arg("E"), py::arg("M"), py::arg("normalize"), py::arg("eps"), py::arg("threads")
#define ATTENTION_CORE_CAUSAL_BACKWARD_ARGS                                                    \
    py::arg("grad"), py::arg("grad_strides"), py::arg("q"), py::arg("q_strides"), py::arg("k"), \
        py::arg("k_strides"), py::arg("v"), py::arg("v_strides"), py::arg("out"),              \
        py::arg("out_strides"), py::arg("S0"), py::arg("z0"), py::arg("gS"), py::arg("gz"),    \
        py::arg("dq"), py::arg("dq_strides"), py::arg("dk"), py::arg("dk_strides"),            \
        py::arg("dv"), py::arg("dv_strides"), py::arg("dS0"), py::arg("dz0"), py::arg("N"),    \
        py::arg("H"), py::arg("L"), py::arg("E"), py::arg("M"), py::arg("normalize"),          \
        py::arg("eps"), py::arg("threads")
    m.def("causal_product_forward_f32", &causal_product_forward<float>,
          ATTENTION_CORE_CAUSAL_FORWARD_ARGS);
    m.def("causal_product_forward_f64", &causal_product_forward<double>,
          ATTENTION_CORE_CAUSAL_FORWARD_ARGS);
    m.def("causal_product_backward_f32", &causal_product_backward<float>,
          ATTENTION_CORE_CAUSAL_BACKWARD_ARGS);
    m.def("causal_product_backward_f64", &causal_product_backward<double>,
          ATTENTION_CORE_CAUSAL_BACKWARD_ARGS);
    m.def("cpu_level", &get_cpu_level,
          "Instruction set the kernels use: 0 baseline, 1 AVX2+FMA, 2 AVX-512.");
    m.def("set_cpu_level", &set_cpu_level, py::arg("level"),
          "Cap the instruction set (-1: the best this CPU supports); for tests and benchmarks.");
}
