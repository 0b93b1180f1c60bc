"""Registry, parameter specs and builders: names, defaults, validation and messages."""

import argparse

import pytest
import torch

import attention_core.builders as builders_module
from attention_core.attention import CausalLinearAttention, FullAttention, LinearAttention
from attention_core.attention_registry import (
    AttentionRegistry,
    Bool,
    Callable,
    Choice,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
    Registry,
)
from attention_core.builders import (
    AttentionBuilder,
    RecurrentAttentionBuilder,
    RecurrentCrossAttentionBuilder,
    TransformerDecoderBuilder,
    TransformerEncoderBuilder,
)
from attention_core.events import EventDispatcher
from attention_core.transformers import TransformerDecoder, TransformerEncoder

ALL_TYPES = {
    "full",
    "linear",
    "causal-linear",
    "local",
    "reformer",
    "clustered",
    "improved-clustered",
    "causal-improved-clustered",
    "exact-topk",
    "conditional-full",
    "aft-full",
    "aft-simple",
}


def test_specs():
    assert Int.check(3) and not Int.check(3.0) and not Int.check(True)
    assert Float.check(0.5) and Float.check(1) and Float.get(1) == 1.0
    assert isinstance(Float.get(1), float)
    assert Bool.check(False) and not Bool.check(0)
    assert Callable.check(len) and not Callable.check(3)
    assert Choice(["a", "b"]).check("a") and not Choice(["a"]).check("c")
    assert EventDispatcherInstance.check("") and EventDispatcherInstance.check(EventDispatcher())
    assert not EventDispatcherInstance.check(3)
    assert Optional(Int, 7).get(None) == 7 and Optional(Int).get(2) == 2
    with pytest.raises(ValueError, match="does not conform to Int"):
        Int.get("x")
    assert repr(Optional(Float)) == "Optional[Float]"


def test_registry_rules():
    registry = Registry("test")
    registry.register("a", FullAttention, [("softmax_temp", Optional(Float))])
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", FullAttention, [])
    with pytest.raises(ValueError, match="already registered with spec"):
        registry.register("b", FullAttention, [("softmax_temp", Int)])
    with pytest.raises(KeyError, match="known: a"):
        registry["zzz"]
    assert registry["a"] == (FullAttention, ["softmax_temp"])
    assert "a" in registry and registry.keys == ["a"]
    with pytest.raises(ValueError, match="invalid value 'hot' for attention parameter"):
        registry.validate_parameter("softmax_temp", "hot")


def test_every_attention_type_is_registered():
    assert set(AttentionRegistry.keys) >= ALL_TYPES


def test_attention_builder():
    builder = AttentionBuilder.from_kwargs(query_dimensions=16, attention_dropout=0.0)
    assert isinstance(builder.get("linear"), LinearAttention)
    full = builder.get("full")
    assert isinstance(full, FullAttention) and full.dropout.p == 0.0
    assert builder.attention_dropout == 0.0
    with pytest.raises(AttributeError, match="not a parameter of any registered attention"):
        builder.no_such_parameter = 3
    with pytest.raises(ValueError, match="invalid value"):
        builder.query_dimensions = "sixteen"
    with pytest.raises(ValueError, match=r"unknown attention type 'fulll'.*did you mean 'full'"):
        builder.get("fulll")
    with pytest.raises(ValueError, match="needs the parameter"):
        AttentionBuilder().get("linear")


def test_composite_attention_types():
    builder = AttentionBuilder.from_kwargs(query_dimensions=8, length_limit=4)
    attention = builder.get("conditional-full:linear")
    assert type(attention).__name__ == "ConditionalFullAttention"
    assert isinstance(attention.other_attention, LinearAttention)
    with pytest.raises(ValueError, match="cannot wrap another attention"):
        builder.get("linear:full")
    with pytest.raises(ValueError, match="wraps another attention"):
        builder.get("conditional-full")


def test_recurrent_builders_use_their_registries():
    assert RecurrentAttentionBuilder()._registry.name == "recurrent attention"
    assert RecurrentCrossAttentionBuilder()._registry.name == "recurrent cross attention"


def test_encoder_builder_defaults():
    builder = TransformerEncoderBuilder()
    assert (builder.n_layers, builder.n_heads) == (4, 4)
    assert (builder.query_dimensions, builder.value_dimensions) == (64, 64)
    assert builder.feed_forward_dimensions == 1024
    assert builder.dropout == 0.1 and builder.activation == "relu"
    assert builder.final_normalization is True
    assert builder.attention_type == "full" and builder.event_dispatcher == ""
    model = builder.get()
    assert isinstance(model, TransformerEncoder) and len(model.layers) == 4
    assert model.norm is not None and model.layers[0].linear1.out_features == 1024


def test_encoder_builder_kwargs_and_attention_parameters():
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=3,
        n_heads=2,
        query_dimensions=8,
        value_dimensions=16,
        feed_forward_dimensions=40,
        attention_type="causal-linear",
        final_normalization=False,
        eps=None,
    ).get()
    assert len(model.layers) == 3 and model.norm is None
    attention = model.layers[0].attention
    assert isinstance(attention.inner_attention, CausalLinearAttention)
    assert attention.query_projection.out_features == 16
    assert attention.value_projection.out_features == 32
    assert model.layers[0].linear1.weight.shape == (40, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_layers": 0}, "n_layers must be a positive int; got 0"),
        ({"n_heads": -2}, "n_heads must be a positive int"),
        ({"query_dimensions": 2.5}, "query_dimensions must be a positive int"),
        ({"dropout": 1.5}, r"dropout must be a float in \[0, 1\]"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"attention_type": "flash"}, "unknown attention type 'flash'.*known:"),
        ({"n_layer": 2}, "has no setting 'n_layer'.*did you mean 'n_layers'"),
        ({"local_contxt": 2}, "did you mean 'local_context'"),
        ({"attention_dropout": "high"}, "invalid value 'high' for attention parameter"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_encoder_builder_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerEncoderBuilder.from_kwargs(**kwargs)


def test_non_strict_and_namespace():
    builder = TransformerEncoderBuilder.from_kwargs(strict=False, n_layers=2, unknown=3)
    assert builder.n_layers == 2
    namespace = argparse.Namespace(n_layers=5, learning_rate=0.1)
    assert TransformerEncoderBuilder.from_namespace(namespace).n_layers == 5
    with pytest.raises(ValueError, match="learning_rate"):
        TransformerEncoderBuilder.from_namespace(namespace, strict=True)
    builder = TransformerEncoderBuilder.from_dictionary({"n_heads": 3})
    assert builder.n_heads == 3


def test_decoder_builder():
    builder = TransformerDecoderBuilder.from_kwargs(
        n_layers=2,
        n_heads=2,
        query_dimensions=8,
        value_dimensions=8,
        feed_forward_dimensions=32,
        self_attention_type="causal-linear",
        cross_attention_type="full",
        attention_dropout=0.0,
    )
    assert builder.self_attention.attention_dropout == 0.0
    assert builder.cross_attention.attention_dropout == 0.0
    model = builder.get()
    assert isinstance(model, TransformerDecoder)
    layer = model.layers[0]
    assert isinstance(layer.self_attention.inner_attention, CausalLinearAttention)
    assert isinstance(layer.cross_attention.inner_attention, FullAttention)
    with pytest.raises(ValueError, match="unknown attention type"):
        TransformerDecoderBuilder.from_kwargs(cross_attention_type="nope")


def test_event_dispatcher_reaches_every_module():
    dispatcher = EventDispatcher()
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4, event_dispatcher=dispatcher
    ).get()
    assert model.event_dispatcher is dispatcher
    assert model.layers[0].attention.inner_attention.event_dispatcher is dispatcher


def test_recurrent_model_builders_point_to_their_package():
    with pytest.raises(AttributeError, match=r"recurrent_transformer\.builders"):
        builders_module.RecurrentEncoderBuilder  # noqa: B018


def test_seed_quick_start_runs_as_written():
    """The fast-transformers quick start with the new import prefix (smaller input)."""
    from attention_core.builders import TransformerEncoderBuilder

    bert = TransformerEncoderBuilder.from_kwargs(
        n_layers=12,
        n_heads=12,
        query_dimensions=64,
        value_dimensions=64,
        feed_forward_dimensions=3072,
        attention_type="full",
        activation="gelu",
    ).get()
    y = bert(torch.rand(2, 16, 64 * 12))
    assert y.shape == (2, 16, 768) and torch.isfinite(y).all()
