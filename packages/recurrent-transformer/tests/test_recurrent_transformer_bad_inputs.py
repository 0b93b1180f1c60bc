"""Issue 18 (reliability, round two) in the recurrent package: token ids checked by the
language model, a wrong memory_length_mask or input dtype named as the user passed it, and
the random feature maps of the recurrent linear attentions safe under concurrent redraws.
Each test fails without its fix."""

from __future__ import annotations

import pytest
import torch

from attention_core.feature_maps import Favor, RandomFourierFeatures
from attention_core.masking import LengthMask
from attention_core.testing import assert_close, seeded
from attention_core.testing.threads import interfered
from recurrent_transformer.attention.cross_attention.linear_attention import (
    RecurrentCrossLinearAttention,
)
from recurrent_transformer.attention.self_attention.linear_attention import (
    RecurrentLinearAttention,
)
from recurrent_transformer.builders import RecurrentDecoderBuilder, RecurrentEncoderBuilder
from recurrent_transformer.lm import RecurrentLM

SIZES = dict(n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
             feed_forward_dimensions=8)  # fmt: skip


def test_lm_checks_token_ids_in_forward_prefill_and_step():
    lm = RecurrentLM(num_tokens=10, n_layers=1, n_heads=2, query_dimensions=4)
    message = r"tokens must hold token ids in \[0, 10\); got values in \[{}, {}\]"
    with pytest.raises(ValueError, match=message.format(1, 12)):
        lm(torch.tensor([[1, 12]]))
    with pytest.raises(ValueError, match=message.format(-3, 4)):
        lm.prefill(torch.tensor([[4, -3]]))
    _, state = lm.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=message.format(10, 10)):
        lm.step(torch.tensor([10]), state)
    logits, _ = lm.step(torch.tensor([9]), state)  # the largest id is fine
    assert logits.shape == (1, 10)


@pytest.mark.parametrize("max_len", [9, 5])
def test_a_wrong_memory_length_mask_is_named(max_len):
    decoder = RecurrentDecoderBuilder.from_kwargs(**SIZES).get()
    x, memory = torch.randn(2, 8), torch.randn(2, 7, 8)
    wrong = LengthMask(torch.tensor([3, 3]), max_len=max_len)
    expected = (
        r"memory_length_mask must have shape \(N, S\) = \(2, 7\), the batch size and the "
        rf"length of memory; got a mask of shape \(2, {max_len}\)"
    )
    for module in (decoder, decoder.layers[0]):
        with pytest.raises(ValueError, match=expected):
            module(x, memory, memory_length_mask=wrong)
        with pytest.raises(ValueError, match=expected):
            module.prefill(x[:, None], memory, memory_length_mask=wrong)
    with pytest.raises(TypeError, match=r"memory_length_mask must be a BaseMask.*got Tensor"):
        decoder(x, memory, memory_length_mask=torch.ones(2, 7))


def test_an_input_of_another_dtype_than_the_model_is_named():
    encoder = RecurrentEncoderBuilder.from_kwargs(**SIZES).get()
    decoder = RecurrentDecoderBuilder.from_kwargs(**SIZES).get()
    x, memory = torch.randn(2, 8), torch.randn(2, 7, 8)
    named = r"{} must have the dtype of the model's parameters \(torch.float32\); got {}"
    with pytest.raises(TypeError, match=named.format("x", "torch.float16")):
        encoder(x.half())
    with pytest.raises(TypeError, match=named.format("x", "torch.float64")):
        encoder.prefill(x[:, None].double())
    with pytest.raises(TypeError, match=named.format("x", "torch.float16")):
        decoder(x.half(), memory)
    with pytest.raises(TypeError, match=named.format("memory", "torch.float64")):
        decoder(x, memory.double())
    y, _ = encoder.double()(x.double())  # a converted model takes the converted input
    assert y.dtype == torch.float64


@pytest.mark.parametrize("feature_map", [Favor, RandomFourierFeatures], ids=lambda c: c.__name__)
def test_recurrent_linear_attention_keeps_its_features_while_others_redraw(feature_map):
    """Another thread redraws after every projection: each step projects its query and key
    with one matrix, and later steps of the sequence with the matrix of its first step."""
    attention = RecurrentLinearAttention(4, feature_map=interfered(feature_map).factory(n_dims=8))
    x = torch.randn(2, 3, 4, generator=seeded(0))
    state = None
    for _ in range(3):
        _, state = attention(x, x, x, state)
    features = [p[1] for p in attention.feature_map.projections]
    assert len(features) == 6
    assert all(torch.equal(f, features[0]) for f in features)
    attention.feature_map.projections.clear()
    attention.prefill(x[:, None], x[:, None], x[:, None])
    phi_q, phi_k = (p[1] for p in attention.feature_map.projections)
    assert torch.equal(phi_q, phi_k)


@pytest.mark.parametrize("feature_map", [Favor, RandomFourierFeatures], ids=lambda c: c.__name__)
def test_recurrent_cross_linear_attention_keeps_its_features_while_others_redraw(feature_map):
    attention = RecurrentCrossLinearAttention(
        4, feature_map=interfered(feature_map).factory(n_dims=8)
    )
    memory = torch.randn(2, 5, 3, 4, generator=seeded(1))
    lengths = LengthMask(torch.tensor([5, 5]), max_len=5)
    _, state = attention(memory[:, 0], memory, memory, lengths)
    attention(memory[:, 0], None, None, None, state)  # a later step reads the same features
    (k, phi_k, _), (q1, phi_q1, _), (q2, phi_q2, _) = attention.feature_map.projections
    assert (k, q1, q2) == ("keys", "queries", "queries")
    assert_close("first step's query features", phi_q1[:, 0], phi_k[:, 0], rtol=1e-6, atol=0)
    assert_close("later step's query features", phi_q2[:, 0], phi_k[:, 0], rtol=1e-6, atol=0)
