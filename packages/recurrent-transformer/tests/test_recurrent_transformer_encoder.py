"""Recurrent encoders against the batch encoder with a causal mask and the same weights (float64,
1e-6), prefill, state_dict transfer, gradients, the seed examples and input errors."""

from __future__ import annotations

import pytest
import torch

from attention_core.builders import TransformerEncoderBuilder
from attention_core.masking import LengthMask, TriangularCausalMask
from attention_core.testing import assert_close, seeded
from recurrent_transformer.builders import RecurrentEncoderBuilder
from recurrent_transformer.state import KVCache, TransformerState

TOL = {"rtol": 1e-6, "atol": 1e-6}

# (recurrent attention_type, batch attention_type, extra attention parameters)
TYPES = {
    "linear": ("linear", "causal-linear", {}),
    "causal-linear": ("causal-linear", "causal-linear", {}),
    "full": ("full", "full", {"attention_dropout": 0.0}),
    "local": ("local", "local", {"local_context": 5, "attention_dropout": 0.0}),
    "exact-topk": ("exact-topk", "exact-topk", {"topk": 3, "attention_dropout": 0.0}),
    "aft-simple": ("aft-simple", "aft-simple", {}),
    "aft-full": ("aft-full", "aft-full", {"max_sequence_length": 16}),
    "conditional-full": (
        "conditional-full:linear",
        "conditional-full:causal-linear",
        {"length_limit": 32, "attention_dropout": 0.0},
    ),
}


def settings(n_layers=2, n_heads=3, query_dimensions=4, value_dimensions=5, **extra):
    return dict(
        n_layers=n_layers,
        n_heads=n_heads,
        query_dimensions=query_dimensions,
        value_dimensions=value_dimensions,
        feed_forward_dimensions=13,
        dropout=0.0,
        **extra,
    )


def twins(name, **overrides):
    """A batch encoder and a recurrent encoder with the batch encoder's weights (float64)."""
    recurrent_type, batch_type, extra = TYPES[name]
    kwargs = settings(**{**extra, **overrides})
    if name.startswith("aft"):
        kwargs["query_dimensions"] = kwargs["value_dimensions"]
    torch.manual_seed(0)
    batch = TransformerEncoderBuilder.from_kwargs(attention_type=batch_type, **kwargs).get()
    recurrent = RecurrentEncoderBuilder.from_kwargs(attention_type=recurrent_type, **kwargs).get()
    recurrent.load_state_dict(batch.state_dict())
    return batch.double().eval(), recurrent.double().eval()


def step_through(model, x, state=None):
    outputs = []
    for t in range(x.shape[1]):
        y, state = model(x[:, t], state=state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


def comparable(state):
    """The tensors of a model state, with caches trimmed to their length."""
    out = []
    for layer in state:
        out += [layer.keys, layer.values] if isinstance(layer, KVCache) else layer.tensors()
    return out


def random_input(N, L, E, seed=0):
    return torch.randn(N, L, E, generator=seeded(seed), dtype=torch.float64)


# stepping and prefill against the batch model


@pytest.mark.parametrize("N,L", [(1, 1), (2, 7), (3, 11)], ids=["N1-L1", "N2-L7", "N3-L11"])
@pytest.mark.parametrize("name", list(TYPES))
def test_stepping_equals_batch_with_causal_mask(name, N, L):
    batch, recurrent = twins(name)
    x = random_input(N, L, batch.layers[0].d_model)
    expected = batch(x, attn_mask=TriangularCausalMask(L))
    with torch.no_grad():
        stepped, state = step_through(recurrent, x)
    assert_close(f"{name} stepped", stepped, expected, **TOL)
    assert isinstance(state, TransformerState) and len(state) == 2
    prefilled, _ = recurrent.prefill(x)
    assert_close(f"{name} prefill", prefilled, expected, **TOL)


@pytest.mark.parametrize("name", ["linear", "full"])
def test_stepping_with_autograd_on_equals_batch(name):
    batch, recurrent = twins(name)
    x = random_input(2, 6, batch.layers[0].d_model)
    stepped, _ = step_through(recurrent, x)
    assert stepped.requires_grad
    assert_close("outputs", stepped, batch(x, attn_mask=TriangularCausalMask(6)), **TOL)


@pytest.mark.parametrize("name", ["linear", "full"])
def test_prefill_then_stepping_equals_stepping_from_the_start(name):
    _, recurrent = twins(name)
    x = random_input(3, 9, recurrent.layers[0].d_model, seed=1)
    with torch.no_grad():
        expected, expected_state = step_through(recurrent, x)
        head, state = recurrent.prefill(x[:, :5])
        tail, state = step_through(recurrent, x[:, 5:], state)
    assert_close("prefill + steps", torch.cat([head, tail], 1), expected, **TOL)
    for got, want in zip(comparable(state), comparable(expected_state)):
        assert_close("state", got, want, **TOL)


def test_gradients_of_stepping_equal_batch_gradients():
    batch, recurrent = twins("linear")
    x = random_input(2, 5, batch.layers[0].d_model).requires_grad_()
    stepped, _ = step_through(recurrent, x)
    (gx,) = torch.autograd.grad(stepped.square().sum(), x)
    expected = batch(x, attn_mask=TriangularCausalMask(5))
    (ex,) = torch.autograd.grad(expected.square().sum(), x)
    assert_close("dx", gx, ex, **TOL)
    grads = torch.autograd.grad(step_through(recurrent, x)[0].sum(), list(recurrent.parameters()))
    expected_grads = torch.autograd.grad(
        batch(x, attn_mask=TriangularCausalMask(5)).sum(), list(batch.parameters())
    )
    for (name, _), g, e in zip(recurrent.named_parameters(), grads, expected_grads):
        assert_close(f"d{name}", g, e, **TOL)


# weights move between the batch and the recurrent model


@pytest.mark.parametrize("name", ["linear", "full", "aft-full", "conditional-full"])
def test_state_dicts_have_the_batch_names(name):
    batch, recurrent = twins(name)
    assert list(batch.state_dict()) == list(recurrent.state_dict())
    keys = list(recurrent.state_dict())
    assert "layers.0.attention.query_projection.weight" in keys
    assert "layers.1.linear1.bias" in keys and "norm.weight" in keys
    batch.load_state_dict(recurrent.state_dict())  # and back


def test_feature_map_is_a_submodule_of_the_inner_attention():
    _, recurrent = twins("linear")
    modules = dict(recurrent.named_modules())
    assert "layers.0.attention.inner_attention.feature_map" in modules


# seed examples (001: state=, 000: memory= with a DeprecationWarning)


def test_seed_001_example_runs():
    # --- seed 001 example (fast_transformers -> recurrent_transformer); 10 loops, not 100 ---
    from recurrent_transformer.builders import RecurrentEncoderBuilder

    model = RecurrentEncoderBuilder.from_kwargs(
        attention_type="linear",
        n_layers=8,
        n_heads=12,
        feed_forward_dimensions=1536,
        query_dimensions=32,
        value_dimensions=32,
    ).get()

    x0 = torch.rand(
        10,  # batch size
        12 * 32,  # feature size
    )
    state = None

    x = x0
    for i in range(10):  # noqa: B007
        x, state = model(x, state=state)
    # --- end of seed example ---
    assert x.shape == (10, 384) and torch.isfinite(x).all()
    assert len(state) == 8 and state[0].S.shape == (10, 12, 32, 32)


def test_seed_000_example_runs_with_a_deprecation_warning():
    from recurrent_transformer.builders import RecurrentEncoderBuilder

    model = RecurrentEncoderBuilder.from_kwargs(
        attention_type="linear",
        n_layers=8,
        n_heads=12,
        feed_forward_dimensions=1536,
        query_dimensions=32,
        value_dimensions=32,
    ).get()

    x0 = torch.rand(
        10,  # batch size
        12 * 32,  # feature size
    )
    memory = None

    x = x0
    with pytest.warns(DeprecationWarning, match="'memory' is deprecated"):
        for i in range(10):  # noqa: B007
            x, memory = model(x, memory=memory)
    assert x.shape == (10, 384) and len(memory) == 8


# errors


def test_whole_sequence_is_refused_with_a_hint():
    _, recurrent = twins("linear")
    with pytest.raises(ValueError, match=r"one element of the sequence per call.*prefill"):
        recurrent(random_input(2, 4, 15))


def test_input_errors():
    _, recurrent = twins("linear")
    with pytest.raises(ValueError, match=r"x must have shape \(N, 15\); got \(2, 16\)"):
        recurrent(torch.rand(2, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a floating point tensor"):
        recurrent(torch.ones(2, 15, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must have shape \(N, T, 15\) with T >= 1"):
        recurrent.prefill(torch.rand(2, 0, 15, dtype=torch.float64))
    with pytest.raises(ValueError, match="pass either state= or the deprecated memory="):
        recurrent(torch.rand(2, 15, dtype=torch.float64), state=1, memory=1)


def test_state_of_another_batch_size_or_model_is_refused():
    _, recurrent = twins("linear")
    x = random_input(2, 1, 15)[:, 0]
    _, state = recurrent(x)
    with pytest.raises(ValueError, match=r"state.S must have shape \(3, .*one batch size"):
        recurrent(random_input(3, 1, 15)[:, 0], state=state)
    _, wider = twins("linear", value_dimensions=6)
    with pytest.raises(ValueError, match=r"state.S must have shape \(2, 3, 4, 6\)"):
        wider(random_input(2, 1, 18)[:, 0], state=state)
    _, deeper = twins("linear", n_layers=3)
    with pytest.raises(ValueError, match="has 3 layers but the state holds 2 layer states"):
        deeper(x, state=state)
    _, full = twins("full")
    with pytest.raises(TypeError, match="RecurrentFullAttention needs a KVCache as state"):
        full(x, state=state)
    with pytest.raises(TypeError, match="needs the TransformerState it returned"):
        recurrent(x, state=torch.zeros(3))
    with pytest.raises(TypeError, match=r"use state.to\(torch.float32\)"):
        recurrent.float()(x.float(), state=state)


def test_padding_mask_is_not_needed_for_equal_lengths():
    # the batch encoder with an explicit all-full LengthMask gives the same as stepping
    batch, recurrent = twins("full")
    x = random_input(2, 4, 15)
    lengths = LengthMask(torch.tensor([4, 4]))
    expected = batch(x, attn_mask=TriangularCausalMask(4), length_mask=lengths)
    assert_close("full lengths", step_through(recurrent, x)[0], expected, **TOL)
