"""ExactTopKAttention against a float64 loop reference, and ConditionalFullAttention's
dispatch between full attention and the wrapped attention."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attention_core.attention.conditional_full_attention import ConditionalFullAttention
from attention_core.attention.exact_topk_attention import ExactTopKAttention
from attention_core.attention.full_attention import FullAttention
from attention_core.attention.linear_attention import LinearAttention
from attention_core.attention_registry import AttentionRegistry
from attention_core.events import AttentionEvent, EventDispatcher
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close, random_lengths, seeded

# helpers


def make_inputs(N, L, S, H, E, D, dtype=torch.float64, seed=0, requires_grad=False):
    g = seeded(seed)
    q = torch.randn(N, L, H, E, generator=g, dtype=dtype)
    k = torch.randn(N, S, H, E, generator=g, dtype=dtype)
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


def reference_topk(q, k, v, attn_mask, key_lengths, topk, temp):
    """For every query: the allowed keys, the ``topk`` of them with the largest ``q . k``,
    and a softmax over those; zeros when no key is allowed."""
    q, k, v = q.double(), k.double(), v.double()
    N, L, H, _ = q.shape
    S = k.shape[1]
    out = torch.zeros(N, L, H, v.shape[-1], dtype=torch.float64)
    for n in range(N):
        for h in range(H):
            for i in range(L):
                allowed = [
                    j
                    for j in range(S)
                    if attn_mask.bool_matrix[i, j] and key_lengths.bool_matrix[n, j]
                ]
                scores = {j: float(q[n, i, h] @ k[n, j, h]) for j in allowed}
                best = sorted(allowed, key=lambda j: -scores[j])[:topk]
                if best:
                    weights = torch.softmax(temp * (k[n, best, h] @ q[n, i, h]), dim=0)
                    out[n, i, h] = weights @ v[n, best, h]
    return out


# exact top-k


TOPK_CASES = [
    pytest.param(1, 1, 1, 1, 2, 3, 1, "none", id="L1-S1-k1"),
    pytest.param(2, 5, 7, 2, 4, 3, 3, "lengths", id="L5-S7-k3-lengths"),
    pytest.param(3, 11, 11, 2, 3, 5, 4, "causal", id="L11-k4-causal"),
    pytest.param(2, 7, 13, 3, 5, 2, 6, "random", id="L7-S13-k6-random"),
    pytest.param(2, 6, 5, 1, 4, 4, 5, "random", id="L6-S5-k-equals-S"),
    pytest.param(1, 4, 3, 2, 2, 2, 32, "lengths", id="k-above-S"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("N", "L", "S", "H", "E", "D", "topk", "kind"), TOPK_CASES)
def test_topk_matches_reference(N, L, S, H, E, D, topk, kind, dtype):
    q, k, v = make_inputs(N, L, S, H, E, D, dtype, seed=L * S)
    attn_mask, query_lengths, key_lengths = make_masks(kind, N, L, S, seed=L)
    attention = ExactTopKAttention(topk=topk, attention_dropout=0.0)
    out = attention(q, k, v, attn_mask, query_lengths, key_lengths)
    expected = reference_topk(q, k, v, attn_mask, key_lengths, topk, 1 / math.sqrt(E))
    assert_close("out", out, expected)


@pytest.mark.parametrize("kind", ["none", "lengths", "causal", "random"])
def test_topk_at_least_S_equals_full_attention(kind):
    N, L, S = 2, 9, 9
    q, k, v = make_inputs(N, L, S, 2, 4, 3)
    masks = make_masks(kind, N, L, S, seed=3)
    out = ExactTopKAttention(topk=S, softmax_temp=0.3, attention_dropout=0.0)(q, k, v, *masks)
    expected = FullAttention(softmax_temp=0.3, attention_dropout=0.0)(q, k, v, *masks)
    assert_close("out", out, expected)
    wide = ExactTopKAttention(topk=100, softmax_temp=0.3, attention_dropout=0.0)
    assert_close("out topk > S", wide(q, k, v, *masks), expected)


def test_topk_one_picks_the_best_key():
    q, k, v = make_inputs(2, 5, 8, 2, 3, 4)
    masks = make_masks("lengths", 2, 5, 8, seed=1)
    out = ExactTopKAttention(topk=1, attention_dropout=0.0)(q, k, v, *masks)
    scores = torch.einsum("nlhe,nshe->nlhs", q, k)
    scores = scores.masked_fill(~masks[2].bool_matrix[:, None, None, :], float("-inf"))
    best = scores.argmax(-1)  # (N, L, H)
    expected = torch.stack(
        [v[n, best[n, i, h], h] for n in range(2) for i in range(5) for h in range(2)]
    ).view(2, 5, 2, 4)
    assert_close("out", out, expected)


def test_topk_gradcheck():
    q, k, v = make_inputs(1, 4, 6, 2, 3, 2, requires_grad=True)
    masks = make_masks("random", 1, 4, 6, seed=2)
    attention = ExactTopKAttention(topk=3, attention_dropout=0.0)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, *masks), (q, k, v))


def test_topk_event_has_at_most_topk_keys_per_query():
    dispatcher = EventDispatcher()
    events = []
    dispatcher.listen(AttentionEvent, events.append)
    q, k, v = make_inputs(2, 6, 9, 2, 4, 3)
    masks = make_masks("lengths", 2, 6, 9, seed=4)
    attention = ExactTopKAttention(topk=3, attention_dropout=0.0, event_dispatcher=dispatcher)
    out = attention(q, k, v, *masks)
    (event,) = events
    A = event.attention_matrix
    assert A.shape == (2, 2, 6, 9)
    assert ((A > 0).sum(-1) <= 3).all()
    assert_close("A V", torch.einsum("nhls,nshd->nlhd", A, v), out)


def test_topk_fully_masked_rows_are_zero():
    q, k, v = make_inputs(2, 3, 4, 1, 2, 2, dtype=torch.float32)
    lengths = LengthMask(torch.tensor([4, 0]), max_len=4)
    out = ExactTopKAttention(topk=2)(
        q, k, v, FullMask(3, 4), LengthMask(torch.tensor([3, 3])), lengths
    )
    assert torch.isfinite(out).all()
    assert_close("padded", out[1], torch.zeros_like(out[1]))


def test_topk_registered():
    cls, params = AttentionRegistry["exact-topk"]
    assert cls is ExactTopKAttention
    assert params == ["topk", "softmax_temp", "attention_dropout", "event_dispatcher"]
    defaults = AttentionRegistry.class_parameters("exact-topk", dict.fromkeys(params))
    assert defaults == {
        "topk": 32,
        "softmax_temp": None,
        "attention_dropout": 0.1,
        "event_dispatcher": "",
    }
    attention = ExactTopKAttention()
    assert attention.topk == 32 and attention.softmax_temp is None
    assert attention.dropout.p == 0.1


@pytest.mark.parametrize("topk", [0, -2, 2.0], ids=["zero", "negative", "float"])
def test_topk_bad_argument(topk):
    with pytest.raises(ValueError, match=f"topk must be a positive int; got {topk!r}"):
        ExactTopKAttention(topk=topk)


def test_topk_bad_inputs():
    q, k, v = make_inputs(1, 3, 4, 1, 2, 2)
    masks = make_masks("none", 1, 3, 4)
    with pytest.raises(ValueError, match="same head dimension; got 2 and 3"):
        ExactTopKAttention()(q, torch.randn(1, 4, 1, 3, dtype=q.dtype), v, *masks)
    with pytest.raises(TypeError, match="values must have the dtype of queries"):
        ExactTopKAttention()(q, k, v.float(), *masks)


# conditional full attention


class Recorder(nn.Module):
    """A wrapped attention that returns a constant and counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        self.calls += 1
        N, L, H, _ = queries.shape
        return values.new_full((N, L, H, values.shape[-1]), 7.0) * self.weight


@pytest.mark.parametrize(
    ("L", "S", "uses_full"),
    [
        pytest.param(1, 1, True, id="L1-S1"),
        pytest.param(5, 5, True, id="at-limit"),
        pytest.param(6, 6, False, id="both-over"),
        pytest.param(3, 6, False, id="S-over"),
        pytest.param(6, 2, False, id="L-over"),
        pytest.param(2, 5, True, id="L2-S5"),
    ],
)
def test_conditional_dispatch(L, S, uses_full):
    q, k, v = make_inputs(2, L, S, 2, 3, 4)
    masks = make_masks("lengths", 2, L, S, seed=L + S)
    other = Recorder()
    attention = ConditionalFullAttention(other, length_limit=5, softmax_temp=0.5)
    attention.eval()
    out = attention(q, k, v, *masks)
    if uses_full:
        expected = FullAttention(softmax_temp=0.5).eval()(q, k, v, *masks)
        assert_close("out", out, expected)
        assert other.calls == 0
    else:
        assert_close("out", out, torch.full_like(out, 7.0))
        assert other.calls == 1


def test_conditional_with_linear_attention_for_long_sequences():
    q, k, v = make_inputs(2, 9, 9, 2, 4, 3)
    masks = make_masks("lengths", 2, 9, 9, seed=1)
    linear = LinearAttention(4)
    attention = ConditionalFullAttention(attention=linear, length_limit=8)
    assert_close("out", attention(q, k, v, *masks), linear(q, k, v, *masks))


def test_conditional_state_dict_and_submodules():
    attention = ConditionalFullAttention(Recorder(), attention_dropout=0.25)
    assert set(dict(attention.named_children())) == {"full_attention", "other_attention"}
    assert set(attention.state_dict()) == {"other_attention.weight"}
    assert attention.full_attention.dropout.p == 0.25
    assert attention.length_limit == 512


def test_conditional_passes_events_to_full_attention():
    dispatcher = EventDispatcher()
    events = []
    dispatcher.listen(AttentionEvent, events.append)
    attention = ConditionalFullAttention(Recorder(), length_limit=4, event_dispatcher=dispatcher)
    q, k, v = make_inputs(1, 3, 3, 1, 2, 2)
    attention(q, k, v, *make_masks("none", 1, 3, 3))
    assert len(events) == 1 and events[0].attention_matrix.shape == (1, 1, 3, 3)


def test_conditional_registered_like_a_builder_would_use_it():
    cls, params = AttentionRegistry["conditional-full"]
    assert cls is ConditionalFullAttention
    assert params == ["length_limit", "softmax_temp", "attention_dropout", "event_dispatcher"]
    kwargs = AttentionRegistry.class_parameters("conditional-full", dict.fromkeys(params))
    assert kwargs["length_limit"] == 512 and kwargs["attention_dropout"] == 0.1
    inner = Recorder()
    attention = cls(attention=inner, **kwargs)
    assert attention.other_attention is inner and attention.length_limit == 512


def test_conditional_bad_arguments():
    with pytest.raises(ValueError, match="length_limit must be a positive int; got 0"):
        ConditionalFullAttention(Recorder(), length_limit=0)
    with pytest.raises(TypeError, match=r"attention module used beyond length_limit.*got str"):
        ConditionalFullAttention("linear")
    q, k, v = make_inputs(1, 3, 3, 1, 2, 2)
    masks = make_masks("none", 1, 3, 3)
    with pytest.raises(ValueError, match=r"key_lengths must have shape \(1, 3\); got \(1, 4\)"):
        ConditionalFullAttention(Recorder())(q, k, v, *masks[:2], LengthMask(torch.tensor([4])))
