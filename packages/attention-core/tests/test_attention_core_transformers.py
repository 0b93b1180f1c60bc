"""Encoders and decoders: masks, events, parameter names of fast-transformers, and
loading weights from torch.nn.Transformer* and Hugging Face BERT layouts."""

import pytest
import torch
from torch import nn

from attention_core.builders import TransformerDecoderBuilder, TransformerEncoderBuilder
from attention_core.events import (
    AttentionEvent,
    EventDispatcher,
    IntermediateOutput,
    QKVEvent,
)
from attention_core.events.filters import event_class, from_layer, layer_name_contains
from attention_core.masking import LengthMask, TriangularCausalMask
from attention_core.testing import assert_close
from attention_core.utils import check_state, forward_hooks_registered, make_mirror
from attention_core.weight_mapper import (
    HugginfaceBertEncoderMapper,
    LongformerMapper,
    PytorchMapper,
)


def small_encoder(**kwargs):
    settings = dict(
        n_layers=2,
        n_heads=2,
        query_dimensions=4,
        value_dimensions=4,
        feed_forward_dimensions=16,
        dropout=0.0,
        attention_dropout=0.0,
    )
    settings.update(kwargs)
    return TransformerEncoderBuilder.from_kwargs(**settings).get()


def fast_transformers_encoder_state_dict(n_layers, d_model, d_ff, d_qk, d_v, final_norm):
    """A state_dict with exactly the keys and shapes fast-transformers 0.4 saves."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes = {
            "attention.query_projection.weight": (d_qk, d_model),
            "attention.query_projection.bias": (d_qk,),
            "attention.key_projection.weight": (d_qk, d_model),
            "attention.key_projection.bias": (d_qk,),
            "attention.value_projection.weight": (d_v, d_model),
            "attention.value_projection.bias": (d_v,),
            "attention.out_projection.weight": (d_model, d_v),
            "attention.out_projection.bias": (d_model,),
            "linear1.weight": (d_ff, d_model),
            "linear1.bias": (d_ff,),
            "linear2.weight": (d_model, d_ff),
            "linear2.bias": (d_model,),
            "norm1.weight": (d_model,),
            "norm1.bias": (d_model,),
            "norm2.weight": (d_model,),
            "norm2.bias": (d_model,),
        }
        for name, shape in shapes.items():
            state[p + name] = torch.randn(shape, generator=g)
    if final_norm:
        state["norm.weight"] = torch.randn(d_model, generator=g)
        state["norm.bias"] = torch.randn(d_model, generator=g)
    return state


@pytest.mark.parametrize("attention_type", ["full", "linear", "causal-linear"])
def test_fast_transformers_state_dict_loads(attention_type):
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=2,
        n_heads=3,
        query_dimensions=5,
        value_dimensions=4,
        feed_forward_dimensions=20,
        attention_type=attention_type,
    ).get()
    state = fast_transformers_encoder_state_dict(2, 12, 20, 15, 12, final_norm=True)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.layers[1].linear2.weight, state["layers.1.linear2.weight"])


def test_fast_transformers_decoder_parameter_names():
    model = TransformerDecoderBuilder.from_kwargs(n_layers=1, n_heads=2).get()
    names = set(model.state_dict())
    for part in ("self_attention", "cross_attention"):
        assert f"layers.0.{part}.query_projection.weight" in names
    assert {"layers.0.norm3.weight", "layers.0.linear1.weight", "norm.weight"} <= names


def test_encoder_respects_causal_mask_and_padding():
    torch.manual_seed(0)
    model = small_encoder(attention_type="causal-linear").double().eval()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    y = model(x, attn_mask=TriangularCausalMask(9))
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 4, 8, dtype=torch.float64)  # change the future only
    y2 = model(x2, attn_mask=TriangularCausalMask(9))
    assert_close("past unchanged by the future", y2[:, :5], y[:, :5])
    full = small_encoder().double().eval()
    lengths = LengthMask(torch.tensor([9, 6]), max_len=9)
    y = full(x, length_mask=lengths)
    y2 = full(torch.cat([x[:, :6], x2[:, 6:]], 1), length_mask=lengths)
    assert_close("padding ignored", y2[1, :6], y[1, :6])


def test_decoder_runs_with_masks():
    model = TransformerDecoderBuilder.from_kwargs(
        n_layers=2,
        n_heads=2,
        query_dimensions=4,
        value_dimensions=4,
        dropout=0.0,
        self_attention_type="causal-linear",
        cross_attention_type="linear",
    ).get()
    x, memory = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    y = model(
        x,
        memory,
        x_mask=TriangularCausalMask(5),
        memory_length_mask=LengthMask(torch.tensor([7, 3, 1]), max_len=7),
    )
    assert y.shape == (3, 5, 8) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="same batch size"):
        model.layers[0](x, memory[:2])


def test_events_are_dispatched_with_payloads():
    dispatcher = EventDispatcher()
    model = small_encoder(event_dispatcher=dispatcher)
    attentions, qkvs, outputs = [], [], []
    dispatcher.listen(AttentionEvent, attentions.append)
    dispatcher.listen(QKVEvent, qkvs.append)
    dispatcher.listen(IntermediateOutput, outputs.append)
    model(torch.randn(3, 6, 8))
    assert len(attentions) == 2 and attentions[0].attention_matrix.shape == (3, 2, 6, 6)
    assert_close("rows sum to one", attentions[0].attention_matrix.sum(-1), torch.ones(3, 2, 6))
    assert len(qkvs) == 2 and qkvs[0].queries.shape == (3, 6, 2, 4)
    assert len(outputs) == 2 and outputs[-1].x.shape == (3, 6, 8)
    assert attentions[0].source is model.layers[0].attention.inner_attention


def test_event_filters():
    dispatcher = EventDispatcher()
    model = small_encoder(event_dispatcher=dispatcher)
    second = []
    dispatcher.listen(layer_name_contains(model, "layers.1") & AttentionEvent, second.append)
    only_first = []
    dispatcher.listen(from_layer(model.layers[0].attention.inner_attention), only_first.append)
    not_attention = []
    dispatcher.listen(~event_class(AttentionEvent), not_attention.append)
    model(torch.randn(1, 3, 8))
    assert len(second) == 1 and second[0].source is model.layers[1].attention.inner_attention
    assert len(only_first) == 1
    assert all(not isinstance(ev, AttentionEvent) for ev in not_attention)
    assert len(not_attention) == 4  # 2 QKV + 2 intermediate outputs
    dispatcher.remove(second.append)
    dispatcher.clear()
    model(torch.randn(1, 3, 8))
    assert len(only_first) == 1
    assert EventDispatcher.get("named") is EventDispatcher.get("named")
    assert EventDispatcher.get(dispatcher) is dispatcher
    with pytest.raises(TypeError, match="event_dispatcher must be"):
        EventDispatcher.get(3)


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding"])
def test_pytorch_mapper_matches_torch_encoder(padding):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        d_model=12, nhead=3, dim_feedforward=20, dropout=0.0, batch_first=True
    )
    reference = (
        torch.nn.TransformerEncoder(
            layer, num_layers=2, norm=torch.nn.LayerNorm(12), enable_nested_tensor=False
        )
        .double()
        .eval()
    )
    ours = (
        TransformerEncoderBuilder.from_kwargs(
            n_layers=2,
            n_heads=3,
            query_dimensions=4,
            value_dimensions=4,
            feed_forward_dimensions=20,
            dropout=0.0,
            attention_dropout=0.0,
        )
        .get()
        .double()
        .eval()
    )
    ours.load_state_dict(PytorchMapper().map(reference.state_dict()))
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    if padding:
        lengths = torch.tensor([7, 4])
        pad = torch.arange(7)[None] >= lengths[:, None]
        expected = reference(x, src_key_padding_mask=pad)
        actual = ours(x, length_mask=LengthMask(lengths, max_len=7))
        assert_close("padded encoder", actual[1, :4], expected[1, :4])
        assert_close("padded encoder", actual[0], expected[0])
    else:
        assert_close("encoder", ours(x), reference(x))


def test_pytorch_mapper_decoder_keys():
    layer = torch.nn.TransformerDecoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    reference = torch.nn.TransformerDecoder(layer, num_layers=1)
    ours = TransformerDecoderBuilder.from_kwargs(
        n_layers=1,
        n_heads=2,
        query_dimensions=4,
        value_dimensions=4,
        feed_forward_dimensions=16,
        final_normalization=False,
    ).get()
    ours.load_state_dict(PytorchMapper.map(reference.state_dict()), strict=True)


def bert_layer_state(prefix, i, d, d_ff, old_names=False):
    g = torch.Generator().manual_seed(i)
    w, b = ("gamma", "beta") if old_names else ("weight", "bias")
    p = f"{prefix}layer.{i}."
    shapes = {
        "attention.self.query.weight": (d, d),
        "attention.self.query.bias": (d,),
        "attention.self.key.weight": (d, d),
        "attention.self.key.bias": (d,),
        "attention.self.value.weight": (d, d),
        "attention.self.value.bias": (d,),
        "attention.output.dense.weight": (d, d),
        "attention.output.dense.bias": (d,),
        f"attention.output.LayerNorm.{w}": (d,),
        f"attention.output.LayerNorm.{b}": (d,),
        "intermediate.dense.weight": (d_ff, d),
        "intermediate.dense.bias": (d_ff,),
        "output.dense.weight": (d, d_ff),
        "output.dense.bias": (d,),
        f"output.LayerNorm.{w}": (d,),
        f"output.LayerNorm.{b}": (d,),
    }
    return {p + k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize(
    ("prefix", "old_names"), [("", False), ("bert.encoder.", True)], ids=["encoder", "model"]
)
def test_bert_mapper(prefix, old_names):
    state = {**bert_layer_state(prefix, 0, 8, 16, old_names), **bert_layer_state(prefix, 1, 8, 16)}
    if prefix:
        state["bert.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
        state["bert.pooler.dense.weight"] = torch.randn(8, 8)
    ours = TransformerEncoderBuilder.from_kwargs(
        n_layers=2,
        n_heads=2,
        query_dimensions=4,
        value_dimensions=4,
        feed_forward_dimensions=16,
        activation="gelu",
        final_normalization=False,
    ).get()
    mapped = HugginfaceBertEncoderMapper.map(state)
    ours.load_state_dict(mapped, strict=True)
    assert torch.equal(
        ours.layers[1].linear1.weight, state[f"{prefix}layer.1.intermediate.dense.weight"]
    )


def test_longformer_mapper_drops_global_projections_with_a_warning():
    state = bert_layer_state("", 0, 8, 16)
    state["layer.0.attention.self.query_global.weight"] = torch.randn(8, 8)
    with pytest.warns(UserWarning, match="global attention"):
        mapped = LongformerMapper.map(state)
    assert not any("global" in key for key in mapped)


def test_unknown_keys_are_an_error():
    with pytest.raises(ValueError, match=r"does not know how to map the key 'mystery\.weight'"):
        PytorchMapper.map({"mystery.weight": torch.zeros(1)})


def test_check_state_and_make_mirror():
    with pytest.warns(DeprecationWarning, match="'memory' is deprecated"):
        assert check_state(None, memory=3) == 3
    assert check_state(4) == 4
    with pytest.raises(ValueError, match="not both"):
        check_state(1, memory=2)
    a, b = small_encoder(), small_encoder()
    make_mirror(a, b)
    assert b.layers[0].linear1.weight is a.layers[0].linear1.weight
    with pytest.raises(ValueError, match="different parameters"):
        make_mirror(a, small_encoder(n_layers=1))


def test_forward_hooks_registered_sees_module_and_global_hooks():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert not forward_hooks_registered(a, None, b)
    handle = b.register_forward_pre_hook(lambda module, args: None)
    assert forward_hooks_registered(a, None, b) and not forward_hooks_registered(a)
    handle.remove()
    for register in (
        nn.modules.module.register_module_forward_hook,
        nn.modules.module.register_module_forward_pre_hook,
    ):
        handle = register(lambda *args: None)
        assert forward_hooks_registered(a) and forward_hooks_registered()
        handle.remove()
    assert not forward_hooks_registered(a, b)
