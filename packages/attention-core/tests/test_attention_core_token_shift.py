"""TokenShift: the causal depthwise convolution equals a plain loop over offsets, its prefill
and steps give the whole-sequence outputs, gradients check in float64, and bad inputs fail
clearly."""

from __future__ import annotations

import pytest
import torch

from attention_core.nn import TokenShift
from attention_core.testing import assert_close


def shift_with_random_weights(dim, kernel_size, seed=0):
    torch.manual_seed(seed)
    shift = TokenShift(dim, kernel_size).double()
    with torch.no_grad():
        shift.weight.normal_()
        shift.bias.normal_()
    return shift


def reference(shift: TokenShift, x: torch.Tensor) -> torch.Tensor:
    """y_t = x_t + b + sum_i weight[:, k-1-i] * x_{t-i}, with x_{<0} = 0 (plain loop)."""
    k = shift.kernel_size
    out = x + shift.bias
    for t in range(x.shape[1]):
        for i in range(k):
            if t - i >= 0:
                out[:, t] = out[:, t] + shift.weight[:, k - 1 - i] * x[:, t - i]
    return out


@pytest.mark.parametrize(
    ("B", "T", "D", "K"), [(2, 7, 5, 4), (1, 3, 4, 6), (3, 5, 2, 1)], ids=["k4", "k>T", "k1"]
)
def test_forward_equals_a_loop_and_steps_equal_forward(B, T, D, K):
    shift = shift_with_random_weights(D, K)
    x = torch.randn(B, T, D, dtype=torch.float64)
    expected = reference(shift, x)
    assert_close("forward", shift(x), expected)
    split = T // 2
    head, cache = shift.prefill(x[:, :split])
    outs = [head]
    for t in range(split, T):
        y, cache = shift.step(x[:, t], cache)
        outs.append(y[:, None])
    assert_close("prefill + steps", torch.cat(outs, 1), expected)
    assert cache.shape == (B, K - 1, D)


def test_a_new_block_is_the_identity_and_gradients_check():
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    assert torch.equal(TokenShift(3).double()(x), x)
    shift = shift_with_random_weights(3, 3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(
        shift, {"weight": w, "bias": b}, (x,)), (x, shift.weight, shift.bias))  # fmt: skip


def test_bad_inputs_fail_clearly():
    shift = TokenShift(4, 3)
    with pytest.raises(ValueError, match=r"x must have 4 features .*; got shape \(2, 5, 3\)"):
        shift(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"x must have 2 dimensions; got shape \(2, 1, 4\)"):
        shift.step(torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match=r"cache must have shape \(2, 2, 4\) .*; got \(2, 3, 4\)"):
        shift.step(torch.randn(2, 4), torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="x must be a floating point tensor"):
        shift(torch.ones(2, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="kernel_size must be a positive int; got 0"):
        TokenShift(4, 0)
