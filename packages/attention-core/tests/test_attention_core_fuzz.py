"""Property-based fuzzing (hypothesis) of the attention layers and the causal product over
shapes and masks: random batch sizes, heads, lengths (1 and primes included), feature sizes,
padded key lengths and causal or random masks. Each attention is compared with a dense float64
softmax or linear-attention formula written here, so whatever implementation the layer
dispatches to (compiled kernel or plain PyTorch) is checked; nothing may crash, hang or return
a non-finite value on valid input, and invalid masks must raise ValueError."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_core.attention import (
    CausalLinearAttention,
    ExactTopKAttention,
    FullAttention,
    LinearAttention,
    LocalAttention,
)
from attention_core.causal_product import causal_dot_product, normalized_causal_dot_product
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close

FUZZ = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def problems(draw, causal: bool = False):
    """Random ``(Q, K, V, attn_mask, query_lengths, key_lengths)`` in float64."""
    N = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    L = draw(st.integers(1, 23))
    S = L if causal else draw(st.integers(1, 23))
    E = draw(st.integers(1, 9))
    D = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(N, L, H, E, generator=g, dtype=torch.float64)
    K = torch.randn(N, S, H, E, generator=g, dtype=torch.float64)
    V = torch.randn(N, S, H, D, generator=g, dtype=torch.float64)
    if causal:
        attn_mask = TriangularCausalMask(L)
        key_lengths = LengthMask(torch.full((N,), S), max_len=S)
    else:
        keep = torch.rand(L, S, generator=g) < draw(st.floats(0.3, 1.0))
        keep[:, 0] = True  # every query sees at least one key
        attn_mask = FullMask(keep)
        lengths = torch.randint(1, S + 1, (N,), generator=g)
        key_lengths = LengthMask(lengths, max_len=S)
    query_lengths = LengthMask(torch.full((N,), L), max_len=L)
    return Q, K, V, attn_mask, query_lengths, key_lengths


def dense_softmax(Q, K, V, allowed, temp=None):
    """``softmax(temp Q K^T)`` over allowed ``(N, L, S)`` keys; rows with none give zeros."""
    temp = temp or 1 / math.sqrt(Q.shape[-1])
    scores = torch.einsum("nlhe,nshe->nhls", Q, K) * temp
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("nhls,nshd->nlhd", weights, V)


def allowed_of(attn_mask, key_lengths):
    return attn_mask.bool_matrix[None] & key_lengths.bool_matrix[:, None, :]


@FUZZ
@given(problems())
def test_full_attention_matches_dense_softmax(problem):
    Q, K, V, attn_mask, query_lengths, key_lengths = problem
    out = FullAttention(attention_dropout=0.0)(Q, K, V, attn_mask, query_lengths, key_lengths)
    assert out.shape == (Q.shape[0], Q.shape[1], Q.shape[2], V.shape[-1])
    assert torch.isfinite(out).all()
    assert_close("full", out, dense_softmax(Q, K, V, allowed_of(attn_mask, key_lengths)))


@FUZZ
@given(problems(), st.integers(1, 12))
def test_local_attention_matches_a_banded_softmax(problem, local_context):
    Q, K, V, attn_mask, query_lengths, key_lengths = problem
    L, S = Q.shape[1], K.shape[1]
    layer = LocalAttention(local_context, attention_dropout=0.0)
    out = layer(Q, K, V, attn_mask, query_lengths, key_lengths)
    start = torch.arange(L)[:, None] - local_context // 2
    band = (torch.arange(S)[None] >= start) & (torch.arange(S)[None] < start + local_context)
    allowed = allowed_of(attn_mask, key_lengths) & band[None]
    expected = dense_softmax(Q, K, V, allowed)
    seen = allowed.any(-1)  # queries with no allowed key in their window are unspecified
    assert torch.isfinite(out).all()
    assert_close("local", out[seen], expected[seen])


@FUZZ
@given(problems())
def test_exact_topk_with_every_key_is_full_attention(problem):
    Q, K, V, attn_mask, query_lengths, key_lengths = problem
    layer = ExactTopKAttention(topk=K.shape[1], attention_dropout=0.0)
    out = layer(Q, K, V, attn_mask, query_lengths, key_lengths)
    assert_close("topk", out, dense_softmax(Q, K, V, allowed_of(attn_mask, key_lengths)))


def elu1(x):
    return torch.nn.functional.elu(x) + 1


@FUZZ
@given(problems())
def test_linear_attention_matches_the_dense_formula(problem):
    Q, K, V, _, query_lengths, key_lengths = problem
    E = Q.shape[-1]
    out = LinearAttention(E)(Q, K, V, FullMask(Q.shape[1], K.shape[1]), query_lengths, key_lengths)
    phi_k = elu1(K) * key_lengths.float_matrix[:, :, None, None]
    scores = torch.einsum("nlhe,nshe->nhls", elu1(Q), phi_k)
    expected = torch.einsum("nhls,nshd->nlhd", scores, V) / (
        scores.sum(-1).transpose(1, 2)[..., None] + 1e-6
    )
    assert_close("linear", out, expected)


@FUZZ
@given(problems(causal=True))
def test_causal_linear_attention_matches_the_dense_formula(problem):
    Q, K, V, attn_mask, query_lengths, key_lengths = problem
    E = Q.shape[-1]
    out = CausalLinearAttention(E)(Q, K, V, attn_mask, query_lengths, key_lengths)
    scores = torch.einsum("nlhe,nshe->nhls", elu1(Q), elu1(K)).tril()
    expected = torch.einsum("nhls,nshd->nlhd", scores, V) / (
        scores.sum(-1).transpose(1, 2)[..., None] + 1e-6
    )
    assert_close("causal-linear", out, expected)


@FUZZ
@given(
    st.integers(0, 3), st.integers(0, 3), st.integers(0, 130), st.integers(1, 17),
    st.integers(1, 17), st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]),
)  # fmt: skip
def test_causal_product_over_shapes_and_split_points(N, H, L, E, M, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    Q, K = (torch.rand(N, H, L, E, generator=g, dtype=dtype) for _ in range(2))
    V = torch.randn(N, H, L, M, generator=g, dtype=dtype)
    expected = torch.einsum("nhls,nhsm->nhlm", torch.einsum("nhle,nhse->nhls", Q, K).tril(), V)
    assert_close("causal product", causal_dot_product(Q, K, V), expected)
    split = L // 3
    first, state = normalized_causal_dot_product(
        Q[:, :, :split], K[:, :, :split], V[:, :, :split], return_state=True
    )
    rest = normalized_causal_dot_product(
        Q[:, :, split:], K[:, :, split:], V[:, :, split:], state=state
    )
    whole = normalized_causal_dot_product(Q, K, V)
    assert_close("carried state", torch.cat([first, rest], dim=2), whole)
    assert torch.isfinite(whole).all()


@FUZZ
@given(problems(), st.integers(1, 5), st.integers(1, 5))
def test_masks_of_the_wrong_size_are_value_errors(problem, extra_l, extra_s):
    Q, K, V, _, query_lengths, key_lengths = problem
    L, S = Q.shape[1], K.shape[1]
    for layer in (FullAttention(), LocalAttention(3), LinearAttention(Q.shape[-1])):
        with pytest.raises(ValueError, match="attn_mask"):
            layer(Q, K, V, FullMask(L + extra_l, S + extra_s), query_lengths, key_lengths)
    bad_lengths = LengthMask(torch.full((Q.shape[0],), S), max_len=S + extra_s)
    with pytest.raises(ValueError, match="key_lengths"):
        FullAttention()(Q, K, V, FullMask(L, S), query_lengths, bad_lengths)
