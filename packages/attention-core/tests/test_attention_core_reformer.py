"""ReformerAttention against float64 references: dense full attention for one chunk and a
loop over chunks for given hash buckets."""

from __future__ import annotations

import math

import pytest
import torch

from attention_core.attention.full_attention import FullAttention
from attention_core.attention.reformer_attention import ReformerAttention
from attention_core.attention_registry import AttentionRegistry
from attention_core.events import AttentionEvent, EventDispatcher
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close, random_lengths, seeded

# helpers


def make_inputs(N, L, H, E, D, dtype=torch.float64, seed=0, requires_grad=False):
    g = seeded(seed)
    q = torch.randn(N, L, H, E, generator=g, dtype=dtype)
    k = torch.randn(N, L, H, E, generator=g, dtype=dtype)
    v = torch.randn(N, L, H, D, generator=g, dtype=dtype)
    if requires_grad:
        q.requires_grad_(), v.requires_grad_()
    return q, k, v


def random_mask(L, seed):
    return FullMask(torch.rand(L, L, generator=seeded(seed)) < 0.7)


def reference_allowed(q_pos, attn_mask, key_valid, masked, candidates):
    """Which of ``candidates`` (key positions) query ``q_pos`` may attend to."""
    allowed = [j for j in candidates if key_valid[j] and attn_mask[q_pos, j]]
    if masked:
        others = [j for j in allowed if j != q_pos]
        if others:
            allowed = others
    return allowed


def reference_attend(q, v, i, allowed, temp):
    """Softmax attention of query ``q[i]`` ``(E,)`` over rows ``allowed`` of ``v``."""
    if not allowed:
        return torch.zeros(v.shape[-1], dtype=torch.float64)
    keys = q[allowed] / q[allowed].norm(dim=-1, keepdim=True)
    weights = torch.softmax(temp * keys @ q[i], dim=0)
    return weights @ v[allowed]


def reference_round(q, v, buckets, chunk, attn_mask, key_lengths, masked, temp):
    """Loop reference of one round: positions sorted by ``(bucket, position)`` per (n, h),
    cut into chunks of ``chunk`` (the last one possibly short), each chunk attending to
    itself and the previous chunk."""
    q, v = q.double(), v.double()
    N, L, H, _ = q.shape
    out = torch.zeros(N, L, H, v.shape[-1], dtype=torch.float64)
    key_valid = key_lengths.bool_matrix
    for n in range(N):
        for h in range(H):
            order = sorted(range(L), key=lambda p: (int(buckets[n, h, p]), p))
            chunks = [order[c : c + chunk] for c in range(0, L, chunk)]
            for c, members in enumerate(chunks):
                window = (chunks[c - 1] if c > 0 else []) + members
                for i in members:
                    allowed = reference_allowed(
                        i, attn_mask.bool_matrix, key_valid[n], masked, window
                    )
                    out[n, i, h] = reference_attend(q[n, :, h], v[n, :, h], i, allowed, temp)
    return out


def reference_one_chunk(q, v, attn_mask, key_lengths, masked, temp):
    """Dense reference: every query sees every allowed key."""
    N, L, H, _ = q.shape
    buckets = torch.zeros(N, H, L, dtype=torch.long)
    return reference_round(q, v, buckets, L, attn_mask, key_lengths, masked, temp)


def fixed_hashes(monkeypatch, rounds_of_buckets, bits):
    """Make ``ReformerAttention._hash`` return the given ``(N, H, L)`` buckets, one per
    call, with invalid keys and the internal padding after every real bucket."""
    calls = iter(rounds_of_buckets)

    def _hash(self, keys, valid):
        buckets = next(calls)
        pad = keys.shape[2] - buckets.shape[2]
        buckets = torch.nn.functional.pad(buckets, (0, pad), value=2 * bits)
        return buckets.masked_fill(~valid[:, None, :], 2 * bits)

    monkeypatch.setattr(ReformerAttention, "_hash", _hash)


def invalid_last(buckets, key_lengths, bits):
    """The buckets the reference sorts by: invalid keys in bucket ``2 * bits``."""
    return buckets.masked_fill(~key_lengths.bool_matrix[:, None, :], 2 * bits)


# one chunk: dense attention with normalised queries as keys


ONE_CHUNK_CASES = [
    pytest.param(1, 1, 1, 3, 2, "none", id="N1-L1"),
    pytest.param(2, 7, 3, 4, 5, "lengths", id="N2-L7-lengths"),
    pytest.param(3, 13, 2, 5, 3, "causal", id="N3-L13-causal"),
    pytest.param(2, 11, 1, 8, 4, "random", id="N2-L11-random-mask"),
]


def masks_for(kind, N, L, seed=0):
    attn_mask = FullMask(L)
    lengths = LengthMask(torch.full((N,), L), max_len=L)
    if kind == "lengths":
        lengths = LengthMask(random_lengths(N, L, generator=seeded(seed)), max_len=L)
    elif kind == "causal":
        attn_mask = TriangularCausalMask(L)
        lengths = LengthMask(random_lengths(N, L, generator=seeded(seed)), max_len=L)
    elif kind == "random":
        attn_mask = random_mask(L, seed)
        lengths = LengthMask(random_lengths(N, L, generator=seeded(seed)), max_len=L)
    return attn_mask, lengths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize(("N", "L", "H", "E", "D", "kind"), ONE_CHUNK_CASES)
def test_one_chunk_is_full_attention_with_normalised_keys(N, L, H, E, D, kind, masked, dtype):
    q, k, v = make_inputs(N, L, H, E, D, dtype)
    attn_mask, lengths = masks_for(kind, N, L)
    attention = ReformerAttention(chunk_size=L + 3, bits=3, rounds=3, masked=masked)
    attention.eval()
    out = attention(q, k, v, attn_mask, lengths, lengths)
    temp = 1 / math.sqrt(E)
    assert_close("out", out, reference_one_chunk(q, v, attn_mask, lengths, masked, temp))
    if not masked:
        full = FullAttention(attention_dropout=0.0)
        keys = q / q.norm(dim=-1, keepdim=True)
        assert_close("out vs full", out, full(q, keys, v, attn_mask, lengths, lengths))


def test_masked_equals_full_attention_without_the_diagonal():
    N, L, H, E = 2, 9, 2, 4
    q, k, v = make_inputs(N, L, H, E, 3)
    lengths = LengthMask(torch.tensor([9, 4]), max_len=L)
    attention = ReformerAttention(chunk_size=16, masked=True, attention_dropout=0.0)
    out = attention(q, k, v, FullMask(L), lengths, lengths)
    no_diagonal = FullMask(~torch.eye(L, dtype=torch.bool))
    keys = q / q.norm(dim=-1, keepdim=True)
    expected = FullAttention(attention_dropout=0.0)(q, keys, v, no_diagonal, lengths, lengths)
    assert_close("out", out, expected)


def test_masked_attends_to_itself_when_nothing_else_is_allowed():
    q, k, v = make_inputs(1, 4, 1, 3, 2)
    lengths = LengthMask(torch.tensor([4]))
    out = ReformerAttention(chunk_size=4, masked=True, attention_dropout=0.0)(
        q, k, v, FullMask(torch.eye(4, dtype=torch.bool)), lengths, lengths
    )
    assert_close("out", out, v)


def test_softmax_temp_is_used():
    q, k, v = make_inputs(2, 6, 2, 4, 3)
    lengths = LengthMask(torch.tensor([6, 5]))
    attention = ReformerAttention(chunk_size=8, softmax_temp=0.37, attention_dropout=0.0)
    out = attention(q, k, v, FullMask(6), lengths, lengths)
    assert_close("out", out, reference_one_chunk(q, v, FullMask(6), lengths, False, 0.37))


def test_given_keys_are_ignored():
    q, k, v = make_inputs(2, 10, 2, 4, 3)
    lengths = LengthMask(torch.tensor([10, 7]))
    attention = ReformerAttention(chunk_size=3, bits=2, rounds=2, attention_dropout=0.0)
    torch.manual_seed(5)
    first = attention(q, k, v, FullMask(10), lengths, lengths)
    other_keys = torch.randn_like(k)
    torch.manual_seed(5)
    second = attention(q, other_keys, v, FullMask(10), lengths, lengths)
    assert_close("out", second, first)


# several chunks with given hash buckets


CHUNK_CASES = [
    pytest.param(1, 8, 1, 2, "none", False, id="L8-chunk2"),
    pytest.param(2, 12, 2, 4, "lengths", False, id="L12-chunk4-lengths"),
    pytest.param(2, 13, 2, 4, "lengths", True, id="L13-chunk4-masked"),
    pytest.param(2, 11, 3, 3, "causal", False, id="L11-chunk3-causal"),
    pytest.param(1, 17, 2, 5, "random", True, id="L17-chunk5-random-masked"),
    pytest.param(2, 7, 1, 32, "lengths", False, id="L7-chunk32"),
]


@pytest.mark.parametrize(("N", "L", "H", "chunk", "kind", "masked"), CHUNK_CASES)
def test_chunks_match_loop_reference(monkeypatch, N, L, H, chunk, kind, masked):
    bits, rounds = 2, 2
    q, k, v = make_inputs(N, L, H, 4, 3)
    attn_mask, lengths = masks_for(kind, N, L, seed=L)
    g = seeded(L)
    buckets = [torch.randint(0, 2 * bits, (N, H, L), generator=g) for _ in range(rounds)]
    fixed_hashes(monkeypatch, buckets, bits)
    attention = ReformerAttention(
        chunk_size=chunk, bits=bits, rounds=rounds, masked=masked, attention_dropout=0.0
    )
    out = attention(q, k, v, attn_mask, lengths, lengths)
    temp = 1 / math.sqrt(4)
    expected = sum(
        reference_round(
            q, v, invalid_last(b, lengths, bits), min(chunk, L), attn_mask, lengths, masked, temp
        )
        for b in buckets
    )
    assert_close("out", out, expected / rounds)


def test_gradcheck_with_fixed_buckets(monkeypatch):
    N, L, H, bits = 1, 7, 2, 2
    q, _, v = make_inputs(N, L, H, 3, 2, requires_grad=True)
    lengths = LengthMask(torch.tensor([6]), max_len=L)
    buckets = torch.randint(0, 2 * bits, (N, H, L), generator=seeded(3))
    attention = ReformerAttention(chunk_size=3, bits=bits, rounds=1, attention_dropout=0.0)

    def f(q, v):
        fixed_hashes(monkeypatch, [buckets], bits)
        return attention(q, q.detach(), v, TriangularCausalMask(L), lengths, lengths)

    assert torch.autograd.gradcheck(f, (q, v))


def test_gradients_flow_with_random_hashing():
    q, k, v = make_inputs(2, 10, 2, 4, 3, dtype=torch.float32, requires_grad=True)
    lengths = LengthMask(torch.tensor([10, 6]))
    out = ReformerAttention(chunk_size=4, bits=2)(q, k, v, FullMask(10), lengths, lengths)
    out.square().sum().backward()
    for name, t in (("dq", q), ("dv", v)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name


# hashing


def test_hash_is_locality_sensitive():
    attention = ReformerAttention(bits=4)
    x = torch.nn.functional.normalize(torch.randn(2, 3, 5, 6, generator=seeded(1)), dim=-1)
    keys = torch.cat([x, x, -x], dim=2)  # (N, H, 15, E): copies and opposite directions
    valid = torch.ones(2, 15, dtype=torch.bool)
    valid[1, -2:] = False
    torch.manual_seed(0)
    buckets = attention._hash(keys, valid)
    assert buckets.shape == (2, 3, 15)
    assert torch.equal(buckets[..., :5], buckets[..., 5:10])
    # -x flips every projection, moving argmax i to i + bits (mod 2 bits)
    expected_opposite = (buckets[..., :5] + 4) % 8
    assert torch.equal(buckets[0, :, 10:], expected_opposite[0])
    assert torch.equal(buckets[1, :, 10:13], expected_opposite[1, :, :3])
    assert (buckets[1, :, 13:] == 8).all()
    assert ((buckets[0] >= 0) & (buckets[0] < 8)).all()


def test_hash_uses_argmax_over_signed_projections():
    attention = ReformerAttention(bits=3)
    keys = torch.randn(1, 2, 9, 4, generator=seeded(2), dtype=torch.float64)
    torch.manual_seed(11)
    buckets = attention._hash(keys, torch.ones(1, 9, dtype=torch.bool))
    torch.manual_seed(11)
    planes = torch.randn(4, 3, dtype=torch.float64)
    projected = keys @ planes
    assert torch.equal(buckets, torch.cat([projected, -projected], -1).argmax(-1))


# random hashing end to end


@pytest.mark.parametrize("L", [1, 2, 5, 13, 31, 33], ids=lambda L: f"L{L}")
def test_lengths_not_multiple_of_chunk_size(L):
    q, k, v = make_inputs(2, L, 2, 4, 3, dtype=torch.float32, seed=L)
    lengths = LengthMask(torch.tensor([L, max(L // 2, 1)]), max_len=L)
    attention = ReformerAttention(chunk_size=4, bits=2, rounds=3, attention_dropout=0.0)
    out = attention(q, k, v, TriangularCausalMask(L), lengths, lengths)
    assert out.shape == (2, L, 2, 3)
    assert torch.isfinite(out).all()
    # the first position may only attend to itself
    assert_close("first position", out[:, 0], v[:, 0])


def test_fully_padded_sequences_are_finite_and_zero():
    q, k, v = make_inputs(3, 9, 2, 4, 3, dtype=torch.float32)
    lengths = LengthMask(torch.tensor([9, 0, 3]), max_len=9)
    attention = ReformerAttention(chunk_size=2, bits=2, masked=True, attention_dropout=0.0)
    out = attention(q, k, v, FullMask(9), lengths, lengths)
    assert torch.isfinite(out).all()
    assert_close("padded", out[1], torch.zeros_like(out[1]))


def test_zero_queries_stay_finite():
    q, k, v = make_inputs(1, 6, 1, 4, 2)
    q[0, 2] = 0
    out = ReformerAttention(chunk_size=3, attention_dropout=0.0)(
        q, k, v, FullMask(6), LengthMask(torch.tensor([6])), LengthMask(torch.tensor([6]))
    )
    assert torch.isfinite(out).all()


def test_attention_event_is_the_dense_average_over_rounds():
    q, k, v = make_inputs(2, 11, 2, 4, 3)
    lengths = LengthMask(torch.tensor([11, 8]))
    dispatcher = EventDispatcher()
    events = []
    dispatcher.listen(AttentionEvent, events.append)
    attention = ReformerAttention(
        chunk_size=3, bits=2, rounds=3, attention_dropout=0.0, event_dispatcher=dispatcher
    )
    out = attention(q, k, v, FullMask(11), lengths, lengths)
    (event,) = events
    A = event.attention_matrix
    assert A.shape == (2, 2, 11, 11)
    assert_close("A V", torch.einsum("nhls,nshd->nlhd", A, v), out)
    assert (A[1, :, :, 8:] == 0).all()
    assert_close("row sums", A.sum(-1), torch.ones(2, 2, 11, dtype=A.dtype))


def test_no_event_without_listeners():
    dispatcher = EventDispatcher()
    q, k, v = make_inputs(1, 4, 1, 2, 2)
    lengths = LengthMask(torch.tensor([4]))
    ReformerAttention(event_dispatcher=dispatcher)(q, k, v, FullMask(4), lengths, lengths)
    assert not dispatcher.has_listeners


# registry and errors


def test_registered_with_fast_transformers_parameters():
    cls, params = AttentionRegistry["reformer"]
    assert cls is ReformerAttention
    assert params == [
        "chunk_size",
        "bits",
        "rounds",
        "masked",
        "softmax_temp",
        "attention_dropout",
        "event_dispatcher",
    ]
    defaults = AttentionRegistry.class_parameters("reformer", dict.fromkeys(params))
    # builders default to 63 bits, as fast-transformers' registry does; the constructor to 8
    assert defaults == {
        "chunk_size": 32,
        "bits": 63,
        "rounds": 4,
        "masked": False,
        "softmax_temp": None,
        "attention_dropout": 0.1,
        "event_dispatcher": "",
    }
    attention = ReformerAttention()
    assert (attention.chunk_size, attention.bits, attention.rounds) == (32, 8, 4)
    assert attention.masked is False and attention.dropout.p == 0.1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"chunk_size": 0}, ValueError, "chunk_size must be a positive int; got 0"),
        pytest.param({"bits": -1}, ValueError, "bits must be a positive int; got -1"),
        pytest.param({"rounds": 1.5}, ValueError, "rounds must be a positive int; got 1.5"),
        pytest.param({"masked": 1}, TypeError, "masked must be a bool; got int"),
    ],
    ids=["chunk_size", "bits", "rounds", "masked"],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ReformerAttention(**kwargs)


def test_queries_and_keys_of_different_lengths_are_an_error():
    q = torch.randn(1, 4, 1, 2)
    k, v = torch.randn(1, 5, 1, 2), torch.randn(1, 5, 1, 2)
    with pytest.raises(ValueError, match="same length; got L=4 and S=5"):
        ReformerAttention()(
            q, k, v, FullMask(4, 5), LengthMask(torch.tensor([4])), LengthMask(torch.tensor([5]))
        )


def test_bad_input_shapes_are_reported():
    q, k, v = make_inputs(2, 4, 1, 2, 2)
    lengths = LengthMask(torch.tensor([4, 4]))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(4, 4\); got \(3, 3\)"):
        ReformerAttention()(q, k, v, FullMask(3), lengths, lengths)
    with pytest.raises(ValueError, match="same batch size; got 2, 2 and 1"):
        ReformerAttention()(q, k, v[:1], FullMask(4), lengths, lengths)
