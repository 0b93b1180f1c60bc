"""Write ``fast_transformers_checkpoint.pt``: small fast-transformers models' ``state_dict``s
with inputs and the outputs fast-transformers computes from them.

The fixture lets the tests check, without fast-transformers installed, that a checkpoint saved
by pytorch-fast-transformers 0.4.0 loads with ``load_state_dict`` into the recurrent models of
this package and gives fast-transformers' outputs. Regenerate it with an interpreter that has
fast-transformers (and the same torch), from the repository root:

    python packages/recurrent-transformer/tests/data/make_fast_transformers_checkpoint.py

(it was written with pytorch-fast-transformers 0.4.0 and torch 2.13 CPU, in /tmp/ftvenv).

Contents (a dict of tensors and dicts, loadable with ``torch.load(..., weights_only=True)``):

- ``settings``: the builder settings of every model (ints only);
- ``x`` ``(N, L, E)``, ``memory`` ``(N, S, E)``, ``memory_lengths`` ``(N,)``;
- ``recurrent_linear``, ``recurrent_full``: a ``RecurrentEncoderBuilder`` model's
  ``state_dict`` and its stepped outputs ``(N, L, E)``;
- ``batch_causal_linear``: a ``TransformerEncoderBuilder`` (``causal-linear``) model's
  ``state_dict`` and its outputs with a ``TriangularCausalMask``;
- ``decoder``: a ``RecurrentDecoderBuilder`` (linear self, full cross) model's ``state_dict``
  and its stepped outputs over the padded memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from fast_transformers.builders import (
    RecurrentDecoderBuilder,
    RecurrentEncoderBuilder,
    TransformerEncoderBuilder,
)
from fast_transformers.masking import LengthMask, TriangularCausalMask

OUT = Path(__file__).with_name("fast_transformers_checkpoint.pt")
SETTINGS = dict(
    n_layers=1, n_heads=2, query_dimensions=3, value_dimensions=3, feed_forward_dimensions=8
)
N, L, S = 2, 5, 4


def stepped(model, x, *extra, **kwargs):
    outputs, state = [], None
    for t in range(x.shape[1]):
        y, state = model(x[:, t], *extra, state=state, **kwargs)
        outputs.append(y)
    return torch.stack(outputs, dim=1)


def main() -> None:
    torch.manual_seed(0)
    E = SETTINGS["n_heads"] * SETTINGS["value_dimensions"]
    x = torch.randn(N, L, E)
    memory = torch.randn(N, S, E)
    lengths = torch.tensor([S, 2])
    data = {"settings": dict(SETTINGS), "x": x, "memory": memory, "memory_lengths": lengths}
    with torch.no_grad():
        for attention in ("linear", "full"):
            model = RecurrentEncoderBuilder.from_kwargs(attention_type=attention, **SETTINGS)
            model = model.get().eval()
            data[f"recurrent_{attention}"] = {
                "state_dict": model.state_dict(),
                "outputs": stepped(model, x),
            }
        batch = TransformerEncoderBuilder.from_kwargs(attention_type="causal-linear", **SETTINGS)
        batch = batch.get().eval()
        data["batch_causal_linear"] = {
            "state_dict": batch.state_dict(),
            "outputs": batch(x, attn_mask=TriangularCausalMask(L)),
        }
        decoder = (
            RecurrentDecoderBuilder.from_kwargs(
                self_attention_type="linear", cross_attention_type="full", **SETTINGS
            )
            .get()
            .eval()
        )
        mask = LengthMask(lengths, max_len=S)
        data["decoder"] = {
            "state_dict": decoder.state_dict(),
            "outputs": stepped(decoder, x, memory, memory_length_mask=mask),
        }
    # the legacy (non-zip) format: a few KB instead of a 64-byte-aligned record per tensor
    torch.save(data, OUT, _use_new_zipfile_serialization=False)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
