"""Checkpoints saved by pytorch-fast-transformers 0.4.0 load into these models and give its
outputs.

The fixture ``data/fast_transformers_checkpoint.pt`` (a few KB, written by
``data/make_fast_transformers_checkpoint.py`` with fast-transformers installed) holds the
``state_dict`` of a fast-transformers recurrent encoder (linear and full attention), of a batch
causal-linear encoder and of a recurrent decoder (linear self, full cross attention, padded
memory), with inputs and the outputs fast-transformers computed. fast-transformers itself is not
needed here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attention_core.masking import LengthMask
from attention_core.testing import assert_close
from recurrent_transformer.builders import RecurrentDecoderBuilder, RecurrentEncoderBuilder

FIXTURE = Path(__file__).with_name("data") / "fast_transformers_checkpoint.pt"
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def checkpoint():
    return torch.load(FIXTURE, weights_only=True)


def stepped(model, x, *extra, **kwargs):
    outputs, state = [], None
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = model(x[:, t], *extra, state=state, **kwargs)
            outputs.append(y)
    return torch.stack(outputs, dim=1)


def test_fixture_is_small():
    assert FIXTURE.stat().st_size < 32_000


@pytest.mark.parametrize(
    "entry,attention",
    [
        ("recurrent_linear", "linear"),
        ("recurrent_full", "full"),
        # a batch model trained with a causal mask runs as an RNN
        ("batch_causal_linear", "linear"),
    ],
)
def test_encoder_checkpoint_loads_and_gives_fast_transformers_outputs(checkpoint, entry, attention):
    model = RecurrentEncoderBuilder.from_kwargs(
        attention_type=attention, **checkpoint["settings"]
    ).get()
    saved = checkpoint[entry]
    # strict: every name of the checkpoint is a parameter here, and nothing is missing
    model.load_state_dict(saved["state_dict"])
    model.eval()
    before = stepped(model, checkpoint["x"])
    assert_close(entry, before, saved["outputs"], **TOL)
    # perturbing a weight changes the outputs: the comparison is not vacuous (a constant
    # shift of linear1 would not: its input comes out of a LayerNorm and sums to zero)
    with torch.no_grad():
        model.layers[0].linear1.weight.mul_(1.5)
    assert not torch.allclose(stepped(model, checkpoint["x"]), saved["outputs"], atol=1e-3)


def test_decoder_checkpoint_loads_and_gives_fast_transformers_outputs(checkpoint):
    model = RecurrentDecoderBuilder.from_kwargs(
        self_attention_type="linear", cross_attention_type="full", **checkpoint["settings"]
    ).get()
    model.load_state_dict(checkpoint["decoder"]["state_dict"])
    model.eval()
    memory = checkpoint["memory"]
    mask = LengthMask(checkpoint["memory_lengths"], max_len=memory.shape[1])
    got = stepped(model, checkpoint["x"], memory, memory_length_mask=mask)
    assert_close("decoder", got, checkpoint["decoder"]["outputs"], **TOL)


def test_recurrent_checkpoint_loads_into_the_batch_model(checkpoint):
    from attention_core.builders import TransformerEncoderBuilder
    from attention_core.masking import TriangularCausalMask

    batch = TransformerEncoderBuilder.from_kwargs(
        attention_type="causal-linear", **checkpoint["settings"]
    ).get()
    batch.load_state_dict(checkpoint["recurrent_linear"]["state_dict"])
    batch.eval()
    x = checkpoint["x"]
    with torch.no_grad():
        got = batch(x, attn_mask=TriangularCausalMask(x.shape[1]))
    assert_close("batch", got, checkpoint["recurrent_linear"]["outputs"], **TOL)
