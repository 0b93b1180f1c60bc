"""The compiled causal-product kernel (attention_core._C through attention_core.causal_product._op):
against an independent float64 reference, every instruction-set variant, strided layouts,
gradients, the running state, opcheck, torch.compile, threads and dispatch."""

import pytest
import torch

from attention_core import _extension
from attention_core.attention import CausalLinearAttention
from attention_core.builders import TransformerEncoderBuilder
from attention_core.causal_product import _op as causal_op
from attention_core.causal_product import (
    causal_dot_product,
    causal_dot_product_chunked,
    normalized_causal_dot_product,
)
from attention_core.masking import LengthMask, TriangularCausalMask
from attention_core.testing import assert_close

needs_kernels = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)
pytestmark = needs_kernels

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
NORMALIZE = [pytest.param(False, id="numerator"), pytest.param(True, id="normalized")]
EPS = 1e-3


def gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(N, H, L, E, M, *, seed=0, dtype=torch.float64):
    """Positive Q and K (as after a feature map) and any V."""
    g = gen(seed)
    Q = torch.rand(N, H, L, E, generator=g, dtype=torch.float64) + 0.1
    K = torch.rand(N, H, L, E, generator=g, dtype=torch.float64) + 0.1
    V = torch.randn(N, H, L, M, generator=g, dtype=torch.float64)
    return Q.to(dtype), K.to(dtype), V.to(dtype)


def dense_reference(Q, K, V, normalize, eps=EPS, S0=None, z0=None):
    """float64, dense masked matrices: out, S_final and z_final."""
    Q, K, V = Q.double(), K.double(), V.double()
    scores = torch.einsum("nhle,nhse->nhls", Q, K).tril()
    numerator = scores @ V
    S = torch.einsum("nhle,nhlm->nhem", K, V)
    z = K.sum(2)
    denominator = scores.sum(-1)
    if S0 is not None:
        numerator = numerator + Q @ S0.double()
        S = S + S0.double()
    if z0 is not None:
        denominator = denominator + (Q @ z0.double()[..., None])[..., 0]
        z = z + z0.double()
    if normalize:
        return numerator / (denominator + eps)[..., None], S, z
    return numerator, S, z


def run(Q, K, V, normalize, **kwargs):
    """The public function (kernel path for float32/float64 CPU tensors)."""
    if normalize:
        return normalized_causal_dot_product(Q, K, V, EPS, **kwargs)
    return causal_dot_product(Q, K, V, **kwargs)


def check_against_reference(Q, K, V, normalize, name=""):
    """Output and the gradients of Q, K and V against the dense float64 reference."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (Q, K, V)]
    reference = [t.detach().double().requires_grad_(True) for t in (Q, K, V)]
    out = run(*leaves, normalize)
    expected, _, _ = dense_reference(*reference, normalize)
    assert_close(f"{name}out", out, expected)
    G = torch.randn(expected.shape, generator=gen(99), dtype=torch.float64)
    out.backward(G.to(out.dtype))
    expected.backward(G)
    for label, a, b in zip("QKV", leaves, reference):
        assert_close(f"{name}d{label}", a.grad, b.grad)


@pytest.fixture
def cpu_level():
    """Set the instruction-set level for one test, then restore automatic selection."""
    yield _extension._C.set_cpu_level
    _extension._C.set_cpu_level(-1)


# ---------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------

SHAPES = [
    pytest.param((1, 1, 1, 1, 1), id="size-1"),
    pytest.param((2, 3, 7, 5, 13), id="primes"),
    pytest.param((1, 2, 37, 33, 47), id="simd-tails"),
    pytest.param((1, 1, 11, 64, 64), id="64x64"),
    pytest.param((1, 1, 5, 130, 70), id="state-rows-blocked"),
]


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_dense_reference(shape, dtype, normalize):
    check_against_reference(*inputs(*shape, dtype=dtype), normalize)


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
def test_every_instruction_set_variant(level, normalize, cpu_level):
    cpu_level(level)
    if _extension._C.cpu_level() != level:
        pytest.skip(f"this CPU does not support level {level}")
    for dtype in (torch.float32, torch.float64):
        Q, K, V = inputs(2, 2, 19, 37, 71, dtype=dtype, seed=level)
        check_against_reference(Q, K, V, normalize, name=f"{dtype} ")


def strided(t, layout):
    """The same values as ``t`` (N, H, L, D) in another memory layout."""
    if layout == "sequence-first":  # (N, L, H, D) storage, as in the attention modules
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "offset":  # a window of a larger buffer: storage offset, padded rows
        big = torch.zeros(t.shape[0], t.shape[1], t.shape[2] + 3, t.shape[3] + 5, dtype=t.dtype)
        big[:, :, 3:, 2 : 2 + t.shape[3]] = t
        return big[:, :, 3:, 2 : 2 + t.shape[3]]
    if layout == "every-other-token":
        big = torch.zeros(t.shape[0], t.shape[1], 2 * t.shape[2], t.shape[3], dtype=t.dtype)
        big[:, :, ::2] = t
        return big[:, :, ::2]
    if layout == "strided-features":  # needs a copy before the kernel
        big = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "expanded-heads":  # stride 0 over heads
        return t[:, :1].expand(-1, t.shape[1], -1, -1)
    return t


LAYOUTS = ["sequence-first", "offset", "every-other-token", "strided-features", "expanded-heads"]


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(layout, normalize):
    Q, K, V = (strided(t, layout) for t in inputs(2, 3, 9, 6, 5, seed=3))
    assert not Q.is_contiguous()
    check_against_reference(Q, K, V, normalize)


def test_output_layout():
    Q, K, V = (strided(t, "sequence-first") for t in inputs(2, 3, 9, 6, 5))
    assert causal_dot_product(Q, K, V).is_contiguous()  # as fast-transformers
    out = normalized_causal_dot_product(Q, K, V)
    assert out.transpose(1, 2).is_contiguous()  # written in (N, L, H, M) storage
    assert normalized_causal_dot_product(*inputs(2, 3, 9, 6, 5)).is_contiguous()


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize(
    "shape",
    [(0, 2, 3, 4, 5), (1, 2, 0, 4, 5), (1, 2, 3, 0, 5), (1, 2, 3, 4, 0)],
    ids=["N=0", "L=0", "E=0", "M=0"],
)
def test_empty_sizes(shape, normalize):
    Q, K, V = inputs(*shape)
    z0 = torch.rand(shape[0], shape[1], shape[3], dtype=torch.float64)
    S0 = torch.rand(shape[0], shape[1], shape[3], shape[4], dtype=torch.float64)
    state = (S0, z0) if normalize else S0
    out, final = run(Q, K, V, normalize, state=state, return_state=True)
    expected, S, z = dense_reference(Q, K, V, normalize, S0=S0, z0=z0)
    assert_close("out", out, expected)
    assert_close("S", final[0] if normalize else final, S)
    if normalize:
        assert_close("z", final[1], z)


# ---------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_with_state_in_and_out(normalize):
    Q, K, V = (t.requires_grad_(True) for t in inputs(2, 2, 6, 3, 4, seed=5))
    S0 = torch.rand(2, 2, 3, 4, dtype=torch.float64, generator=gen(6), requires_grad=True)
    z0 = torch.rand(2, 2, 3, dtype=torch.float64, generator=gen(7), requires_grad=True)

    def fn(Q, K, V, S0, z0):
        if normalize:
            out, (S, z) = normalized_causal_dot_product(
                Q, K, V, 0.5, state=(S0, z0), return_state=True
            )
            return out, S, z
        out, S = causal_dot_product(Q, K, V, state=S0, return_state=True)
        return out, S

    assert torch.autograd.gradcheck(fn, (Q, K, V, S0, z0))


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_sequence_first(normalize):
    Q, K, V = (strided(t, "sequence-first").requires_grad_(True) for t in inputs(1, 3, 7, 2, 3))
    assert torch.autograd.gradcheck(lambda *t: run(*t, normalize), (Q, K, V))


def test_gradient_of_some_inputs_only():
    Q, K, V = inputs(1, 2, 8, 3, 4, seed=8)
    V.requires_grad_(True)
    normalized_causal_dot_product(Q, K, V, EPS).sum().backward()
    Vr = V.detach().clone().requires_grad_(True)
    dense_reference(Q, K, Vr, True)[0].sum().backward()
    assert_close("dV", V.grad, Vr.grad)


# ---------------------------------------------------------------------------------------
# the running state
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("force_reference", [False, True], ids=["kernel", "reference"])
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_two_halves_with_carried_state_equal_one_pass(normalize, force_reference, monkeypatch):
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1" if force_reference else "0")
    Q, K, V = inputs(2, 3, 23, 5, 7, seed=9)
    whole, final = run(Q, K, V, normalize, return_state=True)
    first, state = run(Q[:, :, :10], K[:, :, :10], V[:, :, :10], normalize, return_state=True)
    second, last = run(Q[:, :, 10:], K[:, :, 10:], V[:, :, 10:], normalize, state=state,
                       return_state=True)  # fmt: skip
    assert_close("out", torch.cat([first, second], 2), whole)
    _, S, z = dense_reference(Q, K, V, normalize)
    assert_close("S", last[0] if normalize else last, S)
    assert_close("S one pass", final[0] if normalize else final, S)
    if normalize:
        assert_close("z", last[1], z)


def test_recurrent_steps_match_the_parallel_pass():
    Q, K, V = inputs(1, 2, 6, 4, 3, seed=10)
    parallel = normalized_causal_dot_product(Q, K, V, EPS)
    state, steps = None, []
    for i in range(6):
        out, state = normalized_causal_dot_product(
            Q[:, :, i : i + 1], K[:, :, i : i + 1], V[:, :, i : i + 1], EPS,
            state=state, return_state=True,
        )  # fmt: skip
        steps.append(out)
    assert_close("token by token", torch.cat(steps, 2), parallel)


# ---------------------------------------------------------------------------------------
# dtypes, threads, dispatch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_inputs(dtype, normalize):
    Q, K, V = (t.to(dtype).requires_grad_(True) for t in inputs(1, 2, 300, 8, 8, seed=11))
    out, state = run(Q, K, V, normalize, return_state=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    S = state[0] if normalize else state
    assert S.dtype == torch.float32  # the state is kept in float32
    expected, S_expected, _ = dense_reference(Q, K, V, normalize)
    scale = expected.abs().max()
    assert_close("out", out.double() / scale, expected / scale, rtol=0, atol=2e-2)
    assert_close("S", S.double() / S_expected.abs().max(), S_expected / S_expected.abs().max(),
                 rtol=0, atol=1e-5)  # fmt: skip
    out.sum().backward()
    assert Q.grad.dtype == dtype and torch.isfinite(Q.grad.float()).all()


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_thread_count_is_honoured(normalize, monkeypatch):
    Q, K, V = (t.float().requires_grad_(True) for t in inputs(2, 4, 64, 32, 32, seed=12))
    calls = []
    compiled = _extension._C

    class Spy:  # records the thread count handed to the compiled functions
        def __getattr__(self, name):
            function = getattr(compiled, name)

            def call(*args, **kwargs):
                calls.append((name, args[-1]))
                return function(*args, **kwargs)

            return call

    monkeypatch.setattr(_extension, "_C", Spy())
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            Q.grad = K.grad = V.grad = None
            out = run(Q, K, V, normalize)
            out.square().sum().backward()
            results.append([out.detach(), Q.grad, K.grad, V.grad])
    finally:
        torch.set_num_threads(threads)
    assert [n for _, n in calls] == [1, 1, 2, 2]
    assert [name.split("_")[-2] for name, _ in calls][:2] == ["forward", "backward"]
    for a, b in zip(*results):  # heads are independent: bitwise equal results
        assert torch.equal(a, b)


def spy(calls: list, name: str, function, argument: int = 0):
    """``function``, appending ``(name, args[argument])`` to ``calls`` on each call."""

    def recorded(*args):
        calls.append((name, args[argument]))
        return function(*args)

    return recorded


def test_dispatch_to_kernel_unless_forced(monkeypatch):
    Q, K, V = inputs(1, 2, 9, 3, 4, dtype=torch.float32)
    calls = []
    for name in ("causal_product_forward", "forward_kernel"):
        monkeypatch.setattr(causal_op, name, spy(calls, name, getattr(causal_op, name), 5))
    monkeypatch.delenv(_extension.FORCE_REFERENCE_ENV, raising=False)
    kernel = causal_dot_product(Q, K, V)
    normalized_causal_dot_product(Q, K, V)
    # nothing to record for autograd: the checked call skips the dispatcher
    assert calls == [("forward_kernel", False), ("forward_kernel", True)]
    calls.clear()
    recorded = causal_dot_product(Q.requires_grad_(), K, V)
    normalized_causal_dot_product(Q, K, V)
    op = [("causal_product_forward", False), ("forward_kernel", False)]
    assert calls == [*op, ("causal_product_forward", True), ("forward_kernel", True)]
    assert torch.equal(recorded.detach(), kernel)
    calls.clear()
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    reference = causal_dot_product(Q, K, V)
    normalized_causal_dot_product(Q, K, V)
    assert calls == []
    assert_close("forced reference", reference, kernel)
    assert_close("chunked", causal_dot_product_chunked(Q, K, V, 4), kernel)


def test_fused_map_skips_the_dispatcher_only_without_autograd(monkeypatch):
    from attention_core.causal_product import _fused, elu_normalized_causal_dot_product

    Q, K, V = inputs(1, 2, 9, 3, 4, dtype=torch.float64)
    calls = []
    for name in ("elu_causal_linear_attention", "elu_forward_kernel"):
        monkeypatch.setattr(_fused, name, spy(calls, name, getattr(_fused, name)))
    direct = elu_normalized_causal_dot_product(Q, K, V, EPS)
    with torch.no_grad():
        elu_normalized_causal_dot_product(Q.requires_grad_(), K, V, EPS)
    recorded = elu_normalized_causal_dot_product(Q, K, V, EPS)
    op = ["elu_causal_linear_attention", "elu_forward_kernel"]  # the op runs the kernel
    assert [name for name, _ in calls] == ["elu_forward_kernel", "elu_forward_kernel", *op]
    assert torch.equal(direct, recorded.detach())
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    assert_close("fused map", direct, dense_reference(phi(Q), phi(K), V, True)[0])


def test_missing_extension_falls_back(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    assert not _extension.kernels_available()
    Q, K, V = inputs(1, 2, 9, 3, 4)
    assert_close("chunked path", causal_dot_product(Q, K, V), dense_reference(Q, K, V, False)[0])
    out = normalized_causal_dot_product(Q, K, V, EPS)
    assert_close("chunked path", out, dense_reference(Q, K, V, True)[0])


# ---------------------------------------------------------------------------------------
# causal linear attention as a whole
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_linear_attention_kernel_equals_reference(dtype, monkeypatch):
    g = gen(13)
    N, L, S, H, E, D = 3, 11, 8, 2, 5, 7
    q = torch.randn(N, L, H, E, generator=g, dtype=dtype)
    k = torch.randn(N, S, H, E, generator=g, dtype=dtype)
    v = torch.randn(N, S, H, D, generator=g, dtype=dtype)
    attention = CausalLinearAttention(E)
    mask = TriangularCausalMask(L)
    args = (LengthMask(torch.tensor([11, 4, 9]), max_len=L), LengthMask(torch.tensor([8, 5, 2])))
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "0")
    kernel = attention(q, k, v, mask, *args)
    assert kernel.shape == (N, L, H, D) and kernel.is_contiguous()
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    assert_close("attention", kernel, attention(q, k, v, mask, *args))


def test_compiled_causal_linear_encoder_matches_eager():
    """torch.compile(fullgraph=True) with the aot_eager backend (inductor takes about a
    minute to compile here); the kernel ops must be in the graph, not around it."""
    torch.manual_seed(0)
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=2,
        n_heads=2,
        query_dimensions=8,
        value_dimensions=8,
        feed_forward_dimensions=32,
        attention_type="causal-linear",
        dropout=0.0,
        attention_dropout=0.0,
    ).get()
    x = torch.randn(2, 13, 16, requires_grad=True)
    mask, lengths = TriangularCausalMask(13), LengthMask(torch.tensor([13, 9]), max_len=13)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def encode(x):
        return model(x, attn_mask=mask, length_mask=lengths)

    compiled = torch.compile(encode, fullgraph=True, backend=recording_backend)
    y = compiled(x)
    y.square().sum().backward()
    grad, x.grad = x.grad, None
    y_eager = encode(x)
    y_eager.square().sum().backward()
    assert len(graphs) == 1
    assert graphs[0].count("attention_core.causal_product_forward.default") == 2
    assert_close("output", y, y_eager)
    assert_close("dx", grad, x.grad)


# ---------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------

OPCHECK_SAMPLES = ["contiguous", "transposed", "offset", "requires-grad", "float64", "state"]


def opcheck_sample(sample, normalize):
    dtype = torch.float64 if sample == "float64" else torch.float32
    Q, K, V = inputs(2, 3, 7, 4, 5, seed=14, dtype=dtype)
    S0 = z0 = None
    if sample == "transposed":
        Q, K, V = (strided(t, "sequence-first") for t in (Q, K, V))
    elif sample == "offset":
        Q, K, V = (strided(t, "offset") for t in (Q, K, V))
    elif sample == "requires-grad":
        Q, K, V = (t.requires_grad_(True) for t in (Q, K, V))
    elif sample == "state":
        S0 = torch.rand(2, 3, 4, 5, requires_grad=True)
        z0 = torch.rand(2, 3, 4, requires_grad=True) if normalize else None
        V.requires_grad_(True)
    sequence_first = sample == "transposed"
    return Q, K, V, S0, z0, normalize, 0.5, sequence_first


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_forward_opcheck(sample, normalize):
    torch.library.opcheck(causal_op.causal_product_forward, opcheck_sample(sample, normalize))


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("sample", ["contiguous", "transposed", "float64", "state"])
def test_backward_opcheck(sample, normalize):
    Q, K, V, S0, z0, normalize, eps, sequence_first = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in opcheck_sample(sample, normalize)
    )
    out, S, z = causal_op.causal_product_forward(Q, K, V, S0, z0, normalize, eps, sequence_first)
    grad = torch.randn_like(out)
    grad_S = torch.randn_like(S) if sample == "state" else None
    grad_z = torch.randn_like(z) if sample == "state" and normalize else None
    args = (grad, Q, K, V, out if normalize else None, S0, z0, grad_S, grad_z, normalize, eps,
            sequence_first)  # fmt: skip
    torch.library.opcheck(causal_op.causal_product_backward, args)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


def raw_forward(Q, K, V, *, L, out):
    """The binding called directly (no Python-side checks)."""
    address = 0 if out is None else out.data_ptr()
    S = torch.empty(1, 2, 3, 4)
    strides = (0, 0, 0)
    _extension._C.causal_product_forward_f32(
        Q.data_ptr(), strides, K.data_ptr(), strides, V.data_ptr(), strides, address, strides,
        0, 0, S.data_ptr(), 0, 1, 2, L, 3, 4, False, 0.0, 1,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda Q, K, V: causal_dot_product(Q, K, V, state=torch.zeros(1, 2, 3, 3)),
            ValueError,
            r"state must have shape \(1, 2, 3, 4\); got \(1, 2, 3, 3\)",
            id="state-shape",
        ),
        pytest.param(
            lambda Q, K, V: causal_dot_product(Q, K, V, state=torch.zeros(1, 2, 3, 4).double()),
            TypeError,
            "state must have dtype torch.float32; got torch.float64",
            id="state-dtype",
        ),
        pytest.param(
            lambda Q, K, V: normalized_causal_dot_product(Q, K, V, state=torch.zeros(1, 2, 3, 4)),
            TypeError,
            r"state must be a pair \(S, z\); got Tensor",
            id="state-not-a-pair",
        ),
        pytest.param(
            lambda Q, K, V: normalized_causal_dot_product(
                Q, K, V, state=(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4))
            ),
            ValueError,
            r"state\[1\] \(z\) must have shape \(1, 2, 3\); got \(1, 2, 4\)",
            id="z-shape",
        ),
        pytest.param(
            lambda Q, K, V: normalized_causal_dot_product(Q, K, V, eps=-1.0),
            ValueError,
            "eps must be a finite non-negative number; got -1.0",
            id="negative-eps",
        ),
        pytest.param(
            lambda Q, K, V: normalized_causal_dot_product(Q, K, V, eps=float("inf")),
            ValueError,
            "eps must be a finite non-negative number; got inf",
            id="infinite-eps",
        ),
        pytest.param(
            lambda Q, K, V: causal_op.causal_product_forward(
                Q.half(), K.half(), V.half(), None, None, False, 0.0, False
            ),
            TypeError,
            r"Q, K and V must all be float32 or float64 \(one dtype\); got torch.float16",
            id="op-dtype",
        ),
        pytest.param(
            lambda Q, K, V: causal_op.causal_product_forward(
                Q, K, V[:, :, :2], None, None, False, 0.0, False
            ),
            ValueError,
            r"V \(N, H, L, M\); got \(1, 2, 5, 3\), \(1, 2, 5, 3\) and \(1, 2, 2, 4\)",
            id="op-shapes",
        ),
        pytest.param(
            lambda Q, K, V: raw_forward(Q, K, V, L=-5, out=Q),
            ValueError,
            r"sizes must be non-negative; got \(N, H, L, E, M\) = \(1, 2, -5, 3, 4\)",
            id="binding-sizes",
        ),
        pytest.param(
            lambda Q, K, V: raw_forward(Q, K, V, L=5, out=None),
            ValueError,
            "out must be a buffer address; got a null pointer",
            id="binding-null-output",
        ),
        pytest.param(
            lambda Q, K, V: _extension._C.set_cpu_level(3),
            ValueError,
            r"level must be -1 \(detect\), 0 \(baseline\), 1 \(avx2\) or 2 \(avx512\); got 3",
            id="binding-cpu-level",
        ),
    ],
)
def test_bad_inputs(call, error, match):
    Q, K, V = inputs(1, 2, 5, 3, 4, dtype=torch.float32)
    with pytest.raises(error, match=match):
        call(Q, K, V)


def test_fake_tensors_without_autograd_take_the_op():
    """Tensor subclasses never reach the kernel directly: under FakeTensorMode (shape
    propagation) and no_grad the registered op's fake gives the shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attention_core.causal_product import elu_normalized_causal_dot_product

    with FakeTensorMode(), torch.no_grad():
        Q = torch.randn(1, 2, 8, 4)
        V = torch.randn(1, 2, 8, 3)
        shapes = [
            causal_dot_product(Q, Q, V).shape,
            normalized_causal_dot_product(Q, Q, V).shape,
            elu_normalized_causal_dot_product(Q, Q, V).shape,
        ]
    assert shapes == [torch.Size([1, 2, 8, 3])] * 3
