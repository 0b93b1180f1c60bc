"""The packed and chunked forms of the compiled causal product (csrc/causal_packed.h,
csrc/causal_chunked.h); csrc/causal_product.h picks the form:

- rows that are not adjacent in memory (the (N, L, H, E) layout of the attention modules,
  every-other-token views, padded buffers): the per-token recurrence over packed chunks of 64
  tokens, heads interleaved chunk by chunk;
- long sequences with a large state (by default L >= 1024 and E M >= 256 * 256 on compact
  rows, 512 * 512 on strided rows): the chunked, GEMM-shaped form (chunks of 64 tokens,
  register-blocked products);
- compact rows otherwise: the plain recurrence (test_attention_core_causal_kernel.py).

The tests here lower the chunked form's thresholds to L >= 128 and E M >= 128 * 128 (the
`chunked_form_from_128` fixture), so that it runs on shapes small enough for the float64
reference; the default thresholds are tested apart, on both sides. Every test here uses
strided inputs, so one of the two new forms runs (the shapes say which):
against the dense float64 reference, at chunk boundaries, with a partial last chunk, shorter
than a chunk, with initial and final states, every instruction-set variant, and gradcheck in
float64."""

import pytest
import torch

from attention_core.causal_product import causal_dot_product, normalized_causal_dot_product
from attention_core.testing import assert_close

_C = pytest.importorskip("attention_core._C", reason="attention_core._C is not compiled")


@pytest.fixture(autouse=True)
def chunked_form_from_128():
    """The chunked form from L = 128 and E M = 128 * 128 on, then the default thresholds."""
    default = _C.chunked_thresholds()
    _C.set_chunked_thresholds(128, 128 * 128, 128 * 128)
    yield
    _C.set_chunked_thresholds(*default)


NORMALIZE = [pytest.param(False, id="numerator"), pytest.param(True, id="normalized")]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
EPS = 1e-3
CHUNK = 64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sequence_first(t):
    """The values of ``t`` (N, H, L, D) stored as (N, L, H, D): rows H * D elements apart."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def every_other_token(t):
    big = torch.zeros(t.shape[0], t.shape[1], 2 * t.shape[2], t.shape[3], dtype=t.dtype)
    big[:, :, ::2] = t
    return big[:, :, ::2]


def padded_rows(t):
    big = torch.zeros(*t.shape[:3], t.shape[3] + 3, dtype=t.dtype)
    big[..., 1 : 1 + t.shape[3]] = t
    return big[..., 1 : 1 + t.shape[3]]


LAYOUTS = {"sequence-first": sequence_first, "every-other-token": every_other_token,
           "padded-rows": padded_rows}  # fmt: skip


def inputs(N, H, L, E, M, *, seed=0, dtype=torch.float64, layout="sequence-first"):
    g = gen(seed)
    Q = torch.rand(N, H, L, E, generator=g, dtype=torch.float64) + 0.1
    K = torch.rand(N, H, L, E, generator=g, dtype=torch.float64) + 0.1
    V = torch.randn(N, H, L, M, generator=g, dtype=torch.float64)
    out = [LAYOUTS[layout](t.to(dtype)) for t in (Q, K, V)]
    assert all(t.stride(2) != t.shape[3] for t in out)  # rows not adjacent: chunked form
    return out


def dense_reference(Q, K, V, normalize, S0=None, z0=None):
    Q, K, V = Q.double(), K.double(), V.double()
    scores = torch.einsum("nhle,nhse->nhls", Q, K).tril()
    numerator = scores @ V
    denominator = scores.sum(-1)
    S, z = torch.einsum("nhle,nhlm->nhem", K, V), K.sum(2)
    if S0 is not None:
        numerator, S = numerator + Q @ S0.double(), S + S0.double()
    if z0 is not None:
        denominator, z = denominator + (Q @ z0.double()[..., None])[..., 0], z + z0.double()
    if normalize:
        return numerator / (denominator + EPS)[..., None], S, z
    return numerator, S, z


def run(Q, K, V, normalize, **kwargs):
    if normalize:
        return normalized_causal_dot_product(Q, K, V, EPS, **kwargs)
    return causal_dot_product(Q, K, V, **kwargs)


def close(name, actual, expected):
    """Equal up to rounding, relative to the largest value (sums of hundreds of terms that
    cross zero have no elementwise relative accuracy in float32)."""
    scale = expected.abs().max().clamp_min(1e-30)
    atol = 2e-5 if actual.dtype == torch.float32 else 1e-12
    assert_close(name, actual.double() / scale, expected / scale, rtol=0, atol=atol)


def check(Q, K, V, normalize, name=""):
    leaves = [t.detach().clone().requires_grad_(True) for t in (Q, K, V)]
    reference = [t.detach().double().requires_grad_(True) for t in (Q, K, V)]
    out = run(*leaves, normalize)
    expected = dense_reference(*reference, normalize)[0]
    close(f"{name}out", out, expected)
    G = torch.randn(expected.shape, generator=gen(99), dtype=torch.float64)
    out.backward(G.to(out.dtype))
    expected.backward(G)
    for label, a, b in zip("QKV", leaves, reference):
        close(f"{name}d{label}", a.grad, b.grad)


SHAPES = [  # packed unless E M >= 128 * 128 and L >= 128 (the fixture's thresholds)
    pytest.param((1, 2, 3, 4, 3), id="packed-three-tokens"),
    pytest.param((2, 2, CHUNK - 7, 9, 4), id="packed-shorter-than-a-chunk"),
    pytest.param((1, 2, 2 * CHUNK, 5, 7), id="two-whole-chunks"),
    pytest.param((2, 2, 2 * CHUNK + 2, 33, 47), id="partial-last-chunk"),
    pytest.param((1, 2, 3 * CHUNK - 1, 64, 64), id="64x64"),
    pytest.param((1, 2, 200, 3, 1), id="narrow"),
    pytest.param((1, 2, 130, 70, 130), id="padded-columns"),
    pytest.param((1, 2, 2 * CHUNK, 128, 128), id="chunked-two-whole-chunks"),
    pytest.param((2, 2, 3 * CHUNK + 5, 131, 127), id="chunked-partial-chunk-padded-columns"),
]


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_matches_dense_reference(shape, dtype, normalize):
    check(*inputs(*shape, dtype=dtype), normalize)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_chunked_layouts(layout, normalize):
    check(*inputs(2, 3, 150, 6, 5, seed=3, layout=layout), normalize)


@pytest.fixture
def cpu_level():
    yield _C.set_cpu_level
    _C.set_cpu_level(-1)


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
def test_chunked_every_instruction_set_variant(level, normalize, cpu_level):
    cpu_level(level)
    if _C.cpu_level() != level:
        pytest.skip(f"this CPU does not support level {level}")
    for dtype in (torch.float32, torch.float64):
        for shape in ((1, 2, 140, 19, 37), (1, 2, 140, 130, 129)):  # packed, chunked
            check(*inputs(*shape, dtype=dtype, seed=level), normalize, name=f"{dtype} {shape} ")


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("features", [(16, 24), (128, 130)], ids=["packed", "chunked"])
def test_chunked_equals_recurrence(features, normalize):
    """The same values through compact rows (the recurrence) and strided rows."""
    Q, K, V = inputs(2, 2, 300, *features, seed=4, dtype=torch.float32)
    chunked = run(Q, K, V, normalize)
    recurrence = run(Q.contiguous(), K.contiguous(), V.contiguous(), normalize)
    assert_close("chunked vs recurrence", chunked, recurrence)


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("features", [(5, 6), (128, 129)], ids=["packed", "chunked"])
def test_chunked_states_in_and_out(features, normalize):
    E, M = features
    Q, K, V = inputs(2, 2, 2 * CHUNK + 30, E, M, seed=5)
    S0 = torch.rand(2, 2, E, M, dtype=torch.float64, generator=gen(6))
    z0 = torch.rand(2, 2, E, dtype=torch.float64, generator=gen(7))
    state = (S0, z0) if normalize else S0
    out, final = run(Q, K, V, normalize, state=state, return_state=True)
    expected, S, z = dense_reference(Q, K, V, normalize, S0=S0, z0=z0 if normalize else None)
    assert_close("out", out, expected)
    assert_close("S", final[0] if normalize else final, S)
    if normalize:
        assert_close("z", final[1], z)
    # two passes with the state carried equal one pass (packed, then 130 tokens)
    first, mid = run(Q[:, :, :28], K[:, :, :28], V[:, :, :28], normalize, state=state,
                     return_state=True)  # fmt: skip
    second = run(Q[:, :, 28:], K[:, :, 28:], V[:, :, 28:], normalize, state=mid)
    assert_close("carried", torch.cat([first, second], 2), expected)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_chunked_gradcheck_with_states(normalize):
    """gradcheck of the packed form; the chunked one (E M >= 128 * 128 here, too many inputs
    for gradcheck) is held to the float64 reference's gradients above."""
    Q, K, V = (t.requires_grad_(True) for t in inputs(1, 2, CHUNK * 2 + 3, 3, 2, seed=8))
    S0 = torch.rand(1, 2, 3, 2, dtype=torch.float64, generator=gen(9), requires_grad=True)
    z0 = torch.rand(1, 2, 3, dtype=torch.float64, generator=gen(10), requires_grad=True)

    def fn(Q, K, V, S0, z0):
        if normalize:
            out, (S, z) = normalized_causal_dot_product(
                Q, K, V, 0.5, state=(S0, z0), return_state=True
            )
            return out, S, z
        out, S = causal_dot_product(Q, K, V, state=S0, return_state=True)
        return out, S

    assert torch.autograd.gradcheck(fn, (Q, K, V, S0, z0))


def test_default_thresholds_choose_the_measured_form():
    """Both sides of each default threshold (the fixture's are restored for the call)."""
    _C.set_chunked_thresholds(1024, 256 * 256, 512 * 512)
    form = _C.causal_form
    assert form(1024, 256, 256, True, False) == "chunked"
    assert form(1023, 256, 256, True, False) == "recurrence"
    assert form(1024, 256, 255, True, False) == "recurrence"
    assert form(4096, 64, 64, True, False) == "recurrence"
    assert form(4096, 64, 64, False, False) == "packed"
    assert form(4096, 64, 64, True, True) == "packed"
    assert form(1024, 256, 256, False, False) == "packed"
    assert form(1024, 512, 512, False, False) == "chunked"
    assert form(1024, 512, 512, True, True) == "chunked"
    assert form(1024, 512, 511, False, True) == "packed"
    assert form(1023, 512, 512, False, True) == "packed"


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_both_sides_of_the_default_length_threshold(normalize):
    """Compact float32 rows with E = M = 256 at L = 1023 (recurrence) and 1024 (chunked):
    the same values as the float64 per-token recurrence."""
    _C.set_chunked_thresholds(1024, 256 * 256, 512 * 512)
    for L in (1023, 1024):
        assert _C.causal_form(L, 256, 256, True, False) == (
            "chunked" if L == 1024 else "recurrence"
        )
        g = gen(L)
        Q, K = (torch.rand(1, 1, L, 256, generator=g) / 16 for _ in range(2))
        V = torch.randn(1, 1, L, 256, generator=g)
        out = run(Q, K, V, normalize)
        expected = run(Q.double(), K.double(), V.double(), normalize)
        close(f"L={L} ", out, expected)
