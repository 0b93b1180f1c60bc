"""The compiled Hamming k-means kernel (attention_core.clustering.hamming.cluster) against a
pure-Python loop implementation of the same Lloyd iterations and against the plain-PyTorch
path: every output, padding, ties, bit widths, threads, opcheck, torch.compile, dispatch and
errors."""

import pytest
import torch

from attention_core import _extension
from attention_core.attention import ClusteredAttention
from attention_core.clustering.hamming import _op as hamming_op
from attention_core.clustering.hamming import cluster
from attention_core.masking import FullMask, LengthMask
from attention_core.testing import assert_close

pytestmark = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def python_kmeans(hashes, length, C, iterations, bits):
    """One sequence with Python ints: (groups, counts, centroids, distances, bitcounts)."""
    mask = (1 << bits) - 1
    codes = [int(h) & mask for h in hashes]
    L = len(codes)
    centroids = [codes[min(c * length // C, L - 1)] if L else 0 for c in range(C)]

    def assign():
        groups, distances = [], []
        for l in range(L):
            if l >= length:
                groups.append(C)
                distances.append(0)
                continue
            d = [bin(codes[l] ^ centroid).count("1") for centroid in centroids]
            groups.append(d.index(min(d)))  # the first minimum
            distances.append(min(d))
        return groups, distances

    def tally(groups):
        counts = [0] * C
        bitcounts = [[0] * bits for _ in range(C)]
        for l in range(length):
            counts[groups[l]] += 1
            for b in range(bits):
                bitcounts[groups[l]][b] += (codes[l] >> b) & 1
        return counts, bitcounts

    def reseed_empty(counts, distances):
        """Each empty cluster takes the farthest valid position (ties: the lowest one)."""
        far = distances[:length]
        for c in range(C):
            if counts[c] or not far or max(far) == 0:
                continue
            taken = codes[far.index(max(far))]
            centroids[c] = taken
            far = [min(d, bin(code ^ taken).count("1")) for d, code in zip(far, codes)]

    groups, distances = assign()
    for _ in range(iterations):
        counts, bitcounts = tally(groups)
        reseed_empty(counts, distances)
        for c in range(C):
            if counts[c]:
                centroids[c] = sum(1 << b for b in range(bits) if 2 * bitcounts[c][b] > counts[c])
        groups, distances = assign()
    counts, bitcounts = tally(groups)
    return groups, counts, centroids, distances, bitcounts


def run_with_buffers(hashes, lengths, C, iterations, bits):
    N, H, L = hashes.shape
    buffers = {
        "groups": torch.empty(N, H, L, dtype=torch.int32),
        "counts": torch.empty(N, H, C, dtype=torch.int32),
        "centroids": torch.empty(N, H, C, dtype=torch.int64),
        "distances": torch.empty(N, H, L, dtype=torch.int32),
        "bitcounts": torch.empty(N, H, C, bits, dtype=torch.int32),
    }
    groups, counts = cluster(hashes, lengths, **buffers, iterations=iterations, bits=bits)
    assert groups is buffers["groups"] and counts is buffers["counts"]
    return buffers


def random_hashes(N, H, L, bits, seed):
    """Hashes drawn from a few prototypes with flipped bits, so clusters exist."""
    g = gen(seed)
    prototypes = torch.randint(0, 2**62, (4,), generator=g)
    pick = prototypes[torch.randint(0, 4, (N, H, L), generator=g)]
    noise = torch.randint(0, 2**62, (N, H, L), generator=g) & torch.randint(
        0, 2**62, (N, H, L), generator=g
    )
    return (pick ^ (noise & noise >> 7)) | (torch.randint(0, 2, (N, H, L), generator=g) << 63)


CASES = [  # N, H, L, C, iterations, bits
    pytest.param((1, 1, 1, 1, 1, 1), id="size-1"),
    pytest.param((2, 3, 17, 3, 5, 32), id="odd"),
    pytest.param((1, 2, 5, 9, 2, 8), id="more-clusters-than-positions"),
    pytest.param((2, 1, 23, 4, 0, 63), id="no-iterations-63-bits"),
    pytest.param((1, 1, 40, 5, 10, 3), id="few-bits-many-ties"),
    pytest.param((2, 2, 64, 16, 8, 4), id="more-clusters-than-hashes"),
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_python_loops(case):
    N, H, L, C, iterations, bits = case
    hashes = random_hashes(N, H, L, bits, seed=L)
    lengths = torch.randint(0, L + 1, (N,), generator=gen(C))
    lengths[0] = L
    got = run_with_buffers(hashes, lengths, C, iterations, bits)
    for n in range(N):
        for h in range(H):
            expected = python_kmeans(hashes[n, h].tolist(), int(lengths[n]), C, iterations, bits)
            for name, value in zip(got, expected):
                assert got[name][n, h].tolist() == value, f"{name} of sequence ({n}, {h})"


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_forced_reference(case, monkeypatch):
    N, H, L, C, iterations, bits = case
    hashes = random_hashes(N, H, L, bits, seed=L + 1)
    lengths = torch.randint(0, L + 1, (N,), generator=gen(C + 1))
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "0")
    kernel = run_with_buffers(hashes, lengths, C, iterations, bits)
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    reference = run_with_buffers(hashes, lengths, C, iterations, bits)
    for name in kernel:
        assert torch.equal(kernel[name], reference[name]), name


def blocks_of_equal_hashes(values, repeat, seed):
    """``(1, 1, len(values) * repeat)`` hashes: every value ``repeat`` times, shuffled."""
    hashes = torch.tensor(values).repeat_interleave(repeat)
    return hashes[torch.randperm(hashes.numel(), generator=gen(seed))].view(1, 1, -1)


@pytest.mark.parametrize("force_reference", ["0", "1"], ids=["kernel", "reference"])
@pytest.mark.parametrize("seed", range(6))
def test_power_of_two_hashes_fill_every_cluster(seed, force_reference, monkeypatch):
    """Eight groups of equal hashes and eight clusters: evenly spaced starting positions often
    share a group; the re-seeding of empty clusters still finds all eight."""
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, force_reference)
    hashes = blocks_of_equal_hashes([1 << i for i in range(8)], 10, seed)
    buffers = run_with_buffers(hashes, torch.tensor([80]), 8, 20, 8)
    assert sorted(buffers["centroids"].view(-1).tolist()) == [1 << i for i in range(8)]
    assert buffers["counts"].view(-1).tolist() == [10] * 8
    assert (buffers["distances"] == 0).all()


@pytest.mark.parametrize("force_reference", ["0", "1"], ids=["kernel", "reference"])
def test_two_groups_starting_in_one_cluster_split(force_reference, monkeypatch):
    """Both starting positions (0 and 50) hold 0: the second cluster is empty after the
    first assignment and takes the farthest hash, 255 (the lowest such position)."""
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, force_reference)
    hashes = torch.zeros(1, 1, 100, dtype=torch.int64)
    hashes[0, 0, 1::2] = 255
    hashes[0, 0, 50] = 0
    hashes[0, 0, 51] = 0
    _, counts = cluster(hashes, torch.tensor([100]), clusters=2, iterations=0, bits=8)
    assert counts.view(-1).tolist() == [100, 0]  # no iteration: no re-seeding
    buffers = run_with_buffers(hashes, torch.tensor([100]), 2, 1, 8)
    assert buffers["centroids"].view(-1).tolist() == [0, 255]
    assert buffers["counts"].view(-1).tolist() == [51, 49]
    assert torch.equal(buffers["groups"].view(-1), (hashes.view(-1) == 255).int())


@pytest.mark.parametrize("force_reference", ["0", "1"], ids=["kernel", "reference"])
def test_empty_clusters_take_distinct_far_hashes(force_reference, monkeypatch):
    """Three empty clusters re-seed one after another: each takes the position farthest
    from every centroid so far, not the same far hash three times."""
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, force_reference)
    # the clusters start at positions 0, 5, 10 and 15, all holding 0; the far hashes follow
    hashes = torch.tensor([0] * 16 + [0xF0, 0x0F, 0xFF, 0xFF]).view(1, 1, 20)
    buffers = run_with_buffers(hashes, torch.tensor([20]), 4, 1, 8)
    assert buffers["centroids"].view(-1).tolist() == [0, 0xFF, 0xF0, 0x0F]
    assert buffers["counts"].view(-1).tolist() == [16, 2, 1, 1]


def test_duplicate_hashes_keep_an_empty_cluster_when_no_position_is_off_centroid():
    """Fewer distinct hashes than clusters: once every position sits on a centroid the
    remaining empty cluster keeps its centroid (nothing to take)."""
    hashes = blocks_of_equal_hashes([3, 12], 5, seed=0)
    _, counts = cluster(hashes, torch.tensor([10]), clusters=3, iterations=5, bits=4)
    assert sorted(counts.view(-1).tolist()) == [0, 5, 5]


def test_padding_and_empty_sequences():
    hashes = random_hashes(3, 2, 6, 16, seed=3)
    groups, counts = cluster(hashes, torch.tensor([6, 2, 0]), clusters=3, bits=16)
    assert (groups[1, :, 2:] == 3).all() and (groups[2] == 3).all()
    assert counts.sum(-1).tolist() == [[6, 6], [2, 2], [0, 0]]


def test_threads_give_identical_results():
    hashes, lengths = random_hashes(2, 8, 50, 32, seed=4), torch.tensor([50, 31])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_buffers(hashes, lengths, 5, 4, 32)
        torch.set_num_threads(2)
        two = run_with_buffers(hashes, lengths, 5, 4, 32)
    finally:
        torch.set_num_threads(threads)
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.fixture
def cpu_level():
    yield _extension._C.set_cpu_level
    _extension._C.set_cpu_level(-1)


def test_baseline_and_popcnt_variants_agree(cpu_level):
    hashes, lengths = random_hashes(2, 2, 30, 40, seed=5), torch.tensor([30, 17])
    cpu_level(0)
    baseline = run_with_buffers(hashes, lengths, 4, 3, 40)
    cpu_level(-1)
    best = run_with_buffers(hashes, lengths, 4, 3, 40)
    for name in baseline:
        assert torch.equal(baseline[name], best[name]), name


def test_opcheck():
    hashes, lengths = random_hashes(2, 3, 11, 20, seed=6), torch.tensor([11, 4])
    torch.library.opcheck(hamming_op.hamming_cluster, (hashes, lengths, 3, 2, 20))


def test_compiled_cluster_matches_eager():
    """torch.compile(fullgraph=True, backend="aot_eager") with the kernel op in the graph."""
    hashes, lengths = random_hashes(2, 2, 13, 24, seed=7), torch.tensor([13, 8])
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def fn(hashes, lengths):
        return cluster(hashes, lengths, clusters=3, iterations=4, bits=24)

    compiled = torch.compile(fn, fullgraph=True, backend=recording_backend)(hashes, lengths)
    eager = fn(hashes, lengths)
    assert graphs and "attention_core.hamming_cluster.default" in graphs[0]
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def test_clustered_attention_kernel_equals_forced_reference(monkeypatch):
    g = gen(8)
    N, L, S, H, E, D = 2, 12, 10, 2, 4, 3
    q, k = torch.randn(N, L, H, E, generator=g), torch.randn(N, S, H, E, generator=g)
    v = torch.randn(N, S, H, D, generator=g)
    lengths = (LengthMask(torch.tensor([12, 7]), max_len=L), LengthMask(torch.tensor([10, 6])))
    attention = ClusteredAttention(3, bits=16, attention_dropout=0.0)
    results = []
    for force in ("0", "1"):
        monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, force)
        torch.manual_seed(0)  # the same hash planes for both runs
        results.append(attention(q, k, v, FullMask(L, S), *lengths))
    assert_close("out", results[0], results[1])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda h, n: hamming_op.hamming_cluster(h.int(), n, 2, 1, 8),
            TypeError,
            r"hashes must be an \(N, H, L\) int64 tensor; got torch.int32",
            id="op-hashes",
        ),
        pytest.param(
            lambda h, n: hamming_op.hamming_cluster(h, n[:1], 2, 1, 8),
            ValueError,
            r"lengths must be an int64 tensor of shape \(2,\); got torch.int64 \(1,\)",
            id="op-lengths",
        ),
        pytest.param(
            lambda h, n: hamming_op.hamming_cluster(h, n, 2, 1, 64),
            ValueError,
            r"bits must be an int in \[1, 63\]; got 64",
            id="op-bits",
        ),
        pytest.param(
            lambda h, n: hamming_op.hamming_cluster(h, n, 0, 1, 8),
            ValueError,
            r"clusters must be an int in \[1, 2147483647\]; got 0",
            id="op-clusters",
        ),
        pytest.param(
            lambda h, n: cluster(h, n + 9),
            ValueError,
            r"lengths must lie in \[0, L=5\]; got values in \[12, 14\]",
            id="public-lengths",
        ),
    ],
)
def test_bad_inputs(call, error, match):
    hashes, lengths = random_hashes(2, 1, 5, 8, seed=9), torch.tensor([5, 3])
    with pytest.raises(error, match=match):
        call(hashes, lengths)
