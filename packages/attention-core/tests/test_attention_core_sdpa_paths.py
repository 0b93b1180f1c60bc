"""The fused paths (PyTorch's scaled_dot_product_attention) of FullAttention and
ClusteredAttention equal their explicit paths (the einsum/softmax ones that run for event
listeners) in float64, outputs and every gradient, for every mask kind; the fused path really
runs SDPA's kernel and no explicit softmax; dropout is SDPA's ``dropout_p`` in training only."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention_core.attention import (
    ClusteredAttention,
    ConditionalFullAttention,
    ExactTopKAttention,
    FullAttention,
)
from attention_core.events import AttentionEvent, EventDispatcher
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close

N, H, E, D = 3, 2, 5, 4


def masks(kind: str, L: int, S: int):
    """``(attn_mask, key_lengths)`` of one kind; the last sequence is fully padded where a
    length mask is involved, and some rows of the arbitrary mask see no key."""
    g = torch.Generator().manual_seed(L * 100 + S)
    lengths = LengthMask(torch.tensor([S, max(S - 3, 1), 0]), max_len=S)
    no_padding = LengthMask(torch.full((N,), S), max_len=S)
    arbitrary = torch.rand(L, S, generator=g) < 0.5
    arbitrary[0] = False  # a query that sees nothing
    return {
        "none": (FullMask(L, S), no_padding),
        "causal": (TriangularCausalMask(L), no_padding),
        "tril-full-mask": (FullMask(torch.ones(L, L, dtype=torch.bool).tril()), no_padding),
        "arbitrary": (FullMask(arbitrary), no_padding),
        "lengths": (FullMask(L, S), lengths),
        "causal+lengths": (TriangularCausalMask(L), lengths),
        "arbitrary+lengths": (FullMask(arbitrary), lengths),
    }[kind]


KINDS = ["none", "causal", "tril-full-mask", "arbitrary", "lengths", "causal+lengths",
         "arbitrary+lengths"]  # fmt: skip
SQUARE_ONLY = {"causal", "tril-full-mask", "causal+lengths"}


def inputs(L: int, S: int, e: int = E, d: int = D):
    g = torch.Generator().manual_seed(7)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return make(N, L, H, e), make(N, S, H, e), make(N, S, H, d)


def run(attention, q, k, v, attn_mask, key_lengths):
    query_lengths = LengthMask(torch.full((N,), q.shape[1]), max_len=q.shape[1])
    out = attention(q, k, v, attn_mask, query_lengths, key_lengths)
    grads = torch.autograd.grad(
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v)
    )
    return out, grads


def explicit(attention, *args):
    """Run with a listener registered, which sends FullAttention down its explicit path."""
    seen = []
    attention.event_dispatcher.listen(AttentionEvent, seen.append)
    try:
        result = run(attention, *args)
    finally:
        attention.event_dispatcher.clear()
    assert len(seen) == 1 and seen[0].attention_matrix.shape[:2] == (N, H)
    return result


SHAPES = [(1, 1), (7, 7), (16, 16), (6, 11), (9, 2)]
CASES = [(kind, L, S) for kind in KINDS for L, S in SHAPES if kind not in SQUARE_ONLY or L == S]


@pytest.mark.parametrize("backend", [SDPBackend.MATH, None], ids=["math", "default"])
@pytest.mark.parametrize(("kind", "L", "S"), CASES, ids=[f"{k}-{L}x{S}" for k, L, S in CASES])
def test_fused_path_equals_explicit_path(kind, L, S, backend):
    attention = FullAttention(softmax_temp=0.3, event_dispatcher=EventDispatcher()).eval()
    q, k, v = inputs(L, S)
    attn_mask, key_lengths = masks(kind, L, S)
    expected, expected_grads = explicit(attention, q, k, v, attn_mask, key_lengths)
    if backend is None:
        actual, grads = run(attention, q, k, v, attn_mask, key_lengths)
    else:
        with sdpa_kernel(backend):
            actual, grads = run(attention, q, k, v, attn_mask, key_lengths)
    assert torch.isfinite(actual).all()
    assert_close(f"{kind} output", actual, expected)
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        assert_close(f"{kind} d{name}", got, want)


def test_queries_that_see_no_key_get_zeros_on_the_fused_path():
    attention = FullAttention(event_dispatcher=EventDispatcher()).eval()
    q, k, v = inputs(5, 5)
    attn_mask, key_lengths = masks("arbitrary+lengths", 5, 5)
    with sdpa_kernel(SDPBackend.MATH):  # the backend that gives NaN for empty rows by itself
        out, grads = run(attention, q, k, v, attn_mask, key_lengths)
    assert (out[:, 0] == 0).all() and (out[2] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)


def profiled_ops(attention, *args) -> set[str]:
    with torch.profiler.profile() as prof:
        run(attention, *args)
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("kind", ["none", "causal", "lengths", "arbitrary+lengths"])
def test_fused_path_runs_the_fused_kernel(kind):
    """On the CPU, forward and backward run SDPA's flash kernel (it needs ``E == D``; with
    ``E != D`` SDPA itself falls back to its math backend) and no explicit softmax."""
    attention = FullAttention(event_dispatcher=EventDispatcher()).eval()
    args = (*inputs(8, 8, e=4, d=4), *masks(kind, 8, 8))
    ops = profiled_ops(attention, *args)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert "aten::_softmax" not in ops and "aten::einsum" not in ops
    attention.event_dispatcher.listen(AttentionEvent, lambda event: None)
    ops = profiled_ops(attention, *args)
    assert "aten::scaled_dot_product_attention" not in ops and "aten::_softmax" in ops


def test_causal_mask_becomes_is_causal():
    """A causal mask with no padding reaches SDPA as ``is_causal``, with no mask tensor."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    attention = FullAttention(event_dispatcher=EventDispatcher()).eval()
    q, k, v = inputs(6, 6)
    full = LengthMask(torch.full((N,), 6), max_len=6)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        attention(q, k, v, TriangularCausalMask(6), full, full)
    assert calls and calls[0]["is_causal"] is True and calls[0].get("attn_mask") is None


def test_dropout_is_applied_in_training_only():
    attention = FullAttention(attention_dropout=0.5, event_dispatcher=EventDispatcher())
    q, k, v = inputs(12, 12)
    attn_mask, key_lengths = masks("none", 12, 12)
    lengths = LengthMask(torch.full((N,), 12), max_len=12)
    with torch.no_grad():
        evaluated = attention.eval()(q, k, v, attn_mask, lengths, key_lengths)
        plain = FullAttention(attention_dropout=0.0, event_dispatcher=EventDispatcher())
        assert_close("eval", evaluated, plain(q, k, v, attn_mask, lengths, key_lengths))
        torch.manual_seed(0)
        trained = attention.train()(q, k, v, attn_mask, lengths, key_lengths)
    assert torch.isfinite(trained).all() and not torch.allclose(trained, evaluated)


def test_gradcheck_of_the_fused_path_with_lengths():
    attention = FullAttention(event_dispatcher=EventDispatcher()).eval()
    q, k, v = inputs(4, 5)
    attn_mask, key_lengths = masks("arbitrary+lengths", 4, 5)
    lengths = LengthMask(torch.full((N,), 4), max_len=4)
    fn = lambda q, k, v: attention(q, k, v, attn_mask, lengths, key_lengths)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_conditional_full_falls_back_to_the_fused_path():
    attention = ConditionalFullAttention(torch.nn.Identity(), length_limit=16).eval()
    attention.full_attention.event_dispatcher = EventDispatcher()
    args = (*inputs(8, 8), *masks("lengths", 8, 8))
    assert "aten::scaled_dot_product_attention" in profiled_ops(attention, *args)


@pytest.mark.parametrize("lengths", [[12, 12, 12], [12, 5, 0]], ids=["no-padding", "padded"])
def test_clustered_fused_path_equals_explicit_path(lengths):
    """ClusteredAttention's centroids attend through SDPA; with a listener, explicitly."""
    attention = ClusteredAttention(
        clusters=3, bits=8, attention_dropout=0.0, event_dispatcher=EventDispatcher()
    ).eval()
    q, k, v = inputs(12, 12, e=4, d=4)
    key_lengths = LengthMask(torch.tensor(lengths), max_len=12)

    def run_clustered():
        torch.manual_seed(3)  # the same hyperplanes in both runs
        out = attention(q, k, v, FullMask(12), key_lengths, key_lengths)
        return out, torch.autograd.grad(out.sum(), (q, k, v))

    actual, grads = run_clustered()
    attention.event_dispatcher.listen(AttentionEvent, lambda event: None)
    expected, expected_grads = run_clustered()
    assert_close("clustered output", actual, expected)
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        assert_close(f"clustered d{name}", got, want)


@pytest.mark.parametrize("topk", [3, 50], ids=["top-3", "all-keys"])
@pytest.mark.parametrize("kind", ["none", "causal", "arbitrary+lengths"])
def test_exact_topk_fused_path_equals_explicit_path(kind, topk):
    """ExactTopKAttention: SDPA under the top-k mask, or the weights built for a listener."""
    attention = ExactTopKAttention(
        topk=topk, attention_dropout=0.0, event_dispatcher=EventDispatcher()
    ).eval()
    q, k, v = inputs(9, 9, e=4, d=4)
    attn_mask, key_lengths = masks(kind, 9, 9)
    expected, expected_grads = explicit(attention, q, k, v, attn_mask, key_lengths)
    assert "aten::_softmax" not in profiled_ops(attention, q, k, v, attn_mask, key_lengths)
    actual, grads = run(attention, q, k, v, attn_mask, key_lengths)
    assert_close(f"exact-topk {kind} output", actual, expected)
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        assert_close(f"exact-topk {kind} d{name}", got, want)


@pytest.mark.parametrize("kind", ["causal", "arbitrary+lengths"])
def test_fused_path_compiles_without_graph_breaks(kind):
    """torch.compile(fullgraph=True) traces the fused path, forward and backward."""
    attention = FullAttention(event_dispatcher=EventDispatcher()).eval()
    q, k, v = inputs(8, 8)
    attn_mask, key_lengths = masks(kind, 8, 8)
    attn_mask.all_ones, key_lengths.all_ones  # noqa: B018 (computed eagerly: data-dependent)
    query_lengths = LengthMask(torch.full((N,), 8), max_len=8)

    def loss(q, k, v):
        return attention(q, k, v, attn_mask, query_lengths, key_lengths).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
    actual = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for name, got, want in zip("qkv", actual, expected, strict=True):
        assert_close(f"compiled d{name}", got, want)


def test_causal_fused_path_never_builds_the_L_by_L_mask():
    """Memory linear in L: the TriangularCausalMask's bool matrix is never materialised."""
    attention = FullAttention(event_dispatcher=EventDispatcher()).eval()
    q, k, v = inputs(6, 6)
    causal, full = TriangularCausalMask(6), LengthMask(torch.full((N,), 6), max_len=6)
    attention(q, k, v, causal, full, full).sum().backward()
    assert not hasattr(causal, "_bool_matrix")
