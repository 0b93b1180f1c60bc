"""The compiled local-product kernels (local_dot_product, local_weighted_average) against a
dense float64 reference and the plain-PyTorch path: shapes, layouts, instruction sets,
gradients, opcheck, torch.compile of LocalAttention, dispatch and errors."""

import pytest
import torch

from attention_core import _extension
from attention_core.attention import LocalAttention
from attention_core.local_product import _op as local_op
from attention_core.local_product import local_dot_product, local_weighted_average
from attention_core.masking import FullMask, LengthMask
from attention_core.testing import assert_close

pytestmark = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]

SHAPES = [  # N, H, L, S, E, C
    pytest.param((1, 1, 1, 1, 1, 1), id="size-1"),
    pytest.param((2, 3, 7, 7, 5, 3), id="odd"),
    pytest.param((1, 2, 13, 5, 3, 4), id="more-queries-even-context"),
    pytest.param((2, 1, 5, 11, 7, 9), id="more-keys"),
    pytest.param((1, 2, 6, 6, 4, 17), id="context-wider-than-sequence"),
    pytest.param((1, 1, 41, 41, 37, 33), id="simd-tails"),
    pytest.param((1, 2, 70, 60, 130, 7), id="wide-features"),  # full register tiles + tail
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def band_inputs(N, H, L, S, E, C, *, seed=0, dtype=torch.float64):
    g = gen(seed)
    Q = torch.randn(N, H, L, E, generator=g, dtype=torch.float64).to(dtype)
    K = torch.randn(N, H, S, E, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.randn(L, S, generator=g, dtype=torch.float64).to(dtype)
    lengths = torch.randint(1, S + 1, (N,), generator=g)
    lengths[0] = S
    return Q, K, mask, lengths


def key_of_slot(L, S, C):
    """(L, C) key index j = l - C // 2 + k and whether 0 <= j < S, by loops."""
    index = torch.empty(L, C, dtype=torch.long)
    for l in range(L):
        for k in range(C):
            index[l, k] = l - C // 2 + k
    return index, (index >= 0) & (index < S)


def dense_dot(Q, K, mask, lengths, C):
    """float64: dense Q K^T plus mask, then the band read slot by slot."""
    N, H, L, _ = Q.shape
    S = K.shape[2]
    full = Q.double() @ K.double().transpose(-1, -2) + mask.double()
    index, inside = key_of_slot(L, S, C)
    out = torch.full((N, H, L, C), float("-inf"), dtype=torch.float64)
    for n in range(N):
        for l in range(L):
            for k in range(C):
                j = int(index[l, k])
                if inside[l, k] and j < lengths[n]:
                    out[n, :, l, k] = full[n, :, l, j]
    return out


def dense_average(A, V):
    """float64: the band of weights scattered into a dense (L, S) matrix, times V."""
    N, H, L, C = A.shape
    S = V.shape[2]
    index, inside = key_of_slot(L, S, C)
    dense = torch.zeros(N, H, L, S, dtype=torch.float64)
    for l in range(L):
        for k in range(C):
            if inside[l, k]:
                dense[:, :, l, int(index[l, k])] = A[:, :, l, k].double()
    return dense @ V.double()


def finite(x):
    """-inf slots to zero (and no gradient through them)."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def check_dot(Q, K, mask, lengths, C, name=""):
    leaves = [t.detach().clone().requires_grad_(True) for t in (Q, K)]
    reference = [t.detach().double().requires_grad_(True) for t in (Q, K)]
    out = local_dot_product(*leaves, mask, lengths, C)
    expected = dense_dot(*reference, mask, lengths, C)
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected)), f"{name}-inf slots"
    assert_close(f"{name}scores", finite(out), finite(expected))
    G = torch.randn(expected.shape, generator=gen(99), dtype=torch.float64)
    (finite(out) * G.to(out.dtype)).sum().backward()
    (finite(expected) * G).sum().backward()
    for label, a, b in zip("QK", leaves, reference):
        assert_close(f"{name}d{label}", a.grad, b.grad)


def check_average(A, V, name=""):
    leaves = [t.detach().clone().requires_grad_(True) for t in (A, V)]
    reference = [t.detach().double().requires_grad_(True) for t in (A, V)]
    out = local_weighted_average(*leaves)
    expected = dense_average(*reference)
    assert_close(f"{name}out", out, expected)
    G = torch.randn(expected.shape, generator=gen(98), dtype=torch.float64)
    out.backward(G.to(out.dtype))
    expected.backward(G)
    for label, a, b in zip(["attention", "V"], leaves, reference):
        assert_close(f"{name}d{label}", a.grad, b.grad)


def average_inputs(N, H, L, S, D, C, *, seed=0, dtype=torch.float64):
    g = gen(seed)
    A = torch.rand(N, H, L, C, generator=g, dtype=torch.float64).to(dtype)
    V = torch.randn(N, H, S, D, generator=g, dtype=torch.float64).to(dtype)
    return A, V


# ---------------------------------------------------------------------------------------
# against the dense reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dot_product_matches_dense_reference(shape, dtype):
    Q, K, mask, lengths = band_inputs(*shape, dtype=dtype)
    check_dot(Q, K, mask, lengths, shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_average_matches_dense_reference(shape, dtype):
    check_average(*average_inputs(*shape, dtype=dtype))


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
        check_dot(*band_inputs(2, 2, 23, 19, 37, 35, dtype=dtype, seed=level), 35, f"{dtype} ")
        check_average(*average_inputs(2, 2, 23, 19, 37, 35, dtype=dtype), f"{dtype} ")
        # blocks of 16 queries over a wide band: 4 blocks, the last partial, S > L
        check_dot(*band_inputs(1, 2, 50, 61, 64, 128, dtype=dtype, seed=level), 128, "wide ")
        check_average(*average_inputs(1, 2, 50, 61, 64, 128, dtype=dtype), "wide ")


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
    Q, K, mask, lengths = band_inputs(2, 3, 9, 8, 6, 5, seed=3)
    Q, K = strided(Q, layout), strided(K, layout)
    check_dot(Q, K, mask.t().contiguous().t(), lengths, 5)
    A, V = average_inputs(2, 3, 9, 8, 6, 5, seed=4)
    check_average(strided(A, layout), strided(V, layout))


def test_padded_batch_rows_without_keys():
    Q, K, mask, _ = band_inputs(3, 2, 10, 10, 4, 3, seed=5)
    lengths = torch.tensor([10, 1, 0])  # the last sequence has no valid key at all
    check_dot(Q, K, mask, lengths, 3)
    out = local_dot_product(Q, K, mask, lengths, 3)
    assert torch.isneginf(out[2]).all()


# ---------------------------------------------------------------------------------------
# gradients, opcheck, compile
# ---------------------------------------------------------------------------------------


def test_gradcheck_dot_product():
    Q, K, mask, lengths = band_inputs(2, 2, 6, 5, 3, 4, seed=6)
    Q.requires_grad_(True)
    K.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k: finite(local_dot_product(q, k, mask, lengths, 4)), (Q, K)
    )


def test_gradcheck_weighted_average():
    A, V = (t.requires_grad_(True) for t in average_inputs(2, 2, 6, 5, 3, 4, seed=7))
    assert torch.autograd.gradcheck(local_weighted_average, (A, V))


OPCHECK_SAMPLES = ["contiguous", "transposed", "offset", "requires-grad", "float64"]


def opcheck_inputs(sample):
    dtype = torch.float64 if sample == "float64" else torch.float32
    Q, K, mask, lengths = band_inputs(2, 3, 7, 6, 4, 5, seed=8, dtype=dtype)
    A, V = average_inputs(2, 3, 7, 6, 4, 5, seed=9, dtype=dtype)
    tensors = [Q, K, A, V]
    if sample in ("transposed", "offset"):
        tensors = [strided(t, "sequence-first" if sample == "transposed" else sample)
                   for t in tensors]  # fmt: skip
    elif sample == "requires-grad":
        tensors = [t.requires_grad_(True) for t in tensors]
    Q, K, A, V = tensors
    return Q, K, mask, lengths, A, V


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_forward_opcheck(sample):
    Q, K, mask, lengths, A, V = opcheck_inputs(sample)
    torch.library.opcheck(local_op.local_dot_product_forward, (Q, K, mask, lengths, 5))
    torch.library.opcheck(local_op.local_weighted_average_forward, (A, V))


@pytest.mark.parametrize("sample", ["transposed", "float64"])
def test_backward_opcheck(sample):
    Q, K, _, lengths, A, V = opcheck_inputs(sample)
    grad_scores = torch.randn(2, 3, 7, 5, dtype=Q.dtype)
    grad_out = torch.randn(2, 3, 7, 4, dtype=Q.dtype)
    torch.library.opcheck(local_op.local_dot_product_backward, (grad_scores, Q, K, lengths, 5))
    torch.library.opcheck(local_op.local_weighted_average_backward, (grad_out, A, V))


def attention_inputs(dtype=torch.float32, seed=10):
    g = gen(seed)
    N, L, S, H, E, D = 2, 13, 11, 2, 4, 5
    q = torch.randn(N, L, H, E, generator=g, dtype=dtype)
    k = torch.randn(N, S, H, E, generator=g, dtype=dtype)
    v = torch.randn(N, S, H, D, generator=g, dtype=dtype)
    mask = FullMask(torch.rand(L, S, generator=g) > 0.2)
    return (
        q,
        k,
        v,
        mask,
        LengthMask(torch.tensor([13, 7]), max_len=L),
        LengthMask(torch.tensor([11, 6]), max_len=S),
    )


def test_compiled_local_attention_matches_eager():
    """torch.compile(fullgraph=True, backend="aot_eager"): both kernel ops in the graph."""
    attention = LocalAttention(5, attention_dropout=0.0)
    q, k, v, mask, ql, kl = attention_inputs()
    q.requires_grad_(True)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def run(q):
        return attention(q, k, v, mask, ql, kl)

    y = torch.compile(run, fullgraph=True, backend=recording_backend)(q)
    y.square().sum().backward()
    grad, q.grad = q.grad, None
    y_eager = run(q)
    y_eager.square().sum().backward()
    assert len(graphs) == 1
    assert "attention_core.local_dot_product_forward.default" in graphs[0]
    assert "attention_core.local_weighted_average_forward.default" in graphs[0]
    assert_close("output", y, y_eager)
    assert_close("dq", grad, q.grad)


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_local_attention_kernel_equals_forced_reference(dtype, monkeypatch):
    attention = LocalAttention(6, softmax_temp=0.4, attention_dropout=0.0)
    q, k, v, mask, ql, kl = attention_inputs(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "0")
    kernel = attention(*leaves, mask, ql, kl)
    kernel.square().sum().backward()
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    reference = attention(*leaves, mask, ql, kl)
    reference.square().sum().backward()
    assert_close("attention", kernel, reference)
    for label, a, t in zip("qkv", grads, leaves):
        assert_close(f"d{label}", a, t.grad)


def test_dispatch_to_kernel_unless_forced(monkeypatch):
    Q, K, mask, lengths = band_inputs(1, 2, 9, 9, 3, 4, dtype=torch.float32)
    A, V = average_inputs(1, 2, 9, 9, 3, 4, dtype=torch.float32)
    calls = []
    for name in ("local_dot_product_forward", "local_weighted_average_forward"):
        original = getattr(local_op, name)
        monkeypatch.setattr(
            local_op, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
        )
    monkeypatch.delenv(_extension.FORCE_REFERENCE_ENV, raising=False)
    local_dot_product(Q, K, mask, lengths, 4)
    local_weighted_average(A, V)
    assert len(calls) == 2
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    local_dot_product(Q, K, mask, lengths, 4)
    local_weighted_average(A, V)
    assert len(calls) == 2
    # a mask that requires a gradient takes the differentiable reference path
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "0")
    local_dot_product(Q, K, mask.requires_grad_(True), lengths, 4)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_inputs(dtype):
    Q, K, mask, lengths = band_inputs(1, 2, 40, 40, 8, 7, seed=11)
    out = local_dot_product(Q.to(dtype), K.to(dtype), mask.to(dtype), lengths, 7)
    assert out.dtype == dtype
    expected = dense_dot(Q, K, mask, lengths, 7)
    assert_close("scores", finite(out).double(), finite(expected), rtol=0, atol=0.1)
    A, V = average_inputs(1, 2, 40, 40, 8, 7, seed=12)
    avg = local_weighted_average(A.to(dtype), V.to(dtype))
    assert avg.dtype == dtype
    assert_close("average", avg.double(), dense_average(A, V), rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda Q, K, m, n: local_op.local_dot_product_forward(Q.half(), K.half(), m, n, 3),
            TypeError,
            "Q and K must all be float32 or float64",
            id="op-dtype",
        ),
        pytest.param(
            lambda Q, K, m, n: local_op.local_dot_product_forward(Q, K[..., :2], m, n, 3),
            ValueError,
            r"Q must be \(N, H, L, E\) and K \(N, H, S, E\); got \(1, 2, 5, 3\) and "
            r"\(1, 2, 6, 2\)",
            id="op-shapes",
        ),
        pytest.param(
            lambda Q, K, m, n: local_op.local_dot_product_forward(Q, K, m[:, :2], n, 3),
            ValueError,
            r"attn_mask must be a torch.float32 tensor of shape \(5, 6\); got torch.float32 "
            r"\(5, 2\)",
            id="op-mask",
        ),
        pytest.param(
            lambda Q, K, m, n: local_op.local_dot_product_forward(Q, K, m, n.int(), 3),
            ValueError,
            r"key_lengths must be an int64 tensor of shape \(1,\); got torch.int32",
            id="op-lengths",
        ),
        pytest.param(
            lambda Q, K, m, n: local_op.local_weighted_average_forward(Q[..., :0], K),
            ValueError,
            r"attention must be \(N, H, L, C\) with C > 0",
            id="op-empty-context",
        ),
        pytest.param(
            lambda Q, K, m, n: _extension._C.local_weighted_average_forward_f32(
                Q.data_ptr(),
                (0, 0, 0),
                K.data_ptr(),
                (0, 0, 0),
                0,
                (0, 0, 0),
                1,
                2,
                5,
                6,
                3,
                3,
                1,
            ),
            ValueError,
            "out must be a buffer address; got a null pointer",
            id="binding-null-output",
        ),
        pytest.param(
            lambda Q, K, m, n: _extension._C.local_weighted_average_forward_f32(
                Q.data_ptr(),
                (0, 0, 0),
                K.data_ptr(),
                (0, 0, 0),
                Q.data_ptr(),
                (0, 0, 0),
                1,
                2,
                5,
                6,
                3,
                0,
                1,
            ),
            ValueError,
            r"local context positive; got \(N, H, L, S, F, C\) = \(1, 2, 5, 6, 3, 0\)",
            id="binding-context",
        ),
        pytest.param(
            lambda Q, K, m, n: local_dot_product(Q, K, m, n, 0),
            ValueError,
            "local_context must be a positive int; got 0",
            id="public-context",
        ),
    ],
)
def test_bad_inputs(call, error, match):
    Q, K, mask, lengths = band_inputs(1, 2, 5, 6, 3, 3, dtype=torch.float32)
    with pytest.raises(error, match=match):
        call(Q, K, mask, lengths)
