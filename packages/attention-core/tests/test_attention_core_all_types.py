"""Every registered attention type builds from the builder by name and runs forward and
backward in float32 and float64 with the masks it supports; unsupported masks are errors."""

import pytest
import torch

from attention_core.attention_registry import AttentionRegistry
from attention_core.builders import TransformerEncoderBuilder
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask

# name -> (extra builder kwargs, mask kind it needs: "causal", "none" or "any")
TYPES = {
    "full": ({}, "any"),
    "linear": ({}, "none"),
    "causal-linear": ({}, "causal"),
    "local": ({"local_context": 5}, "any"),
    "reformer": ({"chunk_size": 4, "bits": 3, "rounds": 2}, "any"),
    "clustered": ({"clusters": 3, "bits": 8}, "none"),
    "improved-clustered": ({"clusters": 3, "bits": 8, "topk": 4}, "none"),
    "causal-improved-clustered": ({"clusters": 3, "bits": 8, "topk": 4}, "causal"),
    "exact-topk": ({"topk": 4}, "any"),
    "conditional-full:linear": ({"length_limit": 8}, "none"),
    "aft-full": ({"max_sequence_length": 32}, "any"),
    "aft-simple": ({}, "causal-or-none"),
}


def test_table_covers_the_registry():
    names = {name.split(":")[0] for name in TYPES}
    assert names == set(AttentionRegistry.keys)


def build(attention_type, extra, dtype):
    torch.manual_seed(0)
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=2,
        n_heads=2,
        query_dimensions=8,
        value_dimensions=8,
        feed_forward_dimensions=32,
        attention_type=attention_type,
        dropout=0.0,
        **extra,
    ).get()
    return model.to(dtype)


def mask_for(kind, L):
    return TriangularCausalMask(L) if kind == "causal" else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("attention_type", list(TYPES))
def test_forward_backward(attention_type, dtype):
    extra, kind = TYPES[attention_type]
    model = build(attention_type, extra, dtype)
    L = 12
    x = torch.randn(3, L, 16, dtype=dtype, requires_grad=True)
    lengths = LengthMask(torch.tensor([12, 9, 5]), max_len=L)
    y = model(x, attn_mask=mask_for(kind, L), length_mask=lengths)
    assert y.shape == (3, L, 16) and y.dtype == dtype
    assert torch.isfinite(y).all()
    y[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "attention_type", [name for name, (_, kind) in TYPES.items() if kind != "any"]
)
def test_unsupported_masks_are_clear_errors(attention_type):
    extra, kind = TYPES[attention_type]
    model = build(attention_type, extra, torch.float32)
    L = 12  # longer than conditional-full's length_limit
    if kind == "causal":
        bad = FullMask(L)
    elif kind == "none":
        bad = TriangularCausalMask(L)
    else:  # an arbitrary mask
        bad = FullMask(torch.rand(L, L, generator=torch.Generator().manual_seed(0)) > 0.5)
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(2, L, 16), attn_mask=bad)
