"""The prepared ops (``PreparedFeedForward``, ``PreparedResidualLinear``,
``PreparedCacheAttention``): fixed operands
checked once, then only the per-call arguments. Every call, first or later, equals the
public function (bit for bit on the kernel path, in float64 and float32); a later call sees
values written into the fixed tensors in place and re-checks a tensor given other storage,
shape or strides; wrong per-call arguments get the public function's errors; autograd,
``torch.compile`` and the forced reference take the public path."""

import pytest
import torch

from attention_core.cache_attention import PreparedCacheAttention, cache_attention
from attention_core.residual_step import (
    PreparedFeedForward,
    PreparedResidualLinear,
    residual_feed_forward,
    residual_linear,
)
from attention_core.testing import assert_close

FEED_FORWARD_CASES = [  # R, D, F, activation, norm_first
    pytest.param((1, 8, 16, "relu", False), id="1-row-relu-post"),
    pytest.param((4, 16, 32, "geglu", True), id="geglu-pre"),
    pytest.param((3, 24, 40, "gelu", False), id="gelu-post"),
    pytest.param((7, 256, 1024, "geglu", True), id="window-sized"),
]


def feed_forward_weights(D, F, activation, dtype, seed=0, biases=True):
    g = torch.Generator().manual_seed(seed)
    first = 2 * F if activation == "geglu" else F

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype) / shape[-1] ** 0.5

    return (
        rand(first, D), rand(first) if biases else None, rand(D, F), rand(D) if biases else None,
        1 + rand(D), rand(D) if biases else None,
    )  # fmt: skip


@pytest.mark.parametrize("case", FEED_FORWARD_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no-biases"])
def test_prepared_feed_forward_equals_the_function_at_every_call(case, dtype, biases):
    R, D, F, activation, norm_first = case
    weights = feed_forward_weights(D, F, activation, dtype, biases=biases)
    options = dict(activation=activation, norm_first=norm_first, eps=1e-5)
    ff = PreparedFeedForward(*weights, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for rows in (R, R, 1, 2 * R):  # the first call, later calls, other row counts
            x = torch.randn(rows, D, generator=g, dtype=dtype)
            assert torch.equal(ff(x), residual_feed_forward(x, *weights, **options))
        strided = torch.randn(R, 2 * D, generator=g, dtype=dtype)[:, ::2]  # another path
        assert torch.equal(ff(strided), residual_feed_forward(strided, *weights, **options))


def test_prepared_feed_forward_sees_every_change_of_its_weights():
    D, F = 8, 16
    w1, b1, w2, b2, g, b = feed_forward_weights(D, F, "relu", torch.float64)
    ff = PreparedFeedForward(w1, b1, w2, b2, g, b)
    x = torch.randn(3, D, dtype=torch.float64)
    with torch.no_grad():
        ff(x)
        w1.mul_(2)  # in place: the same storage, read at the call
        assert torch.equal(ff(x), residual_feed_forward(x, w1, b1, w2, b2, g, b))
        w2.data = torch.randn(D, F, dtype=torch.float64)  # other storage: checked again
        assert torch.equal(ff(x), residual_feed_forward(x, w1, b1, w2, b2, g, b))
        b2.set_(torch.randn(D, dtype=torch.float64))
        assert torch.equal(ff(x), residual_feed_forward(x, w1, b1, w2, b2, g, b))
        g.data = torch.randn(2 * D, dtype=torch.float64)[::2]  # strided: not the kernel's
        assert torch.equal(ff(x), residual_feed_forward(x, w1, b1, w2, b2, g, b))
        w1.data = torch.randn(F, D + 1, dtype=torch.float64)  # now wrong: the check names it
        with pytest.raises(ValueError, match="linear1_weight"):
            ff(x)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(3, 9, dtype=torch.float64), ValueError, "linear1_weight"),
        (torch.randn(3, 8), TypeError, "dtype"),
        (torch.randint(0, 3, (3, 8)), TypeError, "x"),
        ("x", TypeError, "x"),
    ],
    ids=["width", "dtype", "integers", "not-a-tensor"],
)
def test_prepared_feed_forward_refuses_what_the_function_refuses(x, error, match):
    weights = feed_forward_weights(8, 16, "relu", torch.float64)
    ff = PreparedFeedForward(*weights)
    with torch.no_grad():
        ff(torch.randn(3, 8, dtype=torch.float64))  # checked once
        with pytest.raises(error, match=match):
            ff(x)


def test_prepared_feed_forward_refuses_bad_options_when_made():
    weights = feed_forward_weights(8, 16, "relu", torch.float64)
    with pytest.raises(ValueError, match="activation"):
        PreparedFeedForward(*weights, activation="tanh")
    with pytest.raises(TypeError, match="norm_first"):
        PreparedFeedForward(*weights, norm_first=1)
    with pytest.raises(ValueError, match="eps"):
        PreparedFeedForward(*weights, eps=float("nan"))


def test_prepared_feed_forward_records_gradients_through_the_op():
    weights = [w.requires_grad_() for w in feed_forward_weights(8, 16, "gelu", torch.float64)]
    ff = PreparedFeedForward(*weights, activation="gelu")
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        ff(x)  # the fast path is ready; a call that records must not take it
    y = ff(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert all(w.grad is not None for w in weights)


def test_prepared_feed_forward_follows_the_forced_reference(monkeypatch):
    weights = feed_forward_weights(16, 32, "geglu", torch.float32)
    ff = PreparedFeedForward(*weights, activation="geglu", norm_first=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        kernel = ff(x)
        monkeypatch.setenv("ATTENTION_CORE_FORCE_REFERENCE", "1")
        forced = ff(x)
        expected = residual_feed_forward(x, *weights, activation="geglu", norm_first=True)
    assert torch.equal(forced, expected)  # both the reference now
    assert_close("forced reference", forced, kernel, atol=1e-5, rtol=1e-5)


def test_prepared_feed_forward_compiles():
    weights = feed_forward_weights(8, 16, "relu", torch.float32)
    ff = PreparedFeedForward(*weights)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ff(x)
        compiled = torch.compile(ff, fullgraph=True, backend="eager")
        assert_close(
            "compiled", compiled(x), residual_feed_forward(x, *weights), atol=1e-6, rtol=1e-6
        )


LINEAR_CASES = [  # R, D, K, norm
    pytest.param((1, 8, 16, True), id="1-row-norm"),
    pytest.param((10, 384, 384, True), id="recurrent-step-sized"),
    pytest.param((3, 24, 40, False), id="no-norm"),
]


def linear_weights(D, K, dtype, seed=0, biases=True):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(D, K, generator=g, dtype=dtype) / K**0.5,
        torch.randn(D, generator=g, dtype=dtype) if biases else None,
        1 + torch.randn(D, generator=g, dtype=dtype) / 4,
        torch.randn(D, generator=g, dtype=dtype) if biases else None,
    )


@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no-biases"])
def test_prepared_residual_linear_equals_the_function_at_every_call(case, dtype, biases):
    R, D, K, norm = case
    weights = linear_weights(D, K, dtype, biases=biases)
    proj = PreparedResidualLinear(*weights, norm=norm, eps=1e-5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for rows in (R, R, 1, 2 * R, 0):  # the first call, later calls, other row counts
            x = torch.randn(rows, D, generator=g, dtype=dtype)
            a = torch.randn(rows, K, generator=g, dtype=dtype)
            expected = residual_linear(x, a, *weights, norm=norm, eps=1e-5)
            assert torch.equal(proj(x, a), expected)
        x = torch.randn(1, D, generator=g, dtype=dtype).expand(R, D)  # one row read R times
        a = torch.randn(R, 3 * K, generator=g, dtype=dtype)[:, K : 2 * K]  # a strided view
        assert torch.equal(proj(x, a), residual_linear(x, a, *weights, norm=norm, eps=1e-5))
        a = torch.randn(R, 2 * K, generator=g, dtype=dtype)[:, ::2]  # strided features
        assert torch.equal(proj(x, a), residual_linear(x, a, *weights, norm=norm, eps=1e-5))


def test_prepared_residual_linear_sees_every_change_of_its_weights():
    w, b, g, nb = linear_weights(8, 16, torch.float64)
    proj = PreparedResidualLinear(w, b, g, nb, norm=True)
    x, a = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        proj(x, a)
        w.mul_(2)  # in place: the same storage, read at the call
        assert torch.equal(proj(x, a), residual_linear(x, a, w, b, g, nb, norm=True))
        b.data = torch.randn(8, dtype=torch.float64)  # other storage: checked again
        assert torch.equal(proj(x, a), residual_linear(x, a, w, b, g, nb, norm=True))
        g.data = torch.randn(16, dtype=torch.float64)[::2]  # strided: not the kernel's
        assert torch.equal(proj(x, a), residual_linear(x, a, w, b, g, nb, norm=True))
        w.data = torch.randn(8, 17, dtype=torch.float64)  # now wrong: the check names it
        with pytest.raises(ValueError, match="weight"):
            proj(x, a)


@pytest.mark.parametrize(
    ("x", "a", "error", "match"),
    [
        (torch.randn(3, 9, dtype=torch.float64), None, ValueError, "weight"),
        (None, torch.randn(3, 15, dtype=torch.float64), ValueError, "weight"),
        (None, torch.randn(2, 16, dtype=torch.float64), ValueError, "inputs"),
        (torch.randn(3, 8), None, TypeError, "dtype"),
        (None, torch.randn(3, 16), TypeError, "inputs"),
        ("x", None, TypeError, "x"),
        (None, "inputs", TypeError, "inputs"),
    ],
    ids=["x-width", "inputs-width", "rows", "x-dtype", "inputs-dtype", "x-type", "inputs-type"],
)
def test_prepared_residual_linear_refuses_what_the_function_refuses(x, a, error, match):
    proj = PreparedResidualLinear(*linear_weights(8, 16, torch.float64), norm=True)
    good_x, good_a = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        proj(good_x, good_a)  # checked once
        with pytest.raises(error, match=match):
            proj(good_x if x is None else x, good_a if a is None else a)


def test_prepared_residual_linear_refuses_bad_options_when_made():
    weights = linear_weights(8, 16, torch.float64)
    with pytest.raises(TypeError, match="norm"):
        PreparedResidualLinear(*weights, norm=1)
    with pytest.raises(ValueError, match="eps"):
        PreparedResidualLinear(*weights, eps=-1.0)


def test_prepared_residual_linear_records_gradients_and_compiles():
    weights = [t.requires_grad_() for t in linear_weights(8, 16, torch.float64)]
    proj = PreparedResidualLinear(*weights, norm=True)
    x, a = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        proj(x, a)  # the fast path is ready; a call that records must not take it
    y = proj(x, a)
    assert y.grad_fn is not None
    y.sum().backward()
    assert all(t.grad is not None for t in weights)
    with torch.no_grad():
        compiled = torch.compile(proj, fullgraph=True, backend="eager")
        expected = residual_linear(x, a, *weights, norm=True)
        assert_close("compiled", compiled(x, a), expected, atol=1e-12, rtol=1e-12)


def test_prepared_residual_linear_follows_the_forced_reference(monkeypatch):
    weights = linear_weights(16, 32, torch.float32)
    proj = PreparedResidualLinear(*weights, norm=True)
    x, a = torch.randn(4, 16), torch.randn(4, 32)
    with torch.no_grad():
        kernel = proj(x, a)
        monkeypatch.setenv("ATTENTION_CORE_FORCE_REFERENCE", "1")
        forced = proj(x, a)
        expected = residual_linear(x, a, *weights, norm=True)
    assert torch.equal(forced, expected)  # both the reference now
    assert_close("forced reference", forced, kernel, atol=1e-5, rtol=1e-5)


ATTENTION_CASES = [  # B, W, H, E, M, C, start, end
    pytest.param((1, 1, 1, 1, 1, 1, 0, 1), id="1x1"),
    pytest.param((2, 2, 4, 8, 16, 10, 0, 6), id="window"),
    pytest.param((3, 1, 5, 7, 3, 9, 2, 9), id="odd-sizes"),
    pytest.param((2, 2, 8, 64, 64, 300, 40, 298), id="memory-window"),
]


def attention_operands(B, W, H, E, M, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, C, E, generator=g, dtype=dtype)
    values = torch.randn(B, H, C, M, generator=g, dtype=dtype)
    return keys, values


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "per-batch", "sliced"])
@pytest.mark.parametrize("layout", ["row-major", "feature-major"])
def test_prepared_attention_equals_the_function_at_every_call(case, dtype, bias_kind, layout):
    B, W, H, E, M, C, start, end = case
    keys, values = attention_operands(B, W, H, E, M, C, dtype)
    if layout == "feature-major":
        keys = keys.transpose(2, 3).contiguous().transpose(2, 3)
    attention = PreparedCacheAttention(keys, values, scale=0.5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lo, hi in ((start, end), (start, end), (0, C), (end, end)):
            J = hi - lo
            q = torch.randn(B, W, H, E, generator=g, dtype=dtype)
            bias = {
                "none": None,
                "shared": torch.randn(H, W, J, generator=g, dtype=dtype),
                "per-batch": torch.randn(B, H, W, J, generator=g, dtype=dtype),
                "sliced": torch.randn(H, W + 1, J + 3, generator=g, dtype=dtype)[:, :W, 2 : J + 2],
            }[bias_kind]
            got = attention(q, lo, hi, bias)
            assert torch.equal(got, cache_attention(q, keys, values, lo, hi, bias, scale=0.5))
        q = torch.randn(B, W, H, E, generator=g, dtype=dtype)
        assert torch.equal(attention(q), cache_attention(q, keys, values, scale=0.5))


def test_prepared_attention_default_scale_and_strided_queries():
    keys, values = attention_operands(2, 3, 4, 8, 16, 10, torch.float64)
    attention = PreparedCacheAttention(keys, values)
    projection = torch.randn(2 * 3, 3 * 4 * 8, dtype=torch.float64)  # q, k, v side by side
    q = projection[:, : 4 * 8].view(2, 3, 4, 8)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(attention(q, 1, 9), cache_attention(q, keys, values, 1, 9))


def test_prepared_attention_sees_writes_and_new_storage():
    keys, values = attention_operands(2, 1, 4, 8, 8, 12, torch.float64)
    attention = PreparedCacheAttention(keys, values)
    q = torch.randn(2, 1, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        attention(q, 0, 6)
        keys[:, :, 6:8] = torch.randn(2, 4, 2, 8, dtype=torch.float64)  # a window's own keys
        assert torch.equal(attention(q, 0, 8), cache_attention(q, keys, values, 0, 8))
        values.data = torch.randn(2, 4, 12, 8, dtype=torch.float64)
        assert torch.equal(attention(q, 0, 8), cache_attention(q, keys, values, 0, 8))
        keys.set_(torch.randn(2, 4, 5, 8, dtype=torch.float64))  # shorter: refused by name
        with pytest.raises(ValueError, match="values"):
            attention(q, 0, 5)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a, q: a(q, 0, 13), ValueError, "start and end"),
        (lambda a, q: a(q, 5, 4), ValueError, "start and end"),
        (lambda a, q: a(q, 0.0, 4), TypeError, "start"),
        (lambda a, q: a(q[:, :, :3], 0, 4), ValueError, "keys"),
        (lambda a, q: a(q.float(), 0, 4), TypeError, "dtype"),
        (lambda a, q: a(q, 0, 4, torch.zeros(4, 1, 5, dtype=torch.float64)), ValueError, "bias"),
        (lambda a, q: a(q, 0, 4, torch.zeros(4, 1, 4)), TypeError, "bias"),
        (lambda a, q: a(q, 0, 4, "bias"), TypeError, "bias"),
    ],
    ids=["end", "reversed", "float-start", "heads", "dtype", "bias-shape", "bias-dtype", "bias"],
)
def test_prepared_attention_refuses_what_the_function_refuses(call, error, match):
    keys, values = attention_operands(2, 1, 4, 8, 8, 12, torch.float64)
    attention = PreparedCacheAttention(keys, values)
    q = torch.randn(2, 1, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        attention(q, 0, 6)  # checked once
        with pytest.raises(error, match=match):
            call(attention, q)


def test_prepared_attention_refuses_a_bad_scale():
    keys, values = attention_operands(1, 1, 1, 2, 2, 3, torch.float64)
    for scale in (float("inf"), True, "1"):
        with pytest.raises(ValueError, match="scale"):
            PreparedCacheAttention(keys, values, scale=scale)


def test_prepared_attention_records_gradients_through_the_op():
    keys, values = attention_operands(2, 1, 4, 8, 8, 12, torch.float64)
    attention = PreparedCacheAttention(keys.requires_grad_(), values)
    q = torch.randn(2, 2, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        attention(q, 0, 6)
    out = attention(q, 0, 6)
    assert out.grad_fn is not None
    out.sum().backward()
    assert keys.grad is not None and keys.grad[:, :, 6:].abs().sum() == 0


def counting(monkeypatch, module, name):
    """Count the calls of ``module.name`` (the checked public path)."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_prepared_ops_check_their_fixed_operands_once(monkeypatch):
    from attention_core.cache_attention import prepared as attention_module
    from attention_core.residual_step import prepared as feed_forward_module

    checked_ff = counting(monkeypatch, feed_forward_module, "feed_forward")
    checked_linear = counting(monkeypatch, feed_forward_module, "linear")
    checked_attention = counting(monkeypatch, attention_module, "attend")
    w, bias, norm_w, norm_b = linear_weights(16, 8, torch.float32)
    proj = PreparedResidualLinear(w, bias, norm_w, norm_b, norm=True)
    heads = torch.randn(4, 8)
    w1, b1, w2, b2, g, b = feed_forward_weights(16, 32, "geglu", torch.float32)
    ff = PreparedFeedForward(w1, b1, w2, b2, g, b, activation="geglu", norm_first=True)
    keys, values = attention_operands(2, 2, 4, 8, 8, 20, torch.float32)
    attention = PreparedCacheAttention(keys, values)
    x, q, bias = torch.randn(4, 16), torch.randn(2, 2, 4, 8), torch.randn(4, 2, 10)
    with torch.no_grad():
        for _ in range(3):
            ff(x)
            proj(x, heads)
            attention(q, 2, 12, bias)
        assert (len(checked_ff), len(checked_linear), len(checked_attention)) == (1, 1, 1)
        w.data = w.clone()
        proj(x, heads)
        proj(x, heads)
        assert len(checked_linear) == 2  # new storage: checked once more
        w2.data = w2.clone()
        keys.data = keys.clone()
        ff(x)
        attention(q, 2, 12, bias)
        assert (len(checked_ff), len(checked_attention)) == (2, 2)  # new storage: checked
        ff(x)
        attention(q, 2, 12, bias)
        assert (len(checked_ff), len(checked_attention)) == (2, 2)
    ff(x)  # grad mode on: the checked path (which records where a weight requires grad)
    proj(x, heads)
    assert (len(checked_ff), len(checked_linear)) == (3, 3)


def test_prepared_ops_recheck_a_held_tensor_of_another_dtype_at_the_same_address():
    w1, b1, w2, b2, g, b = feed_forward_weights(8, 16, "relu", torch.float32)
    ff = PreparedFeedForward(w1, b1, w2, b2, g, b)
    keys, values = attention_operands(2, 1, 4, 8, 8, 12, torch.float32)
    attention = PreparedCacheAttention(keys, values)
    x, q = torch.randn(3, 8), torch.randn(2, 1, 4, 8)
    w, bias, norm_w, norm_b = linear_weights(8, 16, torch.float32)
    proj = PreparedResidualLinear(w, bias, norm_w, norm_b)
    heads = torch.randn(3, 16)
    with torch.no_grad():
        ff(x), attention(q, 0, 6), proj(x, heads)
        w.data = w.data.view(torch.int32)
        with pytest.raises(TypeError, match="weight"):
            proj(x, heads)
        w1.data = w1.data.view(torch.int32)  # same address and shape, another dtype
        keys.data = keys.data.view(torch.int32)
        with pytest.raises(TypeError, match="linear1_weight"):
            ff(x)
        with pytest.raises(TypeError, match="keys"):
            attention(q, 0, 6)


def test_prepared_ops_let_go_of_weights_the_kernel_no_longer_reads():
    """After a call that the kernel cannot serve (weights moved to another dtype, as
    ``model.to(torch.bfloat16)`` does), the ops hold neither the old layout nor the old
    storages, which would otherwise stay alive as long as the op."""
    w1, b1, w2, b2, g, b = feed_forward_weights(8, 16, "relu", torch.float32)
    ff = PreparedFeedForward(w1, b1, w2, b2, g, b)
    weight, bias, norm_w, norm_b = linear_weights(8, 16, torch.float32)
    proj = PreparedResidualLinear(weight, bias, norm_w, norm_b, norm=True)
    x, heads = torch.randn(3, 8), torch.randn(3, 16)
    with torch.no_grad():
        ff(x), proj(x, heads)
        assert ff._checked is not None and proj._checked is not None
        for t in (w1, b1, w2, b2, g, b, weight, bias, norm_w, norm_b):
            t.data = t.data.to(torch.bfloat16)
        half = x.to(torch.bfloat16)
        assert torch.equal(ff(half), residual_feed_forward(half, w1, b1, w2, b2, g, b))
        expected = residual_linear(half, heads.to(torch.bfloat16), weight, bias, norm_w, norm_b,
                                   norm=True)  # fmt: skip
        assert torch.equal(proj(half, heads.to(torch.bfloat16)), expected)
    assert ff._checked is None and proj._checked is None


def test_prepared_ops_options_are_fixed():
    ff = PreparedFeedForward(
        *feed_forward_weights(8, 16, "geglu", torch.float32), activation="geglu"
    )
    keys, values = attention_operands(2, 1, 4, 8, 8, 12, torch.float32)
    attention = PreparedCacheAttention(keys, values, scale=0.5)
    proj = PreparedResidualLinear(*linear_weights(8, 16, torch.float32), norm=True, eps=0.5)
    assert (proj.norm, proj.eps) == (True, 0.5)
    assert (ff.activation, ff.norm_first, ff.eps) == ("geglu", False, 1e-5)
    assert (attention.keys, attention.values, attention.scale) == (keys, values, 0.5)
    changes = [
        (ff, "activation", "gelu"),
        (ff, "eps", 0.1),
        (ff, "norm_first", True),
        (proj, "norm", False),
        (proj, "eps", 1e-5),
        (attention, "scale", float("nan")),
        (attention, "keys", values),
    ]
    for obj, name, value in changes:
        with pytest.raises(AttributeError):
            setattr(obj, name, value)


def test_prepared_ops_later_calls_on_unusual_layouts_equal_the_functions():
    weights = feed_forward_weights(8, 16, "relu", torch.float64)
    ff = PreparedFeedForward(*weights)
    keys, values = attention_operands(2, 2, 4, 8, 8, 12, torch.float64)
    attention = PreparedCacheAttention(keys, values)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ff(torch.randn(3, 8, dtype=torch.float64))
        for x in (
            torch.randn(1, 8, dtype=torch.float64).expand(4, 8),  # one row read four times
            torch.randn(0, 8, dtype=torch.float64),
            torch.randn(3, 16, dtype=torch.float64)[:, ::2],  # strided features
        ):
            assert torch.equal(ff(x), residual_feed_forward(x, *weights))
        attention(torch.randn(2, 2, 4, 8, dtype=torch.float64), 0, 6)
        q = torch.randn(2, 2, 4, 16, generator=g, dtype=torch.float64)[..., ::2]
        bias = torch.randn(4, 2, 12, generator=g, dtype=torch.float64)[..., ::2]  # J = 6
        assert torch.equal(attention(q, 2, 8, bias), cache_attention(q, keys, values, 2, 8, bias))
        with pytest.raises(ValueError, match="bias"):
            attention(q, 2, 8, torch.tensor(1.0, dtype=torch.float64))
