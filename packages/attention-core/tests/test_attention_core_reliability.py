"""Issue 18 (reliability, round two): thread-safe random feature maps, empty inputs, errors
that name the user's argument (length masks, the model's dtype) and builders that refuse
sizes that cannot be allocated. Each test fails without its fix."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from attention_core.attention import AttentionLayer
from attention_core.attention.causal_linear_attention import CausalLinearAttention
from attention_core.attention.linear_attention import LinearAttention
from attention_core.builders import (
    AttentionBuilder,
    TransformerDecoderBuilder,
    TransformerEncoderBuilder,
)
from attention_core.feature_maps import (
    Favor,
    GeneralizedRandomFeatures,
    RandomFourierFeatures,
    SmoothedRandomFourierFeatures,
)
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close, seeded
from attention_core.testing.threads import interfered
from attention_core.transformers import TransformerEncoderLayer

RANDOM_FEATURE_MAPS = [
    Favor,
    RandomFourierFeatures,
    SmoothedRandomFourierFeatures,
    GeneralizedRandomFeatures,
]


# thread safety of the random feature maps


@pytest.mark.parametrize("feature_map", RANDOM_FEATURE_MAPS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("attention", [LinearAttention, CausalLinearAttention],
                         ids=lambda c: c.__name__)  # fmt: skip
def test_attention_projects_queries_and_keys_with_the_same_features(attention, feature_map):
    """Another thread redraws the features between the query and the key projections of a
    forward call (and after them): the call still uses one matrix for both."""
    E, L = 8, 6
    module = attention(E, feature_map=interfered(feature_map).factory(n_dims=16))
    x = torch.randn(2, L, 3, E, generator=seeded(0))
    lengths = LengthMask(torch.tensor([L, L]), max_len=L)
    mask = TriangularCausalMask(L) if attention is CausalLinearAttention else FullMask(L)
    for _ in range(3):
        module.feature_map.projections.clear()
        module(x, x, x, mask, lengths, lengths)
        (first, phi_q, _), (second, phi_k, _) = module.feature_map.projections
        assert (first, second) == ("queries", "keys")
        assert torch.equal(phi_q, phi_k)


@pytest.mark.parametrize("feature_map", RANDOM_FEATURE_MAPS, ids=lambda c: c.__name__)
def test_new_feature_map_hands_each_thread_its_own_matrix(feature_map):
    phi = feature_map(4, n_dims=8)
    x = torch.randn(5, 4, generator=seeded(1))
    phi.new_feature_map("cpu")
    mine = phi.omega
    expected = phi(x)
    thread = threading.Thread(target=phi.new_feature_map, args=("cpu",))
    thread.start()
    thread.join()
    assert phi.omega is not mine  # the other thread drew a new matrix ...
    assert torch.equal(phi(x), expected)  # ... and this thread still projects with its own
    phi.new_feature_map("cpu")  # until it draws again
    assert not torch.equal(phi(x), expected)


def test_concurrent_forward_calls_of_one_linear_encoder():
    """Four threads call one linear encoder built with Favor; every call
    projects its queries and keys with one matrix (checked on its recorded projections,
    with the query and key projections of the attention layer made equal)."""
    E, heads = 4, 2
    layer = AttentionLayer(
        LinearAttention(E, feature_map=interfered(Favor).factory(n_dims=8)), E * heads, heads
    )
    with torch.no_grad():
        layer.key_projection.load_state_dict(layer.query_projection.state_dict())
    phi = layer.inner_attention.feature_map
    x = torch.randn(1, 5, E * heads, generator=seeded(2))
    full, lengths = FullMask(5), LengthMask(torch.tensor([5]), max_len=5)
    failures = []

    def calls():
        for _ in range(10):
            layer(x, x, x, full, lengths, lengths)
        own = [p for p in phi.projections if p[2] == threading.get_ident()]
        assert [p[0] for p in own] == ["queries", "keys"] * 10
        pairs = zip(own[0::2], own[1::2], strict=True)
        failures.extend(i for i, (q, k) in enumerate(pairs) if not torch.equal(q[1], k[1]))

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(phi.projections) == 4 * 10 * 2
    assert failures == []


@pytest.mark.parametrize("feature_map", RANDOM_FEATURE_MAPS, ids=lambda c: c.__name__)
def test_random_feature_maps_copy_pickle_and_move(feature_map):
    phi = feature_map(4, n_dims=8)
    phi.new_feature_map("cpu")
    x = torch.randn(3, 4, generator=seeded(3), dtype=torch.float64)
    expected = phi(x)
    for twin in (copy.deepcopy(phi), pickle.loads(pickle.dumps(phi)), copy.deepcopy(phi).double()):
        assert_close("copied feature map", twin(x), expected)
        twin.new_feature_map("cpu")  # works: the copy has its own lock and thread state
    loaded = feature_map(4, n_dims=8)
    loaded.new_feature_map("cpu")
    loaded.load_state_dict(phi.state_dict())
    assert_close("loaded feature map", loaded(x), expected)
    replaced = torch.zeros_like(phi.omega)
    phi.omega = replaced  # assigning omega takes effect at once in every thread
    assert torch.equal(phi.forward_queries(x), feature_map.forward(phi, x))


def test_deterministic_eval_keeps_its_matrix_across_threads():
    phi = Favor(4, n_dims=8, deterministic_eval=True)
    phi.new_feature_map("cpu")
    phi.eval()
    x = torch.randn(3, 4, generator=seeded(4))
    expected = phi(x)
    thread = threading.Thread(target=phi.new_feature_map, args=("cpu",))
    thread.start()
    thread.join()
    phi.new_feature_map("cpu")
    assert torch.equal(phi(x), expected)


def test_a_linear_attention_with_random_features_compiles_with_fullgraph():
    attention = LinearAttention(8, feature_map=Favor.factory(n_dims=16))
    x = torch.randn(1, 10, 2, 8, generator=seeded(6))
    masks = (FullMask(10), LengthMask(torch.tensor([10])), LengthMask(torch.tensor([10])))
    compiled = torch.compile(attention, fullgraph=True)
    y = compiled(x, x, x, *masks)
    assert y.shape == (1, 10, 2, 8) and torch.isfinite(y).all()


# empty inputs give empty outputs


def _inner(attention_type: str, **parameters):
    builder = AttentionBuilder.from_kwargs(query_dimensions=4, **parameters)
    return builder.get(attention_type)


@pytest.mark.parametrize(
    ("attention_type", "parameters", "N", "L", "S"),
    [
        ("clustered", {"clusters": 2}, 0, 8, 8),
        ("improved-clustered", {"clusters": 2}, 0, 8, 8),
        ("causal-improved-clustered", {"clusters": 2}, 0, 8, 8),
        ("clustered", {"clusters": 2}, 2, 0, 8),
        ("aft-full", {"max_sequence_length": 8}, 2, 0, 0),
        ("aft-simple", {}, 2, 0, 0),
        ("aft-full", {"max_sequence_length": 8}, 0, 8, 8),
        ("aft-simple", {}, 0, 8, 8),
        ("aft-full", {"max_sequence_length": 8}, 2, 3, 0),
    ],
)
def test_empty_inputs_give_empty_outputs(attention_type, parameters, N, L, S):
    attention = _inner(attention_type, **parameters)
    g = seeded(5)
    q = torch.randn(N, L, 2, 4, generator=g, requires_grad=True)
    k = torch.randn(N, S, 2, 4, generator=g, requires_grad=True)
    v = torch.randn(N, S, 2, 4, generator=g, requires_grad=True)
    mask = TriangularCausalMask(L) if "causal" in attention_type else FullMask(L, S)
    out = attention(
        q, k, v, mask, LengthMask(torch.full((N,), L), max_len=L),
        LengthMask(torch.full((N,), S), max_len=S),
    )  # fmt: skip
    assert out.shape == (N, L, 2, 4)
    assert torch.equal(out, torch.zeros_like(out))  # a query that sees no key gets zeros
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and not t.grad.any()


def test_empty_input_still_checks_the_mask_kind():
    with pytest.raises(ValueError, match="does not support arbitrary attention masks"):
        _inner("clustered", clusters=2)(
            *(torch.zeros(0, 4, 2, 4) for _ in range(3)), TriangularCausalMask(4),
            LengthMask(torch.zeros(0, dtype=torch.long), max_len=4),
            LengthMask(torch.zeros(0, dtype=torch.long), max_len=4),
        )  # fmt: skip


# errors name the user's argument


def _encoder_and_decoder():
    sizes = dict(n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
                 feed_forward_dimensions=8)  # fmt: skip
    encoder = TransformerEncoderBuilder.from_kwargs(**sizes).get()
    decoder = TransformerDecoderBuilder.from_kwargs(**sizes).get()
    return encoder, decoder


@pytest.mark.parametrize("max_len", [30, 15])
def test_a_wrong_length_mask_is_named(max_len):
    encoder, decoder = _encoder_and_decoder()
    x, memory = torch.randn(2, 20, 8), torch.randn(2, 7, 8)
    wrong = LengthMask(torch.tensor([5, 5]), max_len=max_len)
    expected = rf"\(N, L\) = \(2, 20\).*length of x; got a mask of shape \(2, {max_len}\)"
    for module in (encoder, encoder.layers[0]):
        with pytest.raises(ValueError, match="length_mask must have shape " + expected):
            module(x, length_mask=wrong)
    for module in (decoder, decoder.layers[0]):
        with pytest.raises(ValueError, match="x_length_mask must have shape " + expected):
            module(x, memory, x_length_mask=wrong)
        with pytest.raises(
            ValueError,
            match=r"memory_length_mask must have shape \(N, S\) = \(2, 7\).*length of memory; "
            rf"got a mask of shape \(2, {max_len}\)",
        ):
            module(x, memory, memory_length_mask=wrong)
    with pytest.raises(TypeError, match=r"length_mask must be a BaseMask.*got Tensor"):
        encoder(x, length_mask=torch.ones(2, 20))


def test_an_input_of_another_dtype_than_the_model_is_named():
    encoder, decoder = _encoder_and_decoder()
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    with pytest.raises(TypeError, match=r"x must have the dtype of the model's parameters "
                       r"\(torch.float32\); got torch.float16"):  # fmt: skip
        encoder(x.half())
    with pytest.raises(TypeError, match=r"memory must have the dtype .*float32.*got torch.float64"):
        decoder(x, memory.double())
    assert encoder.double()(x.double()).dtype == torch.float64  # a converted model is fine


def test_autocast_inputs_are_not_refused():
    """Under autocast the input's dtype legitimately differs from the parameters'."""
    layer = TransformerEncoderLayer(
        AttentionLayer(_inner("full"), 8, 2, d_keys=4, d_values=4), 8, 16, dropout=0.0
    )
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.shape == (2, 5, 8)
    assert torch.isfinite(y).all()


# builders refuse sizes that cannot be allocated


@pytest.mark.parametrize(
    ("builder", "settings", "named"),
    [
        (TransformerEncoderBuilder, {"query_dimensions": 2**40}, "query_dimensions=1099511627776"),
        (TransformerDecoderBuilder, {"value_dimensions": 2**16}, "value_dimensions=65536"),
        (TransformerEncoderBuilder, {"n_heads": 2**20, "feed_forward_dimensions": 2**30},
         "feed_forward_dimensions=1073741824"),
        (TransformerEncoderBuilder, {"n_layers": 2**40}, "n_layers=1099511627776"),
    ],
)  # fmt: skip
def test_builders_refuse_sizes_beyond_memory(builder, settings, named):
    with pytest.raises(ValueError, match=rf"would allocate \d+ bytes .*{named}.*this machine has"):
        builder.from_kwargs(**settings).get()


def test_builders_refuse_a_tensor_beyond_torchs_limit():
    with pytest.raises(ValueError, match=r"a parameter tensor of \d+ bytes .*torch's limit"):
        TransformerEncoderBuilder.from_kwargs(query_dimensions=2**60).get()


def test_builders_still_build_ordinary_sizes():
    model = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=2, query_dimensions=8,
                                                  value_dimensions=8).get()  # fmt: skip
    assert len(model.layers) == 2
