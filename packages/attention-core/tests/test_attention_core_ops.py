"""The op modules behind local and clustered attention (hashing, Hamming clustering,
aggregate/broadcast, local and sparse products) against float64 references written here
with loops or dense matrices."""

import pytest
import torch

from attention_core import _extension
from attention_core.aggregate import (
    aggregate,
    broadcast,
    clustered_aggregate,
    clustered_broadcast,
)
from attention_core.clustering.hamming import cluster
from attention_core.hashing import _op as hashing_op
from attention_core.hashing import compute_hashes, compute_hashes_reference
from attention_core.local_product import local_dot_product, local_weighted_average
from attention_core.sparse_product import (
    clustered_sparse_dot_product,
    clustered_sparse_weighted_average,
    sparse_dot_product,
    sparse_weighted_average,
)
from attention_core.testing import assert_close

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
needs_kernels = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# =======================================================================================
# hashing
# =======================================================================================


def hash_margins(X, A):
    """float64 ``X . A[b, :D] - A[b, D]`` (the last column is a threshold, as in
    fast-transformers) for every row and plane, ``(M, B)``."""
    X, A = X.double(), A.double()
    return X @ A[:, :-1].T - A[:, -1]


def hashes_oracle(X, A):
    """Python ints: bit b set when the float64 margin is positive."""
    margins = hash_margins(X, A).tolist()
    return [sum(1 << b for b, m in enumerate(row) if m > 0) for row in margins]


def assert_hashes_match(hashes, X, A, eps):
    """Every bit agrees with the float64 oracle except where the margin is within ``eps``
    of zero (where float32 rounding may legitimately flip it)."""
    assert hashes.dtype == torch.int64 and hashes.shape == (X.shape[0],)
    margins = hash_margins(X, A)
    bits = torch.arange(A.shape[0])
    got = ((hashes.unsqueeze(-1) >> bits) & 1).bool()
    decided = margins.abs() > eps
    assert torch.equal(got[decided], (margins > 0)[decided])
    assert (hashes >> A.shape[0] == 0).all(), "bits above B must stay clear"


HASH_SHAPES = [  # M, D, B
    pytest.param(1, 1, 1, id="tiny"),
    pytest.param(37, 5, 13, id="primes"),
    pytest.param(64, 16, 63, id="max-bits"),
    pytest.param(0, 3, 4, id="empty"),
]


@pytest.mark.parametrize(("M", "D", "B"), HASH_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_compute_hashes_matches_oracle(M, D, B, dtype, layout):
    g = gen(M + D + B)
    if layout == "transposed":
        X = torch.randn(D, M, generator=g, dtype=dtype).T
    elif layout == "strided":
        X = torch.randn(M, 2 * D + 1, generator=g, dtype=dtype)[:, 1::2]
    else:
        X = torch.randn(M, D, generator=g, dtype=dtype)
    A = torch.randn(B, D + 1, generator=g, dtype=dtype)
    eps = 1e-4 if dtype == torch.float32 else 1e-12
    assert_hashes_match(compute_hashes(X, A), X, A, eps)
    assert_hashes_match(compute_hashes_reference(X, A), X, A, eps)


def test_compute_hashes_exact_on_hand_example():
    X = torch.tensor([[1.0, -1.0], [-1.0, 2.0], [0.0, 0.0]])
    # the third plane has threshold -1: 0 > -1 sets its bit everywhere
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    assert compute_hashes(X, A).tolist() == [0b101, 0b110, 0b100]
    assert compute_hashes_reference(X, A).tolist() == [0b101, 0b110, 0b100]
    assert hashes_oracle(X, A) == [0b101, 0b110, 0b100]
    # a threshold of 1 clears the third bit and the first of [1, -1]: 1 > 1 is false
    A = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert compute_hashes(X, A).tolist() == [0b000, 0b010, 0b000]
    assert compute_hashes_reference(X, A).tolist() == [0b000, 0b010, 0b000]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_compute_hashes_low_precision_uses_reference(dtype):
    g = gen(3)
    X, A = torch.randn(20, 4, generator=g).to(dtype), torch.randn(9, 5, generator=g).to(dtype)
    assert_hashes_match(compute_hashes(X, A), X, A, eps=0.1)


def test_compute_hashes_fills_output_buffer():
    g = gen(4)
    X, A = torch.randn(11, 3, generator=g), torch.randn(7, 4, generator=g)
    H = torch.full((11,), -5, dtype=torch.int64)
    out = compute_hashes(X, A, H)
    assert out is H
    assert torch.equal(H, compute_hashes(X, A))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_reference(dtype):
    g = gen(5)
    X = torch.randn(101, 7, generator=g, dtype=dtype)[::2]  # odd size, non-contiguous
    A = torch.randn(31, 8, generator=g, dtype=dtype)
    kernel = hashing_op.compute_hashes_kernel(X, A)
    reference = compute_hashes_reference(X, A)
    margins = hash_margins(X, A)
    eps = 1e-4 if dtype == torch.float32 else 1e-12
    # identical except, at most, bits decided by a rounding-sized margin
    differing = ((kernel ^ reference).unsqueeze(-1) >> torch.arange(31)) & 1
    assert (margins.abs()[differing.bool()] <= eps).all()
    if dtype == torch.float64:
        assert torch.equal(kernel, reference)


@needs_kernels
@pytest.mark.parametrize(
    "sample",
    ["contiguous", "transposed", "offset", "requires-grad", "float64"],
)
def test_compute_hashes_opcheck(sample):
    g = gen(6)
    dtype = torch.float64 if sample == "float64" else torch.float32
    X = torch.randn(13, 5, generator=g, dtype=dtype)
    A = torch.randn(9, 6, generator=g, dtype=dtype)
    if sample == "transposed":
        X = torch.randn(5, 13, generator=g).T
    elif sample == "offset":
        X = torch.randn(20, 5, generator=g)[7:]
    elif sample == "requires-grad":
        X.requires_grad_(True)
    torch.library.opcheck(hashing_op.compute_hashes_kernel, (X, A))


@needs_kernels
def test_compute_hashes_dispatches_to_kernel_unless_forced(monkeypatch):
    g = gen(7)
    X, A = torch.randn(9, 4, generator=g), torch.randn(5, 5, generator=g)
    calls = []

    def spy(X, A):
        calls.append(X.shape)
        return compute_hashes_reference(X, A)

    monkeypatch.setattr(hashing_op, "compute_hashes_kernel", spy)
    monkeypatch.delenv(_extension.FORCE_REFERENCE_ENV, raising=False)
    compute_hashes(X, A)
    assert calls == [(9, 4)]
    # float16 and the forced-reference switch both bypass the kernel
    compute_hashes(X.half(), A.half())
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    assert not _extension.use_kernels(X, A)
    assert torch.equal(compute_hashes(X, A), compute_hashes_reference(X, A))
    assert calls == [(9, 4)]
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "0")
    assert _extension.use_kernels(X, A)


def test_compute_hashes_under_torch_compile():
    g = gen(8)
    X, A = torch.randn(17, 6, generator=g), torch.randn(12, 7, generator=g)
    compiled = torch.compile(compute_hashes, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(X, A), compute_hashes(X, A))


@pytest.mark.parametrize(
    ("X", "A", "H", "match"),
    [
        pytest.param(
            torch.ones(3, 2),
            torch.ones(4, 2),
            None,
            r"A must have shape \(B, D \+ 1\)",
            id="no-bias",
        ),
        pytest.param(
            torch.ones(3, 2),
            torch.ones(64, 3),
            None,
            "between 1 and 63 hyperplanes; got 64",
            id="64-bits",
        ),
        pytest.param(
            torch.ones(3, 2),
            torch.ones(4, 3).double(),
            None,
            "A must have the dtype of X",
            id="dtype",
        ),
        pytest.param(torch.ones(3), torch.ones(4, 2), None, "X must have 2 dimensions", id="rank"),
        pytest.param(
            torch.ones(3, 2),
            torch.ones(4, 3),
            torch.zeros(3, dtype=torch.int32),
            "H must have dtype torch.int64",
            id="H-dtype",
        ),
        pytest.param(
            torch.ones(3, 2),
            torch.ones(4, 3),
            torch.zeros(2, dtype=torch.int64),
            r"H must have shape \(3,\)",
            id="H-shape",
        ),
        pytest.param(
            torch.ones(3, 2, dtype=torch.int64),
            torch.ones(4, 3),
            None,
            "X must be a floating point tensor",
            id="int-X",
        ),
    ],
)
def test_compute_hashes_errors(X, A, H, match):
    with pytest.raises((ValueError, TypeError), match=match):
        compute_hashes(X, A, H)


# =======================================================================================
# local products
# =======================================================================================


def local_dot_oracle(Q, K, mask, key_lengths, context):
    N, H, L, _ = Q.shape
    S = K.shape[2]
    dense = torch.einsum("nhle,nhse->nhls", Q.double(), K.double()) + mask.double()
    out = torch.full((N, H, L, context), float("-inf"), dtype=torch.float64)
    for n in range(N):
        for l in range(L):
            for k in range(context):
                j = l - context // 2 + k
                if 0 <= j < S and j < key_lengths[n]:
                    out[n, :, l, k] = dense[n, :, l, j]
    return out


def local_average_oracle(A, V):
    N, H, L, context = A.shape
    S = V.shape[2]
    out = torch.zeros(N, H, L, V.shape[3], dtype=torch.float64)
    for l in range(L):
        for k in range(context):
            j = l - context // 2 + k
            if 0 <= j < S:
                out[:, :, l] += A[:, :, l, k, None].double() * V[:, :, j].double()
    return out


LOCAL_SHAPES = [  # N, H, L, S, E, context
    pytest.param(1, 1, 1, 1, 1, 1, id="tiny"),
    pytest.param(2, 3, 7, 7, 5, 3, id="primes"),
    pytest.param(2, 2, 11, 5, 3, 4, id="L>S-even-context"),
    pytest.param(3, 1, 5, 13, 2, 7, id="L<S"),
    pytest.param(1, 2, 4, 3, 2, 11, id="context>L+S"),
]


def local_inputs(N, H, L, S, E, context, dtype, seed=0):
    g = gen(seed)
    Q = torch.randn(N, H, L, E, generator=g, dtype=dtype)
    K = torch.randn(N, H, S, E, generator=g, dtype=dtype)
    mask = torch.randn(L, S, generator=g, dtype=dtype)
    mask[torch.rand(L, S, generator=g) < 0.2] = float("-inf")
    lengths = torch.randint(0, S + 1, (N,), generator=g)
    lengths[0] = S
    return Q, K, mask, lengths


@pytest.mark.parametrize(("N", "H", "L", "S", "E", "context"), LOCAL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_local_dot_product(N, H, L, S, E, context, dtype):
    Q, K, mask, lengths = local_inputs(N, H, L, S, E, context, dtype)
    out = local_dot_product(Q, K, mask, lengths, context)
    expected = local_dot_oracle(Q, K, mask, lengths, context)
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    assert_close("local_dot", out[finite], expected[finite])


def test_local_dot_product_finite_mask_and_float32_mask_on_float64():
    Q, K, _, lengths = local_inputs(2, 2, 6, 6, 3, 3, torch.float64)
    mask = torch.zeros(6, 6).masked_fill(torch.eye(6, dtype=torch.bool), -1e24)  # float32
    out = local_dot_product(Q, K, mask, lengths, 3)
    assert out.dtype == torch.float64
    expected = local_dot_oracle(Q, K, mask, lengths, 3)
    finite = torch.isfinite(expected)
    assert_close("local_dot", out[finite], expected[finite], rtol=1e-12, atol=0)


@pytest.mark.parametrize(("N", "H", "L", "S", "E", "context"), LOCAL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_local_weighted_average(N, H, L, S, E, context, dtype):
    g = gen(1)
    A = torch.rand(N, H, L, context, generator=g, dtype=dtype)
    V = torch.randn(N, H, S, E + 1, generator=g, dtype=dtype)
    assert_close("local_avg", local_weighted_average(A, V), local_average_oracle(A, V))


def test_local_products_gradcheck():
    Q, K, mask, lengths = local_inputs(2, 2, 6, 5, 3, 4, torch.float64, seed=3)
    Q.requires_grad_(True)
    K.requires_grad_(True)
    valid = torch.isfinite(local_dot_product(Q, K, mask, lengths, 4))

    def dot(Q, K):
        return local_dot_product(Q, K, mask, lengths, 4).masked_fill(~valid, 0.0)

    torch.autograd.gradcheck(dot, (Q, K))
    A = torch.rand(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(local_weighted_average, (A, V))


def test_local_products_never_build_an_L_by_S_matrix():
    # L * S = 1e10 elements: any dense intermediate would need tens of gigabytes.
    L = S = 100_000
    Q, K, V = torch.randn(1, 1, L, 2), torch.randn(1, 1, S, 2), torch.randn(1, 1, S, 3)
    mask = torch.zeros(1, 1).expand(L, S)  # a zero-stride view, not an L x S allocation
    QK = local_dot_product(Q, K, mask, torch.tensor([S]), 3)
    assert QK.shape == (1, 1, L, 3)
    out = local_weighted_average(torch.softmax(QK, dim=-1), V)
    assert out.shape == (1, 1, L, 3) and torch.isfinite(out).all()
    assert_close("middle row", QK[0, 0, 500, 1], Q[0, 0, 500] @ K[0, 0, 500])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param(
            {"local_context": 0},
            ValueError,
            "local_context must be a positive int; got 0",
            id="context-0",
        ),
        pytest.param(
            {"attn_mask": torch.zeros(4, 6)},
            ValueError,
            r"attn_mask must have shape \(L, S\) = \(5, 6\)",
            id="mask-shape",
        ),
        pytest.param(
            {"key_lengths": torch.tensor([6.0, 6.0])},
            TypeError,
            "key_lengths must be an integer tensor",
            id="lengths-float",
        ),
        pytest.param(
            {"key_lengths": torch.tensor([6])},
            ValueError,
            r"key_lengths must have shape \(N,\) = \(2,\)",
            id="lengths-shape",
        ),
        pytest.param(
            {"keys": torch.zeros(2, 3, 6, 4, dtype=torch.float64)},
            TypeError,
            "keys must have the dtype of queries",
            id="keys-dtype",
        ),
        pytest.param(
            {"keys": torch.zeros(2, 3, 6, 5)},
            ValueError,
            r"keys must have shape \(N, H, S, E\)",
            id="keys-dim",
        ),
    ],
)
def test_local_dot_product_errors(kwargs, error, match):
    args = {
        "queries": torch.zeros(2, 3, 5, 4),
        "keys": torch.zeros(2, 3, 6, 4),
        "attn_mask": torch.zeros(5, 6),
        "key_lengths": torch.tensor([6, 6]),
        "local_context": 3,
    } | kwargs
    with pytest.raises(error, match=match):
        local_dot_product(**args)


def test_local_weighted_average_errors():
    with pytest.raises(ValueError, match=r"values must have shape \(N, H, S, D\) = \(2, 3, S, D\)"):
        local_weighted_average(torch.zeros(2, 3, 5, 3), torch.zeros(2, 4, 6, 4))
    with pytest.raises(TypeError, match="values must have the dtype of attention"):
        local_weighted_average(torch.zeros(2, 3, 5, 3), torch.zeros(2, 3, 6, 4).double())


# =======================================================================================
# Hamming clustering
# =======================================================================================


def popcount(x):
    return bin(x).count("1")


def cluster_oracle(hashes, lengths, clusters, iterations, bits):
    """Lloyd's algorithm on Python ints, one sequence at a time, with the re-seeding of
    empty clusters of :mod:`attention_core.clustering.hamming`."""
    N, H, L = hashes.shape
    mask = (1 << bits) - 1
    groups = torch.full((N, H, L), clusters, dtype=torch.int32)
    counts = torch.zeros(N, H, clusters, dtype=torch.int32)
    for n in range(N):
        length = int(lengths[n])
        for h in range(H):
            codes = [int(x) & mask for x in hashes[n, h, :length]]
            if not codes:
                continue
            centroids = [codes[c * length // clusters] for c in range(clusters)]

            def assign(codes=codes, centroids=centroids):
                # nearest centroid, ties to the lowest index
                distances = [[popcount(x ^ centroid) for centroid in centroids] for x in codes]
                return [row.index(min(row)) for row in distances]

            members = assign()
            for _ in range(iterations):
                # an empty cluster takes the code farthest from every centroid so far (ties:
                # the lowest position), unless every code sits on a centroid
                far = [min(popcount(x ^ centroid) for centroid in centroids) for x in codes]
                for c in range(clusters):
                    if c not in members and max(far) > 0:
                        centroids[c] = codes[far.index(max(far))]
                        far = [min(d, popcount(x ^ centroids[c])) for d, x in zip(far, codes)]
                for c in range(clusters):
                    mine = [x for x, m in zip(codes, members, strict=True) if m == c]
                    if mine:
                        centroids[c] = sum(
                            1 << b
                            for b in range(bits)
                            if 2 * sum((x >> b) & 1 for x in mine) > len(mine)
                        )
                members = assign()
            groups[n, h, :length] = torch.tensor(members, dtype=torch.int32)
            for m in members:
                counts[n, h, m] += 1
    return groups, counts


CLUSTER_CASES = [  # N, H, L, clusters, bits, iterations
    pytest.param(1, 1, 1, 1, 1, 0, id="tiny"),
    pytest.param(2, 3, 13, 5, 7, 3, id="primes"),
    pytest.param(2, 2, 6, 9, 4, 2, id="more-clusters-than-positions"),
    pytest.param(3, 1, 11, 3, 63, 4, id="63-bits"),
    pytest.param(1, 2, 17, 4, 2, 10, id="few-bits-many-ties"),
]


@pytest.mark.parametrize(("N", "H", "L", "clusters", "bits", "iterations"), CLUSTER_CASES)
def test_cluster_matches_lloyd_oracle(N, H, L, clusters, bits, iterations):
    g = gen(L * clusters + bits)
    # full 64-bit codes: the bits above ``bits`` must be ignored
    hashes = torch.randint(-(2**63), 2**63 - 1, (N, H, L), generator=g, dtype=torch.int64)
    lengths = torch.randint(0, L + 1, (N,), generator=g)
    lengths[0] = L
    groups, counts = cluster(hashes, lengths, clusters=clusters, iterations=iterations, bits=bits)
    expected_groups, expected_counts = cluster_oracle(hashes, lengths, clusters, iterations, bits)
    assert groups.dtype == counts.dtype == torch.int32
    assert torch.equal(groups, expected_groups)
    assert torch.equal(counts, expected_counts)
    assert torch.equal(counts.sum(-1), lengths.int().view(N, 1).expand(N, H))


def test_cluster_hand_example_and_ties_go_to_lowest_index():
    hashes = torch.tensor([[[0b0000, 0b0001, 0b1110, 0b1111]]])
    groups, counts = cluster(hashes, torch.tensor([4]), clusters=2, iterations=3, bits=4)
    assert groups.tolist() == [[[0, 0, 1, 1]]] and counts.tolist() == [[[2, 2]]]
    # initial centroids: positions 0 and floor(3 / 2) = 1, i.e. 0b00 and 0b11; 0b01 is at
    # distance 1 from both
    hashes = torch.tensor([[[0b00, 0b11, 0b01]]])
    groups, _ = cluster(hashes, torch.tensor([3]), clusters=2, iterations=0, bits=2)
    assert groups.tolist() == [[[0, 1, 0]]]


def test_cluster_fills_all_buffers_and_centroids_set_the_cluster_count():
    g = gen(11)
    N, H, L, C, bits = 2, 2, 9, 3, 6
    hashes = torch.randint(0, 2**bits, (N, H, L), generator=g)
    lengths = torch.tensor([9, 5])
    buffers = {
        "groups": torch.full((N, H, L), -7, dtype=torch.int32),
        "counts": torch.full((N, H, C), -7, dtype=torch.int32),
        "centroids": torch.full((N, H, C), -7, dtype=torch.int64),
        "distances": torch.full((N, H, L), -7, dtype=torch.int32),
        "bitcounts": torch.full((N, H, C, bits), -7, dtype=torch.int32),
    }
    groups, counts = cluster(hashes, lengths, clusters=99, iterations=2, bits=bits, **buffers)
    assert groups is buffers["groups"] and counts is buffers["counts"]
    expected_groups, expected_counts = cluster_oracle(hashes, lengths, C, 2, bits)
    assert torch.equal(groups, expected_groups) and torch.equal(counts, expected_counts)
    valid = torch.arange(L) < lengths.view(N, 1, 1)
    member = groups.long().clamp(max=C - 1)
    centroid_of = buffers["centroids"].gather(2, member)
    hamming = torch.tensor([popcount(int(x)) for x in (hashes ^ centroid_of).flatten()])
    distance = torch.where(valid, hamming.view(N, H, L), 0)
    assert torch.equal(buffers["distances"].long(), distance)
    for n, h, c, b in [(0, 0, 0, 0), (1, 1, 2, 5), (0, 1, 1, 3)]:
        in_cluster = (groups[n, h] == c) & valid[n, 0]
        assert buffers["bitcounts"][n, h, c, b] == ((hashes[n, h] >> b) & 1)[in_cluster].sum()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param(
            {"hashes": torch.zeros(1, 1, 4)},
            TypeError,
            "hashes must have dtype torch.int64",
            id="float-hashes",
        ),
        pytest.param({"bits": 64}, ValueError, r"bits must be in \[1, 63\]; got 64", id="64-bits"),
        pytest.param(
            {"clusters": 0}, ValueError, "clusters must be a positive int; got 0", id="0-clusters"
        ),
        pytest.param(
            {"iterations": -1},
            ValueError,
            "iterations must be a non-negative int; got -1",
            id="negative-iterations",
        ),
        pytest.param(
            {"lengths": torch.tensor([5])},
            ValueError,
            r"lengths must lie in \[0, L=4\]",
            id="too-long",
        ),
        pytest.param(
            {"groups": torch.zeros(1, 1, 4, dtype=torch.int64)},
            TypeError,
            "groups must have dtype torch.int32",
            id="groups-dtype",
        ),
        pytest.param(
            {"counts": torch.zeros(1, 1, 2, dtype=torch.int32)},
            ValueError,
            r"counts must have shape \(1, 1, 3\)",
            id="counts-shape",
        ),
    ],
)
def test_cluster_errors(kwargs, error, match):
    args = {
        "hashes": torch.zeros(1, 1, 4, dtype=torch.int64),
        "lengths": torch.tensor([4]),
        "clusters": 3,
    } | kwargs
    with pytest.raises(error, match=match):
        cluster(**args)


# =======================================================================================
# aggregate and broadcast
# =======================================================================================


def aggregate_oracle(X, G, F):
    N, H, L, E = X.shape
    C = F.shape[2]
    Y = torch.zeros(N, H, C, E, dtype=torch.float64)
    for n in range(N):
        for h in range(H):
            for l in range(L):
                c = int(G[n, h, l])
                if 0 <= c < C:
                    Y[n, h, c] += F[n, h, c].double() * X[n, h, l].double()
    return Y


def broadcast_oracle(Y, G, F):
    N, H, C, E = Y.shape
    L = G.shape[2]
    X = torch.zeros(N, H, L, E, dtype=torch.float64)
    for n in range(N):
        for h in range(H):
            for l in range(L):
                c = int(G[n, h, l])
                if 0 <= c < C:
                    X[n, h, l] = F[n, h, c].double() * Y[n, h, c].double()
    return X


AGG_SHAPES = [  # N, H, L, C, E
    pytest.param(1, 1, 1, 1, 1, id="tiny"),
    pytest.param(2, 3, 11, 5, 7, id="primes"),
    pytest.param(3, 2, 4, 9, 2, id="more-groups-than-rows"),
]


def agg_inputs(N, H, L, C, E, dtype, seed=0):
    g = gen(seed)
    X = torch.randn(N, H, L, E, generator=g, dtype=dtype)
    G = torch.randint(-1, C + 2, (N, H, L), generator=g)  # some entries out of range
    F = torch.rand(N, H, C, generator=g)  # float32 factors, as fast-transformers passes
    Y = torch.randn(N, H, C, E, generator=g, dtype=dtype)
    return X, G, F, Y


@pytest.mark.parametrize(("N", "H", "L", "C", "E"), AGG_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_and_broadcast(N, H, L, C, E, dtype):
    X, G, F, Y = agg_inputs(N, H, L, C, E, dtype)
    assert_close("aggregate", aggregate(X, G, F), aggregate_oracle(X, G, F))
    assert_close("broadcast", broadcast(Y, G, F), broadcast_oracle(Y, G, F))
    # int32 groups, as returned by cluster, work the same
    assert_close("aggregate-int32", aggregate(X, G.int(), F), aggregate_oracle(X, G, F))


def test_aggregate_and_broadcast_fill_output_buffers():
    X, G, F, Y = agg_inputs(2, 2, 5, 3, 4, torch.float32, seed=1)
    Y_out = torch.full((2, 2, 3, 4), 9.0)
    assert aggregate(X, G, F, Y_out) is Y_out
    assert_close("Y", Y_out, aggregate_oracle(X, G, F))
    X_out = torch.full((2, 2, 5, 4), 9.0)
    assert broadcast(Y, G, F, X_out) is X_out
    assert_close("X", X_out, broadcast_oracle(Y, G, F))


def test_clustered_aggregate_and_broadcast_ignore_padding():
    N, H, L, C, E = 2, 2, 7, 3, 4
    g = gen(2)
    lengths = torch.tensor([7, 4])
    valid = torch.arange(L) < lengths.view(N, 1, 1)
    G = torch.randint(0, C, (N, H, L), generator=g).sort(dim=-1).values.masked_fill(~valid, C)
    G[1, :, 5] = 0  # a stale group in the padding must not count
    counts = torch.stack([((c == G) & valid).sum(-1) for c in range(C)], dim=-1)
    X = torch.randn(N, H, L, E, generator=g, dtype=torch.float64)
    F = torch.rand(N, H, C, generator=g, dtype=torch.float64)
    Y = torch.randn(N, H, C, E, generator=g, dtype=torch.float64)
    G_valid = G.masked_fill(~valid, -1)
    assert_close(
        "clustered_aggregate",
        clustered_aggregate(X, G, F, lengths),
        aggregate_oracle(X, G_valid, F),
    )
    assert_close(
        "clustered_broadcast", clustered_broadcast(Y, G, counts, F), broadcast_oracle(Y, G_valid, F)
    )


def test_aggregate_broadcast_gradcheck():
    X, G, _, Y = agg_inputs(2, 2, 6, 3, 3, torch.float64, seed=3)
    X.requires_grad_(True)
    Y.requires_grad_(True)
    F = torch.rand(2, 2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda X, F: aggregate(X, G, F), (X, F))
    torch.autograd.gradcheck(lambda Y, F: broadcast(Y, G, F), (Y, F))
    lengths = torch.tensor([6, 3])
    torch.autograd.gradcheck(lambda X, F: clustered_aggregate(X, G, F, lengths), (X, F))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda: aggregate(
                torch.zeros(2, 2, 5, 3),
                torch.zeros(2, 2, 4, dtype=torch.int64),
                torch.ones(2, 2, 3),
            ),
            ValueError,
            r"G must have shape \(N, H, L\) = \(2, 2, 5\)",
            id="G-shape",
        ),
        pytest.param(
            lambda: aggregate(torch.zeros(2, 2, 5, 3), torch.zeros(2, 2, 5), torch.ones(2, 2, 3)),
            TypeError,
            "G must be an integer tensor",
            id="G-float",
        ),
        pytest.param(
            lambda: aggregate(
                torch.zeros(2, 2, 5, 3),
                torch.zeros(2, 2, 5, dtype=torch.int64),
                torch.ones(2, 3, 3),
            ),
            ValueError,
            r"F must have shape \(N, H, C\) = \(2, 2, C\)",
            id="F-shape",
        ),
        pytest.param(
            lambda: broadcast(
                torch.zeros(2, 2, 3, 4),
                torch.zeros(2, 2, 5, dtype=torch.int64),
                torch.ones(2, 2, 4),
            ),
            ValueError,
            r"F must have shape \(N, H, C\) = \(2, 2, 3\)",
            id="broadcast-F",
        ),
        pytest.param(
            lambda: aggregate(
                torch.zeros(2, 2, 5, 3),
                torch.zeros(2, 2, 5, dtype=torch.int64),
                torch.ones(2, 2, 3),
                torch.zeros(2, 2, 3, 2),
            ),
            ValueError,
            r"Y must have shape \(2, 2, 3, 3\)",
            id="Y-buffer",
        ),
        pytest.param(
            lambda: clustered_aggregate(
                torch.zeros(2, 2, 5, 3),
                torch.zeros(2, 2, 5, dtype=torch.int64),
                torch.ones(2, 2, 3),
                torch.tensor([5]),
            ),
            ValueError,
            r"lengths must have shape \(N,\) = \(2,\)",
            id="lengths",
        ),
        pytest.param(
            lambda: clustered_broadcast(
                torch.zeros(2, 2, 3, 4),
                torch.zeros(2, 2, 5, dtype=torch.int64),
                torch.ones(2, 2, 2, dtype=torch.int64),
                torch.ones(2, 2, 3),
            ),
            ValueError,
            r"counts must have shape \(N, H, C\) = \(2, 2, 3\)",
            id="counts",
        ),
    ],
)
def test_aggregate_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# =======================================================================================
# sparse products
# =======================================================================================

SPARSE_SHAPES = [  # N, H, L, S, E, k
    pytest.param(1, 1, 1, 1, 1, 1, id="tiny"),
    pytest.param(2, 3, 7, 11, 5, 3, id="primes"),
    pytest.param(2, 2, 13, 5, 4, 5, id="k=S"),
]


def sparse_inputs(N, H, L, S, E, k, dtype, seed=0):
    g = gen(seed)
    Q = torch.randn(N, H, L, E, generator=g, dtype=dtype)
    K = torch.randn(N, H, S, E, generator=g, dtype=dtype)
    V = torch.randn(N, H, S, E + 2, generator=g, dtype=dtype)
    topk = torch.randint(0, S, (N, H, L, k), generator=g)
    W = torch.rand(N, H, L, k, generator=g, dtype=dtype)
    return Q, K, V, topk, W


def sparse_dot_oracle(Q, K, topk):
    N, H, L, k = topk.shape
    out = torch.zeros(N, H, L, k, dtype=torch.float64)
    for n, h, l, i in torch.cartesian_prod(*map(torch.arange, (N, H, L, k))).tolist():
        out[n, h, l, i] = Q[n, h, l].double() @ K[n, h, topk[n, h, l, i]].double()
    return out


def sparse_average_oracle(W, V, topk):
    N, H, L, k = topk.shape
    out = torch.zeros(N, H, L, V.shape[3], dtype=torch.float64)
    for n, h, l, i in torch.cartesian_prod(*map(torch.arange, (N, H, L, k))).tolist():
        out[n, h, l] += W[n, h, l, i].double() * V[n, h, topk[n, h, l, i]].double()
    return out


@pytest.mark.parametrize(("N", "H", "L", "S", "E", "k"), SPARSE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_products(N, H, L, S, E, k, dtype):
    Q, K, V, topk, W = sparse_inputs(N, H, L, S, E, k, dtype)
    assert_close("sparse_dot", sparse_dot_product(Q, K, topk), sparse_dot_oracle(Q, K, topk))
    assert_close(
        "sparse_avg", sparse_weighted_average(W, V, topk), sparse_average_oracle(W, V, topk)
    )


@pytest.mark.parametrize(("N", "H", "L", "S", "E", "k"), SPARSE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clustered_sparse_products(N, H, L, S, E, k, dtype):
    Q, K, V, _, W = sparse_inputs(N, H, L, S, E, k, dtype, seed=1)
    g = gen(2)
    C = 3
    topk = torch.randint(0, S, (N, H, C, k), generator=g)
    lengths = torch.randint(0, L + 1, (N,), generator=g)
    lengths[0] = L
    valid = torch.arange(L) < lengths.view(N, 1, 1)
    groups = torch.randint(0, C, (N, H, L), generator=g).masked_fill(~valid, C).int()
    counts = torch.stack([(groups == c).sum(-1) for c in range(C)], dim=-1).int()
    # every query's own list is its cluster's; invalid queries read an arbitrary row
    per_query = topk.gather(2, groups.long().clamp(max=C - 1)[..., None].expand(-1, -1, -1, k))
    keep = valid.expand(N, H, L).unsqueeze(-1).double()
    dot = clustered_sparse_dot_product(Q, K, topk, groups, counts, lengths)
    assert_close("clustered_dot", dot, sparse_dot_oracle(Q, K, per_query) * keep)
    avg = clustered_sparse_weighted_average(W, V, topk, groups, counts)
    assert_close("clustered_avg", avg, sparse_average_oracle(W, V, per_query) * keep)
    avg = clustered_sparse_weighted_average(W, V, topk, groups)  # fast-transformers' 4 args
    assert_close("clustered_avg_no_counts", avg, sparse_average_oracle(W, V, per_query) * keep)


def test_sparse_products_gradcheck():
    Q, K, V, topk, W = sparse_inputs(2, 2, 5, 6, 3, 3, torch.float64, seed=4)
    for t in (Q, K, V, W):
        t.requires_grad_(True)
    torch.autograd.gradcheck(lambda Q, K: sparse_dot_product(Q, K, topk), (Q, K))
    torch.autograd.gradcheck(lambda W, V: sparse_weighted_average(W, V, topk), (W, V))
    groups = torch.tensor([0, 1, 1, 0, 2]).expand(2, 2, 5)
    counts = torch.tensor([2, 2, 1]).expand(2, 2, 3)
    cluster_topk = topk[:, :, :3]
    lengths = torch.tensor([5, 3])
    torch.autograd.gradcheck(
        lambda Q, K: clustered_sparse_dot_product(Q, K, cluster_topk, groups, counts, lengths),
        (Q, K),
    )
    torch.autograd.gradcheck(
        lambda W, V: clustered_sparse_weighted_average(W, V, cluster_topk, groups, counts), (W, V)
    )


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda: sparse_dot_product(
                torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 4, 2), torch.full((1, 1, 3, 2), 4)
            ),
            ValueError,
            r"topk must hold key indices in \[0, S=4\); got (values in \[4, 4\]|4)",
            id="index-range",
        ),
        pytest.param(
            lambda: sparse_dot_product(
                torch.zeros(1, 1, 3, 2),
                torch.zeros(1, 1, 4, 3),
                torch.zeros(1, 1, 3, 2, dtype=torch.int64),
            ),
            ValueError,
            "Q and K must have the same feature size; got 2 and 3",
            id="feature-size",
        ),
        pytest.param(
            lambda: sparse_dot_product(
                torch.zeros(1, 1, 3, 2),
                torch.zeros(1, 1, 4, 2),
                torch.zeros(1, 1, 2, 2, dtype=torch.int64),
            ),
            ValueError,
            r"topk must have shape \(1, 1, 3, k\)",
            id="topk-shape",
        ),
        pytest.param(
            lambda: sparse_weighted_average(
                torch.zeros(1, 1, 3, 2),
                torch.zeros(1, 1, 4, 2).double(),
                torch.zeros(1, 1, 3, 2, dtype=torch.int64),
            ),
            TypeError,
            "values must have the dtype of weights",
            id="dtype",
        ),
        pytest.param(
            lambda: sparse_weighted_average(
                torch.zeros(1, 1, 3, 2),
                torch.zeros(1, 2, 4, 2),
                torch.zeros(1, 1, 3, 2, dtype=torch.int64),
            ),
            ValueError,
            "weights and values must have the same",
            id="heads",
        ),
        pytest.param(
            lambda: clustered_sparse_weighted_average(
                torch.zeros(1, 1, 3, 2),
                torch.zeros(1, 1, 4, 2),
                torch.zeros(1, 1, 2, 3, dtype=torch.int64),
                torch.zeros(1, 1, 3, dtype=torch.int64),
            ),
            ValueError,
            r"topk must have shape \(N, H, C, k\) with k = 2",
            id="clustered-k",
        ),
        pytest.param(
            lambda: clustered_sparse_dot_product(
                torch.zeros(1, 1, 3, 2),
                torch.zeros(1, 1, 4, 2),
                torch.zeros(1, 1, 2, 2, dtype=torch.int64),
                torch.zeros(1, 1, 4, dtype=torch.int64),
                torch.ones(1, 1, 2, dtype=torch.int64),
                torch.tensor([3]),
            ),
            ValueError,
            r"groups must have shape \(1, 1, 3\)",
            id="groups-shape",
        ),
    ],
)
def test_sparse_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
