"""The compiled aggregate/broadcast kernels (aggregate, broadcast, clustered_aggregate,
clustered_broadcast) against loop references in float64 and the plain-PyTorch path: shapes,
invalid groups, padding, layouts, instruction sets, gradients, opcheck, torch.compile of
ClusteredAttention's bookkeeping, dispatch and errors."""

import pytest
import torch

from attention_core import _extension
from attention_core.aggregate import _op as aggregate_op
from attention_core.aggregate import (
    aggregate,
    broadcast,
    clustered_aggregate,
    clustered_broadcast,
)
from attention_core.attention import ClusteredAttention
from attention_core.masking import FullMask, LengthMask
from attention_core.testing import assert_close

pytestmark = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]

SHAPES = [  # N, H, L, C, E
    pytest.param((1, 1, 1, 1, 1), id="size-1"),
    pytest.param((2, 3, 7, 3, 5), id="odd"),
    pytest.param((1, 2, 13, 1, 37), id="one-group"),
    pytest.param((2, 1, 4, 9, 64), id="more-groups-than-rows"),
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make(N, H, L, C, E, *, seed=0, dtype=torch.float64):
    """X (N, H, L, E), Y (N, H, C, E), groups with out-of-range entries, factors, lengths
    (N,) and counts (N, H, C)."""
    g = gen(seed)
    X = torch.randn(N, H, L, E, generator=g, dtype=torch.float64).to(dtype)
    Y = torch.randn(N, H, C, E, generator=g, dtype=torch.float64).to(dtype)
    G = torch.randint(-1, C + 1, (N, H, L), generator=g)  # -1 and C belong to no group
    F = (torch.rand(N, H, C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    lengths = torch.randint(0, L + 1, (N,), generator=g)
    counts = torch.randint(0, L // C + 1, (N, H, C), generator=g)
    return X, Y, G, F, lengths, counts


def loop_aggregate(X, G, F, limits=None):
    """float64 loops; ``limits (N, H)`` of non-padding positions."""
    N, H, L, E = X.shape
    C = F.shape[-1]
    out = torch.zeros(N, H, C, E, dtype=torch.float64) + 0 * (X.sum() + F.sum())  # in the graph
    rows = [[[None] * C for _ in range(H)] for _ in range(N)]
    for n in range(N):
        for h in range(H):
            for c in range(C):
                members = [
                    X[n, h, l].double()
                    for l in range(L)
                    if G[n, h, l] == c and (limits is None or l < limits[n, h])
                ]
                total = torch.stack(members).sum(0) if members else torch.zeros(E)
                rows[n][h][c] = F[n, h, c].double() * total
    return out + torch.stack([torch.stack([torch.stack(r) for r in rh]) for rh in rows])


def loop_broadcast(Y, G, F, limits=None):
    N, H, C, E = Y.shape
    L = G.shape[-1]
    rows = []
    for n in range(N):
        for h in range(H):
            for l in range(L):
                g = int(G[n, h, l])
                if 0 <= g < C and (limits is None or l < limits[n, h]):
                    rows.append(F[n, h, g].double() * Y[n, h, g].double())
                else:
                    rows.append(0 * Y[n, h, 0].double() if C else torch.zeros(E))
    return torch.stack(rows).reshape(N, H, L, E) + 0 * (Y.sum() + F.sum())  # in the graph


def check(fn, reference, inputs, name=""):
    """Output and gradients of the two differentiable inputs against the reference."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    reference_leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    expected = reference(*reference_leaves)
    assert_close(f"{name}out", out, expected)
    grad = torch.randn(expected.shape, generator=gen(99), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    for i, (a, b) in enumerate(zip(leaves, reference_leaves)):
        assert_close(f"{name}grad{i}", a.grad, b.grad)


def check_all(X, Y, G, F, lengths, counts, name=""):
    N, H = X.shape[:2]
    by_length = lengths.view(N, 1).expand(N, H)
    check(lambda x, f: aggregate(x, G, f), lambda x, f: loop_aggregate(x, G, f), (X, F), name)
    check(lambda y, f: broadcast(y, G, f), lambda y, f: loop_broadcast(y, G, f), (Y, F), name)
    check(
        lambda x, f: clustered_aggregate(x, G, f, lengths),
        lambda x, f: loop_aggregate(x, G, f, by_length),
        (X, F),
        f"{name}clustered ",
    )
    check(
        lambda y, f: clustered_broadcast(y, G, counts, f),
        lambda y, f: loop_broadcast(y, G, f, counts.sum(-1)),
        (Y, F),
        f"{name}clustered ",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_loops(shape, dtype):
    check_all(*make(*shape, dtype=dtype))


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
        check_all(*make(2, 2, 11, 3, 37, seed=level, dtype=dtype), name=f"{dtype} ")


def strided(t, layout):
    """The same values as ``t`` (N, H, L, E) in another memory layout."""
    if layout == "sequence-first":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "offset":
        big = torch.zeros(t.shape[0], t.shape[1], t.shape[2] + 3, t.shape[3] + 5, dtype=t.dtype)
        big[:, :, 3:, 2 : 2 + t.shape[3]] = t
        return big[:, :, 3:, 2 : 2 + t.shape[3]]
    big = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)  # strided features
    big[..., ::2] = t
    return big[..., ::2]


@pytest.mark.parametrize("layout", ["sequence-first", "offset", "strided-features"])
def test_non_contiguous_inputs(layout):
    X, Y, G, F, lengths, counts = make(2, 3, 8, 3, 5, seed=3)
    check_all(strided(X, layout), strided(Y, layout), G.transpose(1, 2).contiguous().transpose(
        1, 2), F, lengths, counts)  # fmt: skip


def test_output_buffers():
    X, Y, G, F, lengths, _ = make(2, 2, 6, 3, 4, seed=4)
    out = torch.empty(2, 2, 3, 4, dtype=torch.float64)
    assert clustered_aggregate(X, G, F, lengths, out) is out
    assert_close("Y", out, loop_aggregate(X, G, F, lengths.view(2, 1).expand(2, 2)))
    out = torch.empty(2, 2, 6, 4, dtype=torch.float64)
    assert broadcast(Y, G, F, out) is out
    assert_close("X", out, loop_broadcast(Y, G, F))


# ---------------------------------------------------------------------------------------
# gradients, opcheck, compile
# ---------------------------------------------------------------------------------------


def test_gradcheck():
    X, Y, G, F, lengths, counts = make(2, 2, 6, 3, 4, seed=5)
    X, Y, F = (t.requires_grad_(True) for t in (X, Y, F))
    assert torch.autograd.gradcheck(lambda x, f: clustered_aggregate(x, G, f, lengths), (X, F))
    assert torch.autograd.gradcheck(lambda y, f: clustered_broadcast(y, G, counts, f), (Y, F))
    assert torch.autograd.gradcheck(lambda x, f: aggregate(x, G, f), (X, F))


OPCHECK_SAMPLES = ["contiguous", "transposed", "offset", "requires-grad", "float64", "limits"]


def opcheck_inputs(sample):
    dtype = torch.float64 if sample == "float64" else torch.float32
    X, Y, G, F, _, _ = make(2, 3, 7, 3, 4, seed=6, dtype=dtype)
    limits = torch.tensor([[7, 5, 0], [3, 7, 2]]) if sample == "limits" else None
    if sample in ("transposed", "offset"):
        X, Y = (strided(t, "sequence-first" if sample == "transposed" else sample) for t in (X, Y))
    elif sample == "requires-grad":
        X, Y, F = (t.requires_grad_(True) for t in (X, Y, F))
    return X, Y, G, F, limits


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_forward_opcheck(sample):
    X, Y, G, F, limits = opcheck_inputs(sample)
    torch.library.opcheck(aggregate_op.aggregate_forward, (X, G, F, limits))
    torch.library.opcheck(aggregate_op.broadcast_forward, (Y, G, F, limits))


@pytest.mark.parametrize("sample", ["transposed", "float64", "limits"])
def test_backward_opcheck(sample):
    X, Y, G, F, limits = opcheck_inputs(sample)
    torch.library.opcheck(aggregate_op.aggregate_backward, (torch.randn_like(Y), X, G, F, limits))
    torch.library.opcheck(aggregate_op.broadcast_backward, (torch.randn_like(X), Y, G, F, limits))


def test_compiled_clustered_attention_matches_eager():
    """torch.compile(fullgraph=True, backend="aot_eager") of ClusteredAttention: the hashing,
    clustering, aggregate and broadcast kernels are all in the one graph."""
    g = gen(7)
    N, L, S, H, E, D = 2, 12, 10, 2, 4, 3
    q = torch.randn(N, L, H, E, generator=g, requires_grad=True)
    k, v = torch.randn(N, S, H, E, generator=g), torch.randn(N, S, H, D, generator=g)
    lengths = (LengthMask(torch.tensor([12, 7]), max_len=L), LengthMask(torch.tensor([10, 6])))
    attention = ClusteredAttention(3, attention_dropout=0.0)
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
    for op in ("hamming_cluster", "aggregate_forward", "broadcast_forward"):
        assert f"attention_core.{op}.default" in graphs[0]
    assert_close("output", y, y_eager)
    assert_close("dq", grad, q.grad)


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_clustered_attention_kernel_equals_forced_reference(dtype, monkeypatch):
    g = gen(8)
    N, L, S, H, E, D = 2, 12, 10, 2, 4, 3
    q = torch.randn(N, L, H, E, generator=g, dtype=dtype)
    k = torch.randn(N, S, H, E, generator=g, dtype=dtype)
    v = torch.randn(N, S, H, D, generator=g, dtype=dtype)
    lengths = (LengthMask(torch.tensor([12, 7]), max_len=L), LengthMask(torch.tensor([10, 6])))
    attention = ClusteredAttention(3, attention_dropout=0.0)
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
    X, Y, G, F, lengths, counts = make(1, 2, 5, 2, 3, dtype=torch.float32)
    calls = []
    for name in ("aggregate_forward", "broadcast_forward"):
        original = getattr(aggregate_op, name)
        monkeypatch.setattr(
            aggregate_op, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
        )
    monkeypatch.delenv(_extension.FORCE_REFERENCE_ENV, raising=False)
    kernel = [clustered_aggregate(X, G, F, lengths), clustered_broadcast(Y, G, counts, F)]
    assert len(calls) == 2
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    reference = [clustered_aggregate(X, G, F, lengths), clustered_broadcast(Y, G, counts, F)]
    assert len(calls) == 2
    assert_close("aggregate", kernel[0], reference[0])
    assert_close("broadcast", kernel[1], reference[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_inputs(dtype):
    X, Y, G, F, _, _ = make(1, 2, 30, 4, 8, seed=9)
    out = aggregate(X.to(dtype), G, F.to(dtype))
    assert out.dtype == dtype
    assert_close("aggregate", out.double(), loop_aggregate(X, G, F), rtol=0, atol=0.1)
    out = broadcast(Y.to(dtype), G, F)
    assert out.dtype == dtype
    assert_close("broadcast", out.double(), loop_broadcast(Y, G, F), rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda X, Y, G, F: aggregate_op.aggregate_forward(X.half(), G, F, None),
            TypeError,
            "X and F must all be float32 or float64",
            id="op-dtype",
        ),
        pytest.param(
            lambda X, Y, G, F: aggregate_op.aggregate_forward(X, G.int(), F, None),
            ValueError,
            r"G must be an int64 tensor of shape \(1, 2, 5\); got torch.int32",
            id="op-groups",
        ),
        pytest.param(
            lambda X, Y, G, F: aggregate_op.aggregate_forward(X, G[..., :3], F, None),
            ValueError,
            r"G must be an int64 tensor of shape \(1, 2, 5\); got torch.int64 \(1, 2, 3\)",
            id="op-positions",
        ),
        pytest.param(
            lambda X, Y, G, F: aggregate_op.broadcast_forward(Y, G, F[..., :1], None),
            ValueError,
            r"F must have shape \(1, 2, 2\); got \(1, 2, 1\)",
            id="op-factors",
        ),
        pytest.param(
            lambda X, Y, G, F: aggregate_op.broadcast_forward(Y, G, F, torch.tensor([3])),
            ValueError,
            r"limits must be an int64 tensor of shape \(1, 2\); got torch.int64 \(1,\)",
            id="op-limits",
        ),
        pytest.param(
            lambda X, Y, G, F: _extension._C.group_rows_f32(
                X.data_ptr(), (0, 0, 0), 0, (0, 0, 0), G.data_ptr(), 0, 0, 1, 2, 5, 2, 3, False, 1
            ),
            ValueError,
            "output must be a buffer address; got a null pointer",
            id="binding-null-output",
        ),
        pytest.param(
            lambda X, Y, G, F: _extension._C.group_rows_f32(
                X.data_ptr(),
                (0, 0, 0),
                Y.data_ptr(),
                (0, 0, 0),
                G.data_ptr(),
                0,
                0,
                1,
                2,
                5,
                -2,
                3,
                False,
                1,
            ),
            ValueError,
            r"sizes must be non-negative; got \(N, H, L, C, E\) = \(1, 2, 5, -2, 3\)",
            id="binding-sizes",
        ),
    ],
)
def test_bad_inputs(call, error, match):
    X, Y, G, F, _, _ = make(1, 2, 5, 2, 3, dtype=torch.float32)
    with pytest.raises(error, match=match):
        call(X, Y, G, F)
