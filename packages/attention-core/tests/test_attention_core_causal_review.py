"""Review of the rewritten CPU causal-product kernels: failing cases found by an adversarial sweep.

REVIEW FINDINGS (these tests are expected to fail until the kernels are fixed).

The normalised recurrence applies ``q_scale`` (``r_t = 1 / (q_t . z_t + eps)``) once per
read-out, ``out_t = r_t * (S_t^T q_t)``, where it used to scale ``q_t`` in the row loop,
``out_t = S_t^T (r_t q_t)``. The product ``S_t^T q_t`` overflows float32 for inputs whose
normalised result (and the former kernel's) is finite: ``normalized_causal_dot_product`` is
invariant to the scale of ``Q``, and ``V`` of magnitude ``1e12`` is representable, yet the
kernel returns ``inf``. (The plain-PyTorch fallback, which forms the numerator first, and
fast-transformers overflow too: this is a loss of range against the former kernel.)

``csrc/causal_normalizer.h`` uses GCC's ``__builtin_shuffle``, which clang does not have:
the kernels no longer compile with clang (macOS builds, see CMakeLists.txt), where the
tree before the rewrite did.
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
def test_review_normalized_float32_large_values_stay_finite(cpu_level, sequence_first):
    """REVIEW: q, k = 1e14 and v = 1e12 give out = v = 1e12; the kernel returns inf."""
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


def test_review_elu_float32_large_values_stay_finite(cpu_level):
    """REVIEW: the fused map's form overflows the same way (phi(1e14) = 1e14 + 1)."""
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
def test_review_causal_kernels_compile_and_run_with_clang(tmp_path):
    """REVIEW: causal_normalizer.h's __builtin_shuffle is GCC-only; clang rejects it."""
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
