"""Recurrent decoders against the batch decoder with a causal self-attention mask, a full
cross-attention mask and padded memories (float64, 1e-6); prefill; errors."""

from __future__ import annotations

import pytest
import torch

from attention_core.builders import TransformerDecoderBuilder
from attention_core.masking import LengthMask, TriangularCausalMask
from attention_core.testing import assert_close, seeded
from recurrent_transformer.builders import RecurrentDecoderBuilder
from recurrent_transformer.state import DecoderLayerState, LinearState, MemoryState

TOL = {"rtol": 1e-6, "atol": 1e-6}
SELF = {"linear": "causal-linear", "full": "full"}


def twins(self_type, cross_type, n_layers=2, **overrides):
    kwargs = dict(
        n_layers=n_layers,
        n_heads=2,
        query_dimensions=3,
        value_dimensions=4,
        feed_forward_dimensions=11,
        dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    batch = TransformerDecoderBuilder.from_kwargs(
        self_attention_type=SELF[self_type], cross_attention_type=cross_type, **kwargs
    ).get()
    recurrent = RecurrentDecoderBuilder.from_kwargs(
        self_attention_type=self_type, cross_attention_type=cross_type, **kwargs
    ).get()
    assert list(batch.state_dict()) == list(recurrent.state_dict())
    recurrent.load_state_dict(batch.state_dict())
    return batch.double().eval(), recurrent.double().eval()


def inputs(N=3, L=6, S=7, E=8, lengths=(7, 4, 1)):
    g = seeded(1)
    x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    memory = torch.randn(N, S, E, generator=g, dtype=torch.float64)
    return x, memory, LengthMask(torch.tensor(lengths), max_len=S)


def step_through(model, x, memory, mask, state=None):
    outputs = []
    for t in range(x.shape[1]):
        y, state = model(x[:, t], memory, memory_length_mask=mask, state=state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


COMBINATIONS = [
    pytest.param(s, c, id=f"self-{s}-cross-{c}")
    for s in ("linear", "full")
    for c in ("linear", "full")
]


@pytest.mark.parametrize("lengths", [(7, 4, 1), (7, 7, 7)], ids=["padded", "unpadded"])
@pytest.mark.parametrize("self_type,cross_type", COMBINATIONS)
def test_stepping_equals_batch_decoder(self_type, cross_type, lengths):
    batch, recurrent = twins(self_type, cross_type)
    x, memory, mask = inputs(lengths=lengths)
    expected = batch(x, memory, x_mask=TriangularCausalMask(x.shape[1]), memory_length_mask=mask)
    with torch.no_grad():
        stepped, state = step_through(recurrent, x, memory, mask)
    assert_close("stepped", stepped, expected, **TOL)
    assert all(isinstance(layer, DecoderLayerState) for layer in state)
    _, cross_state = state[0]
    assert isinstance(cross_state, LinearState if cross_type == "linear" else MemoryState)
    prefilled, _ = recurrent.prefill(x, memory, mask)
    assert_close("prefill", prefilled, expected, **TOL)


@pytest.mark.parametrize("self_type,cross_type", COMBINATIONS)
def test_prefill_then_stepping_without_the_memory(self_type, cross_type):
    batch, recurrent = twins(self_type, cross_type)
    x, memory, mask = inputs()
    expected = batch(x, memory, x_mask=TriangularCausalMask(x.shape[1]), memory_length_mask=mask)
    head, state = recurrent.prefill(x[:, :2], memory, mask)
    # the memory was projected once into the state: later steps need not pass it again
    tail, _ = step_through(recurrent, x[:, 2:], None, None, state)
    assert_close("prefill + steps", torch.cat([head, tail], 1), expected, **TOL)


@pytest.mark.parametrize("lengths", [(7, 4, 1), (7, 7, 7)], ids=["padded", "unpadded"])
@pytest.mark.parametrize("cross_type", ["exact-topk", "aft-simple", "aft-full", "local"])
def test_other_recurrent_cross_attentions_equal_the_batch_decoder(cross_type, lengths):
    # topk=3 < S=7: the top-k selection is exercised; AFT needs E == D
    batch, recurrent = twins(
        "full",
        cross_type,
        query_dimensions=4,
        topk=3,
        max_sequence_length=8,
        aft_parameterization=3,
        local_context=3,
    )
    x, memory, mask = inputs(lengths=lengths)
    expected = batch(x, memory, x_mask=TriangularCausalMask(x.shape[1]), memory_length_mask=mask)
    with torch.no_grad():
        stepped, state = step_through(recurrent, x, memory, mask)
    assert_close(cross_type, stepped, expected, **TOL)
    assert isinstance(state[0][1], MemoryState)
    head, state = recurrent.prefill(x[:, :2], memory, mask)
    tail, _ = step_through(recurrent, x[:, 2:], None, None, state)
    assert_close("prefill + steps", torch.cat([head, tail], 1), expected, **TOL)
    # another memory gives other outputs: the comparison is not vacuous
    other, _ = step_through(recurrent, x, 2 * memory, mask)
    assert not torch.allclose(other, expected, atol=1e-3)


@pytest.mark.parametrize("local_context", [1, 2, 4])
@pytest.mark.parametrize("S", [3, 9])
def test_local_cross_attention_windows_equal_the_batch_decoder(local_context, S):
    # S=3 < L=6: late windows fall past the memory (zeros, as in the batch attention)
    batch, recurrent = twins("linear", "local", local_context=local_context)
    x, memory, mask = inputs(S=S, lengths=(S, 2, 1))
    expected = batch(x, memory, x_mask=TriangularCausalMask(x.shape[1]), memory_length_mask=mask)
    with torch.no_grad():
        stepped, state = step_through(recurrent, x, memory, mask)
    assert_close("local", stepped, expected, **TOL)
    assert state[0][1].position == x.shape[1]
    head, state = recurrent.prefill(x[:, :4], memory, mask)
    tail, _ = step_through(recurrent, x[:, 4:], None, None, state)
    assert_close("prefill + steps", torch.cat([head, tail], 1), expected, **TOL)


def test_aft_full_cross_attention_counts_positions_up_to_its_limit():
    _, recurrent = twins("linear", "aft-full", query_dimensions=4, max_sequence_length=8)
    x, memory, mask = inputs()
    _, state = recurrent.prefill(torch.cat([x, x[:, :2]], 1), memory, mask)  # 8 steps
    assert state[0][1].position == 8
    with pytest.raises(ValueError, match="up to max_sequence_length=8 steps; this would be step 9"):
        recurrent(x[:, 0], None, state=state)


def test_default_memory_length_mask_is_full():
    batch, recurrent = twins("linear", "full")
    x, memory, _ = inputs()
    expected = batch(x, memory, x_mask=TriangularCausalMask(x.shape[1]))
    outputs, state = [], None
    for t in range(x.shape[1]):
        y, state = recurrent(x[:, t], memory, state=state)
        outputs.append(y)
    assert_close("no mask", torch.stack(outputs, 1), expected, **TOL)


def test_layer_state_unpacks_like_fast_transformers():
    _, recurrent = twins("linear", "linear", n_layers=1)
    x, memory, mask = inputs()
    _, state = recurrent.layers[0](x[:, 0], memory, mask)
    self_state, cross_state = state
    y, _ = recurrent.layers[0](x[:, 1], memory, mask, state=[self_state, cross_state])
    assert y.shape == (3, 8)


def test_decoder_errors():
    _, recurrent = twins("linear", "full")
    x, memory, mask = inputs()
    with pytest.raises(ValueError, match=r"one element of the sequence per call.*prefill"):
        recurrent(x, memory, mask)
    with pytest.raises(ValueError, match=r"memory must have shape \(3, S, 8\); got \(2, 7, 8\)"):
        recurrent(x[:, 0], memory[:2], mask)
    with pytest.raises(TypeError, match=r"memory must be a torch\.Tensor; got NoneType"):
        recurrent(x[:, 0], None)
    with pytest.raises(
        ValueError, match=r"memory_length_mask must have shape \(N, S\) = \(3, 7\).*got .* \(3, 5\)"
    ):
        recurrent(x[:, 0], memory, LengthMask(torch.tensor([5, 4, 1])))
    _, state = recurrent(x[:, 0], memory, mask)
    with pytest.raises(ValueError, match=r"state.S must have shape \(2, .*one batch size"):
        recurrent(x[:2, 1], memory[:2], state=state)
    with pytest.raises(TypeError, match="needs the DecoderLayerState it returned"):
        recurrent.layers[0](x[:, 1], memory, state=state)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300])
def test_full_cross_attention_padding_cannot_leak(value):
    """Padded memory positions, whatever they hold, give the zero-padded result."""
    _, recurrent = twins("full", "full")
    x, memory, mask = inputs(lengths=(7, 4, 0))
    padded = mask.bool_matrix[:, :, None]
    with torch.no_grad():
        garbage, _ = step_through(recurrent, x, memory.masked_fill(~padded, value), mask)
        zeros, _ = step_through(recurrent, x, memory.masked_fill(~padded, 0.0), mask)
    assert torch.isfinite(garbage).all()
    assert_close("stepped", garbage, zeros, **TOL)
