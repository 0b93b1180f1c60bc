"""Batch encoders and decoders (full, linear, causal-linear) run under torch.compile with
fullgraph=True (no graph break) and give the eager outputs; they round-trip through
state_dict and torch.save / torch.load(weights_only=True) to identical outputs."""

from __future__ import annotations

import io

import pytest
import torch

from attention_core.builders import TransformerDecoderBuilder, TransformerEncoderBuilder
from attention_core.masking import LengthMask, TriangularCausalMask
from attention_core.testing import assert_close

SIZES = dict(n_layers=2, n_heads=2, query_dimensions=8, value_dimensions=8,
             feed_forward_dimensions=32)  # fmt: skip


def encoder(attention_type):
    torch.manual_seed(0)
    return (
        TransformerEncoderBuilder.from_kwargs(attention_type=attention_type, **SIZES).get().eval()
    )


def masks(x, lengths, causal):
    """Built eagerly, outside the compiled region: a LengthMask validates its lengths'
    values, which is data-dependent Python control flow."""
    attn_mask = TriangularCausalMask(x.shape[1]) if causal else None
    return attn_mask, LengthMask(lengths, max_len=x.shape[1])


def encode(model, x, attn_mask, length_mask):
    return model(x, attn_mask=attn_mask, length_mask=length_mask)


@pytest.mark.parametrize(
    ("attention_type", "causal"), [("full", False), ("full", True), ("linear", False),
                                   ("causal-linear", True)],
)  # fmt: skip
def test_compiled_encoder_matches_eager_without_graph_breaks(attention_type, causal):
    model = encoder(attention_type)
    x = torch.randn(3, 11, 16)
    attn_mask, length_mask = masks(x, torch.tensor([11, 7, 4]), causal)
    with torch.no_grad():
        expected = encode(model, x, attn_mask, length_mask)
        compiled = torch.compile(encode, fullgraph=True, backend="aot_eager")
        actual = compiled(model, x, attn_mask, length_mask)
        assert_close(f"compiled {attention_type}", actual, expected)


@pytest.mark.parametrize("self_attention", ["full", "causal-linear"])
def test_compiled_decoder_matches_eager(self_attention):
    torch.manual_seed(0)
    decoder = TransformerDecoderBuilder.from_kwargs(
        self_attention_type=self_attention, cross_attention_type="full", **SIZES
    ).get().eval()  # fmt: skip
    x, memory = torch.randn(2, 9, 16), torch.randn(2, 5, 16)

    def run(x, memory):
        return decoder(x, memory, x_mask=TriangularCausalMask(x.shape[1]))

    with torch.no_grad():
        expected = run(x, memory)
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
        assert_close("compiled decoder", compiled(x, memory), expected)


@pytest.mark.parametrize("attention_type", ["full", "linear", "causal-linear"])
def test_save_and_load_with_weights_only_gives_identical_outputs(attention_type):
    model = encoder(attention_type)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    twin = TransformerEncoderBuilder.from_kwargs(attention_type=attention_type, **SIZES).get()
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    twin.eval()
    x = torch.randn(2, 6, 16)
    causal = attention_type == "causal-linear"
    attn_mask, length_mask = masks(x, torch.tensor([6, 4]), causal)
    with torch.no_grad():
        assert torch.equal(
            encode(twin, x, attn_mask, length_mask), encode(model, x, attn_mask, length_mask)
        )
