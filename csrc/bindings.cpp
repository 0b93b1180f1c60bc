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
#include "causal_product.h"
#include "cpu_dispatch.h"
#include "feature_map.h"
#include "hamming.h"
#include "hashing.h"
#include "linear_step_bindings.h"
#include "local_product.h"
#include "parallel.h"
#include "residual_step_bindings.h"
#include "sparse_product.h"

namespace py = pybind11;

namespace {

using attention_core::require_address;
using attention_core::require_eps;
using attention_core::require_threads;

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
std::string causal_form(int64_t L, int64_t E, int64_t M, bool compact, bool elu) {
    using attention_core::causal::Form;
    switch (attention_core::causal::choose_form(L, E, M, compact, elu)) {
        case Form::chunked: return "chunked";
        case Form::packed: return "packed";
        default: return "recurrence";
    }
}

std::array<int64_t, 3> get_chunked_thresholds() {
    const auto& t = attention_core::causal::chunked_thresholds();
    return {t.min_length, t.min_state_compact, t.min_state_strided};
}

void set_chunked_thresholds(int64_t min_length, int64_t min_state_compact,
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

// ---------------------------------------------------------------------------------------
// local product
// ---------------------------------------------------------------------------------------

template <typename T>
attention_core::local::Operand<T> local_operand(const char* name, std::uintptr_t address,
                                                const Strides3& s, int64_t elements) {
    require_address(name, address, elements);
    return {as_ptr<T>(address), {s[0], s[1], s[2]}};
}

void check_local_sizes(int64_t N, int64_t H, int64_t L, int64_t S, int64_t F, int64_t C,
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

// ---------------------------------------------------------------------------------------
// sparse and clustered sparse products
// ---------------------------------------------------------------------------------------

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
    attention_core::linear_step::bind(m);  // csrc/linear_step_bindings.h
    attention_core::residual_step::bind(m);  // csrc/residual_step_bindings.h
    attention_core::cache_attention::bind(m);  // csrc/cache_attention_bindings.h
}
