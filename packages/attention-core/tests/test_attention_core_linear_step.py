"""One recurrent linear-attention step (``attention_core.linear_step``, op
``attention_core::linear_attention_step``): the compiled kernel against the plain formula in
float64 and float32 over varied shapes, strided inputs, the first step (no state), the
identity feature map, every instruction set with the new state's rows streamed or stored,
half-precision accumulation, the written-out backward against autograd
of the formula (gradcheck), opcheck, torch.compile, the old state left untouched, stepping
equal to the batch causal linear attention, and bad inputs."""

import pytest
import torch

from attention_core.causal_product import normalized_causal_dot_product
from attention_core.linear_step import (
    elu_feature,
    linear_attention_step,
    linear_attention_step_reference,
)
from attention_core.linear_step._op import linear_attention_step_op
from attention_core.testing import assert_close

SHAPES = [
    pytest.param((1, 1, 1, 1), id="1x1x1x1"),
    pytest.param((3, 2, 5, 7), id="odd-sizes"),
    pytest.param((10, 12, 32, 32), id="recurrent-example-model"),
    pytest.param((2, 3, 16, 64), id="wide-values"),
]


def draw(N, H, E, M, dtype=torch.float64, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(N, H, E, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(N, H, M, generator=g, dtype=dtype)
    S = torch.randn(N, H, E, M, generator=g, dtype=dtype) if state else None
    Z = (torch.rand(N, H, E, generator=g, dtype=dtype) * 3 + 0.5) if state else None
    return q, k, v, S, Z


def plain(q, k, v, S, Z, eps, elu):
    """The formula with einsum, independent of the reference module."""
    a, b = (elu_feature(q), elu_feature(k)) if elu else (q, k)
    S_new = torch.einsum("nhe,nhm->nhem", b, v) + (0 if S is None else S)
    Z_new = b + (0 if Z is None else Z)
    out = torch.einsum("nhe,nhem->nhm", a, S_new) / (
        torch.einsum("nhe,nhe->nh", a, Z_new)[..., None] + eps
    )
    return out, S_new, Z_new


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("elu", [True, False], ids=["elu", "identity"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "first-step"])
def test_step_equals_the_formula(shape, dtype, elu, with_state):
    q, k, v, S, Z = draw(*shape, dtype=dtype, state=with_state)
    if not elu:  # mapped features are positive
        q, k = q.abs(), k.abs()
    out, (S_new, Z_new) = linear_attention_step(
        q, k, v, None if S is None else (S, Z), 0.1, elu_feature_map=elu
    )
    expected = plain(*(t if t is None else t.double() for t in (q, k, v, S, Z)), 0.1, elu)
    tolerance = (
        dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    )
    for name, got, want in zip(("out", "S", "Z"), (out, S_new, Z_new), expected):
        assert got.dtype == dtype and got.is_contiguous()
        assert_close(name, got, want, **tolerance)


@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "M",
    [
        pytest.param(16, id="streamed"),  # rows of whole 64-byte blocks (float; double: 128 B)
        pytest.param(24, id="streamed-f64-only"),  # 96 B in float, 192 B in double
        pytest.param(10, id="stored"),
        pytest.param(272, id="wider-than-the-stream-buffer"),
    ],
)
def test_every_instruction_set_and_store_gives_the_formula(level, dtype, M):
    from attention_core import _C

    q, k, v, S, Z = draw(3, 5, 4, M, dtype=dtype, seed=M)
    try:
        _C.set_cpu_level(level)  # clamped to what the CPU supports
        out, (S_new, Z_new) = linear_attention_step(q, k, v, (S, Z), 0.1)
    finally:
        _C.set_cpu_level(-1)
    expected = plain(*(t.double() for t in (q, k, v, S, Z)), 0.1, True)
    tolerance = (
        dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    )
    for name, got, want in zip(("out", "S", "Z"), (out, S_new, Z_new), expected):
        assert_close(name, got, want, **tolerance)


def test_strided_inputs_and_state():
    """q, k, v read through strides (heads of a wider projection), S and Z non-contiguous."""
    N, H, E, M = 3, 4, 8, 6
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(N, 3 * H * E + 5, generator=g, dtype=torch.float64)
    q = qkv[:, : H * E].unflatten(1, (H, E))
    k = qkv[:, H * E : 2 * H * E].unflatten(1, (H, E))
    v = qkv[:, 2 * H * E : 2 * H * E + H * M].unflatten(1, (H, M))
    S = torch.randn(N, H, M, E, generator=g, dtype=torch.float64).transpose(-1, -2)
    Z = torch.rand(N, E, H, generator=g, dtype=torch.float64).transpose(-1, -2) + 1
    out, (S_new, Z_new) = linear_attention_step(q, k, v, (S, Z))
    for name, got, want in zip(
        ("out", "S", "Z"), (out, S_new, Z_new), plain(q, k, v, S, Z, 1e-6, True)
    ):
        assert_close(name, got, want, rtol=1e-12, atol=1e-12)


def test_the_old_state_is_not_modified():
    q, k, v, S, Z = draw(2, 3, 4, 5, dtype=torch.float32)
    S0, Z0 = S.clone(), Z.clone()
    _, (S1, Z1) = linear_attention_step(q, k, v, (S, Z))
    assert torch.equal(S, S0) and torch.equal(Z, Z0)
    assert S1.data_ptr() != S.data_ptr() and Z1.data_ptr() != Z.data_ptr()
    assert not torch.equal(S1, S0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_accumulates_in_float32(dtype):
    q, k, v, S, Z = draw(2, 3, 8, 4, dtype=dtype)
    S, Z = S.float(), Z.float() * 1000  # a long sequence's normaliser
    out, (S_new, Z_new) = linear_attention_step(q, k, v, (S, Z))
    assert out.dtype == dtype and S_new.dtype == Z_new.dtype == torch.float32
    # the feature map in the input dtype, the sums in float32
    a, b = elu_feature(q).float(), elu_feature(k).float()
    assert_close("Z", Z_new, Z + b, rtol=0, atol=0)
    assert_close("S", S_new, S + b[..., None] * v.float()[..., None, :], rtol=1e-6, atol=1e-6)
    expected = plain(a, b, v.float(), S, Z, 1e-6, False)[0]
    assert_close("out", out, expected.to(dtype))
    with pytest.raises(ValueError, match=r"S must be a torch.float32 tensor"):
        linear_attention_step(q, k, v, (S.to(dtype), Z))


def test_steps_equal_the_batch_causal_linear_attention():
    N, H, L, E, M = 2, 3, 9, 5, 4
    g = torch.Generator().manual_seed(3)
    Q, K = (torch.randn(N, H, L, E, generator=g, dtype=torch.float64) for _ in range(2))
    V = torch.randn(N, H, L, M, generator=g, dtype=torch.float64)
    batch = normalized_causal_dot_product(elu_feature(Q), elu_feature(K), V, 1e-6)
    state = None
    for i in range(L):
        out, state = linear_attention_step(Q[:, :, i], K[:, :, i], V[:, :, i], state)
        assert_close(f"position {i}", out, batch[:, :, i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("elu", [True, False], ids=["elu", "identity"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "first-step"])
def test_gradcheck(elu, with_state):
    q, k, v, S, Z = draw(2, 2, 3, 4, state=with_state, seed=5)
    if not elu:
        q, k = q.abs() + 0.1, k.abs() + 0.1
    leaves = [t.requires_grad_() for t in (q, k, v, S, Z) if t is not None]

    def step(*args):
        q, k, v, *state = args
        out, (S_new, Z_new) = linear_attention_step(
            q, k, v, tuple(state) or None, 0.1, elu_feature_map=elu
        )
        return out, S_new, Z_new

    assert torch.autograd.gradcheck(step, leaves)


def test_backward_equals_autograd_of_the_formula():
    q, k, v, S, Z = draw(3, 2, 6, 5, seed=7)
    ours = [t.clone().requires_grad_() for t in (q, k, v, S, Z)]
    theirs = [t.clone().requires_grad_() for t in (q, k, v, S, Z)]
    g = torch.Generator().manual_seed(8)
    out, (S_new, Z_new) = linear_attention_step(*ours[:3], tuple(ours[3:]), 0.1)
    expected = plain(*theirs, 0.1, True)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in expected]
    torch.autograd.backward([out, S_new, Z_new], grads)
    torch.autograd.backward(list(expected), grads)
    for name, a, b in zip(("dq", "dk", "dv", "dS", "dZ"), ours, theirs):
        assert_close(name, a.grad, b.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "first-step"])
def test_opcheck(with_state):
    samples = []
    for dtype in (torch.float32, torch.float64):
        q, k, v, S, Z = draw(2, 3, 4, 5, dtype=dtype, state=with_state)
        samples.append((q, k, v, S, Z, 1e-6, True))
        samples.append((q.abs(), k.abs(), v, S, Z, 0.5, False))
        # transposed and offset views
        wide = torch.randn(2, 3, 9, dtype=dtype)
        samples.append(
            (
                wide[..., 1:5],
                wide[..., 5:9],
                v.transpose(0, 1).contiguous().transpose(0, 1),
                S,
                Z,
                1e-6,
                True,
            )
        )
        grad = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, S, Z)]
        samples.append((*grad, 1e-6, True))
    for args in samples:
        torch.library.opcheck(linear_attention_step_op, args)


def test_torch_compile_fullgraph():
    q, k, v, S, Z = draw(2, 3, 4, 5, dtype=torch.float32)

    def step(q, k, v, S, Z):
        return linear_attention_step(q, k, v, (S, Z))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, (S1, Z1) = compiled(q, k, v, S, Z)
    expected = linear_attention_step_reference(q, k, v, S, Z, 1e-6, True)
    for name, got, want in zip(("out", "S", "Z"), (out, S1, Z1), expected):
        assert_close(name, got, want)


def test_reference_is_forced_by_the_environment(monkeypatch):
    q, k, v, S, Z = draw(2, 3, 4, 5, dtype=torch.float32)
    kernel = linear_attention_step(q, k, v, (S, Z))[0]
    monkeypatch.setenv("ATTENTION_CORE_FORCE_REFERENCE", "1")
    reference = linear_attention_step(q, k, v, (S, Z))[0]
    assert_close("out", kernel, reference)


BAD = [
    (
        "query",
        lambda q, k, v, S, Z: ([1.0], k, v, (S, Z), 1e-6),
        TypeError,
        "query must be a torch.Tensor",
    ),
    ("dtype", lambda q, k, v, S, Z: (q, k.double(), v, (S, Z), 1e-6), TypeError, "one dtype"),
    (
        "integer",
        lambda q, k, v, S, Z: (q.long(), k.long(), v.long(), None, 1e-6),
        TypeError,
        "floating point",
    ),
    (
        "key shape",
        lambda q, k, v, S, Z: (q, k[:, :, :2], v, (S, Z), 1e-6),
        ValueError,
        r"query and key must be \(N, H, E\)",
    ),
    (
        "value heads",
        lambda q, k, v, S, Z: (q, k, v[:, :1], (S, Z), 1e-6),
        ValueError,
        r"value must have shape \(2, 3, M\)",
    ),
    ("rank", lambda q, k, v, S, Z: (q[0], k[0], v[0], None, 1e-6), ValueError, r"\(N, H, E\)"),
    (
        "S shape",
        lambda q, k, v, S, Z: (q, k, v, (S[:1], Z), 1e-6),
        ValueError,
        r"S must be a torch.float32 tensor of shape \(2, 3, 4, 5\); got .* \(1, 3, 4, 5\)",
    ),
    (
        "Z dtype",
        lambda q, k, v, S, Z: (q, k, v, (S, Z.double()), 1e-6),
        ValueError,
        r"Z must be a torch.float32 tensor of shape \(2, 3, 4\); got torch.float64",
    ),
    (
        "state type",
        lambda q, k, v, S, Z: (q, k, v, S, 1e-6),
        TypeError,
        r"state must be a pair \(S, Z\)",
    ),
    (
        "eps",
        lambda q, k, v, S, Z: (q, k, v, (S, Z), -1.0),
        ValueError,
        "eps must be a finite non-negative number; got -1.0",
    ),
    (
        "eps nan",
        lambda q, k, v, S, Z: (q, k, v, (S, Z), float("nan")),
        ValueError,
        "eps must be a finite",
    ),
    ("device", lambda q, k, v, S, Z: (q, k, v.to("meta"), None, 1e-6), ValueError, "one device"),
]


@pytest.mark.parametrize("make, error, message", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_inputs_name_the_argument(make, error, message):
    q, k, v, S, Z = draw(2, 3, 4, 5, dtype=torch.float32)
    args = make(q, k, v, S, Z)
    with pytest.raises(error, match=message):
        linear_attention_step(*args)


def test_the_op_checks_its_arguments_too():
    q, k, v, S, Z = draw(2, 3, 4, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"S must be a torch.float32 tensor of shape"):
        torch.ops.attention_core.linear_attention_step(q, k, v, S[:, :, :2], Z, 1e-6, True)
