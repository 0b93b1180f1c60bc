"""Causal linear attention in bfloat16 and float16 over 16k tokens: the states accumulate in
float32, so the output stays finite and close to the float32 computation, and the carried
state (for recurrent continuation) comes back in float32."""

from __future__ import annotations

import pytest
import torch

from attention_core.attention import CausalLinearAttention
from attention_core.causal_product import normalized_causal_dot_product
from attention_core.masking import LengthMask, TriangularCausalMask

N_TOKENS = 16384
# measured worst absolute difference from float32 (outputs of magnitude ~1): 3.8e-3 in
# bfloat16 and 6.2e-4 in float16; mean 3e-5 and 4e-6. The bounds leave a factor 4.
BOUNDS = {torch.bfloat16: 1.5e-2, torch.float16: 2.5e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_causal_linear_attention_16k_tokens_half_precision(dtype):
    g = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, N_TOKENS, 2, 16, generator=g) for _ in range(3))
    layer = CausalLinearAttention(16)
    mask = TriangularCausalMask(N_TOKENS)
    lengths = LengthMask(torch.tensor([N_TOKENS]))
    expected = layer(Q, K, V, mask, lengths, lengths)
    out = layer(Q.to(dtype), K.to(dtype), V.to(dtype), mask, lengths, lengths)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    error = (out.float() - expected).abs()
    assert error.max() < BOUNDS[dtype], f"max abs error {error.max():.2e}"
    # a late position depends on all 16k keys: the error must not grow along the sequence
    assert error[:, -1024:].mean() < 2 * error[:, :1024].mean() + 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_state_is_float32_and_continues_exactly(dtype):
    g = torch.Generator().manual_seed(1)
    Q, K = (torch.rand(1, 2, 4096, 8, generator=g).to(dtype) for _ in range(2))
    V = torch.randn(1, 2, 4096, 8, generator=g).to(dtype)
    whole, (S, z) = normalized_causal_dot_product(Q, K, V, return_state=True)
    assert S.dtype == z.dtype == torch.float32
    assert torch.isfinite(S).all() and z.min() > 0
    first, state = normalized_causal_dot_product(
        Q[:, :, :3000], K[:, :, :3000], V[:, :, :3000], return_state=True
    )
    rest = normalized_causal_dot_product(
        Q[:, :, 3000:], K[:, :, 3000:], V[:, :, 3000:], state=state
    )
    torch.testing.assert_close(torch.cat([first, rest], dim=2), whole, rtol=0, atol=1e-2)
