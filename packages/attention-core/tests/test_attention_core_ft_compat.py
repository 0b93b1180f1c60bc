"""fast-transformers compatibility: the compiled-module names (``aggregate_cpu``,
``causal_product_cpu``, ...) with their output-buffer conventions, checked against plain
PyTorch in float64; empty clusters never give NaN; the exception classes that are also
fast-transformers' TypeError/RuntimeError; ``lower_triangular`` of rectangular masks."""

from __future__ import annotations

import pytest
import torch

from attention_core.aggregate import aggregate, aggregate_cpu, broadcast_cpu
from attention_core.attention import LinearAttention
from attention_core.causal_product import causal_product_cpu
from attention_core.clustering.hamming import cluster_cpu
from attention_core.errors import MissingParameterError, UnsupportedMaskError
from attention_core.hashing import hash_cpu
from attention_core.local_product import local_product_cpu
from attention_core.masking import FullMask, LengthMask
from attention_core.sparse_product import clustered_sparse_product_cpu, sparse_product_cpu
from attention_core.testing import assert_close

FORCE_REFERENCE = "ATTENTION_CORE_FORCE_REFERENCE"
f64 = torch.float64


@pytest.fixture(params=["kernel", "reference"])
def path(request, monkeypatch):
    monkeypatch.setenv(FORCE_REFERENCE, "1" if request.param == "reference" else "0")
    return request.param


def test_aggregate_cpu_accumulates_and_broadcast_cpu_keeps_invalid_rows(path):
    torch.manual_seed(0)
    N, H, L, E, C = 2, 3, 9, 4, 3
    X = torch.randn(N, H, L, E, dtype=f64)
    G = torch.randint(-1, C + 1, (N, H, L), dtype=torch.int32)
    F = torch.rand(N, H, C, dtype=f64)
    Y = torch.ones(N, H, C, E, dtype=f64)
    aggregate_cpu(X, G, F, Y)
    expected = torch.ones(N, H, C, E, dtype=f64)
    for n, h, l in torch.cartesian_prod(*map(torch.arange, (N, H, L))).tolist():
        g = int(G[n, h, l])
        if 0 <= g < C:
            expected[n, h, g] += F[n, h, g] * X[n, h, l]
    assert_close("Y", Y, expected)

    out = torch.full((N, H, L, E), 7.0, dtype=f64)
    broadcast_cpu(Y, G, F, out)
    valid = ((G >= 0) & (G < C)).unsqueeze(-1)
    rows = (Y * F.unsqueeze(-1)).gather(
        2, G.long().clamp(0, C - 1).unsqueeze(-1).expand(-1, -1, -1, E)
    )
    assert_close("X", out, torch.where(valid, rows, torch.full_like(rows, 7.0)))


def test_aggregate_cpu_takes_fast_transformers_counts_buffer():
    G = torch.tensor([[[0, 1, 1, 2]]], dtype=torch.int32)
    counts = torch.zeros(1, 1, 3)  # (N, H, C) serves as (N, H, C, 1), as in fast-transformers
    aggregate_cpu(torch.ones(1, 1, 4, 1), G, torch.ones(1, 1, 3), counts)
    assert counts.tolist() == [[[1.0, 2.0, 1.0]]]
    X = torch.full((1, 1, 4), 5.0)  # (N, H, L) for (N, H, L, 1), with an invalid group
    broadcast_cpu(counts.unsqueeze(-1), torch.tensor([[[2, -1, 0, 1]]]), torch.ones(1, 1, 3), X)
    assert X.tolist() == [[[1.0, 5.0, 1.0, 2.0]]]
    with pytest.raises(ValueError, match="Y must have shape"):
        aggregate_cpu(torch.ones(1, 1, 4, 2), G, torch.ones(1, 1, 3), torch.zeros(1, 1, 3))


def test_empty_clusters_aggregate_to_zeros_not_nan(path):
    torch.manual_seed(1)
    X = torch.randn(2, 2, 6, 5, dtype=f64)
    G = torch.tensor([[0, 0, 0, 2, 2, 2], [3, 3, 3, 3, 3, 3]]).view(1, 2, 6).repeat(2, 1, 1)
    counts = torch.stack([G.eq(c).sum(-1) for c in range(4)], dim=-1)
    Y = aggregate(X, G, 1 / counts.to(f64))  # 1 / 0 = inf for the empty clusters
    assert not torch.isnan(Y).any()
    assert (Y[:, 0, 1] == 0).all() and (Y[:, 1, :3] == 0).all()
    assert_close("centroid", Y[:, 0, 0], X[:, 0, :3].mean(1))


def reference_causal(Q, K, V):
    mask = torch.ones(Q.shape[2], K.shape[2], dtype=torch.bool).tril()
    scores = (Q @ K.transpose(-1, -2)).masked_fill(~mask, 0)
    return scores @ V


def test_causal_product_cpu_forward_and_backward_fill_the_buffers(path):
    torch.manual_seed(2)
    Q, K, V = (torch.randn(2, 3, 11, d, dtype=f64) for d in (4, 4, 5))
    product = torch.empty(2, 3, 11, 5, dtype=f64)
    causal_product_cpu.causal_dot_product(Q, K, V, product)
    assert_close("product", product, reference_causal(Q, K, V))

    grad_out = torch.randn(2, 3, 11, 5, dtype=f64)
    buffers = [torch.full_like(t, 3.0) for t in (Q, K, V)]
    causal_product_cpu.causal_dot_backward(Q, K, V, grad_out, *buffers)
    leaves = [t.clone().requires_grad_() for t in (Q, K, V)]
    expected = torch.autograd.grad(reference_causal(*leaves), leaves, grad_out)
    for name, got, want in zip(("dQ", "dK", "dV"), buffers, expected):
        assert_close(name, got, want)


def test_hash_cpu_uses_fast_transformers_threshold_convention():
    torch.manual_seed(3)
    X, A = torch.randn(50, 6), torch.randn(20, 7)
    H = torch.zeros(50, dtype=torch.int64)
    hash_cpu.compute_hashes(X, A, H)
    projections = X @ A[:, :-1].T
    bits = projections.gt(A[:, -1]).long()
    assert torch.equal(H, (bits << torch.arange(20)).sum(-1))
    P = torch.randn(50, 13)
    hash_cpu.compute_hashes_from_projections(P, H)
    assert torch.equal(H, ((P > 0).long() << torch.arange(13)).sum(-1))


def test_cluster_cpu_fills_its_buffers():
    hashes = torch.tensor([0, 1, 0, 255, 254, 255, 0, 1]).view(1, 1, 8).repeat(2, 3, 1)
    lengths = torch.tensor([8, 6], dtype=torch.int32)
    centroids = torch.empty(2, 3, 2, dtype=torch.int64)
    clusters = torch.empty(2, 3, 8, dtype=torch.int32)
    counts = torch.empty(2, 3, 2, dtype=torch.int32)
    cluster_cpu(hashes, lengths, centroids, clusters, counts, 5, 8)
    low = clusters[0, 0, 0]
    assert (clusters[0, :, [0, 1, 2, 6, 7]] == low).all()
    assert (clusters[0, :, 3:6] == 1 - low).all()
    assert (clusters[1, :, 6:] == 2).all()  # padding
    assert counts[0].sum(-1).tolist() == [8, 8, 8] and counts[1].sum(-1).tolist() == [6, 6, 6]
    assert sorted(centroids[0, 0].tolist()) == [0, 255]


def window_reference(Q, K, lengths, w):
    N, H, L, _ = Q.shape
    out = torch.full((N, H, L, w), -1e24, dtype=Q.dtype)
    for l in range(L):
        for k in range(w):
            j = l - w // 2 + k
            for n in range(N):
                if 0 <= j < min(K.shape[2], int(lengths[n])):
                    out[n, :, l, k] = (Q[n, :, l] * K[n, :, j]).sum(-1)
    return out


def test_local_product_cpu_matches_fast_transformers_semantics(path):
    torch.manual_seed(4)
    Q, K = torch.randn(2, 2, 9, 3, dtype=f64), torch.randn(2, 2, 9, 3, dtype=f64)
    lengths = torch.tensor([9, 6])
    expected = window_reference(Q, K, lengths, 5)
    mask = torch.zeros(9, 9, dtype=f64)
    got = local_product_cpu.local_dot_product(Q, K, mask, lengths, 5)
    assert_close("local_dot_product", got, expected)

    grad = torch.randn(2, 2, 9, 5, dtype=f64)
    gQ, gK = local_product_cpu.local_dot_backward(Q, K, lengths, grad, 5)
    leaves = [Q.clone().requires_grad_(), K.clone().requires_grad_()]
    ref = window_reference(*leaves, lengths, 5)
    dQ, dK = torch.autograd.grad(ref, leaves, grad.masked_fill(ref == -1e24, 0))
    assert_close("dQ", gQ, dQ)
    assert_close("dK", gK, dK)

    A, V = torch.rand(2, 2, 9, 5, dtype=f64), torch.randn(2, 2, 9, 4, dtype=f64)
    out = local_product_cpu.local_weighted_average(A, V)
    gA, gV = local_product_cpu.local_weighted_average_backward(A, V, torch.ones_like(out))
    assert out.shape == (2, 2, 9, 4) and gA.shape == A.shape and gV.shape == V.shape
    # slot k of query l reads value l - 2 + k: the middle slot reads the query's own row
    one_hot = torch.zeros_like(A)
    one_hot[..., 2] = 1
    assert_close("identity", local_product_cpu.local_weighted_average(one_hot, V), V)


def test_sparse_product_cpu_buffers(path):
    torch.manual_seed(5)
    Q, K = torch.randn(2, 2, 7, 3, dtype=f64), torch.randn(2, 2, 8, 3, dtype=f64)
    topk = torch.randint(0, 8, (2, 2, 7, 4))
    gathered = (
        K.unsqueeze(2)
        .expand(-1, -1, 7, -1, -1)
        .gather(3, topk.unsqueeze(-1).expand(-1, -1, -1, -1, 3))
    )
    expected = (Q.unsqueeze(3) * gathered).sum(-1)
    product = torch.empty(2, 2, 7, 4, dtype=f64)
    sparse_product_cpu.sparse_dot_product(Q, K, topk, product)
    assert_close("product", product, expected)

    W, V = torch.rand(2, 2, 7, 4, dtype=f64), torch.randn(2, 2, 8, 5, dtype=f64)
    out = torch.ones(2, 2, 7, 5, dtype=f64)
    sparse_product_cpu.sparse_weighted_average(W, V, topk, out)
    values = (
        V.unsqueeze(2)
        .expand(-1, -1, 7, -1, -1)
        .gather(3, topk.unsqueeze(-1).expand(-1, -1, -1, -1, 5))
    )
    assert_close("average", out, 1 + (W.unsqueeze(-1) * values).sum(3))

    gQ, gK = torch.zeros_like(Q), torch.zeros_like(K)
    grad = torch.randn(2, 2, 7, 4, dtype=f64)
    sparse_product_cpu.sparse_dot_backward(Q, K, topk, grad, gQ, gK)
    assert_close("dQ", gQ, (grad.unsqueeze(-1) * gathered).sum(3))


def test_clustered_sparse_product_cpu_leaves_rows_of_other_groups(path):
    torch.manual_seed(6)
    Q, K = torch.randn(1, 2, 6, 3, dtype=f64), torch.randn(1, 2, 5, 3, dtype=f64)
    groups = torch.tensor([0, 1, 1, 0, 2, -1], dtype=torch.int32).view(1, 1, 6).repeat(1, 2, 1)
    topk = torch.randint(0, 5, (1, 2, 2, 3))
    product = torch.full((1, 2, 6, 3), 9.0, dtype=f64)
    clustered_sparse_product_cpu.clustered_sparse_dot_product(Q, K, groups, topk, product)
    for l, g in enumerate([0, 1, 1, 0, 2, -1]):
        if g in (0, 1):
            keys = K[0].gather(1, topk[0, :, g].unsqueeze(-1).expand(-1, -1, 3))
            assert_close("row", product[0, :, l], (Q[0, :, l].unsqueeze(1) * keys).sum(-1))
        else:
            assert (product[0, :, l] == 9.0).all()


def test_exceptions_are_also_fast_transformers_types():
    assert issubclass(MissingParameterError, ValueError) and issubclass(
        MissingParameterError, TypeError
    )
    assert issubclass(UnsupportedMaskError, ValueError) and issubclass(
        UnsupportedMaskError, RuntimeError
    )
    x = torch.rand(1, 4, 2, 8)
    causal = FullMask(torch.ones(4, 4, dtype=torch.bool).tril())
    lengths = LengthMask(torch.tensor([4]))
    with pytest.raises(RuntimeError, match="LinearAttention does not support"):
        LinearAttention(8)(x, x, x, causal, lengths, lengths)


def test_lower_triangular_of_rectangular_masks():
    assert LengthMask(torch.tensor([1, 2, 3]), max_len=4).lower_triangular
    assert LengthMask(torch.tensor([1, 2, 3])).lower_triangular
    assert not LengthMask(torch.tensor([1, 1, 3])).lower_triangular
    assert not FullMask(torch.ones(4, 3, dtype=torch.bool).tril()).lower_triangular
    assert not FullMask(torch.tensor([[1, 0, 1], [1, 1, 0], [1, 1, 1]]) > 0).lower_triangular
