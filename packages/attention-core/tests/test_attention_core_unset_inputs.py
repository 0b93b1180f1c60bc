"""Settings left unset and arguments of the wrong type get the documented error, not a
``TypeError`` or ``AttributeError`` from deep inside (cases found by type checking)."""

from __future__ import annotations

import pytest
import torch

from attention_core.attention_registry import AttentionRegistry
from attention_core.builders import TransformerDecoderBuilder, TransformerEncoderBuilder
from attention_core.errors import MissingParameterError
from attention_core.masking import FullMask, LengthMask


@pytest.mark.parametrize("size", ["n_heads", "value_dimensions"])
def test_model_dimensions_of_an_unset_size(size):
    builder = TransformerEncoderBuilder()
    assert builder.model_dimensions == 4 * 64
    setattr(builder, size, None)
    assert getattr(builder, size) is None  # reading the setting itself still gives None
    with pytest.raises(MissingParameterError, match=size):
        _ = builder.model_dimensions


@pytest.mark.parametrize(
    ("size", "cross"),
    [
        ("n_heads", "cross_n_heads"),
        ("query_dimensions", "cross_query_dimensions"),
        ("value_dimensions", "cross_value_dimensions"),
        ("value_dimensions", "cross_model_dimensions"),
    ],
)
def test_cross_sizes_default_to_an_unset_size(size, cross):
    builder = TransformerDecoderBuilder()
    setattr(builder, size, None)
    with pytest.raises(MissingParameterError, match=size):
        getattr(builder, cross)
    setattr(builder, size, 8)
    assert isinstance(getattr(builder, cross), int)


@pytest.mark.parametrize("name", ["causal-linear", "linear", "full"])
def test_non_tensor_queries_are_named(name):
    attention = AttentionRegistry[name][0](**({"query_dimensions": 4} if "linear" in name else {}))
    keys = torch.randn(1, 3, 2, 4)
    with pytest.raises(TypeError, match=r"queries must be a torch\.Tensor"):
        attention(
            [[0.0]],
            keys,
            keys,
            FullMask(3, 3),
            LengthMask(torch.tensor([3])),
            LengthMask(torch.tensor([3])),
        )
