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

#include "aggregate.h"
#include "binding_checks.h"
#include "blas.h"
#include "cache_attention_bindings.h"
#include "causal_product_bindings.h"
#include "cpu_dispatch.h"
#include "feature_map.h"
#include "hamming.h"
#include "hashing.h"
#include "linear_step_bindings.h"
#include "local_product_bindings.h"
#include "parallel.h"
#include "residual_step_bindings.h"
#include "sparse_product_bindings.h"
#include "step_chain_bindings.h"

namespace py = pybind11;

namespace {

using attention_core::as_ptr;
using attention_core::Strides3;
using attention_core::check_positive;
using attention_core::require_address;
using attention_core::require_eps;
using attention_core::require_threads;

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
// aggregate and broadcast
// ---------------------------------------------------------------------------------------

template <typename T>
void group_rows(std::uintptr_t in, Strides3 is, std::uintptr_t out, Strides3 os,
                std::uintptr_t G, std::uintptr_t F, std::uintptr_t limits, int64_t N, int64_t H,
                int64_t L, int64_t C, int64_t E, bool broadcast, int64_t threads) {
    if (N < 0 || H < 0 || L < 0 || C < 0 || E < 0) {
        std::ostringstream msg;
        msg << "sizes must be non-negative; got (N, H, L, C, E) = (" << N << ", " << H << ", "
            << L << ", " << C << ", " << E << ")";
        throw std::invalid_argument(msg.str());
    }
    require_threads(threads);
    const int64_t in_rows = broadcast ? C : L, out_rows = broadcast ? L : C;
    require_address("input", in, N * H * in_rows * E);
    require_address("output", out, N * H * out_rows * E);
    require_address("G", G, N * H * L);
    attention_core::aggregate::Args<T> a{N, H, L, C, E};
    a.G = as_ptr<const int64_t>(G);
    a.F = as_ptr<const T>(F);
    a.limits = as_ptr<const int64_t>(limits);
    a.in = {as_ptr<const T>(in), {is[0], is[1], is[2]}};
    a.out = {as_ptr<T>(out), {os[0], os[1], os[2]}};
    py::gil_scoped_release release;
    attention_core::aggregate::run<T>(a, broadcast, threads);
}

// ---------------------------------------------------------------------------------------
// hamming k-means
// ---------------------------------------------------------------------------------------

void hamming_cluster(std::uintptr_t hashes, std::uintptr_t lengths, std::uintptr_t groups,
                     std::uintptr_t counts, std::uintptr_t centroids, std::uintptr_t distances,
                     std::uintptr_t bitcounts, int64_t N, int64_t H, int64_t L, int64_t C,
                     int64_t bits, int64_t iterations, int64_t threads) {
    if (N < 0 || H < 0 || L < 0 || C < 1 || iterations < 0) {
        std::ostringstream msg;
        msg << "sizes must be non-negative and clusters positive; got (N, H, L, C, iterations) "
               "= ("
            << N << ", " << H << ", " << L << ", " << C << ", " << iterations << ")";
        throw std::invalid_argument(msg.str());
    }
    if (bits < 1 || bits > 63) {
        std::ostringstream msg;
        msg << "bits must be in [1, 63]; got " << bits;
        throw std::invalid_argument(msg.str());
    }
    require_threads(threads);
    require_address("hashes", hashes, N * H * L);
    require_address("lengths", lengths, N);
    require_address("groups", groups, N * H * L);
    require_address("counts", counts, N * H * C);
    require_address("centroids", centroids, N * H * C);
    require_address("distances", distances, N * H * L);
    require_address("bitcounts", bitcounts, N * H * C * bits);
    attention_core::hamming::Args a{N, H, L, C, bits, iterations};
    a.hashes = as_ptr<const int64_t>(hashes);
    a.lengths = as_ptr<const int64_t>(lengths);
    a.groups = as_ptr<int32_t>(groups);
    a.counts = as_ptr<int32_t>(counts);
    a.centroids = as_ptr<int64_t>(centroids);
    a.distances = as_ptr<int32_t>(distances);
    a.bitcounts = as_ptr<int32_t>(bitcounts);
    py::gil_scoped_release release;
    attention_core::hamming::cluster(a, threads);
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

#define ATTENTION_CORE_GROUP_ARGS                                                             \
    py::arg("input"), py::arg("input_strides"), py::arg("output"), py::arg("output_strides"), \
        py::arg("G"), py::arg("F"), py::arg("limits"), py::arg("N"), py::arg("H"),           \
        py::arg("L"), py::arg("C"), py::arg("E"), py::arg("broadcast"), py::arg("threads")
    m.def("group_rows_f32", &group_rows<float>, ATTENTION_CORE_GROUP_ARGS,
          "aggregate (broadcast=False) or broadcast (True) rows by group.");
    m.def("group_rows_f64", &group_rows<double>, ATTENTION_CORE_GROUP_ARGS,
          "aggregate (broadcast=False) or broadcast (True) rows by group.");
    m.def("hamming_cluster", &hamming_cluster, py::arg("hashes"), py::arg("lengths"),
          py::arg("groups"), py::arg("counts"), py::arg("centroids"), py::arg("distances"),
          py::arg("bitcounts"), py::arg("N"), py::arg("H"), py::arg("L"), py::arg("C"),
          py::arg("bits"), py::arg("iterations"), py::arg("threads"));
    m.def("cpu_level", &get_cpu_level,
          "Instruction set the kernels use: 0 baseline, 1 AVX2+FMA, 2 AVX-512.");
    m.def("set_cpu_level", &set_cpu_level, py::arg("level"),
          "Cap the instruction set (-1: the best this CPU supports); for tests and benchmarks.");
    m.def("openmp_enabled", &attention_core::openmp_enabled,
          "Whether the kernels were compiled with OpenMP (else they run serially).");
    m.def(
        "last_team_size", [] { return attention_core::last_team_size().load(); },
        "Threads (the OpenMP team) that ran the last kernel's parallel loop (for tests).");
    m.def("install_blas_f32", &attention_core::blas::install<float>, py::arg("sgemm"),
          "Use the sgemm_ at this address (0: none) for few-row products; whether it is used.");
    m.def("install_blas_f64", &attention_core::blas::install<double>, py::arg("dgemm"),
          "Use the dgemm_ at this address (0: none) for few-row products; whether it is used.");
    m.def(
        "set_blas_min_rows",
        [](int64_t rows) { attention_core::rows::blas_min_rows_override() = rows; },
        py::arg("rows"), "Products of this many rows or more run on BLAS (-1: measured); tests.");
    attention_core::causal::bind(m);  // csrc/causal_product_bindings.h
    attention_core::local::bind(m);  // csrc/local_product_bindings.h
    attention_core::sparse::bind(m);  // csrc/sparse_product_bindings.h
    attention_core::linear_step::bind(m);  // csrc/linear_step_bindings.h
    attention_core::residual_step::bind(m);  // csrc/residual_step_bindings.h
    attention_core::cache_attention::bind(m);  // csrc/cache_attention_bindings.h
    attention_core::step_chain::bind(m);  // csrc/step_chain_bindings.h
}
