"""Full, linear and causal-linear attention against float64 references of their formulas,
and the causal dot product op."""

import pytest
import torch

from attention_core.attention import (
    AttentionLayer,
    CausalLinearAttention,
    FullAttention,
    LinearAttention,
)
from attention_core.causal_product import (
    causal_dot_product,
    causal_dot_product_chunked,
    causal_dot_product_reference,
)
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close

SHAPES = [  # N, L, S, H, E, D
    pytest.param(1, 1, 1, 1, 1, 1, id="tiny"),
    pytest.param(2, 7, 7, 3, 5, 4, id="primes"),
    pytest.param(3, 13, 29, 2, 8, 6, id="cross-lengths"),
    pytest.param(2, 70, 70, 1, 16, 3, id="longer-than-a-chunk"),
]


def qkv(N, L, S, H, E, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, L, H, E, generator=g, dtype=dtype),
        torch.randn(N, S, H, E, generator=g, dtype=dtype),
        torch.randn(N, S, H, D, generator=g, dtype=dtype),
    )


def key_lengths_for(N, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (N,), generator=g)
    lengths[0] = S
    return LengthMask(lengths, max_len=S)


def softmax_reference(q, k, v, allowed, temp):
    """Loop-free but obviously right: dense scores, -inf where not allowed."""
    scores = torch.einsum("nlhe,nshe->nhls", q, k) * temp
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("nhls,nshd->nlhd", weights, v)


@pytest.mark.parametrize(("N", "L", "S", "H", "E", "D"), SHAPES)
def test_full_attention(N, L, S, H, E, D):
    q, k, v = qkv(N, L, S, H, E, D)
    g = torch.Generator().manual_seed(2)
    attn = torch.rand(L, S, generator=g) > 0.3
    key_lengths = key_lengths_for(N, S)
    out = FullAttention(attention_dropout=0.0)(
        q, k, v, FullMask(attn), LengthMask(torch.full((N,), L)), key_lengths
    )
    allowed = attn[None, None] & key_lengths.bool_matrix[:, None, None, :]
    assert_close("full", out, softmax_reference(q, k, v, allowed, E**-0.5))


def test_full_attention_fully_masked_rows_are_zero_not_nan():
    q, k, v = qkv(2, 4, 4, 1, 3, 3)
    attn = torch.ones(4, 4, dtype=torch.bool)
    attn[1] = False
    out = FullAttention(attention_dropout=0.0, softmax_temp=0.5)(
        q, k, v, FullMask(attn), LengthMask(torch.tensor([4, 4])), LengthMask(torch.tensor([4, 4]))
    )
    assert torch.isfinite(out).all() and (out[:, 1] == 0).all()


@pytest.mark.parametrize(("N", "L", "S", "H", "E", "D"), SHAPES)
def test_linear_attention(N, L, S, H, E, D):
    q, k, v = qkv(N, L, S, H, E, D)
    key_lengths = key_lengths_for(N, S)
    out = LinearAttention(E)(q, k, v, FullMask(L, S), LengthMask(torch.full((N,), L)), key_lengths)
    phi_q = torch.nn.functional.elu(q) + 1
    phi_k = torch.nn.functional.elu(k) + 1
    scores = torch.einsum("nlhe,nshe->nhls", phi_q, phi_k)
    scores = scores * key_lengths.float_matrix.double()[:, None, None, :]
    expected = torch.einsum("nhls,nshd->nlhd", scores, v) / (
        scores.sum(-1).transpose(1, 2)[..., None] + 1e-6
    )
    assert_close("linear", out, expected)


def test_linear_attention_rejects_masks():
    q, k, v = qkv(1, 4, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="does not support arbitrary attention masks"):
        LinearAttention(2)(
            q,
            k,
            v,
            TriangularCausalMask(4),
            LengthMask(torch.tensor([4])),
            LengthMask(torch.tensor([4])),
        )


@pytest.mark.parametrize(
    ("N", "L", "S", "H", "E", "D"), [s for s in SHAPES if s.id != "cross-lengths"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_causal_linear_attention(N, L, S, H, E, D, dtype):
    q, k, v = qkv(N, L, S, H, E, D, dtype=dtype)
    key_lengths = key_lengths_for(N, S)
    out = CausalLinearAttention(E)(
        q, k, v, TriangularCausalMask(L), LengthMask(torch.full((N,), L)), key_lengths
    )
    q64, k64, v64 = (t.double() for t in (q, k, v))
    phi_q = torch.nn.functional.elu(q64) + 1
    phi_k = torch.nn.functional.elu(k64) + 1
    scores = torch.einsum("nlhe,nshe->nhls", phi_q, phi_k).tril()
    scores = scores * key_lengths.float_matrix.double()[:, None, None, :]
    expected = torch.einsum("nhls,nshd->nlhd", scores, v64) / (
        scores.sum(-1).transpose(1, 2)[..., None] + 1e-6
    )
    assert_close("causal-linear", out, expected, rtol=1e-4 if dtype == torch.float32 else None)


def test_causal_linear_needs_a_causal_mask():
    q, k, v = qkv(1, 4, 4, 1, 2, 2)
    lengths = LengthMask(torch.tensor([4]))
    with pytest.raises(ValueError, match="lower triangular"):
        CausalLinearAttention(2)(q, k, v, FullMask(4), lengths, lengths)


def test_causal_linear_handles_different_key_length():
    q, k, v = qkv(1, 5, 8, 1, 3, 2)
    attention = CausalLinearAttention(3)
    lengths = LengthMask(torch.tensor([5]))
    out = attention(q, k, v, TriangularCausalMask(5), lengths, LengthMask(torch.tensor([8])))
    same = attention(
        q, k[:, :5], v[:, :5], TriangularCausalMask(5), lengths, LengthMask(torch.tensor([5]))
    )
    assert_close("truncated keys", out, same)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1, 1), (2, 3, 7, 5, 4), (1, 2, 130, 8, 16), (2, 1, 64, 3, 3)],
    ids=["tiny", "primes", "chunks-plus-two", "exact-chunk"],
)
def test_causal_dot_product_forms_agree(shape):
    N, H, L, E, M = shape
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(N, H, L, E, dtype=torch.float64, generator=g)
    K = torch.randn(N, H, L, E, dtype=torch.float64, generator=g)
    V = torch.randn(N, H, L, M, dtype=torch.float64, generator=g)
    loop = torch.zeros(N, H, L, M, dtype=torch.float64)
    for i in range(L):
        for j in range(i + 1):
            loop[:, :, i] += (Q[:, :, i] * K[:, :, j]).sum(-1, keepdim=True) * V[:, :, j]
    assert_close("reference", causal_dot_product_reference(Q, K, V), loop)
    assert_close("chunked", causal_dot_product_chunked(Q, K, V, chunk_size=5), loop)
    assert_close("public", causal_dot_product(Q, K, V), loop)


def test_causal_dot_product_gradients():
    g = torch.Generator().manual_seed(3)
    Q, K, V = (
        torch.randn(1, 2, 11, 3, dtype=torch.float64, generator=g, requires_grad=True)
        for _ in range(3)
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v: causal_dot_product_chunked(q, k, v, chunk_size=4), (Q, K, V)
    )


def test_causal_dot_product_noncontiguous_input():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 9, 3, 5, dtype=torch.float64, generator=g)
    Q = K = V = base.transpose(1, 2)  # (N, H, L, E) view, not contiguous
    assert not Q.is_contiguous()
    assert_close(
        "transposed",
        causal_dot_product(Q, K, V),
        causal_dot_product_reference(*(t.contiguous() for t in (Q, K, V))),
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.rand(2, 3, 4)), "Q must have 4 dim"),
        ((torch.rand(1, 1, 3, 4), torch.rand(1, 1, 3, 5), torch.rand(1, 1, 3, 2)), "same shape"),
        ((torch.rand(1, 1, 3, 4), torch.rand(1, 1, 3, 4), torch.rand(1, 1, 2, 2)), "V must have"),
        (
            (torch.rand(1, 1, 3, 4), torch.rand(1, 1, 3, 4).double(), torch.rand(1, 1, 3, 2)),
            "share a dtype",
        ),
    ],
    ids=["rank", "qk-shape", "v-shape", "dtype"],
)
def test_causal_dot_product_errors(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        causal_dot_product(*args)


def test_attention_layer_shapes_and_errors():
    layer = AttentionLayer(FullAttention(), d_model=12, n_heads=3, d_keys=5, d_values=7)
    assert layer.query_projection.weight.shape == (15, 12)
    assert layer.value_projection.weight.shape == (21, 12)
    assert layer.out_projection.weight.shape == (12, 21)
    x = torch.rand(2, 6, 12)
    lengths = LengthMask(torch.tensor([6, 6]))
    assert layer(x, x, x, FullMask(6), lengths, lengths).shape == (2, 6, 12)
    with pytest.raises(ValueError, match=r"d_model=12 features; got shape \(2, 6, 10\)"):
        bad = torch.rand(2, 6, 10)
        layer(bad, bad, bad, FullMask(6), lengths, lengths)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(6, 6\); got \(5, 5\)"):
        layer(x, x, x, FullMask(5), lengths, lengths)
    with pytest.raises(ValueError, match=r"key_lengths must have shape \(2, 6\)"):
        layer(x, x, x, FullMask(6), lengths, LengthMask(torch.tensor([3])))
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        AttentionLayer(FullAttention(), 12, 0)
