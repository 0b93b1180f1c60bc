"""Causal linear attention with the feature map elu(x) + 1 applied inside the CPU kernel
(``elu_normalized_causal_dot_product``, ops ``attention_core::elu_causal_linear_attention``
and its backward), and CausalLinearAttention's use of it: against the feature map applied
first, in float64 and float32, every form of the kernel (packed; chunked, here from L = 128
and E M = 128 * 128 on: the `chunked_form_from_128` fixture lowers its thresholds), compact
and strided rows, gradcheck, opcheck, torch.compile, the layer's general path for every
other feature map, and the kernels' elu(x) + 1 against torch.exp at every CPU level."""

import pytest
import torch

from attention_core import _extension
from attention_core.attention import CausalLinearAttention
from attention_core.causal_product import (
    _fused,
    elu_normalized_causal_dot_product,
    normalized_causal_dot_product,
)
from attention_core.feature_maps import (
    ActivationFunctionFeatureMap,
    elu_feature_map,
    is_elu_feature_map,
)
from attention_core.masking import LengthMask, TriangularCausalMask
from attention_core.testing import assert_close

pytest.importorskip("attention_core._C", reason="attention_core._C is not compiled")


@pytest.fixture(autouse=True)
def chunked_form_from_128():
    """The chunked form from L = 128 and E M = 128 * 128 on, then the default thresholds."""
    default = _extension._C.chunked_thresholds()
    _extension._C.set_chunked_thresholds(128, 128 * 128, 128 * 128)
    yield
    _extension._C.set_chunked_thresholds(*default)


EPS = 0.1  # large enough that dQ is not all cancellation (at L=1 it is dout/deps)


def phi(x):
    return torch.nn.functional.elu(x) + 1


def inputs(N, H, L, E, M, *, seed=0, dtype=torch.float64, sequence_first=True):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(N, L, H, d, generator=g, dtype=dtype) for d in (E, E, M)]
    if sequence_first:  # the attention layout, seen as (N, H, L, .)
        return [t.transpose(1, 2) for t in tensors]
    return [t.transpose(1, 2).contiguous() for t in tensors]


def check(Q, K, V, name=""):
    """Output and gradients against the feature map applied first, in float64."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (Q, K, V)]
    reference = [t.detach().double().requires_grad_(True) for t in (Q, K, V)]
    out = elu_normalized_causal_dot_product(*leaves, EPS)
    Qr, Kr, Vr = reference
    expected = normalized_causal_dot_product(phi(Qr), phi(Kr), Vr, EPS)
    scale = expected.abs().max()
    atol = 1e-5 if Q.dtype == torch.float32 else 1e-12
    assert_close(f"{name}out", out.double() / scale, expected / scale, rtol=0, atol=atol)
    G = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9), dtype=Q.dtype)
    out.backward(G)
    expected.backward(G.double())
    for label, a, b in zip("QKV", leaves, reference):
        s = b.grad.abs().max()
        assert_close(f"{name}d{label}", a.grad.double() / s, b.grad / s, rtol=0, atol=atol)


SHAPES = [
    pytest.param((1, 2, 1, 4, 3), id="one-token"),
    pytest.param((2, 3, 37, 5, 7), id="shorter-than-a-chunk"),
    pytest.param((1, 2, 64, 64, 64), id="one-chunk"),
    pytest.param((2, 2, 130, 33, 47), id="partial-last-chunk"),
    pytest.param((1, 2, 130, 128, 129), id="chunked-form"),
    pytest.param((1, 3, 200, 64, 64), id="chunks-of-full-tiles"),
]


@pytest.mark.parametrize("sequence_first", [True, False], ids=["sequence-first", "compact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_feature_map_matches_mapping_first(shape, dtype, sequence_first):
    check(*inputs(*shape, dtype=dtype, sequence_first=sequence_first))


@pytest.fixture
def cpu_level():
    """Set the instruction-set level for one test, then restore automatic selection."""
    yield _extension._C.set_cpu_level
    _extension._C.set_cpu_level(-1)


@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
def test_every_instruction_set_variant(level, cpu_level):
    """Each compiled copy of the chunk kernels (feature map, normaliser, recurrence with its
    full and partial column tiles and token groups), over several chunks."""
    cpu_level(level)
    if _extension._C.cpu_level() != level:
        pytest.skip(f"this CPU does not support level {level}")
    for dtype in (torch.float32, torch.float64):
        check(*inputs(2, 2, 131, 64, 71, dtype=dtype, seed=level), name=f"{dtype} ")


def test_output_keeps_the_attention_layout():
    out = elu_normalized_causal_dot_product(*inputs(2, 3, 9, 4, 5))
    assert out.transpose(1, 2).is_contiguous()


def test_gradcheck():
    Q, K, V = (t.requires_grad_(True) for t in inputs(1, 2, 70, 3, 2, seed=3))
    assert torch.autograd.gradcheck(
        lambda *t: elu_normalized_causal_dot_product(*t, 0.5), (Q, K, V)
    )


def test_half_precision_and_forced_reference_take_the_general_path(monkeypatch):
    Q, K, V = inputs(1, 2, 20, 4, 3, dtype=torch.float32)
    expected = normalized_causal_dot_product(phi(Q), phi(K), V)
    half = elu_normalized_causal_dot_product(Q.bfloat16(), K.bfloat16(), V.bfloat16())
    assert half.dtype == torch.bfloat16
    assert_close("bfloat16", half.float(), expected, rtol=0, atol=5e-2)
    monkeypatch.setenv("ATTENTION_CORE_FORCE_REFERENCE", "1")
    assert_close("forced reference", elu_normalized_causal_dot_product(Q, K, V), expected)


def test_bad_eps_is_named():
    with pytest.raises(ValueError, match="eps"):
        elu_normalized_causal_dot_product(*inputs(1, 1, 3, 2, 2), -1.0)


@pytest.mark.parametrize("sequence_first", [True, False], ids=["sequence-first", "compact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck(dtype, sequence_first):
    Q, K, V = (t.requires_grad_(True) for t in inputs(2, 3, 7, 4, 5, dtype=dtype))
    torch.library.opcheck(_fused.elu_causal_linear_attention, (Q, K, V, 0.5, sequence_first))
    Q, K, V = (t.detach() for t in (Q, K, V))
    out = _fused.elu_causal_linear_attention(Q, K, V, 0.5, sequence_first)
    args = (torch.randn_like(out), Q, K, V, out, 0.5, sequence_first)
    torch.library.opcheck(_fused.elu_causal_linear_attention_backward, args)


# ---------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------


def layer_call(attention, q, k, v, lengths=None):
    N, L = q.shape[:2]
    mask = TriangularCausalMask(L)
    query_lengths = LengthMask(torch.full((N,), L), max_len=L)
    key_lengths = lengths or LengthMask(torch.full((N,), k.shape[1]), max_len=k.shape[1])
    return attention(q, k, v, mask, query_lengths, key_lengths)


def same_map_unfused(E):
    """elu(x) + 1 through another function object: the layer's general path."""
    return ActivationFunctionFeatureMap(E, lambda x: torch.nn.functional.elu(x) + 1)


@pytest.mark.parametrize("L", [5, 130])
def test_layer_fused_equals_general_path(L):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, L, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))  # fmt: skip
    fused = CausalLinearAttention(8)
    general = CausalLinearAttention(8, feature_map=same_map_unfused)
    assert is_elu_feature_map(fused.feature_map) and not is_elu_feature_map(general.feature_map)
    assert is_elu_feature_map(CausalLinearAttention(8, feature_map=elu_feature_map).feature_map)
    out = layer_call(fused, q, k, v)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = layer_call(general, q, k, v)
    expected.square().sum().backward()
    assert out.is_contiguous()
    assert_close("out", out, expected)
    for label, a, t in zip("qkv", grads, (q, k, v)):
        assert_close(f"d{label}", a, t.grad)


def test_layer_uses_the_fused_op_only_when_it_may(monkeypatch):
    calls = []
    original = _fused.elu_forward_kernel  # run by the op, or directly without autograd

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(_fused, "elu_forward_kernel", spy)
    q, k, v = (torch.randn(1, 6, 2, 4) for _ in range(3))
    attention = CausalLinearAttention(4)
    layer_call(attention, q, k, v)
    assert len(calls) == 1
    layer_call(attention, q, k, v, LengthMask(torch.tensor([4]), max_len=6))  # padded keys
    layer_call(attention, q, k[:, :5], v[:, :5])  # S != L
    handle = attention.feature_map.register_forward_hook(lambda *a: None)  # hooks must run
    layer_call(attention, q, k, v)
    handle.remove()
    assert len(calls) == 1


def test_compiled_layer_matches_eager():
    """torch.compile(fullgraph=True) (aot_eager backend) with the fused op in the graph."""
    attention = CausalLinearAttention(8)
    q, k, v = (torch.randn(1, 20, 2, 8, requires_grad=True) for _ in range(3))
    mask, lengths = TriangularCausalMask(20), LengthMask(torch.tensor([20]), max_len=20)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    compiled = torch.compile(
        lambda *t: attention(*t, mask, lengths, lengths), fullgraph=True, backend=recording_backend
    )
    out = compiled(q, k, v)
    assert any("elu_causal_linear_attention" in graph for graph in graphs)
    assert_close("compiled", out, layer_call(attention, q, k, v))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


SPECIAL_INPUTS = [0.0, -0.0, 1e-40, -1e-40, -1e-45, 1.0, -1.0, 3.5, -17.0, -86.9, -87.3, -88.0]
SPECIAL_INPUTS += [-100.0, -103.9, -104.0, -104.5, -1e30, float("inf"), float("-inf")]


def kernel_feature_map(x):
    """The kernels' elu(x) + 1 over a contiguous tensor, with the current CPU level."""
    out = torch.full((x.numel() + 16,), 7.0, dtype=x.dtype)  # 16 sentinels after the end
    name = "elu_plus_one_f32" if x.dtype == torch.float32 else "elu_plus_one_f64"
    getattr(_extension._C, name)(x.data_ptr(), out.data_ptr(), x.numel())
    assert (out[x.numel() :] == 7.0).all(), "wrote past the end of the row"
    return out[: x.numel()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
def test_feature_map_exp_against_torch(level, dtype, cpu_level):
    """elu(x) + 1 = exp(x) for x <= 0 (against torch.exp in float64: relative error of a few
    float32 ulps down to exp(x) = 1e-37, absolute below 2e-38 beneath), x + 1
    exactly above, over a dense range, special values (signed zeros, denormals, the
    underflow edges, infinities, NaN) and every row length up to two vectors (the masked
    tail of the AVX-512 form)."""
    cpu_level(level)
    if _extension._C.cpu_level() != level:
        pytest.skip(f"this CPU does not support level {level}")
    g = torch.Generator().manual_seed(level)
    dense = torch.linspace(-110.0, 10.0, 4001, dtype=torch.float64)
    x = torch.cat([dense, torch.randn(999, generator=g, dtype=torch.float64) * 3])
    x = torch.cat([x, torch.tensor(SPECIAL_INPUTS, dtype=torch.float64)]).to(dtype)
    got = kernel_feature_map(x).double()
    xd = x.double()
    expected = torch.where(xd > 0, xd + 1, torch.exp(xd.clamp(max=0)))
    tiny = torch.finfo(torch.float32).tiny
    ulps = 4 * torch.finfo(dtype).eps
    assert got[xd == float("inf")].eq(float("inf")).all()
    normal = (expected >= 1e-37) & expected.isfinite()  # the plain form clamps at -87
    rel = ((got - expected).abs() / expected.clamp(min=tiny))[normal]
    worst = x[normal][rel.argmax()].item()
    assert rel.max() <= ulps, f"relative error {rel.max():.3g} at x = {worst}, level {level}"
    small = expected < 1e-37
    assert (got[small] - expected[small]).abs().max() < 2e-38
    assert (got[xd > 0] == (x[xd > 0] + 1).double()).all()
    nan = kernel_feature_map(torch.tensor([float("nan"), -1.0], dtype=dtype))
    assert nan[0].isnan() and nan[1] == torch.exp(torch.tensor(-1.0, dtype=dtype))
    for n in range(0, 34):  # every tail length
        row = torch.randn(n, generator=g, dtype=dtype) * 4
        rd = row.double()
        expected = torch.where(rd > 0, rd + 1, torch.exp(rd.clamp(max=0)))
        assert_close(f"n={n}", kernel_feature_map(row).double(), expected, rtol=ulps, atol=2e-38)
