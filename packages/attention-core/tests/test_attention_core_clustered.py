"""Clustered, improved-clustered and causal improved-clustered attention.

Clustering is random (random hyperplanes), so every test either imposes the groups (by
replacing the attention's ``cluster_queries`` hook) or records the groups the attention
used, and then checks the output against a float64 loop reference of the formula given
those groups. Cases where the result does not depend on the clustering are compared with
FullAttention directly.
"""

import pytest
import torch

from attention_core.attention import _clustering
from attention_core.attention.clustered_attention import ClusteredAttention
from attention_core.attention.full_attention import FullAttention
from attention_core.attention.improved_clustered_attention import ImprovedClusteredAttention
from attention_core.attention.improved_clustered_causal_attention import (
    ImprovedClusteredCausalAttention,
)
from attention_core.attention_registry import AttentionRegistry
from attention_core.events import AttentionEvent, EventDispatcher
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
SHAPES = [  # N, L, S, H, E, D, clusters
    pytest.param(1, 1, 1, 1, 1, 1, 1, id="tiny"),
    pytest.param(2, 7, 11, 3, 5, 4, 3, id="primes"),
    pytest.param(3, 13, 6, 2, 4, 3, 5, id="L>S"),
    pytest.param(2, 5, 5, 2, 3, 2, 8, id="more-clusters-than-queries"),
]


# ---------------------------------------------------------------------------------------
# inputs and hooks
# ---------------------------------------------------------------------------------------


def qkv(N, L, S, H, E, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, L, H, E, generator=g, dtype=dtype),
        torch.randn(N, S, H, E, generator=g, dtype=dtype),
        torch.randn(N, S, H, D, generator=g, dtype=dtype),
    )


def lengths_for(N, L, seed, low=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, L + 1, (N,), generator=g)
    lengths[0] = L
    return LengthMask(lengths, max_len=L)


def random_groups(N, H, L, clusters, query_lengths, seed=3):
    """Random clusters for the valid queries, the padding group ``clusters`` elsewhere."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, clusters, (N, H, L), generator=g)
    return groups.masked_fill(~query_lengths.bool_matrix[:, None, :], clusters)


def impose(attention, groups):
    """Make ``attention`` use the given groups instead of hashing and clustering."""
    C = attention.clusters
    counts = torch.stack([(groups == c).sum(-1) for c in range(C)], dim=-1)
    attention.cluster_queries = lambda queries, lengths: (groups, counts)
    return attention


def record(attention):
    """Keep the groups of every call of ``attention`` in the returned list."""
    seen = []
    original = attention.cluster_queries

    def spy(queries, lengths):
        groups, counts = original(queries, lengths)
        seen.append(groups)
        return groups, counts

    attention.cluster_queries = spy
    return seen


# ---------------------------------------------------------------------------------------
# float64 references of the three formulas, given the groups
# ---------------------------------------------------------------------------------------


def cluster_members(groups, n, h, C):
    for c in range(C):
        members = (groups[n, h] == c).nonzero().flatten().tolist()
        if members:
            yield members


def centroid_attention(q, k, members, n, h, key_len, temp):
    centroid = q[n, members, h].double().mean(0)
    scores = temp * (k[n, :key_len, h].double() @ centroid)
    return scores, torch.softmax(scores, dim=0)


def clustered_reference(q, k, v, groups, key_lengths, C, temp):
    N, L, H, _ = q.shape
    out = torch.zeros(N, L, H, v.shape[-1], dtype=torch.float64)
    for n in range(N):
        key_len = int(key_lengths.lengths[n])
        for h in range(H):
            for members in cluster_members(groups, n, h, C):
                _, A = centroid_attention(q, k, members, n, h, key_len, temp)
                out[n, members, h] = A @ v[n, :key_len, h].double()
    return out


def top_set(scores, topk):
    return torch.argsort(scores, descending=True)[: min(topk, len(scores))].tolist()


def improved_reference(q, k, v, groups, key_lengths, C, topk, temp):
    N, L, H, _ = q.shape
    out = torch.zeros(N, L, H, v.shape[-1], dtype=torch.float64)
    for n in range(N):
        key_len = int(key_lengths.lengths[n])
        K, V = k[n, :key_len].double(), v[n, :key_len].double()
        for h in range(H):
            for members in cluster_members(groups, n, h, C):
                scores, A = centroid_attention(q, k, members, n, h, key_len, temp)
                T = top_set(scores, topk)
                mass = A[T].sum()
                rest = A.clone()
                rest[T] = 0
                for i in members:
                    w = torch.softmax(temp * (K[T, h] @ q[n, i, h].double()), dim=0)
                    out[n, i, h] = mass * (w @ V[T, h]) + rest @ V[:, h]
    return out


def causal_reference(q, k, v, groups, key_lengths, C, topk, temp):
    """Also returns how many (n, i, h) had no past key among their cluster's top keys."""
    N, L, H, _ = q.shape
    out = torch.zeros(N, L, H, v.shape[-1], dtype=torch.float64)
    empty = 0
    for n in range(N):
        key_len = int(key_lengths.lengths[n])
        K, V = k[n, :key_len].double(), v[n, :key_len].double()
        for h in range(H):
            for members in cluster_members(groups, n, h, C):
                scores, _ = centroid_attention(q, k, members, n, h, key_len, temp)
                T = top_set(scores, topk)
                for i in members:
                    past = [j for j in T if j <= i]
                    if not past:
                        empty += 1
                        continue
                    w = torch.softmax(temp * (K[past, h] @ q[n, i, h].double()), dim=0)
                    out[n, i, h] = w @ V[past, h]
    return out, empty


# ---------------------------------------------------------------------------------------
# clustered attention
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("N", "L", "S", "H", "E", "D", "C"), SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clustered_matches_formula_for_given_groups(N, L, S, H, E, D, C, dtype):
    q, k, v = qkv(N, L, S, H, E, D, dtype)
    query_lengths, key_lengths = lengths_for(N, L, seed=1), lengths_for(N, S, seed=2)
    groups = random_groups(N, H, L, C, query_lengths)
    attention = impose(ClusteredAttention(C, attention_dropout=0.0), groups)
    out = attention(q, k, v, FullMask(L, S), query_lengths, key_lengths)
    assert out.dtype == dtype
    expected = clustered_reference(q, k, v, groups, key_lengths, C, E**-0.5)
    assert_close("clustered", out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hash_bias", [True, False], ids=["bias", "no-bias"])
def test_clustered_with_real_clustering_matches_formula(dtype, hash_bias):
    N, L, S, H, E, D, C = 3, 17, 10, 2, 4, 3, 4
    q, k, v = qkv(N, L, S, H, E, D, dtype, seed=5)
    query_lengths, key_lengths = lengths_for(N, L, seed=6), lengths_for(N, S, seed=7)
    attention = ClusteredAttention(
        C, iterations=5, bits=16, hash_bias=hash_bias, attention_dropout=0.0
    )
    seen = record(attention)
    torch.manual_seed(0)
    out = attention(q, k, v, FullMask(L, S), query_lengths, key_lengths)
    (groups,) = seen
    valid = query_lengths.bool_matrix[:, None, :].expand_as(groups)
    assert ((groups < C) == valid).all(), "valid queries get a cluster, padding the sentinel"
    assert len(groups[valid].unique()) > 1, "the clustering should split the queries"
    expected = clustered_reference(q, k, v, groups, key_lengths, C, E**-0.5)
    assert_close("clustered", out, expected)
    assert (out[~query_lengths.bool_matrix] == 0).all()
    torch.manual_seed(0)
    again = attention(q, k, v, FullMask(L, S), query_lengths, key_lengths)
    assert torch.equal(seen[1], groups) and torch.equal(again, out)


@pytest.mark.parametrize(
    ("L", "distinct", "clusters"),
    [
        pytest.param(12, 4, 4, id="blocks-of-3-4-clusters"),
        pytest.param(7, 7, 7, id="all-distinct-C=L"),
        pytest.param(6, 6, 9, id="all-distinct-C>L"),
    ],
)
def test_clustered_equals_full_when_each_distinct_query_has_a_cluster(L, distinct, clusters):
    N, S, H, E, D = 2, 9, 2, 4, 3
    g = torch.Generator().manual_seed(8)
    base = torch.randn(N, distinct, H, E, generator=g, dtype=torch.float64)
    q = base.repeat_interleave(L // distinct, dim=1)  # equal queries in contiguous blocks
    _, k, v = qkv(N, L, S, H, E, D, seed=9)
    key_lengths = lengths_for(N, S, seed=10)
    query_lengths = LengthMask(torch.full((N,), L))
    torch.manual_seed(1)
    attention = ClusteredAttention(clusters, bits=63, attention_dropout=0.0)
    out = attention(q, k, v, FullMask(L, S), query_lengths, key_lengths)
    expected = FullAttention(attention_dropout=0.0)(
        q, k, v, FullMask(L, S), query_lengths, key_lengths
    )
    assert_close("clustered vs full", out, expected)


def test_clustered_hash_bias_false_zeroes_the_plane_offsets(monkeypatch):
    planes = []
    original = _clustering.compute_hashes

    def spy(X, A, H=None):
        planes.append(A.clone())
        return original(X, A, H)

    monkeypatch.setattr(_clustering, "compute_hashes", spy)
    q, k, v = qkv(1, 6, 6, 1, 3, 2)
    lengths = LengthMask(torch.tensor([6]))
    for hash_bias in (False, True):
        attention = ClusteredAttention(2, bits=7, hash_bias=hash_bias)
        attention(q, k, v, FullMask(6, 6), lengths, lengths)
    assert planes[0].shape == (7, 4) and planes[0].dtype == torch.float64
    assert (planes[0][:, -1] == 0).all() and (planes[1][:, -1] != 0).all()


# ---------------------------------------------------------------------------------------
# improved clustered attention
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("N", "L", "S", "H", "E", "D", "C"), SHAPES)
@pytest.mark.parametrize("topk", [1, 3, 100], ids=["top1", "top3", "top-clamped"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_improved_matches_formula_for_given_groups(N, L, S, H, E, D, C, topk, dtype):
    q, k, v = qkv(N, L, S, H, E, D, dtype, seed=11)
    query_lengths, key_lengths = lengths_for(N, L, seed=12), lengths_for(N, S, seed=13)
    groups = random_groups(N, H, L, C, query_lengths, seed=14)
    attention = ImprovedClusteredAttention(C, topk=topk, softmax_temp=0.6, attention_dropout=0.0)
    out = impose(attention, groups)(q, k, v, FullMask(L, S), query_lengths, key_lengths)
    expected = improved_reference(q, k, v, groups, key_lengths, C, topk, 0.6)
    assert_close("improved", out, expected)
    assert (out[~query_lengths.bool_matrix] == 0).all()


def test_improved_with_real_clustering_matches_formula():
    N, L, S, H, E, D, C, topk = 2, 15, 12, 2, 4, 3, 3, 4
    q, k, v = qkv(N, L, S, H, E, D, seed=15)
    query_lengths, key_lengths = lengths_for(N, L, seed=16), lengths_for(N, S, seed=17)
    attention = ImprovedClusteredAttention(C, bits=20, topk=topk, attention_dropout=0.0)
    seen = record(attention)
    torch.manual_seed(2)
    out = attention(q, k, v, FullMask(L, S), query_lengths, key_lengths)
    expected = improved_reference(q, k, v, seen[0], key_lengths, C, topk, E**-0.5)
    assert_close("improved", out, expected)


@pytest.mark.parametrize("imposed", [True, False], ids=["random-groups", "real-clustering"])
def test_improved_equals_full_when_topk_covers_all_keys(imposed):
    N, L, S, H, E, D, C = 3, 10, 7, 2, 5, 4, 3
    q, k, v = qkv(N, L, S, H, E, D, seed=18)
    key_lengths = lengths_for(N, S, seed=19)
    query_lengths = LengthMask(torch.full((N,), L))
    attention = ImprovedClusteredAttention(C, topk=S, attention_dropout=0.0)
    if imposed:
        impose(attention, random_groups(N, H, L, C, query_lengths, seed=20))
    torch.manual_seed(3)
    out = attention(q, k, v, FullMask(L, S), query_lengths, key_lengths)
    expected = FullAttention(attention_dropout=0.0)(
        q, k, v, FullMask(L, S), query_lengths, key_lengths
    )
    assert_close("improved vs full", out, expected)


# ---------------------------------------------------------------------------------------
# causal improved clustered attention
# ---------------------------------------------------------------------------------------

CAUSAL_SHAPES = [  # N, L, H, E, D, clusters
    pytest.param(1, 1, 1, 1, 1, 1, id="tiny"),
    pytest.param(2, 11, 3, 5, 4, 3, id="primes"),
    pytest.param(3, 8, 2, 3, 2, 9, id="more-clusters-than-queries"),
]


@pytest.mark.parametrize(("N", "L", "H", "E", "D", "C"), CAUSAL_SHAPES)
@pytest.mark.parametrize("topk", [1, 3, 100], ids=["top1", "top3", "top-clamped"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_matches_formula_for_given_groups(N, L, H, E, D, C, topk, dtype):
    q, k, v = qkv(N, L, L, H, E, D, dtype, seed=21)
    query_lengths, key_lengths = lengths_for(N, L, seed=22), lengths_for(N, L, seed=23)
    groups = random_groups(N, H, L, C, query_lengths, seed=24)
    attention = ImprovedClusteredCausalAttention(C, topk=topk, attention_dropout=0.0)
    out = impose(attention, groups)(q, k, v, TriangularCausalMask(L), query_lengths, key_lengths)
    expected, _ = causal_reference(q, k, v, groups, key_lengths, C, topk, E**-0.5)
    assert torch.isfinite(out).all()
    assert_close("causal", out, expected)


def test_causal_queries_without_past_top_keys_output_zeros():
    N, L, H, E, D, C = 2, 12, 2, 4, 3, 2
    q, k, v = qkv(N, L, L, H, E, D, seed=25)
    lengths = LengthMask(torch.full((N,), L))
    attention = ImprovedClusteredCausalAttention(C, topk=2, attention_dropout=0.0)
    seen = record(attention)
    torch.manual_seed(4)
    out = attention(q, k, v, TriangularCausalMask(L), lengths, lengths)
    expected, empty = causal_reference(q, k, v, seen[0], lengths, C, 2, E**-0.5)
    assert empty > 0, "the data should contain queries whose top keys are all in the future"
    assert_close("causal", out, expected)


@pytest.mark.parametrize("imposed", [True, False], ids=["random-groups", "real-clustering"])
def test_causal_equals_causal_full_when_topk_covers_all_keys(imposed):
    N, L, H, E, D, C = 3, 9, 2, 4, 3, 3
    q, k, v = qkv(N, L, L, H, E, D, seed=26)
    key_lengths = lengths_for(N, L, seed=27)
    query_lengths = LengthMask(torch.full((N,), L))
    attention = ImprovedClusteredCausalAttention(C, topk=L, attention_dropout=0.0)
    if imposed:
        impose(attention, random_groups(N, H, L, C, query_lengths, seed=28))
    torch.manual_seed(5)
    causal = TriangularCausalMask(L)
    out = attention(q, k, v, causal, query_lengths, key_lengths)
    expected = FullAttention(attention_dropout=0.0)(q, k, v, causal, query_lengths, key_lengths)
    assert_close("causal vs full", out, expected)


# ---------------------------------------------------------------------------------------
# shared behaviour: gradients, events, registry, errors
# ---------------------------------------------------------------------------------------

ATTENTIONS = [
    pytest.param(lambda: ClusteredAttention(2, attention_dropout=0.0), id="clustered"),
    pytest.param(
        lambda: ImprovedClusteredAttention(2, topk=2, attention_dropout=0.0), id="improved"
    ),
    pytest.param(
        lambda: ImprovedClusteredCausalAttention(2, topk=3, attention_dropout=0.0), id="causal"
    ),
]


def mask_for(attention, L):
    causal = isinstance(attention, ImprovedClusteredCausalAttention)
    return TriangularCausalMask(L) if causal else FullMask(L, L)


@pytest.mark.parametrize("make", ATTENTIONS)
def test_gradcheck_with_given_groups(make):
    N, L, H, E, D = 2, 5, 1, 3, 2
    q, k, v = (t.requires_grad_(True) for t in qkv(N, L, L, H, E, D, seed=29))
    query_lengths, key_lengths = lengths_for(N, L, seed=30, low=2), lengths_for(N, L, seed=31)
    attention = impose(make(), random_groups(N, H, L, 2, query_lengths, seed=32))
    mask = mask_for(attention, L)
    torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, mask, query_lengths, key_lengths),
        (q, k, v),
        fast_mode=True,
    )


@pytest.mark.parametrize("make", ATTENTIONS)
def test_gradients_flow_with_real_clustering(make):
    N, L, H, E, D = 2, 9, 2, 4, 3
    q, k, v = (t.requires_grad_(True) for t in qkv(N, L, L, H, E, D, torch.float32, seed=33))
    lengths = lengths_for(N, L, seed=34, low=3)
    attention = make()
    attention(q, k, v, mask_for(attention, L), lengths, lengths).square().sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        pytest.param(
            lambda d: ClusteredAttention(3, event_dispatcher=d), (2, 2, 3, 6), id="clustered"
        ),
        pytest.param(
            lambda d: ImprovedClusteredAttention(3, topk=2, event_dispatcher=d),
            (2, 2, 3, 6),
            id="improved",
        ),
        pytest.param(
            lambda d: ImprovedClusteredCausalAttention(3, topk=2, event_dispatcher=d),
            (2, 2, 6, 2),
            id="causal",
        ),
    ],
)
def test_attention_event(make, shape):
    dispatcher = EventDispatcher()
    seen = []
    dispatcher.listen(AttentionEvent, seen.append)
    attention = make(dispatcher).eval()
    q, k, v = qkv(2, 6, 6, 2, 3, 3)
    lengths = LengthMask(torch.tensor([6, 6]))
    attention(q, k, v, mask_for(attention, 6), lengths, lengths)
    assert len(seen) == 1 and seen[0].source is attention
    assert seen[0].attention_matrix.shape == shape


@pytest.mark.parametrize(
    ("key", "cls", "params"),
    [
        ("clustered", ClusteredAttention, []),
        ("improved-clustered", ImprovedClusteredAttention, ["topk"]),
        ("causal-improved-clustered", ImprovedClusteredCausalAttention, ["topk"]),
    ],
)
def test_registered(key, cls, params):
    registered, names = AttentionRegistry[key]
    assert registered is cls
    common = ["clusters", "iterations", "bits", "hash_bias"]
    tail = ["softmax_temp", "attention_dropout", "event_dispatcher"]
    assert names == common + params + tail
    assert AttentionRegistry.validate_parameter("hash_bias", False) is False
    with pytest.raises(ValueError, match="clusters"):
        AttentionRegistry.validate_parameter("clusters", "many")


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        pytest.param(
            ClusteredAttention,
            {"clusters": 0},
            "clusters must be a positive int; got 0",
            id="clusters",
        ),
        pytest.param(
            ClusteredAttention,
            {"clusters": 2, "bits": 64},
            r"bits must be in \[1, 63\]; got 64",
            id="bits",
        ),
        pytest.param(
            ClusteredAttention,
            {"clusters": 2, "iterations": -1},
            "iterations must be a non-negative int",
            id="iterations",
        ),
        pytest.param(
            ImprovedClusteredAttention,
            {"clusters": 2, "topk": 0},
            "topk must be a positive int; got 0",
            id="topk",
        ),
        pytest.param(
            ImprovedClusteredCausalAttention,
            {"clusters": 2, "topk": 1.5},
            "topk must be a positive int; got 1.5",
            id="causal-topk",
        ),
    ],
)
def test_constructor_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_mask_errors():
    q, k, v = qkv(1, 4, 4, 1, 2, 2)
    lengths = LengthMask(torch.tensor([4]))
    causal = TriangularCausalMask(4)
    with pytest.raises(ValueError, match="ClusteredAttention does not support arbitrary"):
        ClusteredAttention(2)(q, k, v, causal, lengths, lengths)
    with pytest.raises(ValueError, match="ImprovedClusteredAttention does not support arbitrary"):
        ImprovedClusteredAttention(2)(q, k, v, causal, lengths, lengths)
    with pytest.raises(ValueError, match="needs a lower triangular"):
        ImprovedClusteredCausalAttention(2)(q, k, v, FullMask(4, 4), lengths, lengths)
    with pytest.raises(ValueError, match="queries, keys and values must have the same batch"):
        ClusteredAttention(2)(q, k[:0], v, FullMask(4, 4), lengths, lengths)
