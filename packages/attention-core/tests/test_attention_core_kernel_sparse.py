"""The compiled sparse-product kernels (sparse_dot_product, sparse_weighted_average and their
clustered variants) against loop references in float64 and the plain-PyTorch path: shapes,
repeated indices, padding, layouts, instruction sets, gradients, opcheck, torch.compile,
dispatch and errors."""

import pytest
import torch

from attention_core import _extension
from attention_core.attention import ImprovedClusteredAttention
from attention_core.masking import FullMask, LengthMask
from attention_core.sparse_product import _op as sparse_op
from attention_core.sparse_product import (
    clustered_sparse_dot_product,
    clustered_sparse_weighted_average,
    sparse_dot_product,
    sparse_weighted_average,
)
from attention_core.testing import assert_close

pytestmark = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]

SHAPES = [  # N, H, L, S, E, k
    pytest.param((1, 1, 1, 1, 1, 1), id="size-1"),
    pytest.param((2, 3, 7, 5, 3, 2), id="odd"),
    pytest.param((1, 2, 5, 3, 4, 7), id="more-picks-than-keys"),  # repeated indices
    pytest.param((2, 1, 11, 13, 37, 5), id="simd-tails"),
    pytest.param((1, 2, 4, 6, 64, 3), id="e64"),
    pytest.param((1, 2, 9, 12, 130, 5), id="wide-features"),  # full register tiles + tail
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make(N, H, L, S, E, k, *, seed=0, dtype=torch.float64, clusters=None):
    """Q (N, H, L, E), K (N, H, S, E), weights (N, H, L, k) and topk: (N, H, L, k) or, with
    ``clusters``, (N, H, clusters, k) plus groups (N, H, L) that include out-of-range ones."""
    g = gen(seed)
    Q = torch.randn(N, H, L, E, generator=g, dtype=torch.float64).to(dtype)
    K = torch.randn(N, H, S, E, generator=g, dtype=torch.float64).to(dtype)
    W = torch.rand(N, H, L, k, generator=g, dtype=torch.float64).to(dtype)
    rows = L if clusters is None else clusters
    topk = torch.randint(0, S, (N, H, rows, k), generator=g)
    if clusters is None:
        return Q, K, W, topk
    groups = torch.randint(-1, clusters + 1, (N, H, L), generator=g)  # -1 and C: no cluster
    return Q, K, W, topk, groups


def loop_dot(Q, K, topk, groups=None, limits=None):
    """float64 loops; ``limits`` (N, H) of valid queries."""
    N, H, L, _ = Q.shape
    k = topk.shape[-1]
    out = torch.zeros(N, H, L, k, dtype=torch.float64) + 0 * (Q.sum() + K.sum())  # in the graph
    for n in range(N):
        for h in range(H):
            for l in range(L):
                row = l if groups is None else int(groups[n, h, l])
                if not 0 <= row < topk.shape[2] or (limits is not None and l >= limits[n, h]):
                    continue
                for t in range(k):
                    out[n, h, l, t] = Q[n, h, l].double() @ K[n, h, topk[n, h, row, t]].double()
    return out


def loop_average(W, V, topk, groups=None, limits=None):
    N, H, L, k = W.shape
    out = torch.zeros(N, H, L, V.shape[-1], dtype=torch.float64) + 0 * (W.sum() + V.sum())
    for n in range(N):
        for h in range(H):
            for l in range(L):
                row = l if groups is None else int(groups[n, h, l])
                if not 0 <= row < topk.shape[2] or (limits is not None and l >= limits[n, h]):
                    continue
                for t in range(k):
                    out[n, h, l] += W[n, h, l, t].double() * V[n, h, topk[n, h, row, t]].double()
    return out


def check(fn, reference, inputs, name=""):
    """Output and gradients of the two differentiable inputs against the loop reference."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs[:2]]
    reference_leaves = [t.detach().double().requires_grad_(True) for t in inputs[:2]]
    out = fn(*leaves, *inputs[2:])
    expected = reference(*reference_leaves)
    assert_close(f"{name}out", out, expected)
    G = torch.randn(expected.shape, generator=gen(99), dtype=torch.float64)
    out.backward(G.to(out.dtype))
    expected.backward(G)
    for i, (a, b) in enumerate(zip(leaves, reference_leaves)):
        assert_close(f"{name}grad{i}", a.grad, b.grad)


def check_all(N, H, L, S, E, k, dtype=torch.float64, seed=0, name=""):
    Q, K, W, topk = make(N, H, L, S, E, k, seed=seed, dtype=dtype)
    check(sparse_dot_product, lambda q, kk: loop_dot(q, kk, topk), (Q, K, topk), name)
    check(sparse_weighted_average, lambda w, v: loop_average(w, v, topk), (W, K, topk), name)


def check_all_clustered(N, H, L, S, E, k, C, dtype=torch.float64, seed=0, name=""):
    Q, K, W, topk, groups = make(N, H, L, S, E, k, seed=seed, dtype=dtype, clusters=C)
    lengths = torch.randint(0, L + 1, (N,), generator=gen(seed + 1))
    counts = torch.randint(0, L // C + 1, (N, H, C), generator=gen(seed + 2))
    limits_dot = lengths.view(N, 1).expand(N, H)
    limits_average = counts.sum(-1)
    check(
        lambda q, kk: clustered_sparse_dot_product(q, kk, topk, groups, counts, lengths),
        lambda q, kk: loop_dot(q, kk, topk, groups, limits_dot),
        (Q, K),
        name,
    )
    check(
        lambda w, v: clustered_sparse_weighted_average(w, v, topk, groups, counts),
        lambda w, v: loop_average(w, v, topk, groups, limits_average),
        (W, K),
        name,
    )
    check(
        lambda w, v: clustered_sparse_weighted_average(w, v, topk, groups),
        lambda w, v: loop_average(w, v, topk, groups),
        (W, K),
        f"{name}no counts ",
    )


# ---------------------------------------------------------------------------------------
# against the loop references
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_products_match_loops(shape, dtype):
    check_all(*shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1, 1, 1, 1, 1, 1, 1), id="size-1"),
        pytest.param((2, 3, 9, 5, 3, 2, 2), id="odd"),
        pytest.param((2, 2, 13, 7, 37, 9, 3), id="repeated-and-simd-tails"),
    ],
)
def test_clustered_sparse_products_match_loops(shape, dtype):
    check_all_clustered(*shape, dtype=dtype)


@pytest.fixture
def cpu_level():
    yield _extension._C.set_cpu_level
    _extension._C.set_cpu_level(-1)


@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
def test_every_instruction_set_variant(level, cpu_level):
    cpu_level(level)
    if _extension._C.cpu_level() != level:
        pytest.skip(f"this CPU does not support level {level}")
    for dtype in (torch.float32, torch.float64):
        check_all(2, 2, 9, 11, 37, 5, dtype=dtype, seed=level, name=f"{dtype} ")
        check_all_clustered(1, 2, 9, 11, 41, 4, 3, dtype=dtype, seed=level, name=f"{dtype} ")


def strided(t, layout):
    """The same values as ``t`` (N, H, L, F) in another memory layout."""
    if layout == "sequence-first":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "offset":
        big = torch.zeros(t.shape[0], t.shape[1], t.shape[2] + 3, t.shape[3] + 5, dtype=t.dtype)
        big[:, :, 3:, 2 : 2 + t.shape[3]] = t
        return big[:, :, 3:, 2 : 2 + t.shape[3]]
    if layout == "strided-features":
        big = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t[:, :1].expand(-1, t.shape[1], -1, -1)  # expanded heads: stride 0


@pytest.mark.parametrize("layout", ["sequence-first", "offset", "strided-features", "expanded"])
def test_non_contiguous_inputs(layout):
    Q, K, W, topk = make(2, 3, 6, 5, 4, 3, seed=3)
    Q, K, W = (strided(t, layout) for t in (Q, K, W))
    topk = strided(topk, layout)
    check(sparse_dot_product, lambda q, kk: loop_dot(q, kk, topk), (Q, K, topk))
    check(sparse_weighted_average, lambda w, v: loop_average(w, v, topk), (W, K, topk))


# ---------------------------------------------------------------------------------------
# gradients, opcheck, compile
# ---------------------------------------------------------------------------------------


def test_gradcheck():
    Q, K, W, topk = (t.requires_grad_(t.is_floating_point()) for t in make(2, 2, 5, 4, 3, 3))
    assert torch.autograd.gradcheck(lambda q, k: sparse_dot_product(q, k, topk), (Q, K))
    assert torch.autograd.gradcheck(lambda w, v: sparse_weighted_average(w, v, topk), (W, K))


def test_gradcheck_clustered():
    Q, K, W, topk, groups = make(2, 2, 6, 4, 3, 3, seed=4, clusters=2)
    Q, K, W = (t.requires_grad_(True) for t in (Q, K, W))
    counts, lengths = torch.tensor([[2, 2], [3, 1]]).expand(2, 2, 2), torch.tensor([6, 4])
    assert torch.autograd.gradcheck(
        lambda q, k: clustered_sparse_dot_product(q, k, topk, groups, counts, lengths), (Q, K)
    )
    assert torch.autograd.gradcheck(
        lambda w, v: clustered_sparse_weighted_average(w, v, topk, groups, counts), (W, K)
    )


OPCHECK_SAMPLES = ["contiguous", "transposed", "offset", "requires-grad", "float64", "clustered"]


def opcheck_inputs(sample):
    dtype = torch.float64 if sample == "float64" else torch.float32
    Q, K, W, topk = make(2, 3, 7, 6, 4, 3, seed=5, dtype=dtype)
    groups = limits = None
    if sample in ("transposed", "offset"):
        Q, K, W = (strided(t, "sequence-first" if sample == "transposed" else sample)
                   for t in (Q, K, W))  # fmt: skip
    elif sample == "requires-grad":
        Q, K, W = (t.requires_grad_(True) for t in (Q, K, W))
    elif sample == "clustered":
        topk = topk[:, :, :2]
        groups = torch.randint(-1, 3, (2, 3, 7), generator=gen(6))
        limits = torch.tensor([[7, 5, 0], [3, 7, 7]])
    return Q, K, W, topk, groups, limits


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_forward_opcheck(sample):
    Q, K, W, topk, groups, limits = opcheck_inputs(sample)
    torch.library.opcheck(sparse_op.sparse_dot_product_forward, (Q, K, topk, groups, limits))
    torch.library.opcheck(sparse_op.sparse_weighted_average_forward, (W, K, topk, groups, limits))


@pytest.mark.parametrize("sample", ["transposed", "float64", "clustered"])
def test_backward_opcheck(sample):
    Q, K, W, topk, groups, limits = opcheck_inputs(sample)
    grad_dot = torch.randn(2, 3, 7, 3, dtype=Q.dtype)
    grad_average = torch.randn(2, 3, 7, 4, dtype=Q.dtype)
    torch.library.opcheck(
        sparse_op.sparse_dot_product_backward, (grad_dot, Q, K, topk, groups, limits)
    )
    torch.library.opcheck(
        sparse_op.sparse_weighted_average_backward, (grad_average, W, K, topk, groups, limits)
    )


def test_compiled_improved_clustered_attention_matches_eager():
    """torch.compile(fullgraph=True, backend="aot_eager") of ImprovedClusteredAttention, the
    layer that uses the clustered sparse products."""
    g = gen(10)
    N, L, S, H, E, D = 2, 12, 10, 2, 4, 3
    q = torch.randn(N, L, H, E, generator=g, requires_grad=True)
    k, v = torch.randn(N, S, H, E, generator=g), torch.randn(N, S, H, D, generator=g)
    lengths = (LengthMask(torch.tensor([12, 7]), max_len=L), LengthMask(torch.tensor([10, 6])))
    attention = ImprovedClusteredAttention(3, topk=4, attention_dropout=0.0)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def run(q):
        return attention(q, k, v, FullMask(L, S), *lengths)

    torch.manual_seed(0)  # the same hash planes in both runs
    y = torch.compile(run, fullgraph=True, backend=recording_backend)(q)
    y.square().sum().backward()
    grad, q.grad = q.grad, None
    torch.manual_seed(0)
    y_eager = run(q)
    y_eager.square().sum().backward()
    assert len(graphs) == 1
    assert "attention_core.sparse_dot_product_forward.default" in graphs[0]
    assert "attention_core.sparse_weighted_average_forward.default" in graphs[0]
    assert_close("output", y, y_eager)
    assert_close("dq", grad, q.grad)


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_improved_clustered_attention_kernel_equals_forced_reference(dtype, monkeypatch):
    g = gen(8)
    N, L, S, H, E, D = 2, 12, 10, 2, 4, 3
    q = torch.randn(N, L, H, E, generator=g, dtype=dtype)
    k = torch.randn(N, S, H, E, generator=g, dtype=dtype)
    v = torch.randn(N, S, H, D, generator=g, dtype=dtype)
    lengths = (LengthMask(torch.tensor([12, 7]), max_len=L), LengthMask(torch.tensor([10, 6])))
    attention = ImprovedClusteredAttention(3, topk=4, attention_dropout=0.0)
    results = []
    for force in ("0", "1"):
        monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, force)
        torch.manual_seed(0)  # the same hash planes for both runs
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, FullMask(L, S), *lengths)
        out.square().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for label, a, b in zip(["out", "dq", "dk", "dv"], *results):
        assert_close(label, a, b)


def test_dispatch_to_kernel_unless_forced(monkeypatch):
    Q, K, W, topk = make(1, 2, 5, 4, 3, 2, dtype=torch.float32)
    calls = []
    for name in ("sparse_dot_product_forward", "sparse_weighted_average_forward"):
        original = getattr(sparse_op, name)
        monkeypatch.setattr(
            sparse_op, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
        )
    monkeypatch.delenv(_extension.FORCE_REFERENCE_ENV, raising=False)
    kernel = [sparse_dot_product(Q, K, topk), sparse_weighted_average(W, K, topk)]
    assert len(calls) == 2
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    reference = [sparse_dot_product(Q, K, topk), sparse_weighted_average(W, K, topk)]
    assert len(calls) == 2
    assert_close("dot", kernel[0], reference[0])
    assert_close("average", kernel[1], reference[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_inputs(dtype):
    Q, K, W, topk = make(1, 2, 30, 20, 8, 5, seed=9)
    out = sparse_dot_product(Q.to(dtype), K.to(dtype), topk)
    assert out.dtype == dtype
    assert_close("dot", out.double(), loop_dot(Q, K, topk), rtol=0, atol=0.1)
    avg = sparse_weighted_average(W.to(dtype), K.to(dtype), topk)
    assert avg.dtype == dtype
    assert_close("average", avg.double(), loop_average(W, K, topk), rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


def raw_dot(Q, K, topk, S):
    """The binding called directly (no Python-side checks)."""
    out = torch.empty(1, 2, 5, 2)
    _extension._C.sparse_dot_product_forward_f32(
        Q.data_ptr(), Q.stride()[:3], K.data_ptr(), K.stride()[:3], out.data_ptr(),
        out.stride()[:3], topk.data_ptr(), 5, 0, 0, 1, 2, 5, S, 3, 2, 1,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda Q, K, W, i: sparse_op.sparse_dot_product_forward(Q.half(), K, i, None, None),
            TypeError,
            "Q and K must all be float32 or float64",
            id="op-dtype",
        ),
        pytest.param(
            lambda Q, K, W, i: sparse_op.sparse_dot_product_forward(Q, K, i.int(), None, None),
            ValueError,
            r"topk must be an int64 tensor of shape \(1, 2, R, k\); got torch.int32",
            id="op-topk-dtype",
        ),
        pytest.param(
            lambda Q, K, W, i: sparse_op.sparse_dot_product_forward(Q, K, i[:, :, :3], None, None),
            ValueError,
            r"topk must have 5 rows \(one per query\)",
            id="op-topk-rows",
        ),
        pytest.param(
            lambda Q, K, W, i: sparse_op.sparse_weighted_average_forward(
                W[..., :1], K, i, None, None
            ),
            ValueError,
            r"topk must have k = 1 columns \(from weights\)",
            id="op-k",
        ),
        pytest.param(
            lambda Q, K, W, i: sparse_op.sparse_dot_product_forward(
                Q, K, i[:, :, :2], i[..., 0].int(), None
            ),
            ValueError,
            r"groups must be an int64 tensor of shape \(1, 2, 5\); got torch.int32",
            id="op-groups",
        ),
        pytest.param(
            lambda Q, K, W, i: raw_dot(Q, K, i, 2),
            ValueError,
            r"topk must hold key indices in \[0, S=2\); got [23]",
            id="binding-index-range",
        ),
        pytest.param(
            lambda Q, K, W, i: sparse_dot_product(Q, K, i + 4),
            ValueError,
            r"topk must hold key indices in \[0, S=4\)",
            id="public-index-range",
        ),
    ],
)
def test_bad_inputs(call, error, match):
    Q, K, W, topk = make(1, 2, 5, 4, 3, 2, dtype=torch.float32)
    topk[0, 0, 0, 0] = 3
    with pytest.raises(error, match=match):
        call(Q, K, W, topk)


def _bad_index_calls(bad, where):
    """Each public sparse function with one key index set to ``bad``: ``where`` is "read" (a
    row some valid query reads), "unused-cluster" (a cluster no query belongs to) or
    "past-length" (a cluster only padded queries belong to)."""
    N, H, L, S, E, k, C = 1, 2, 6, 5, 3, 2, 4
    Q, K, W, _ = make(N, H, L, S, E, k)
    g = gen(3)
    topk = torch.randint(0, S, (N, H, L, k), generator=g)
    ctopk = torch.randint(0, S, (N, H, C, k), generator=g)
    groups = torch.tensor([0, 1, 0, 1, 2, 2]).expand(N, H, L).clone()  # cluster 3: unused
    lengths = torch.tensor([4])  # queries 4 and 5 (cluster 2) are padding
    counts = torch.ones(N, H, C, dtype=torch.long)
    row = {"read": 1, "unused-cluster": 3, "past-length": 2}[where]
    ctopk[0, 1, row, 1] = bad
    topk[0, 1, {"read": 2, "unused-cluster": 2, "past-length": 5}[where], 0] = bad
    return [
        lambda: sparse_dot_product(Q, K, topk),
        lambda: sparse_weighted_average(W, K, topk),
        lambda: clustered_sparse_dot_product(Q, K, ctopk, groups, counts, lengths),
        lambda: clustered_sparse_weighted_average(W, K, ctopk, groups, counts),
    ]


@pytest.mark.parametrize("bad", [-1, 5, 2**40, -(2**62)])
@pytest.mark.parametrize("where", ["read", "unused-cluster", "past-length"])
def test_out_of_range_indices_raise_alike_on_kernel_and_reference(bad, where, monkeypatch):
    """The kernel checks indices in its loop (no scan before it) and raises after it; the
    reference checks before computing. Both reject every index of topk outside [0, S), also
    those no valid query reads, with the same error."""
    for force in ("0", "1"):
        monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, force)
        for call in _bad_index_calls(bad, where):
            with pytest.raises(ValueError, match=r"topk must hold key indices in \[0, S=5\)"):
                call()


def test_kernel_results_unchanged_by_an_earlier_failed_call():
    """A call that raised on a bad index leaves no state: the next valid call is exact."""
    Q, K, _, topk = make(1, 2, 6, 5, 3, 2)
    expected = loop_dot(Q, K, topk)
    bad = topk.clone()
    bad[0, 0, 3, 1] = 7
    with pytest.raises(ValueError, match=r"got 7"):
        sparse_dot_product(Q, K, bad)
    assert_close("dot", sparse_dot_product(Q, K, topk), expected)
