"""RecurrentDecoderBuilder's cross_* sizes (fast-transformers master): the recurrent decoder
steps with a memory of ``cross_n_heads * cross_value_dimensions`` features and gives the
outputs of the batch decoder with the same weights."""

from __future__ import annotations

import torch

from attention_core.builders import TransformerDecoderBuilder
from attention_core.masking import TriangularCausalMask
from attention_core.testing import assert_close
from recurrent_transformer.builders import RecurrentDecoderBuilder

SIZES = dict(
    n_layers=2, n_heads=2, query_dimensions=4, value_dimensions=4, feed_forward_dimensions=16,
    cross_n_heads=3, cross_query_dimensions=5, cross_value_dimensions=6, dropout=0.0,
    attention_dropout=0.0,
)  # fmt: skip


def test_recurrent_decoder_with_cross_sizes_matches_the_batch_decoder():
    torch.manual_seed(0)
    recurrent = RecurrentDecoderBuilder.from_kwargs(**SIZES).get().double().eval()
    batch = TransformerDecoderBuilder.from_kwargs(**SIZES).get().double().eval()
    batch.load_state_dict(recurrent.state_dict())
    cross = recurrent.layers[0].cross_attention
    assert cross.key_projection.weight.shape == (15, 18)
    x, memory = (
        torch.randn(2, 5, 8, dtype=torch.float64),
        torch.randn(2, 4, 18, dtype=torch.float64),
    )
    expected = batch(x, memory, x_mask=TriangularCausalMask(5))
    state, outputs = None, []
    with torch.no_grad():
        for i in range(5):
            y, state = recurrent(x[:, i], memory, state=state)
            outputs.append(y)
    assert_close("steps", torch.stack(outputs, dim=1), expected)
