"""LocalAttention equals FullAttention with the band of allowed keys folded into its masks."""

import pytest
import torch

from attention_core.attention.full_attention import FullAttention
from attention_core.attention.local_attention import LocalAttention
from attention_core.attention_registry import AttentionRegistry
from attention_core.events import AttentionEvent, EventDispatcher
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close

SHAPES = [  # N, L, S, H, E, D, local_context
    pytest.param(1, 1, 1, 1, 1, 1, 1, id="tiny"),
    pytest.param(2, 7, 7, 3, 5, 4, 3, id="primes"),
    pytest.param(3, 13, 13, 2, 4, 3, 4, id="even-context"),
    pytest.param(2, 11, 5, 2, 3, 2, 5, id="L>S"),
    pytest.param(2, 5, 17, 1, 3, 3, 7, id="L<S"),
    pytest.param(2, 6, 6, 2, 3, 3, 32, id="context>L"),
]


def qkv(N, L, S, H, E, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, L, H, E, generator=g, dtype=dtype),
        torch.randn(N, S, H, E, generator=g, dtype=dtype),
        torch.randn(N, S, H, D, generator=g, dtype=dtype),
    )


def band(L, S, context):
    """``band[l, j]``: key j lies in query l's window (written with loops)."""
    allowed = torch.zeros(L, S, dtype=torch.bool)
    for l in range(L):
        for j in range(l - context // 2, l - context // 2 + context):
            if 0 <= j < S:
                allowed[l, j] = True
    return allowed


def masks(kind, N, L, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "causal":
        square = L == S
        attn = TriangularCausalMask(L) if square else FullMask(torch.ones(L, S).tril().bool())
    elif kind == "random":
        attn = FullMask(torch.rand(L, S, generator=g) > 0.3)
    else:
        attn = FullMask(L, S)
    key_lengths = torch.randint(1, S + 1, (N,), generator=g)
    key_lengths[0] = S
    query_lengths = torch.randint(1, L + 1, (N,), generator=g)
    return attn, LengthMask(query_lengths, max_len=L), LengthMask(key_lengths, max_len=S)


@pytest.mark.parametrize(("N", "L", "S", "H", "E", "D", "context"), SHAPES)
@pytest.mark.parametrize("mask_kind", ["all-ones", "random", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_local_equals_full_with_band_mask(N, L, S, H, E, D, context, mask_kind, dtype):
    q, k, v = qkv(N, L, S, H, E, D, dtype)
    attn, query_lengths, key_lengths = masks(mask_kind, N, L, S)
    banded = FullMask(attn.bool_matrix & band(L, S, context))
    full = FullAttention(attention_dropout=0.0)
    expected = full(q.double(), k.double(), v.double(), banded, query_lengths, key_lengths)
    out = LocalAttention(context, attention_dropout=0.0)(q, k, v, attn, query_lengths, key_lengths)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close("local", out, expected)


def test_rows_without_allowed_keys_are_zero_and_gradients_match_full():
    N, L, S, H, E, D, context = 2, 9, 9, 2, 4, 3, 3
    q, k, v = (t.requires_grad_(True) for t in qkv(N, L, S, H, E, D, torch.float64, seed=2))
    allowed = torch.ones(L, S, dtype=torch.bool)
    allowed[4, 3:6] = False  # row 4 keeps nothing of its window
    key_lengths = LengthMask(torch.tensor([9, 2]), max_len=S)  # rows >= 4 of n=1 see nothing
    query_lengths = LengthMask(torch.tensor([9, 9]))
    local = LocalAttention(context, softmax_temp=0.7, attention_dropout=0.0)
    out = local(q, k, v, FullMask(allowed), query_lengths, key_lengths)
    assert (out[:, 4] == 0).all() and (out[1, 4:] == 0).all()
    full = FullAttention(softmax_temp=0.7, attention_dropout=0.0)
    banded = FullMask(allowed & band(L, S, context))
    expected = full(q, k, v, banded, query_lengths, key_lengths)
    assert_close("out", out, expected)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    expected_grads = torch.autograd.grad(expected, (q, k, v), cotangent)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected_grads, strict=True):
        assert torch.isfinite(got).all()
        assert_close(name, got, want)


def test_local_attention_gradcheck():
    q, k, v = (t.requires_grad_(True) for t in qkv(2, 5, 4, 1, 3, 2, torch.float64, seed=3))
    attn, query_lengths, key_lengths = masks("random", 2, 5, 4, seed=4)
    local = LocalAttention(3, attention_dropout=0.0)
    torch.autograd.gradcheck(
        lambda q, k, v: local(q, k, v, attn, query_lengths, key_lengths), (q, k, v)
    )


def test_local_attention_dispatches_the_band_of_weights():
    dispatcher = EventDispatcher()
    seen = []
    dispatcher.listen(AttentionEvent, seen.append)
    q, k, v = qkv(2, 6, 6, 3, 4, 4, torch.float32)
    attn, query_lengths, key_lengths = masks("all-ones", 2, 6, 6)
    local = LocalAttention(5, attention_dropout=0.0, event_dispatcher=dispatcher)
    local(q, k, v, attn, query_lengths, key_lengths)
    assert len(seen) == 1 and seen[0].source is local
    weights = seen[0].attention_matrix
    assert weights.shape == (2, 3, 6, 5)
    assert_close("row sums", weights.sum(-1), torch.ones(2, 3, 6))


def test_local_attention_dropout_only_in_training():
    q, k, v = qkv(1, 8, 8, 2, 4, 4, torch.float32)
    attn, query_lengths, key_lengths = masks("all-ones", 1, 8, 8)
    local = LocalAttention(3, attention_dropout=0.5)
    torch.manual_seed(0)
    train_out = local(q, k, v, attn, query_lengths, key_lengths)
    local.eval()
    eval_out = local(q, k, v, attn, query_lengths, key_lengths)
    expected = LocalAttention(3, attention_dropout=0.0)(q, k, v, attn, query_lengths, key_lengths)
    assert_close("eval", eval_out, expected)
    assert not torch.allclose(train_out, eval_out)


def test_local_attention_is_registered():
    cls, params = AttentionRegistry["local"]
    assert cls is LocalAttention
    assert params == ["local_context", "softmax_temp", "attention_dropout", "event_dispatcher"]
    assert AttentionRegistry.validate_parameter("local_context", 7) == 7
    with pytest.raises(ValueError, match="local_context"):
        AttentionRegistry.validate_parameter("local_context", 7.5)


@pytest.mark.parametrize("context", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_local_context_must_be_a_positive_int(context):
    with pytest.raises(ValueError, match=f"local_context must be a positive int; got {context!r}"):
        LocalAttention(context)


def test_local_attention_checks_its_inputs():
    q, k, v = qkv(2, 6, 6, 3, 4, 4, torch.float32)
    attn, query_lengths, key_lengths = masks("all-ones", 2, 6, 6)
    local = LocalAttention(3)
    with pytest.raises(ValueError, match="queries and keys must have the same head dimension"):
        local(q, k[..., :3], v, attn, query_lengths, key_lengths)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(6, 6\); got \(6, 5\)"):
        local(q, k, v, FullMask(6, 5), query_lengths, key_lengths)
