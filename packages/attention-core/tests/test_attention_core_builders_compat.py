"""Builders as in fast-transformers master: the decoder's cross_* sizes, builder settings
reaching a custom attention that declares them, sizes left unset by ``from_namespace``, and
the exception types fast-transformers' callers catch."""

from __future__ import annotations

import argparse

import pytest
import torch

from attention_core.attention_registry import AttentionRegistry, Int
from attention_core.builders import TransformerDecoderBuilder, TransformerEncoderBuilder
from attention_core.errors import MissingParameterError


class RecordingAttention(torch.nn.Module):
    """Full attention that records the sizes the builder gave it."""

    def __init__(self, n_heads, query_dimensions):
        super().__init__()
        self.n_heads = n_heads
        self.query_dimensions = query_dimensions

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        scores = torch.einsum("nlhe,nshe->nhls", queries, keys).softmax(-1)
        return torch.einsum("nhls,nshd->nlhd", scores, values)


@pytest.fixture
def recording_attention():
    """Register ``recording-attention-test`` for one test, then remove it (and the
    ``n_heads`` parameter it brings), so that other tests see the registry unchanged."""
    registry, name = AttentionRegistry, "recording-attention-test"
    parameters_before = set(registry._parameters)
    registry.register(name, RecordingAttention, [("n_heads", Int), ("query_dimensions", Int)])
    yield name
    for table in (registry._classes, registry._class_params, registry._class_specs):
        del table[name]
    for parameter in set(registry._parameters) - parameters_before:
        del registry._parameters[parameter]


def test_cross_sizes_shape_the_cross_attention():
    torch.manual_seed(0)
    model = TransformerDecoderBuilder.from_kwargs(
        n_layers=2, n_heads=4, query_dimensions=8, value_dimensions=8,
        cross_n_heads=3, cross_query_dimensions=5, cross_value_dimensions=6,
        feed_forward_dimensions=16,
    ).get().eval()  # fmt: skip
    cross = model.layers[0].cross_attention
    assert cross.n_heads == 3 and cross.d_model_keys == 18
    assert cross.query_projection.weight.shape == (15, 32)
    assert cross.key_projection.weight.shape == (15, 18)
    assert cross.value_projection.weight.shape == (18, 18)
    assert cross.out_projection.weight.shape == (32, 18)
    x, memory = torch.randn(2, 7, 32), torch.randn(2, 5, 18)
    assert model(x, memory).shape == (2, 7, 32)
    with pytest.raises(ValueError, match="memory must have shape"):
        model(x, torch.randn(2, 5, 32))


def test_cross_sizes_default_to_the_self_attention_sizes():
    builder = TransformerDecoderBuilder.from_kwargs(
        n_heads=2, query_dimensions=4, value_dimensions=3
    )
    assert (builder.cross_n_heads, builder.cross_query_dimensions) == (2, 4)
    assert (builder.cross_value_dimensions, builder.cross_model_dimensions) == (3, 6)
    builder.cross_model_dimensions = 10
    layer = builder.get().layers[0].cross_attention
    assert layer.key_projection.weight.shape == (8, 10)
    with pytest.raises(ValueError, match="cross_n_heads must be a positive int"):
        builder.cross_n_heads = 0


def test_set_settings_reach_a_custom_attention_and_do_not_stick(recording_attention):
    builder = TransformerEncoderBuilder.from_kwargs(
        attention_type="recording-attention-test", n_heads=8, query_dimensions=16, n_layers=1
    )
    attention = builder.get().layers[0].attention.inner_attention
    assert (attention.n_heads, attention.query_dimensions) == (8, 16)
    builder.n_heads = 2
    attention = builder.get().layers[0].attention.inner_attention
    assert attention.n_heads == 2
    assert "n_heads" not in builder.attention._parameters
    with pytest.raises(MissingParameterError, match="n_heads"):
        TransformerEncoderBuilder.from_kwargs(attention_type="recording-attention-test").get()


def test_decoder_cross_attention_gets_cross_heads(recording_attention):
    builder = TransformerDecoderBuilder.from_kwargs(
        n_layers=1, n_heads=4, query_dimensions=8, cross_n_heads=2,
        self_attention_type="recording-attention-test",
        cross_attention_type="recording-attention-test",
    )  # fmt: skip
    layer = builder.get().layers[0]
    assert layer.self_attention.inner_attention.n_heads == 4
    assert layer.cross_attention.inner_attention.n_heads == 2


def test_from_namespace_keeps_unset_sizes_and_get_names_them():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_layers", type=int)
    parser.add_argument("--n_heads", type=int)
    builder = TransformerEncoderBuilder.from_namespace(parser.parse_args(["--n_heads", "3"]))
    assert builder.n_heads == 3 and builder.n_layers is None
    with pytest.raises(MissingParameterError, match="n_layers"):
        builder.get()
    builder.n_layers = 1
    assert len(builder.get().layers) == 1


def test_wrapper_without_wrapped_attention_is_a_type_error_too():
    with pytest.raises(TypeError, match="wraps another attention"):
        TransformerEncoderBuilder.from_kwargs(attention_type="conditional-full").get()
    with pytest.raises(ValueError, match="wraps another attention"):
        TransformerEncoderBuilder.from_kwargs(attention_type="conditional-full").get()
