"""Review of the rewritten CPU causal-product kernels: failing cases found by an adversarial sweep.

REVIEW FINDINGS (these tests are expected to fail until the kernels are fixed).

The normalised recurrence applies ``q_scale`` (``r_t = 1 / (q_t . z_t + eps)``) once per
read-out, ``out_t = r_t * (S_t^T q_t)``, where it used to scale ``q_t`` in the row loop,
``out_t = S_t^T (r_t q_t)``. The product ``S_t^T q_t`` overflows float32 for inputs whose
normalised result (and the former kernel's) is finite: ``normalized_causal_dot_product`` is
invariant to the scale of ``Q``, and ``V`` of magnitude ``1e12`` is representable, yet the
kernel returns ``inf``.
"""

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
