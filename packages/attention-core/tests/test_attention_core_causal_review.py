"""Regression tests for two faults a review found in the CPU causal-product kernels.

- Range: the normalised recurrence scales ``q_t`` by ``r_t = 1 / (q_t . z_t + eps)`` in its
  row loop, ``out_t = S_t^T (r_t q_t)``. Scaling the read-out instead, ``r_t (S_t^T q_t)``,
  overflowed float32 for inputs whose normalised result is finite (``q, k = 1e14``,
  ``v = 1e12``; the result does not depend on the scale of ``q``): every CPU level, the
  recurrence and the packed form, the fused map too.
- Portability: the normaliser's lane tree used GCC's ``__builtin_shuffle``, which clang
  lacks; the kernels must compile (and the lane sums agree) with clang, as on macOS.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attention_core import _extension
from attention_core.causal_product import (
    elu_normalized_causal_dot_product,
    normalized_causal_dot_product,
)

pytest.importorskip("attention_core._C", reason="attention_core._C is not compiled")


@pytest.fixture(params=[0, 1, 2], ids=["baseline", "avx2", "avx512"])
def cpu_level(request):
    """Each CPU level of the kernels (a level the CPU lacks runs the best one it has)."""
    _extension._C.set_cpu_level(request.param)
    yield request.param
    _extension._C.set_cpu_level(-1)


@pytest.mark.parametrize("sequence_first", [False, True], ids=["recurrence", "packed"])
def test_normalized_float32_large_values_stay_finite(cpu_level, sequence_first):
    """q, k = 1e14 and v = 1e12 give out = v = 1e12 (finite), at every CPU level."""
    Q = torch.full((1, 2, 2, 1), 1e14)  # (N, L, H, E)
    V = torch.full((1, 2, 2, 1), 1e12)
    if sequence_first:  # the attention layout seen as (N, H, L, E): the packed form
        Q, V = Q.transpose(1, 2), V.transpose(1, 2)
    else:
        Q, V = Q.transpose(1, 2).contiguous(), V.transpose(1, 2).contiguous()
    expected = normalized_causal_dot_product(Q.double(), Q.double(), V.double())
    out = normalized_causal_dot_product(Q, Q, V)
    assert torch.isfinite(out).all(), out
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


def test_elu_float32_large_values_stay_finite(cpu_level):
    """The fused map's form too (phi(1e14) = 1e14 + 1)."""
    Q = torch.full((1, 2, 2, 1), 1e14).transpose(1, 2)
    V = torch.full((1, 2, 2, 1), 1e12).transpose(1, 2)
    out = elu_normalized_causal_dot_product(Q, Q, V)
    assert torch.isfinite(out).all(), out
    torch.testing.assert_close(out.double(), torch.full_like(out, 1e12).double(), rtol=1e-5, atol=0)


CSRC = Path(__file__).resolve().parents[3] / "csrc"
CLANG = next((c for c in ("clang++", "clang++-18", "clang++-14") if shutil.which(c)), None)

# every form of the causal product, forward and backward, instantiated for both dtypes, and
# the normaliser's lane sums checked against plain sums
CLANG_PROGRAM = r"""
#include "causal_product.h"
#include <cmath>
#include <cstdio>
namespace ac = attention_core::causal;
template void ac::forward<float>(const ac::ForwardArgs<float>&, int64_t);
template void ac::forward<double>(const ac::ForwardArgs<double>&, int64_t);
template void ac::backward<float>(const ac::BackwardArgs<float>&, int64_t);
template void ac::backward<double>(const ac::BackwardArgs<double>&, int64_t);
template <typename T> int check() {
    using L = attention_core::causal::Lanes<T>;
    T lanes[40 * L::V], sums[40];
    for (int i = 0; i < 40 * L::V; ++i) lanes[i] = T((i * 7919) % 13) - T(6);
    L::sums(lanes, 37, sums);
    for (int t = 0; t < 37; ++t) {
        T expected = 0;
        for (int l = 0; l < L::V; ++l) expected += lanes[t * L::V + l];
        if (std::fabs(double(sums[t] - expected)) > 1e-9) return 1;
    }
    return 0;
}
int main() { return check<float>() + check<double>(); }
"""


@pytest.mark.skipif(CLANG is None, reason="clang++ is not installed")
def test_causal_kernels_compile_and_run_with_clang(tmp_path):
    """Every form of the causal product, forward and backward, both dtypes, compiled with
    clang, and the lane tree's sums against plain sums."""
    source = tmp_path / "causal_clang.cpp"
    source.write_text(CLANG_PROGRAM)
    binary = tmp_path / "causal_clang"
    build = subprocess.run(
        [CLANG, "-std=c++17", "-O1", "-Wno-ignored-attributes", "-pthread", f"-I{CSRC}",
         str(source), "-o", str(binary)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert subprocess.run([str(binary)]).returncode == 0
