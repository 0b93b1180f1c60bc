"""Padding cannot leak (issue 18): whatever a padded position holds (NaN, inf, huge values),
the valid outputs of every attention type that takes a length mask equal those computed with
zero padding, through the encoder (self attention, ``length_mask``) and the decoder (cross
attention, ``memory_length_mask``). Hypothesis draws the shapes, the lengths (fully padded
rows included) and the padding values."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from attention_core.builders import TransformerDecoderBuilder, TransformerEncoderBuilder
from attention_core.masking import LengthMask, TriangularCausalMask
from attention_core.testing import assert_close

PROPERTY = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
SIZES = dict(n_heads=2, query_dimensions=4, value_dimensions=4, feed_forward_dimensions=16)
D_MODEL = 8

# the ten attention types that take a length mask -> (builder kwargs, attn_mask kind)
TYPES = {
    "full": ({}, "causal"),
    "linear": ({}, "none"),
    "local": ({"local_context": 5}, "causal"),
    "reformer": ({"chunk_size": 4, "bits": 3, "rounds": 2}, "none"),
    "clustered": ({"clusters": 3, "bits": 8}, "none"),
    "improved-clustered": ({"clusters": 3, "bits": 8, "topk": 4}, "none"),
    "exact-topk": ({"topk": 4}, "causal"),
    "conditional-full:linear": ({"length_limit": 8}, "none"),
    "aft-full": ({"max_sequence_length": 32}, "causal"),
    "aft-simple": ({}, "causal"),
}
# cross attention needs L != S: reformer is a self attention only
CROSS_TYPES = [name for name in TYPES if name != "reformer"]
PADDING = [float("nan"), float("inf"), -float("inf"), 1e30, -3e38]


@functools.cache
def encoder(attention_type: str):
    torch.manual_seed(0)
    extra = TYPES[attention_type][0]
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=2, attention_type=attention_type, **SIZES, **extra
    ).get()
    return model.double().eval()


@functools.cache
def decoder(cross_attention_type: str):
    torch.manual_seed(0)
    extra = TYPES[cross_attention_type][0]
    model = TransformerDecoderBuilder.from_kwargs(
        n_layers=1, self_attention_type="full", cross_attention_type=cross_attention_type,
        **SIZES, **extra,
    ).get()  # fmt: skip
    return model.double().eval()


@st.composite
def padded_batches(draw, max_len: int = 20):
    """``(x, lengths, pad value, seed)``: a float64 ``(N, L, D_MODEL)`` batch, lengths in
    ``[0, L]`` (a fully padded row is likely) and the value written into the padding."""
    N = draw(st.integers(1, 3))
    L = draw(st.integers(1, max_len))
    lengths = draw(st.lists(st.integers(0, L), min_size=N, max_size=N))
    seed = draw(st.integers(0, 2**31 - 1))
    value = draw(st.sampled_from(PADDING) | st.floats(allow_nan=True, allow_infinity=True))
    x = torch.randn(
        N, L, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    return x, torch.tensor(lengths), value, seed


def pad_with(x: Tensor, lengths: Tensor, value: float) -> Tensor:
    padded = x.clone()
    padded[torch.arange(x.shape[1])[None, :] >= lengths[:, None]] = value
    return padded


def valid(y: Tensor, lengths: Tensor) -> Tensor:
    return y[torch.arange(y.shape[1])[None, :] < lengths[:, None]]


def run_seeded(fn, seed):
    """Random hashing and random features draw the same numbers in both runs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return fn()


@pytest.mark.parametrize("attention_type", list(TYPES))
@PROPERTY
@given(batch=padded_batches(), causal=st.booleans())
def test_encoder_padding_cannot_reach_valid_outputs(attention_type, batch, causal):
    x, lengths, value, seed = batch
    model = encoder(attention_type)
    L = x.shape[1]
    causal = causal and TYPES[attention_type][1] == "causal"
    attn_mask = TriangularCausalMask(L) if causal else None
    length_mask = LengthMask(lengths, max_len=L)

    def encode(inputs):
        return lambda: model(inputs, attn_mask=attn_mask, length_mask=length_mask)

    garbage = run_seeded(encode(pad_with(x, lengths, value)), seed)
    zeros = run_seeded(encode(pad_with(x, lengths, 0.0)), seed)
    assert torch.isfinite(valid(garbage, lengths)).all()
    assert_close(f"{attention_type} valid outputs", valid(garbage, lengths), valid(zeros, lengths))


@pytest.mark.parametrize("attention_type", CROSS_TYPES)
@PROPERTY
@given(memory=padded_batches(max_len=12), L=st.integers(1, 9), value=st.sampled_from(PADDING))
def test_decoder_memory_padding_cannot_reach_outputs(attention_type, memory, L, value):
    memory, lengths, _, seed = memory
    model = decoder(attention_type)
    N, S, _ = memory.shape
    x = torch.randn(N, L, D_MODEL, dtype=torch.float64)
    memory_length_mask = LengthMask(lengths, max_len=S)

    def decode(inputs):
        return lambda: model(x, inputs, memory_length_mask=memory_length_mask)

    garbage = run_seeded(decode(pad_with(memory, lengths, value)), seed)
    zeros = run_seeded(decode(pad_with(memory, lengths, 0.0)), seed)
    assert torch.isfinite(garbage).all()
    assert_close(f"{attention_type} cross attention", garbage, zeros)


def test_issue_example_full_encoder_gives_the_zero_padded_result():
    """The reproduction of issue 18, also against the unpadded sequence run alone."""
    torch.manual_seed(0)
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=2, n_heads=2, query_dimensions=8, value_dimensions=8,
        feed_forward_dimensions=32, attention_type="full",
    ).get().eval()  # fmt: skip
    x = torch.randn(2, 16, 16)
    x[1, 12:] = float("nan")
    with torch.no_grad():
        y = model(x, length_mask=LengthMask(torch.tensor([16, 12]), max_len=16))
        alone = model(x[1:, :12])
    assert torch.isfinite(y[1, :12]).all()
    assert_close("y[1, :12]", y[1, :12], alone[0])
