"""AFT-full and AFT-simple against dense float64 references of
``Y_t = sigmoid(Q_t) * sum_s exp(K_s + w_ts) V_s / sum_s exp(K_s + w_ts)`` (per feature)."""

from __future__ import annotations

import pytest
import torch

from attention_core.attention.aft_attention import AFTFullAttention, AFTSimpleAttention
from attention_core.attention_registry import AttentionRegistry
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close, random_lengths, seeded

# helpers


def make_inputs(N, L, S, H, D, dtype=torch.float64, seed=0, key_scale=1.0, requires_grad=False):
    g = seeded(seed)
    q = torch.randn(N, L, H, D, generator=g, dtype=dtype)
    k = torch.randn(N, S, H, D, generator=g, dtype=dtype) * key_scale
    v = torch.randn(N, S, H, D, generator=g, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def make_masks(kind, N, L, S, seed=0):
    g = seeded(seed)
    attn_mask = FullMask(L, S)
    if kind == "causal":
        attn_mask = TriangularCausalMask(L)
    elif kind == "random":
        attn_mask = FullMask(torch.rand(L, S, generator=g) < 0.6)
    query_lengths = LengthMask(random_lengths(N, L, generator=g), max_len=L)
    key_lengths = LengthMask(random_lengths(N, S, generator=g), max_len=S)
    if kind == "none":
        query_lengths = LengthMask(torch.full((N,), L), max_len=L)
        key_lengths = LengthMask(torch.full((N,), S), max_len=S)
    return attn_mask, query_lengths, key_lengths


def reference_aft(q, k, v, w, attn_mask, key_lengths):
    """Dense float64 AFT: for each query ``t`` a softmax over the allowed keys ``s`` of
    ``K_s + w_ts``, feature by feature; zeros when no key is allowed."""
    q, k, v, w = q.double(), k.double(), v.double(), w.double()
    out = []
    for t in range(q.shape[1]):
        allowed = attn_mask.bool_matrix[t][None, :] & key_lengths.bool_matrix  # (N, S)
        logits = k + w[t][None, :, None, None]
        logits = logits.masked_fill(~allowed[:, :, None, None], float("-inf"))
        top = logits.amax(dim=1, keepdim=True).nan_to_num(neginf=0.0)
        weights = torch.exp(logits - top)
        total = weights.sum(dim=1)
        mixed = (weights * v).sum(dim=1) / torch.where(total > 0, total, 1.0)
        out.append(torch.sigmoid(q[:, t]) * mixed)
    return torch.stack(out, dim=1)


def aft_full(max_sequence_length, rank, seed=0, dtype=torch.float64):
    """An AFTFullAttention whose position bias is large enough to matter."""
    attention = AFTFullAttention(max_sequence_length, rank).to(dtype)
    g = seeded(seed)
    with torch.no_grad():
        attention.u.copy_(torch.randn(attention.u.shape, generator=g, dtype=dtype))
        attention.v.copy_(torch.randn(attention.v.shape, generator=g, dtype=dtype) * 0.7)
    return attention


# AFT-full


FULL_CASES = [
    pytest.param(1, 1, 1, 1, 1, "none", id="L1-S1"),
    pytest.param(2, 7, 7, 3, 4, "lengths", id="L7-lengths"),
    pytest.param(3, 11, 11, 2, 5, "causal", id="L11-causal"),
    pytest.param(2, 5, 13, 1, 3, "random", id="L5-S13-random"),
    pytest.param(2, 13, 5, 2, 2, "random", id="L13-S5-random"),
    pytest.param(2, 4, 9, 2, 3, "lengths", id="L4-S9-lengths"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("N", "L", "S", "H", "D", "kind"), FULL_CASES)
def test_aft_full_matches_reference(N, L, S, H, D, kind, dtype):
    q, k, v = make_inputs(N, L, S, H, D, dtype, seed=L * S)
    masks = make_masks(kind, N, L, S, seed=L)
    attention = aft_full(16, 3, seed=S, dtype=dtype)
    out = attention(q, k, v, *masks)
    w = attention.u[:L].double() @ attention.v[:S].double().T
    assert_close("out", out, reference_aft(q, k, v, w, masks[0], masks[2]))


def test_aft_full_gradients_match_reference():
    N, L, S, H, D = 2, 6, 8, 2, 3
    q, k, v = make_inputs(N, L, S, H, D, requires_grad=True)
    masks = make_masks("random", N, L, S, seed=5)
    attention = aft_full(10, 4)
    out = attention(q, k, v, *masks)
    grad_out = torch.randn(out.shape, generator=seeded(9), dtype=out.dtype)
    inputs = (q, k, v, attention.u, attention.v)
    grads = torch.autograd.grad(out, inputs, grad_out)
    w = attention.u[:L] @ attention.v[:S].T
    expected = reference_aft(q, k, v, w, masks[0], masks[2])
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    assert_close("out", out, expected)
    for name, g, e in zip(("dq", "dk", "dv", "du", "dv_bias"), grads, expected_grads):
        assert_close(name, g, e)
    assert grads[3][:L].abs().sum() > 0 and (grads[3][L:] == 0).all()


def test_aft_full_gradcheck():
    q, k, v = make_inputs(1, 3, 4, 2, 2, requires_grad=True)
    masks = make_masks("random", 1, 3, 4, seed=1)
    attention = aft_full(4, 2)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, *masks), (q, k, v))


def test_aft_full_large_keys_are_stable():
    q, k, v = make_inputs(2, 9, 9, 2, 4, torch.float32, key_scale=200.0)
    masks = make_masks("lengths", 2, 9, 9, seed=2)
    attention = aft_full(9, 2, dtype=torch.float32)
    out = attention(q, k, v, *masks)
    w = attention.u[:9].double() @ attention.v[:9].double().T
    assert torch.isfinite(out).all()
    expected = reference_aft(q.double(), k.double(), v.double(), w, masks[0], masks[2])
    assert_close("out", out, expected, rtol=1e-4, atol=1e-4)


def test_aft_full_fully_masked_rows_are_zero():
    q, k, v = make_inputs(2, 4, 4, 1, 3, requires_grad=True)
    attn_mask = FullMask(torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]]) > 0)
    key_lengths = LengthMask(torch.tensor([4, 0]))
    attention = aft_full(4, 2)
    out = attention(q, k, v, attn_mask, LengthMask(torch.tensor([4, 4])), key_lengths)
    assert (out[:, 0] == 0).all() and (out[1] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, attention.u, attention.v))


def test_aft_full_parameters():
    attention = AFTFullAttention()
    assert attention.u.shape == attention.v.shape == (1024, 64)
    assert set(dict(attention.named_parameters())) == {"u", "v"}
    assert 0.005 < attention.u.std().item() < 0.02
    small = AFTFullAttention(max_sequence_length=5, aft_parameterization=3)
    assert small.u.shape == (5, 3)
    assert_close("w", small.position_bias(4, 2), small.u[:4] @ small.v[:2].T)


def test_aft_full_errors():
    q, k, v = make_inputs(1, 6, 6, 1, 2)
    masks = make_masks("none", 1, 6, 6)
    with pytest.raises(ValueError, match="max_sequence_length=5; got L=6 and S=6"):
        AFTFullAttention(5, 2)(q, k, v, *masks)
    with pytest.raises(ValueError, match="same head dimension; got 2 and 3"):
        AFTFullAttention(8, 2)(q, k, torch.randn(1, 6, 1, 3, dtype=q.dtype), *masks)
    with pytest.raises(ValueError, match="max_sequence_length must be a positive int; got 0"):
        AFTFullAttention(0)
    with pytest.raises(ValueError, match="aft_parameterization must be a positive int; got -1"):
        AFTFullAttention(4, -1)


# AFT-simple


SIMPLE_CASES = [
    pytest.param(1, 1, 1, 1, 1, id="L1-S1"),
    pytest.param(2, 7, 7, 3, 4, id="L7"),
    pytest.param(3, 5, 11, 2, 3, id="L5-S11"),
    pytest.param(2, 13, 2, 1, 5, id="L13-S2"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize(("N", "L", "S", "H", "D"), SIMPLE_CASES)
def test_aft_simple_global_matches_reference(N, L, S, H, D, padded, dtype):
    q, k, v = make_inputs(N, L, S, H, D, dtype, seed=L + S)
    masks = make_masks("lengths" if padded else "none", N, L, S, seed=S)
    out = AFTSimpleAttention()(q, k, v, *masks)
    zero_bias = torch.zeros(L, S, dtype=torch.float64)
    assert_close("out", out, reference_aft(q, k, v, zero_bias, masks[0], masks[2]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_aft_simple_causal_matches_reference_for_every_length(dtype):
    attention = AFTSimpleAttention()
    for L in range(1, 38):
        q, k, v = make_inputs(2, L, L, 2, 3, dtype, seed=L)
        masks = make_masks("causal", 2, L, L, seed=L)
        out = attention(q, k, v, *masks)
        zero_bias = torch.zeros(L, L, dtype=torch.float64)
        assert_close(f"out L={L}", out, reference_aft(q, k, v, zero_bias, masks[0], masks[2]))


@pytest.mark.parametrize("kind", ["none", "causal"])
def test_aft_simple_large_keys_are_stable(kind):
    q, k, v = make_inputs(2, 23, 23, 2, 4, torch.float32, seed=4, key_scale=200.0)
    masks = make_masks("lengths" if kind == "none" else kind, 2, 23, 23, seed=4)
    out = AFTSimpleAttention()(q, k, v, *masks)
    assert torch.isfinite(out).all()
    zero_bias = torch.zeros(23, 23, dtype=torch.float64)
    expected = reference_aft(q.double(), k.double(), v.double(), zero_bias, masks[0], masks[2])
    assert_close("out", out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["none", "causal"])
def test_aft_simple_ignores_padded_keys_and_values(kind):
    q, k, v = make_inputs(2, 9, 9, 2, 3, torch.float32, seed=8)
    masks = make_masks("lengths" if kind == "none" else kind, 2, 9, 9, seed=8)
    padded = ~masks[2].bool_matrix[:, :, None, None]
    assert padded.any()
    out = AFTSimpleAttention()(q, k, v, *masks)
    garbage = AFTSimpleAttention()(
        q, k.masked_fill(padded, 1e4), v.masked_fill(padded, -1e6), *masks
    )
    assert_close("out", garbage, out)


@pytest.mark.parametrize("kind", ["none", "causal"])
def test_aft_simple_gradients_match_reference_with_zero_values(kind):
    N, L, H, D = 2, 7, 2, 3
    q, k, v = make_inputs(N, L, L, H, D)
    v[:, 2:4] = 0.0  # exact zeros, e.g. from a relu
    for t in (q, k, v):
        t.requires_grad_()
    masks = make_masks("lengths" if kind == "none" else kind, N, L, L, seed=6)
    out = AFTSimpleAttention()(q, k, v, *masks)
    expected = reference_aft(q, k, v, torch.zeros(L, L, dtype=q.dtype), masks[0], masks[2])
    grad_out = torch.randn(out.shape, generator=seeded(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(name, g, e)


@pytest.mark.parametrize("kind", ["none", "causal"])
def test_aft_simple_gradcheck(kind):
    q, k, v = make_inputs(2, 5, 5, 1, 2, requires_grad=True)
    masks = make_masks("lengths" if kind == "none" else kind, 2, 5, 5, seed=3)
    attention = AFTSimpleAttention()
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, *masks), (q, k, v))


@pytest.mark.parametrize("kind", ["none", "causal"])
def test_aft_simple_fully_padded_sequence_is_zero(kind):
    q, k, v = make_inputs(2, 4, 4, 1, 2, torch.float32, requires_grad=True)
    attn_mask = FullMask(4) if kind == "none" else TriangularCausalMask(4)
    key_lengths = LengthMask(torch.tensor([4, 0]), max_len=4)
    out = AFTSimpleAttention()(q, k, v, attn_mask, LengthMask(torch.tensor([4, 4])), key_lengths)
    assert (out[1] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_aft_simple_rejects_other_masks():
    q, k, v = make_inputs(1, 4, 4, 1, 2)
    masks = make_masks("random", 1, 4, 4, seed=0)
    with pytest.raises(ValueError, match="only an all-ones or a lower triangular attn_mask"):
        AFTSimpleAttention()(q, k, v, *masks)
    with pytest.raises(ValueError, match="same head dimension; got 2 and 3"):
        AFTSimpleAttention()(q, k, torch.randn(1, 4, 1, 3, dtype=q.dtype), *masks)


def test_aft_registered():
    cls, params = AttentionRegistry["aft-full"]
    assert cls is AFTFullAttention
    assert params == ["max_sequence_length", "aft_parameterization", "event_dispatcher"]
    defaults = AttentionRegistry.class_parameters("aft-full", dict.fromkeys(params))
    assert defaults == {
        "max_sequence_length": 1024,
        "aft_parameterization": 64,
        "event_dispatcher": "",
    }
    cls, params = AttentionRegistry["aft-simple"]
    assert cls is AFTSimpleAttention and params == ["event_dispatcher"]
