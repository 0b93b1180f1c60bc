"""Residual sublayer steps (``attention_core.residual_step``, ops
``attention_core::residual_feed_forward`` and ``attention_core::residual_linear``): the
compiled kernels against plain formulas in float64 and float32 over varied shapes, every
activation, pre- and post-norm, missing biases and norm parameters, strided and batched
inputs, every instruction-set variant, inputs left untouched, autograd (gradcheck through the
op), opcheck, torch.compile and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from attention_core import _C
from attention_core.residual_step import (
    residual_feed_forward,
    residual_feed_forward_reference,
    residual_linear,
    residual_linear_reference,
)
from attention_core.residual_step._op import residual_feed_forward_op, residual_linear_op
from attention_core.testing import assert_close

SHAPES = [  # rows, model width D, hidden width F
    pytest.param((1, 1, 1), id="1x1x1"),
    pytest.param((3, 7, 5), id="odd-sizes"),
    pytest.param((5, 33, 70), id="tails"),
    pytest.param((4, 256, 1024), id="feedback-window"),
    pytest.param((10, 384, 1536), id="recurrent-example-model"),
]


def draw_ff(R, D, Fh, activation, dtype=torch.float64, seed=0, biases=True, affine=True):
    g = torch.Generator().manual_seed(seed)
    first = 2 * Fh if activation == "geglu" else Fh
    x = torch.randn(R, D, generator=g, dtype=dtype) * 2 + 0.5
    w1 = torch.randn(first, D, generator=g, dtype=dtype) / D**0.5
    w2 = torch.randn(D, Fh, generator=g, dtype=dtype) / Fh**0.5
    b1 = torch.randn(first, generator=g, dtype=dtype) if biases else None
    b2 = torch.randn(D, generator=g, dtype=dtype) if biases else None
    nw = torch.randn(D, generator=g, dtype=dtype) if affine else None
    nb = torch.randn(D, generator=g, dtype=dtype) if affine else None
    return x, w1, b1, w2, b2, nw, nb


def plain_ff(x, w1, b1, w2, b2, nw, nb, activation, norm_first, eps=1e-5):
    """The sublayer written with explicit mean and variance, independent of the reference."""

    def norm(t):
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        t = (t - mean) / torch.sqrt(var + eps)
        return t * (1 if nw is None else nw) + (0 if nb is None else nb)

    h = (norm(x) if norm_first else x) @ w1.T + (0 if b1 is None else b1)
    if activation == "relu":
        h = h.clamp_min(0)
    elif activation == "gelu":
        h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    else:
        value, gate = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2 :]
        h = value * 0.5 * gate * (1 + torch.erf(gate / 2**0.5))
    y = x + h @ w2.T + (0 if b2 is None else b2)
    return y if norm_first else norm(y)


ACTIVATIONS = ["relu", "gelu", "geglu"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_feed_forward_equals_the_formula(shape, dtype, activation, norm_first):
    args = draw_ff(*shape, activation, dtype=dtype)
    with torch.no_grad():
        y = residual_feed_forward(*args, activation=activation, norm_first=norm_first)
    expected = plain_ff(*(t.double() for t in args), activation, norm_first)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert y.dtype == dtype and y.shape == args[0].shape
    assert_close("y", y.double(), expected, **tol)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_feed_forward_without_biases_or_affine_norm(activation, norm_first):
    args = draw_ff(3, 9, 6, activation, biases=False, affine=False)
    y = residual_feed_forward(*args, activation=activation, norm_first=norm_first, eps=1e-3)
    expected = plain_ff(*args, activation, norm_first, eps=1e-3)
    assert_close("y", y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_every_instruction_set_gives_the_formula(level, dtype):
    args = draw_ff(6, 40, 36, "geglu", dtype=dtype)
    heads = torch.randn(6, 24, dtype=dtype)
    weight = torch.randn(40, 24, dtype=dtype)
    try:
        _C.set_cpu_level(level)  # clamped to what the CPU supports
        y = residual_feed_forward(*args, activation="geglu", norm_first=True)
        z = residual_linear(args[0], heads, weight, None, args[5], args[6], norm=True)
    finally:
        _C.set_cpu_level(-1)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_close("y", y.double(), plain_ff(*(t.double() for t in args), "geglu", True), **tol)
    expected = residual_linear_reference(
        *(t.double() for t in (args[0], heads, weight)), None, True, args[5].double(),
        args[6].double(),
    )  # fmt: skip
    assert_close("z", z.double(), expected, **tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("norm", [True, False], ids=["post-norm", "residual-only"])
def test_linear_equals_the_formula(shape, dtype, norm):
    R, D, K = shape
    g = torch.Generator().manual_seed(1)
    x, a = torch.randn(R, D, generator=g, dtype=dtype), torch.randn(R, K, generator=g, dtype=dtype)
    w, b = torch.randn(D, K, generator=g, dtype=dtype), torch.randn(D, generator=g, dtype=dtype)
    nw, nb = torch.randn(D, generator=g, dtype=dtype), torch.randn(D, generator=g, dtype=dtype)
    y = residual_linear(x, a, w, b, nw, nb, norm=norm)
    expected = x.double() + a.double() @ w.double().T + b.double()
    if norm:
        expected = F.layer_norm(expected, (D,), nw.double(), nb.double(), 1e-5)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_close("y", y.double(), expected, **tol)


def test_batched_and_strided_inputs():
    x, w1, b1, w2, b2, nw, nb = draw_ff(6, 12, 10, "gelu")
    x3 = x.view(2, 3, 12)
    wide = torch.randn(6, 30, dtype=torch.float64)
    strided = wide[:, 5:17]  # rows 30 apart
    transposed = x.T.contiguous().T  # column-major storage
    for name, inp in (("batched", x3), ("strided", strided), ("transposed", transposed)):
        y = residual_feed_forward(inp, w1, b1, w2, b2, nw, nb, activation="gelu")
        expected = plain_ff(inp, w1, b1, w2, b2, nw, nb, "gelu", False)
        assert_close(name, y, expected, rtol=1e-10, atol=1e-10)
        assert y.shape == inp.shape
    heads = wide[:, 3:21]  # overlaps the storage of `strided`: read-only views
    w = torch.randn(12, 18, dtype=torch.float64)
    y = residual_linear(strided, heads, w, norm=True)
    assert_close("linear", y, residual_linear_reference(strided, heads, w, None, True))


def test_inputs_are_not_modified():
    args = draw_ff(4, 16, 8, "geglu")
    copies = [t.clone() for t in args]
    residual_feed_forward(*args, activation="geglu", norm_first=False)
    residual_linear(args[0], torch.randn(4, 8, dtype=torch.float64), args[3], args[4], norm=True)
    for name, before, after in zip(("x", "w1", "b1", "w2", "b2", "nw", "nb"), copies, args):
        assert torch.equal(before, after), name


def test_reference_is_forced_by_the_environment(monkeypatch):
    args = draw_ff(3, 16, 8, "gelu", dtype=torch.float32)
    kernel = residual_feed_forward(*args, activation="gelu")
    monkeypatch.setenv("ATTENTION_CORE_FORCE_REFERENCE", "1")
    reference = residual_feed_forward(*args, activation="gelu")
    assert_close("y", kernel, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_feed_forward_gradcheck(activation, norm_first):
    args = [t.requires_grad_() for t in draw_ff(2, 5, 3, activation)]

    def f(*args):
        return residual_feed_forward(*args, activation=activation, norm_first=norm_first)

    assert torch.autograd.gradcheck(f, args)


def test_linear_gradcheck():
    g = torch.Generator().manual_seed(2)
    args = [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
            for s in ((3, 4), (3, 5), (4, 5), (4,), (4,), (4,))]  # fmt: skip

    def f(x, a, w, b, nw, nb):
        return residual_linear(x, a, w, b, nw, nb, norm=True)

    assert torch.autograd.gradcheck(f, args)


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        for activation in ACTIVATIONS:
            x, w1, b1, w2, b2, nw, nb = draw_ff(3, 6, 4, activation, dtype=dtype)
            for norm_first in (True, False):
                torch.library.opcheck(
                    residual_feed_forward_op,
                    (x, w1, b1, w2, b2, nw, nb, activation, norm_first, 1e-5),
                )
            torch.library.opcheck(
                residual_feed_forward_op,
                (x.T.contiguous().T, w1, None, w2, None, None, None, activation, True, 1e-5),
            )
            grad = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, nw, nb)]
            torch.library.opcheck(residual_feed_forward_op, (*grad, activation, False, 1e-5))
        a, w = torch.randn(3, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype)
        torch.library.opcheck(residual_linear_op, (x, a, w, b2, True, nw, nb, 1e-5))
        torch.library.opcheck(residual_linear_op, (x, a.T.contiguous().T, w, None, False, None,
                                                   None, 1e-5))  # fmt: skip
        grad = [t.clone().requires_grad_() for t in (x, a, w, b2)]
        torch.library.opcheck(residual_linear_op, (*grad, True, None, None, 1e-5))


def test_torch_compile_fullgraph():
    args = draw_ff(3, 8, 6, "geglu", dtype=torch.float32)

    def step(x, w1, b1, w2, b2, nw, nb):
        y = residual_feed_forward(x, w1, b1, w2, b2, nw, nb, activation="geglu", norm_first=True)
        return residual_linear(y, x, torch.eye(8), None, nw, nb, norm=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = residual_linear_reference(
        residual_feed_forward_reference(*args, "geglu", True), args[0], torch.eye(8), None, True,
        args[5], args[6],
    )  # fmt: skip
    assert_close("y", compiled(*args), expected, rtol=1e-5, atol=1e-5)


def _ff_args():
    return list(draw_ff(2, 4, 3, "relu", dtype=torch.float32))


# (id, index of the argument replaced, its replacement, error, message)
BAD_FF = [
    ("x", 0, lambda t: [1.0], TypeError, "x must be a torch.Tensor"),
    ("x-int", 0, lambda t: t.long(), TypeError, "x must be a floating"),
    ("w1-shape", 1, lambda t: t[:2], ValueError, r"linear1_weight must have shape \(3, 4\)"),
    ("w1-none", 1, lambda t: None, TypeError, "linear1_weight must be a torch.Tensor"),
    ("b1-shape", 2, lambda t: t[:1], ValueError, r"linear1_bias must have shape \(3,\)"),
    ("w2-dim", 3, lambda t: t[0], ValueError, r"linear2_weight must be a \(D, F\)"),
    ("w2-rows", 3, lambda t: t[:2], ValueError, "must have shape"),
    ("b2-dtype", 4, lambda t: t.double(), TypeError, "linear2_bias must have the dtype of x"),
    ("norm-shape", 5, lambda t: t[:3], ValueError, r"norm_weight must have shape \(4,\)"),
    ("norm-device", 6, lambda t: t.to("meta"), ValueError, "norm_bias must be on the device"),
]


@pytest.mark.parametrize("name, index, replace, error, message", BAD_FF, ids=[b[0] for b in BAD_FF])
def test_feed_forward_bad_inputs_name_the_argument(name, index, replace, error, message):
    args = _ff_args()
    args[index] = replace(args[index])
    with pytest.raises(error, match=message):
        residual_feed_forward(*args)
    if name in ("x", "w1-none"):  # the op's schema rejects a non-tensor before any check
        return
    with pytest.raises(error, match=message):  # the registered op checks as much
        residual_feed_forward_op(*args, "relu", False, 1e-5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(activation="swish"), ValueError, "activation must be one of"),
        (dict(norm_first=1), TypeError, "norm_first must be a bool"),
        (dict(eps=-1.0), ValueError, "eps must be a finite non-negative number"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite non-negative number"),
    ],
)
def test_feed_forward_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        residual_feed_forward(*_ff_args(), **kwargs)


def test_geglu_needs_a_double_first_product():
    x, w1, b1, w2, b2, nw, nb = draw_ff(2, 4, 3, "relu")
    with pytest.raises(ValueError, match=r"linear1_weight must have shape \(6, 4\)"):
        residual_feed_forward(x, w1, b1, w2, b2, nw, nb, activation="geglu")


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda x, a, w: (x, a[:2], w), ValueError, r"inputs must have shape \(3, K\)"),
        (lambda x, a, w: (x, a.double(), w), TypeError, "inputs must have the dtype and device"),
        (lambda x, a, w: (x, a, w[:, :2]), ValueError, r"weight must have shape \(4, 5\)"),
        (lambda x, a, w: (x, a, w.double()), TypeError, "weight must have the dtype of x"),
        (lambda x, a, w: (x, "a", w), TypeError, "inputs must be a torch.Tensor"),
    ],
)
def test_linear_bad_inputs_name_the_argument(make, error, message):
    x, a, w = torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(error, match=message):
        residual_linear(*make(x, a, w))
    if all(isinstance(t, torch.Tensor) for t in make(x, a, w)):  # else the schema rejects it
        with pytest.raises(error, match=message):
            residual_linear_op(*make(x, a, w), None, False, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        residual_linear(x, a, w, torch.randn(5))
    with pytest.raises(TypeError, match="norm must be a bool"):
        residual_linear(x, a, w, norm="yes")
