"""Tests of the step chain's cache ops for what a review found: positions whose limits pass
the cache's length, autograd's view of the compiled chain's writes, caches of batch 0, shallow
copies. (The binding's own range checks against int64 overflow are in
test_attention_core_step_chain_cache.py, in a subprocess.)

Each test keeps any stray write or read inside memory it owns (a cache that is a view of a
larger buffer), so that a regression cannot corrupt the test process."""

from __future__ import annotations

import copy

import pytest
import torch

from attention_core.step_chain import StepChain


def test_a_write_position_of_limit_past_the_cache_is_refused():
    buffer = torch.zeros(12)
    cache = buffer[4:].view(1, 1, 4, 2)  # a stray write would land in buffer[:4]
    chain = StepChain(2)
    y = chain.linear(chain.input, torch.eye(2))
    with pytest.raises(ValueError, match="position must be a position of limit at most 4"):
        chain.cache_write(y, cache, chain.position(5))
    chain = StepChain(2)
    y = chain.linear(chain.input, torch.eye(2))
    chain.cache_write(y, cache, chain.position(4))
    with torch.no_grad(), pytest.raises(ValueError, match="outside the cache"):
        chain(torch.full((1, 2), 7.0), positions=[4])
    assert not buffer.any()
    with pytest.raises(ValueError, match="limit must be an int from 0 to 2"):
        chain.position(2**62)


def test_a_bias_start_of_limit_past_the_bias_is_refused():
    table = torch.tensor([1000.0, 0.0, 0.0])
    bias = table[1:].view(1, 1, 2)  # a stray read would take table[0]
    keys, values = torch.zeros(1, 1, 2, 1), torch.tensor([[[[1.0], [2.0]]]])
    chain = StepChain(1)
    q = chain.linear(chain.input, torch.eye(1))
    start, end = chain.position(2), chain.position(2)
    with pytest.raises(ValueError, match="bias_start must be a position of limit at most 2"):
        chain.cache_attention(q, keys, values, start, end, bias, chain.position(3), scale=1.0)
    chain = StepChain(1)
    q = chain.linear(chain.input, torch.eye(1))
    start, end = chain.position(2), chain.position(2)
    chain.cache_attention(q, keys, values, start, end, bias, chain.position(2), scale=1.0)
    with torch.no_grad(), pytest.raises(ValueError, match="bias"):
        chain(torch.ones(1, 1), positions=[0, 2, 1])  # columns 1 .. 2 of a bias of 2


def test_compiled_cache_write_is_seen_by_autograd():
    cache = torch.ones(1, 1, 2, 2)
    w = torch.ones(1, 1, 2, 2, requires_grad=True)
    loss = (cache * w).sum()  # saves the cache for backward
    chain = StepChain(2)
    y = chain.linear(chain.input, torch.eye(2))
    chain.cache_write(y, cache, chain.position(1))
    with torch.no_grad():
        chain(torch.full((1, 2), 5.0), positions=[0])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", ["cache_write", "cache_attention"])
def test_a_cache_of_batch_zero_gets_a_clear_error(op):
    cache = torch.zeros(0, 1, 4, 2)
    chain = StepChain(2)
    y = chain.linear(chain.input, torch.eye(2))
    with pytest.raises(ValueError, match="batch"):
        if op == "cache_write":
            chain.cache_write(y, cache, chain.position(3))
            positions = [0]
        else:
            chain.cache_attention(y, cache, cache, chain.position(4), chain.position(4))
            positions = [0, 1]
        with torch.enable_grad():
            chain(torch.ones(2, 2), positions=positions)


def test_an_op_added_to_a_shallow_copy_leaves_the_original_alone():
    torch.manual_seed(0)
    D = 4
    chain = StepChain(D)
    qkv = chain.linear(chain.input, torch.randn(3 * D, D))
    q, k, v = (chain.columns(qkv, i * D, (i + 1) * D) for i in range(3))
    chain.linear_attention_step(q, k, v, heads=D)
    x = torch.randn(1, D)
    with torch.no_grad():
        _, states = chain(x)
        expected, _ = chain(x, states)
        other = copy.copy(chain)
        new = other.linear(other.input, torch.randn(64, D))
        other(x, states, output=new)  # the copy's program, cached for both
        got, _ = chain(x, states)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_feature_major_caches_equal_row_major_ones(grad):
    """Keys stored feature-major (the transpose of a contiguous (B, H, E, C)) are written and
    read in place like row-major ones, on both paths."""
    torch.manual_seed(1)
    B, H, E, C, D = 2, 2, 3, 7, 6
    w = torch.randn(3 * D, D, dtype=torch.float64)
    results = []
    for feature_major in (False, True):
        if feature_major:
            keys = torch.zeros(B, H, E, C, dtype=torch.float64).transpose(2, 3)
        else:
            keys = torch.zeros(B, H, C, E, dtype=torch.float64)
        values = torch.zeros(B, H, C, E, dtype=torch.float64)
        chain = StepChain(D)
        qkv = chain.linear(chain.input, w)
        q, k, v = (chain.columns(qkv, i * D, (i + 1) * D) for i in range(3))
        here, end, start = chain.position(C), chain.position(C), chain.position(0)
        chain.cache_write(k, keys, here)
        chain.cache_write(v, values, here)
        chain.cache_attention(q, keys, values, start, end, scale=0.3)
        outs = []
        with torch.set_grad_enabled(grad):
            for t in range(4):
                x = torch.randn(
                    B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(t)
                )
                outs.append(chain(x, positions=[t, t + 1, 0])[0].detach())
        results.append((torch.stack(outs), keys.detach().clone(), keys.stride()))
    (out0, keys0, _), (out1, keys1, strides1) = results
    assert strides1 == (H * E * C, E * C, 1, C)  # still feature-major: written in place
    torch.testing.assert_close(out1, out0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(keys1, keys0, rtol=0, atol=0)
    assert keys0[:, :, :4].abs().sum() > 0 and not keys0[:, :, 4:].any()
