"""Softmax attention over a key/value cache slice (``attention_core.cache_attention``, op
``attention_core::cache_attention``): the compiled kernel against a plain formula in float64
and float32 over varied shapes and ranges, with and without a (shared or per-batch) bias,
row-major, feature-major and strided keys, rows that see no key, every instruction-set
variant, inputs left untouched, gradcheck, opcheck, torch.compile and bad inputs."""

import pytest
import torch

from attention_core import _C
from attention_core.cache_attention import cache_attention, cache_attention_reference
from attention_core.cache_attention._op import cache_attention_op
from attention_core.testing import assert_close

CASES = [  # B, W, H, E, M, C, start, end
    pytest.param((1, 1, 1, 1, 1, 1, 0, 1), id="1x1"),
    pytest.param((2, 1, 4, 8, 16, 10, 0, 6), id="one-query"),
    pytest.param((3, 2, 5, 7, 3, 9, 2, 9), id="odd-sizes"),
    pytest.param((2, 2, 8, 64, 64, 300, 40, 298), id="memory-window"),
    pytest.param((10, 1, 12, 32, 32, 130, 0, 128), id="recurrent-cache"),
]


def plain(q, k, v, start, end, bias, scale):
    """Per (b, h, i): an explicit loop over the keys, independent of the reference."""
    B, W, H, _ = q.shape
    out = torch.zeros(B, W, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(W):
                s = (k[b, h, start:end].double() @ q[b, i, h].double()) * scale
                if bias is not None:
                    s = s + (bias[h, i] if bias.dim() == 3 else bias[b, h, i]).double()
                if end > start and not torch.isneginf(s).all():
                    out[b, i, h] = torch.softmax(s, 0) @ v[b, h, start:end].double()
    return out


def draw(B, W, H, E, M, C, start, end, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, W, H, E, generator=g, dtype=dtype)
    k = torch.randn(B, H, C, E, generator=g, dtype=dtype)
    v = torch.randn(B, H, C, M, generator=g, dtype=dtype)
    bias = torch.randn(H, W, end - start, generator=g, dtype=dtype)
    if end - start > 1:
        bias[:, 0, -1] = float("-inf")  # a hidden key
    return q, k, v, bias


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "per-batch"])
@pytest.mark.parametrize("layout", ["row-major", "feature-major", "strided"])
def test_attention_equals_the_formula(case, dtype, bias_kind, layout):
    B, W, H, E, M, _, start, end = case
    q, k, v, bias = draw(*case, dtype=dtype)
    if layout == "feature-major":
        k = k.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "strided":
        k = torch.cat((k, k[..., :3]), dim=-1)[..., :E]  # rows E + 3 apart
    b = {"none": None, "shared": bias, "per-batch": bias.expand(B, H, W, end - start)}[bias_kind]
    out = cache_attention(q, k, v, start, end, b, scale=0.7)
    assert out.shape == (B, W, H, M) and out.dtype == dtype and out.is_contiguous()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert_close("out", out.double(), plain(q, k, v, start, end, b, 0.7), **tol)
    expected = cache_attention_reference(q, k, v, start, end, b, 0.7)
    assert_close("reference", out, expected, **tol)


def test_default_range_and_scale():
    q, k, v, _ = draw(2, 3, 2, 5, 4, 7, 0, 7)
    out = cache_attention(q, k, v)
    assert_close("out", out, plain(q, k, v, 0, 7, None, 5**-0.5), rtol=1e-10, atol=1e-10)


def test_a_row_that_sees_no_key_gives_zeros():
    q, k, v, bias = draw(2, 3, 2, 4, 5, 6, 1, 5)
    bias[:, 1] = float("-inf")
    out = cache_attention(q, k, v, 1, 5, bias)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert torch.isfinite(out).all()
    empty = cache_attention(q, k, v, 3, 3)  # an empty range
    assert torch.equal(empty, torch.zeros_like(empty))


@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
def test_every_instruction_set_gives_the_formula(level):
    q, k, v, bias = draw(2, 3, 4, 20, 9, 50, 3, 47, dtype=torch.float32)
    try:
        _C.set_cpu_level(level)  # clamped to what the CPU supports
        out = cache_attention(q, k, v, 3, 47, bias)
    finally:
        _C.set_cpu_level(-1)
    expected = plain(q, k, v, 3, 47, bias, 20**-0.5)
    assert_close("out", out.double(), expected, rtol=1e-4, atol=1e-5)


def test_inputs_are_not_modified():
    q, k, v, bias = draw(2, 2, 3, 4, 5, 8, 0, 8)
    copies = [t.clone() for t in (q, k, v, bias)]
    cache_attention(q, k, v, 0, 8, bias)
    for name, before, after in zip(("query", "keys", "values", "bias"), copies, (q, k, v, bias)):
        assert torch.equal(before, after), name


def test_gradcheck():
    q, k, v, bias = (t.requires_grad_() for t in draw(2, 2, 2, 3, 4, 6, 1, 5))
    assert torch.autograd.gradcheck(lambda *a: cache_attention(*a[:3], 1, 5, a[3]), (q, k, v, bias))


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        q, k, v, bias = draw(2, 2, 3, 4, 5, 8, 1, 7, dtype=dtype)
        torch.library.opcheck(cache_attention_op, (q, k, v, 1, 7, bias, 0.5))
        torch.library.opcheck(cache_attention_op, (q, k, v, 0, 8, None, 1.0))
        k_t = k.transpose(2, 3).contiguous().transpose(2, 3)
        torch.library.opcheck(cache_attention_op, (q, k_t, v, 1, 7, bias, 0.5))
        grad = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        torch.library.opcheck(cache_attention_op, (*grad[:3], 1, 7, grad[3], 0.5))


def test_torch_compile_fullgraph():
    q, k, v, bias = draw(2, 2, 3, 4, 5, 8, 1, 7, dtype=torch.float32)
    compiled = torch.compile(
        lambda q, k, v, b: cache_attention(q, k, v, 1, 7, b), fullgraph=True, backend="aot_eager"
    )
    assert_close("out", compiled(q, k, v, bias), plain(q, k, v, 1, 7, bias, 0.5).float())


BAD = [
    ("query", lambda q, k, v, b: ([1.0], k, v, 0, 8, b), TypeError, "query must be a torch"),
    ("query-dim", lambda q, k, v, b: (q[0], k, v, 0, 8, b), ValueError, r"query must have shape"),
    ("keys", lambda q, k, v, b: (q, k[:, :2], v, 0, 8, b), ValueError, r"keys must have shape"),
    ("values", lambda q, k, v, b: (q, k, v[:, :, :5], 0, 8, b), ValueError, r"values must have"),
    ("dtype", lambda q, k, v, b: (q, k.float(), v, 0, 8, b), TypeError, "keys must have the dtype"),
    ("device", lambda q, k, v, b: (q, k, v.to("meta"), 0, 8, b), ValueError, "values must be on"),
    ("range", lambda q, k, v, b: (q, k, v, 0, 9, None), ValueError, r"0 <= start <= end <= 8"),
    ("start", lambda q, k, v, b: (q, k, v, 5, 4, None), ValueError, r"0 <= start <= end"),
    ("end-type", lambda q, k, v, b: (q, k, v, 0, 8.0, b), TypeError, "end must be an int"),
    ("bias", lambda q, k, v, b: (q, k, v, 0, 7, b), ValueError, r"bias must have shape"),
]


@pytest.mark.parametrize("make, error, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(make, error, message):
    q, k, v, bias = draw(2, 2, 3, 4, 5, 8, 0, 8)
    with pytest.raises(error, match=message):
        cache_attention(*make(q, k, v, bias))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        cache_attention(q, k, v, scale=float("inf"))
