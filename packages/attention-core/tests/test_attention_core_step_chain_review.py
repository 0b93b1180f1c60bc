"""Failing tests of the step chain's cache ops found by a review (xfail until fixed).

Each test keeps any stray write or read inside memory it owns (a cache that is a view of a
larger buffer), so that the failing behaviour cannot corrupt the test process."""

from __future__ import annotations

import copy

import pytest
import torch

from attention_core.step_chain import StepChain

BIG = 2**63 - 1


@pytest.mark.xfail(
    strict=True,
    reason="cache_write_args checks position + W > C in int64: a huge position overflows and "
    "the compiled chain writes before the cache",
)
def test_compiled_cache_write_refuses_a_position_past_int64():
    buffer = torch.zeros(12)
    cache = buffer[4:].view(1, 1, 4, 2)  # a stray write lands in buffer[:4]
    chain = StepChain(2)
    y = chain.linear(chain.input, torch.eye(2))
    chain.cache_write(y, cache, chain.position(BIG))
    with torch.no_grad(), pytest.raises(ValueError, match="outside the cache"):
        chain(torch.full((1, 2), 7.0), positions=[BIG])
    assert not buffer[:4].any()


@pytest.mark.xfail(
    strict=True,
    reason="cache_attention_args checks column + (end - start) > bias_columns in int64: a huge "
    "bias column overflows and the compiled chain reads before the bias",
)
def test_compiled_cache_attention_refuses_a_bias_column_past_int64():
    table = torch.tensor([1000.0, 0.0, 0.0])
    bias = table[1:].view(1, 1, 2)  # a stray read takes table[0]
    keys, values = torch.zeros(1, 1, 2, 1), torch.tensor([[[[1.0], [2.0]]]])
    chain = StepChain(1)
    q = chain.linear(chain.input, torch.eye(1))
    start, end, column = chain.position(2), chain.position(2), chain.position(BIG)
    chain.cache_attention(q, keys, values, start, end, bias, column, scale=1.0)
    with torch.no_grad(), pytest.raises(ValueError, match="bias"):
        chain(torch.ones(1, 1), positions=[0, 2, BIG])


@pytest.mark.xfail(
    strict=True,
    reason="the compiled chain writes a held cache without bumping its version counter: "
    "autograd computes a gradient from the overwritten values instead of refusing",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="a cache of batch 0 is accepted when added; a call raises ZeroDivisionError "
    "(_cache_ops._rows_per_batch)",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="copy.copy shares the op lists and the program cache with the original "
    "(__setstate__): an op added to the copy changes the original, which then refuses "
    "(or misreads) its calls",
)
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
