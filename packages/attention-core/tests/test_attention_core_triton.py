"""The Triton kernels (attention_core._triton): each compared with an independent float64
dense reference, forward and every gradient.

Where to run them: on a CUDA device when there is one; otherwise under Triton's interpreter
on CPU tensors, which must be switched on for the whole pytest process before triton is
imported (``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a function, and
triton's own library functions such as ``tl.sum`` are decorated when triton is imported):
``TRITON_INTERPRET=1 pytest -m slow packages/attention-core/tests/test_attention_core_triton.py``,
which ``nox -s slow`` runs. Without a CUDA device and without the interpreter, the kernel tests
are skipped with that command as the reason. The whole module is marked slow (about half a
minute under the interpreter) and skipped when triton is not importable.
"""

import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from attention_core import _extension
from attention_core.aggregate import _op as aggregate_op
from attention_core.aggregate import _triton as triton_aggregate
from attention_core.causal_product import _op as causal_op
from attention_core.causal_product import _triton as triton_causal
from attention_core.causal_product import (
    causal_dot_product,
    normalized_causal_dot_product,
)
from attention_core.local_product import _op as local_op
from attention_core.local_product import _triton as triton_local
from attention_core.sparse_product import _op as sparse_op
from attention_core.sparse_product import _triton as triton_sparse
from attention_core.testing import TOLERANCES, assert_close

pytestmark = pytest.mark.slow  # about half a minute under the interpreter
EPS = 1e-3
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# every op with a Triton kernel: name -> (its torch.library op, its "cuda" kernel)
OP_MODULES = (causal_op, local_op, sparse_op, aggregate_op)
CUDA_OPS = {
    name: (getattr(module, name), kernel)
    for module in OP_MODULES
    for name, kernel in module.CUDA_KERNELS.items()
}
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
runs_kernels = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED,
    reason="no CUDA device: run with TRITON_INTERPRET=1 set for the whole pytest process",
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device (compiled kernels)"
)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def make_inputs(N, H, L, E, M, *, with_state, normalize, dtype, seed=0):
    """Positive Q, K (as after a feature map), any V; states and output gradients; all
    rounded to ``dtype`` and returned as float64 leaves (the reference's inputs)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, positive=False):
        t = torch.rand(*shape, generator=g) + 0.1 if positive else torch.randn(*shape, generator=g)
        return t.to(dtype).double()

    Q, K = rand(N, H, L, E, positive=True), rand(N, H, L, E, positive=True)
    V = rand(N, H, L, M)
    S0 = rand(N, H, E, M) if with_state else None
    z0 = rand(N, H, E, positive=True) if with_state and normalize else None
    grads = (rand(N, H, L, M), rand(N, H, E, M), rand(N, H, E) if normalize else None)
    return (Q, K, V, S0, z0), grads


def dense_reference(Q, K, V, S0, z0, normalize):
    """float64, dense masked matrices: out, final S and final z."""
    scores = torch.einsum("nhle,nhse->nhls", Q, K).tril()
    numerator = scores @ V
    S = torch.einsum("nhle,nhlm->nhem", K, V)
    z = K.sum(2)
    denominator = scores.sum(-1) + EPS
    if S0 is not None:
        numerator = numerator + Q @ S0
        S = S + S0
    if z0 is not None:
        denominator = denominator + torch.einsum("nhle,nhe->nhl", Q, z0)
        z = z + z0
    out = numerator / denominator[..., None] if normalize else numerator
    return out, S, z


def reference_gradients(inputs, grads, normalize):
    """Forward outputs and the gradients of every input, by float64 autograd."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    out, S, z = dense_reference(*leaves, normalize)
    grad_out, grad_S, grad_z = grads
    loss = (out * grad_out).sum() + (S * grad_S).sum()
    if normalize:
        loss = loss + (z * grad_z).sum()
    present = [t for t in leaves if t is not None]
    found = iter(torch.autograd.grad(loss, present))
    return (out.detach(), S.detach(), z.detach()), [
        next(found) if t is not None else None for t in leaves
    ]


def cast(t, dtype):
    """``t`` (or ``None``) in ``dtype`` on the device the kernels run on."""
    return None if t is None else t.to(DEVICE, dtype)


SHAPES = [
    pytest.param((1, 1, 1, 1, 1), id="size1"),
    pytest.param((2, 3, 70, 5, 7), id="N2-H3-L70-E5-M7"),
    pytest.param((1, 1, 131, 3, 67), id="L131-M67-two-value-blocks"),
]
NORMALIZE = [pytest.param(False, id="numerator"), pytest.param(True, id="normalized")]
STATE = [pytest.param(False, id="no-state"), pytest.param(True, id="state")]


def run_kernels(inputs, grads, normalize, dtype, *, sequence_first=False):
    Q, K, V, S0, z0 = (cast(t, dtype) for t in inputs)
    S0, z0 = cast(S0, torch.float32), cast(z0, torch.float32)
    out, S, z = triton_causal.causal_product_forward(
        Q, K, V, S0, z0, normalize=normalize, eps=EPS, sequence_first=sequence_first
    )
    grad_out, grad_S, grad_z = grads
    backward = triton_causal.causal_product_backward(
        cast(grad_out, dtype), Q, K, V, out if normalize else None, S0, z0,
        cast(grad_S, torch.float32), cast(grad_z, torch.float32),
        normalize=normalize, eps=EPS, sequence_first=sequence_first,
    )  # fmt: skip
    return (out, S, z), backward


def check_all(inputs, grads, normalize, dtype, **kwargs):
    (out, S, z), (dQ, dK, dV, dS0, dz0) = run_kernels(inputs, grads, normalize, dtype, **kwargs)
    (ref_out, ref_S, ref_z), ref_grads = reference_gradients(inputs, grads, normalize)
    assert out.dtype == dtype and dQ.dtype == dtype and S.dtype == torch.float32
    assert_close("out", out.cpu(), ref_out)
    assert_close("S", S.cpu(), ref_S)
    if normalize:
        assert_close("z", z.cpu(), ref_z)
    else:
        assert z.shape == (*out.shape[:2], 0)
    for name, actual, expected in zip(("dQ", "dK", "dV"), (dQ, dK, dV), ref_grads[:3]):
        assert_close(name, actual.cpu(), expected)
    # the state gradients are float32, but (normalised) they depend on the half-precision out
    rtol, atol = TOLERANCES[dtype]
    S0, z0 = inputs[3], inputs[4]
    if S0 is not None:
        assert_close("dS0", dS0.cpu(), ref_grads[3], rtol=rtol, atol=atol)
    if z0 is not None:
        assert_close("dz0", dz0.cpu(), ref_grads[4], rtol=rtol, atol=atol)
    return out, dQ, dK, dV


# ---------------------------------------------------------------------------------------
# causal product: kernels against the dense reference
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter run")
def test_kernels_are_interpreted():
    assert type(triton_causal._forward_kernel).__name__ == "InterpretedFunction"
    assert _extension.triton_available()


@runs_kernels
@pytest.mark.parametrize("with_state", STATE)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("shape", SHAPES)
def test_causal_product_float32(shape, normalize, with_state):
    inputs, grads = make_inputs(
        *shape, with_state=with_state, normalize=normalize, dtype=torch.float32
    )
    check_all(inputs, grads, normalize, torch.float32)


@runs_kernels
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")],
)
def test_causal_product_half_precision(dtype, normalize):
    # L = 64: exactly one chunk
    inputs, grads = make_inputs(2, 1, 64, 8, 6, with_state=True, normalize=normalize, dtype=dtype)
    check_all(inputs, grads, normalize, dtype)


@runs_kernels
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_causal_product_strided_sequence_first(normalize):
    """(N, L, H, E) storage seen as (N, H, L, E) in, sequence-first storage out."""
    inputs, grads = make_inputs(
        2, 3, 67, 4, 5, with_state=True, normalize=normalize, dtype=torch.float32
    )
    # the inputs are (N, H, L, .) views of (N, L, H, .) tensors
    inputs = tuple(
        t.transpose(1, 2).contiguous().transpose(1, 2)
        if t is not None and t.dim() == 4 and i < 3
        else t
        for i, t in enumerate(inputs)
    )
    assert inputs[0].stride(1) < inputs[0].stride(2)
    outputs = check_all(inputs, grads, normalize, torch.float32, sequence_first=True)
    for t in outputs:
        assert t.transpose(1, 2).is_contiguous()


@runs_kernels
def test_causal_product_continues_from_state():
    """A prompt in two calls, the state carried, equals one call."""
    (Q, K, V, _, _), _ = make_inputs(
        1, 2, 90, 6, 4, with_state=False, normalize=True, dtype=torch.float32
    )
    Q, K, V = (cast(t, torch.float32) for t in (Q, K, V))
    whole, S, z = triton_causal.causal_product_forward(Q, K, V, normalize=True, eps=EPS)
    first, S1, z1 = triton_causal.causal_product_forward(
        Q[:, :, :37], K[:, :, :37], V[:, :, :37], normalize=True, eps=EPS
    )
    rest, S2, z2 = triton_causal.causal_product_forward(
        Q[:, :, 37:], K[:, :, 37:], V[:, :, 37:], S1, z1, normalize=True, eps=EPS
    )
    assert_close("out", torch.cat([first, rest], 2), whole)
    assert_close("S", S2, S)
    assert_close("z", z2, z)


@runs_kernels
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize(
    "shape", [pytest.param((1, 2, 0, 3, 4), id="L0"), pytest.param((2, 1, 5, 0, 3), id="E0")]
)
def test_causal_product_empty(shape, normalize):
    inputs, grads = make_inputs(*shape, with_state=True, normalize=normalize, dtype=torch.float32)
    check_all(inputs, grads, normalize, torch.float32)


def test_causal_product_bad_inputs():
    Q = torch.rand(1, 2, 5, 3)
    V = torch.rand(1, 2, 5, 4)
    with pytest.raises(TypeError, match=r"float32, float16 and bfloat16; got torch.float64"):
        triton_causal.causal_product_forward(Q.double(), Q.double(), V.double())
    with pytest.raises(ValueError, match=r"V \(N, H, L, M\); got .*\(1, 2, 4, 4\)"):
        triton_causal.causal_product_forward(Q, Q, V[:, :, :4])
    with pytest.raises(ValueError, match=r"S0 must be .* shape \(1, 2, 3, 4\).*\(1, 2, 4, 3\)"):
        triton_causal.causal_product_forward(Q, Q, V, torch.rand(1, 2, 4, 3))
    with pytest.raises(ValueError, match="out when normalising"):
        triton_causal.causal_product_backward(V, Q, Q, V, None, normalize=True)


# ---------------------------------------------------------------------------------------
# local product: kernels against dense banded references
# ---------------------------------------------------------------------------------------


def band(L, S, C, lengths):
    """Key index ``j = l - C // 2 + k`` of every slot (clamped into [0, S)) and which slots
    are inside [0, S) and below each sequence's length: ``(L, C)`` and ``(N, 1, L, C)``."""
    j = torch.arange(L)[:, None] - C // 2 + torch.arange(C)[None, :]
    valid = (j >= 0) & (j < S) & (j < lengths.view(-1, 1, 1, 1))
    return j.clamp(0, max(S - 1, 0)), valid


def local_dot_reference(Q, K, mask, lengths, C):
    """float64: the dense ``Q K^T + mask`` read at the band, ``-inf`` outside."""
    N, H, L, _ = Q.shape
    index, valid = band(L, K.shape[2], C, lengths)
    dense = Q @ K.transpose(-1, -2) + mask
    out = dense.gather(-1, index.expand(N, H, L, C))
    return out.masked_fill(~valid, float("-inf")), valid


def local_average_reference(A, V):
    """float64: the band weights scattered into a dense ``(L, S)`` matrix, times V."""
    N, H, L, C = A.shape
    S = V.shape[2]
    index, inside = band(L, S, C, torch.full((1,), S))
    dense = A.new_zeros(N, H, L, S).scatter_add(
        -1, index.expand(N, H, L, C), A.masked_fill(~inside, 0.0)
    )
    return dense @ V


LOCAL_SHAPES = [
    pytest.param((1, 1, 1, 1, 1, 1), id="size1"),
    pytest.param((2, 3, 37, 37, 5, 7), id="N2-H3-L37-E5-C7"),
    pytest.param((2, 2, 70, 45, 16, 10), id="L70-S45-C10"),
    pytest.param((1, 2, 20, 50, 4, 64), id="L20-S50-C64-wider-than-L"),
]


def local_inputs(N, H, L, S, E, C, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(N, H, L, E, generator=g).to(dtype).double()
    K = torch.randn(N, H, S, E, generator=g).to(dtype).double()
    mask = torch.randn(L, S, generator=g).to(dtype).double()
    lengths = torch.randint(1, S + 1, (N,), generator=g)
    lengths[0] = S
    return Q, K, mask, lengths


@runs_kernels
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [pytest.param(p.values[0], torch.float32, id=f"{p.id}-float32") for p in LOCAL_SHAPES]
    + [pytest.param(LOCAL_SHAPES[1].values[0], torch.bfloat16, id="N2-H3-L37-E5-C7-bf16")],
)
def test_local_dot_product(shape, dtype):
    N, H, L, _, _, C = shape
    Q, K, mask, lengths = local_inputs(*shape, dtype=dtype)
    Q.requires_grad_()
    K.requires_grad_()
    expected, valid = local_dot_reference(Q, K, mask, lengths, C)
    grad = torch.randn(N, H, L, C, dtype=torch.float64).to(dtype).double()
    # slots outside the band or the key lengths must pass no gradient
    dQ_ref, dK_ref = torch.autograd.grad(expected.masked_fill(~valid, 0.0), (Q, K), grad)
    q, k, m = cast(Q.detach(), dtype), cast(K.detach(), dtype), cast(mask, dtype)
    lengths = lengths.to(DEVICE)
    out = triton_local.local_dot_product_forward(q, k, m, lengths, C)
    assert out.dtype == dtype
    assert torch.equal(torch.isfinite(out).cpu(), valid.expand(N, H, L, C))
    assert_close("out", out.cpu().masked_fill(~valid, 0), expected.masked_fill(~valid, 0))
    dQ, dK = triton_local.local_dot_product_backward(cast(grad, dtype), q, k, lengths, C)
    assert_close("dQ", dQ.cpu(), dQ_ref)
    assert_close("dK", dK.cpu(), dK_ref)


@runs_kernels
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [pytest.param(p.values[0], torch.float32, id=f"{p.id}-float32") for p in LOCAL_SHAPES]
    + [pytest.param(LOCAL_SHAPES[2].values[0], torch.float16, id="L70-S45-C10-fp16")],
)
def test_local_weighted_average(shape, dtype):
    N, H, L, S, _, C = shape
    g = torch.Generator().manual_seed(1)
    A = torch.rand(N, H, L, C, generator=g).to(dtype).double().requires_grad_()
    V = torch.randn(N, H, S, 6, generator=g).to(dtype).double().requires_grad_()
    expected = local_average_reference(A, V)
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64).to(dtype).double()
    dA_ref, dV_ref = torch.autograd.grad(expected, (A, V), grad)
    a, v = cast(A.detach(), dtype), cast(V.detach(), dtype)
    out = triton_local.local_weighted_average_forward(a, v)
    assert out.dtype == dtype
    assert_close("out", out.cpu(), expected)
    dA, dV = triton_local.local_weighted_average_backward(cast(grad, dtype), a, v)
    assert_close("dattention", dA.cpu(), dA_ref)
    assert_close("dV", dV.cpu(), dV_ref)


@runs_kernels
def test_local_strided_inputs():
    """(N, L, H, E) storage seen as (N, H, L, E), a transposed mask."""
    N, H, L, S, E, C = 2, 3, 29, 23, 5, 6
    Q, K, mask, lengths = local_inputs(N, H, L, S, E, C)
    expected, valid = local_dot_reference(Q, K, mask, lengths, C)
    q, k = (cast(t.transpose(1, 2).contiguous(), torch.float32).transpose(1, 2) for t in (Q, K))
    m = cast(mask.t().contiguous(), torch.float32).t()
    out = triton_local.local_dot_product_forward(q, k, m, lengths.to(DEVICE), C)
    assert_close("out", out.cpu().masked_fill(~valid, 0), expected.masked_fill(~valid, 0))
    A = torch.rand(N, L, H, C, dtype=torch.float64).transpose(1, 2)
    V = torch.randn(N, S, H, 4, dtype=torch.float64).transpose(1, 2)
    out = triton_local.local_weighted_average_forward(
        cast(A, torch.float32), cast(V, torch.float32)
    )
    assert_close("average", out.cpu(), local_average_reference(A, V))


def test_local_bad_inputs():
    Q, K = torch.rand(1, 2, 5, 3), torch.rand(1, 2, 6, 3)
    mask, lengths = torch.zeros(5, 6), torch.tensor([6])
    with pytest.raises(TypeError, match=r"one dtype .*; got torch.float32, torch.float64"):
        triton_local.local_dot_product_forward(Q, K.double(), mask, lengths, 3)
    with pytest.raises(ValueError, match=r"K \(N, H, S, E\); got .*\(1, 2, 6, 4\)"):
        triton_local.local_dot_product_forward(Q, torch.rand(1, 2, 6, 4), mask, lengths, 3)
    with pytest.raises(ValueError, match="local_context must be a positive int; got 0"):
        triton_local.local_dot_product_forward(Q, K, mask, lengths, 0)
    with pytest.raises(ValueError, match=r"key_lengths must be an int64 .*torch.int32"):
        triton_local.local_dot_product_forward(Q, K, mask, lengths.int(), 3)
    with pytest.raises(ValueError, match=r"attn_mask must be .* shape \(5, 6\).*\(6, 5\)"):
        triton_local.local_dot_product_forward(Q, K, mask.t(), lengths, 3)
    with pytest.raises(ValueError, match=r"C > 0 and V \(N, H, S, D\)"):
        triton_local.local_weighted_average_forward(torch.rand(1, 2, 5, 0), K)


# ---------------------------------------------------------------------------------------
# sparse products: kernels against dense references
# ---------------------------------------------------------------------------------------


def sparse_index(topk, groups, limits, L):
    """Each query's key list ``(N, H, L, k)`` and whether the query has keys
    ``(N, H, L, 1)``, from per-query lists or per-cluster lists plus groups and limits."""
    N, H = topk.shape[:2]
    valid = torch.ones(N, H, L, dtype=torch.bool)
    if groups is None:
        index = topk
    else:
        C = topk.shape[2]
        valid = (groups >= 0) & (groups < C)
        index = topk.gather(2, groups.clamp(0, C - 1)[..., None].expand(-1, -1, -1, topk.shape[3]))
    if limits is not None:
        valid = valid & (torch.arange(L) < limits[..., None])
    return index, valid[..., None]


def sparse_dot_reference(Q, K, topk, groups, limits):
    """float64: the dense ``Q K^T`` read at each query's keys, zero for queries without."""
    index, valid = sparse_index(topk, groups, limits, Q.shape[2])
    return (Q @ K.transpose(-1, -2)).gather(-1, index) * valid


def sparse_average_reference(W, V, topk, groups, limits):
    """float64: the weights scattered into a dense ``(L, S)`` matrix, times V."""
    N, H, L, _ = W.shape
    index, valid = sparse_index(topk, groups, limits, L)
    dense = W.new_zeros(N, H, L, V.shape[2]).scatter_add(-1, index, W * valid)
    return dense @ V


SPARSE_CASES = [
    pytest.param((1, 1, 1, 1, 1, 1), False, id="size1"),
    pytest.param((2, 3, 13, 11, 5, 3), False, id="per-query-N2-H3-L13-S11-k3"),
    pytest.param((2, 2, 19, 7, 4, 5), True, id="clustered-groups-limits"),
]


def sparse_case(N, H, L, S, E, k, clustered, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(N, H, L, E, generator=g).to(dtype).double().requires_grad_()
    K = torch.randn(N, H, S, E, generator=g).to(dtype).double().requires_grad_()
    if not clustered:
        return Q, K, torch.randint(0, S, (N, H, L, k), generator=g), None, None
    C = 3
    topk = torch.randint(0, S, (N, H, C, k), generator=g)
    groups = torch.randint(-1, C + 1, (N, H, L), generator=g)  # -1 and C: no cluster
    limits = torch.randint(1, L + 1, (N, H), generator=g)
    return Q, K, topk, groups, limits


@runs_kernels
@pytest.mark.parametrize(
    ("shape", "clustered", "dtype"),
    [pytest.param(*p.values, torch.float32, id=f"{p.id}-float32") for p in SPARSE_CASES]
    + [pytest.param(*SPARSE_CASES[2].values, torch.bfloat16, id="clustered-bf16")],
)
def test_sparse_dot_product(shape, clustered, dtype):
    Q, K, topk, groups, limits = sparse_case(*shape, clustered, dtype)
    expected = sparse_dot_reference(Q, K, topk, groups, limits)
    grad = torch.randn(expected.shape, dtype=torch.float64).to(dtype).double()
    dQ_ref, dK_ref = torch.autograd.grad(expected, (Q, K), grad)
    q, k = cast(Q.detach(), dtype), cast(K.detach(), dtype)
    index = [None if t is None else t.to(DEVICE) for t in (topk, groups, limits)]
    out = triton_sparse.sparse_dot_product_forward(q, k, *index)
    assert out.dtype == dtype
    assert_close("out", out.cpu(), expected)
    dQ, dK = triton_sparse.sparse_dot_product_backward(cast(grad, dtype), q, k, *index)
    assert_close("dQ", dQ.cpu(), dQ_ref)
    assert_close("dK", dK.cpu(), dK_ref)


@runs_kernels
@pytest.mark.parametrize(
    ("shape", "clustered", "dtype"),
    [pytest.param(*p.values, torch.float32, id=f"{p.id}-float32") for p in SPARSE_CASES]
    + [pytest.param(*SPARSE_CASES[1].values, torch.float16, id="per-query-fp16")],
)
def test_sparse_weighted_average(shape, clustered, dtype):
    Q, V, topk, groups, limits = sparse_case(*shape, clustered, dtype, seed=1)
    W = torch.rand((*topk.shape[:2], Q.shape[2], topk.shape[3]), dtype=torch.float64)
    W = W.to(dtype).double().requires_grad_()
    expected = sparse_average_reference(W, V, topk, groups, limits)
    grad = torch.randn(expected.shape, dtype=torch.float64).to(dtype).double()
    dW_ref, dV_ref = torch.autograd.grad(expected, (W, V), grad)
    w, v = cast(W.detach(), dtype), cast(V.detach(), dtype)
    index = [None if t is None else t.to(DEVICE) for t in (topk, groups, limits)]
    out = triton_sparse.sparse_weighted_average_forward(w, v, *index)
    assert out.dtype == dtype
    assert_close("out", out.cpu(), expected)
    dW, dV = triton_sparse.sparse_weighted_average_backward(cast(grad, dtype), w, v, *index)
    assert_close("dweights", dW.cpu(), dW_ref)
    assert_close("dvalues", dV.cpu(), dV_ref)


def test_sparse_bad_inputs():
    Q, K = torch.rand(1, 2, 5, 3), torch.rand(1, 2, 6, 3)
    topk = torch.zeros(1, 2, 5, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"one dtype .*; got torch.float32, torch.float64"):
        triton_sparse.sparse_dot_product_forward(Q, K.double(), topk, None, None)
    with pytest.raises(ValueError, match="same feature size; got 3 and 4"):
        triton_sparse.sparse_dot_product_forward(Q, torch.rand(1, 2, 6, 4), topk, None, None)
    with pytest.raises(ValueError, match=r"topk must have 5 rows .*\(1, 2, 4, 2\)"):
        triton_sparse.sparse_dot_product_forward(Q, K, topk[:, :, :4], None, None)
    with pytest.raises(ValueError, match=r"groups must be an int64 tensor of shape \(1, 2, 5\)"):
        triton_sparse.sparse_dot_product_forward(Q, K, topk, torch.zeros(1, 2, 4).long(), None)
    with pytest.raises(ValueError, match="topk must have k = 3 columns"):
        triton_sparse.sparse_weighted_average_forward(torch.rand(1, 2, 5, 3), K, topk, None, None)


# ---------------------------------------------------------------------------------------
# aggregate and broadcast: kernels against dense membership matrices
# ---------------------------------------------------------------------------------------


def membership(G, C, limits):
    """float64 ``(N, H, C, L)``: 1 where position l takes part in group c."""
    L = G.shape[2]
    valid = (G >= 0) & (G < C)
    if limits is not None:
        valid = valid & (torch.arange(L) < limits[..., None])
    one_hot = torch.nn.functional.one_hot(G.clamp(0, C - 1), C).double()
    return (one_hot * valid[..., None]).transpose(-1, -2)


AGGREGATE_SHAPES = [
    pytest.param((1, 1, 1, 1, 1), id="size1"),
    pytest.param((2, 3, 37, 5, 7), id="N2-H3-L37-C5-E7"),
    pytest.param((1, 2, 40, 4, 130), id="E130-two-feature-blocks"),
]


@runs_kernels
@pytest.mark.parametrize("with_limits", [False, True], ids=["no-limits", "limits"])
@pytest.mark.parametrize("shape", AGGREGATE_SHAPES)
def test_aggregate_and_broadcast(shape, with_limits):
    N, H, L, C, E = shape
    g = torch.Generator().manual_seed(5)
    X = torch.randn(N, H, L, E, generator=g, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(N, H, C, E, generator=g, dtype=torch.float64, requires_grad=True)
    F = torch.rand(N, H, C, generator=g, dtype=torch.float64, requires_grad=True)
    G = torch.randint(-1, C + 1, (N, H, L), generator=g)  # -1 and C take no part
    limits = torch.randint(0, L + 1, (N, H), generator=g) if with_limits else None
    member = membership(G, C, limits)
    aggregated = F[..., None] * (member @ X)
    broadcast = member.transpose(-1, -2) @ (F[..., None] * Y)
    grad_a = torch.randn(aggregated.shape, generator=g, dtype=torch.float64)
    grad_b = torch.randn(broadcast.shape, generator=g, dtype=torch.float64)
    dX_ref, dFa_ref = torch.autograd.grad(aggregated, (X, F), grad_a)
    dY_ref, dFb_ref = torch.autograd.grad(broadcast, (Y, F), grad_b)
    x, y, f = (cast(t.detach(), torch.float32) for t in (X, Y, F))
    index = [None if t is None else t.to(DEVICE) for t in (G, limits)]
    assert_close(
        "aggregate", triton_aggregate.aggregate_forward(x, index[0], f, index[1]).cpu(), aggregated
    )
    assert_close(
        "broadcast", triton_aggregate.broadcast_forward(y, index[0], f, index[1]).cpu(), broadcast
    )
    dX, dF = triton_aggregate.aggregate_backward(
        cast(grad_a, torch.float32), x, index[0], f, index[1]
    )
    assert_close("aggregate dX", dX.cpu(), dX_ref)
    assert_close("aggregate dF", dF.cpu(), dFa_ref)
    dY, dF = triton_aggregate.broadcast_backward(
        cast(grad_b, torch.float32), y, index[0], f, index[1]
    )
    assert_close("broadcast dY", dY.cpu(), dY_ref)
    assert_close("broadcast dF", dF.cpu(), dFb_ref)


@runs_kernels
def test_aggregate_half_precision_and_strided():
    N, H, L, C, E = 2, 2, 30, 3, 6
    g = torch.Generator().manual_seed(6)
    X = torch.randn(N, L, H, E, generator=g).to(torch.bfloat16).double().transpose(1, 2)
    F = torch.rand(N, H, C, generator=g).to(torch.bfloat16).double()
    G = torch.randint(0, C, (N, H, L), generator=g)
    expected = F[..., None] * (membership(G, C, None) @ X)
    out = triton_aggregate.aggregate_forward(
        cast(X, torch.bfloat16), G.to(DEVICE), cast(F, torch.bfloat16), None
    )
    assert out.dtype == torch.bfloat16
    assert_close("aggregate", out.cpu(), expected)


def test_aggregate_bad_inputs():
    X, G, F = torch.rand(1, 2, 5, 3), torch.zeros(1, 2, 5, dtype=torch.int64), torch.rand(1, 2, 4)
    with pytest.raises(TypeError, match=r"one dtype .*; got torch.float32, torch.float64"):
        triton_aggregate.aggregate_forward(X, G, F.double(), None)
    with pytest.raises(ValueError, match=r"G must be an int64 tensor .*torch.int32"):
        triton_aggregate.aggregate_forward(X, G.int(), F, None)
    with pytest.raises(
        ValueError,
        match=r"G must be an int64 tensor of shape \(1, 2, 5\); got torch.int64 \(1, 2, 4\)",
    ):
        triton_aggregate.aggregate_forward(X, G[:, :, :4], F, None)
    with pytest.raises(ValueError, match=r"limits must be an int64 tensor of shape \(1, 2\)"):
        triton_aggregate.broadcast_forward(torch.rand(1, 2, 4, 3), G, F, torch.zeros(2).long())


# ---------------------------------------------------------------------------------------
# the op path (fake, autograd, public functions) through the Triton kernels, without a GPU
# ---------------------------------------------------------------------------------------


@pytest.fixture
def triton_as_cpu_kernels(monkeypatch):
    """Make the Triton launch functions (run by the interpreter) the ops' CPU kernels for one
    test, so the ops' fakes and autograd and the public functions run through them."""
    if not INTERPRETED or not _extension.kernels_available():
        pytest.skip("needs the interpreter run and the compiled CPU ops")
    for op, fn in CUDA_OPS.values():
        backends = getattr(op, "_backend_fns", None)
        if backends is None or "cpu" not in backends:
            pytest.skip("torch.library internals differ from torch 2.13's")
        monkeypatch.setitem(backends, "cpu", fn)


def opcheck_samples(N, H, L, E, M):
    """Contiguous, sequence-first (transposed) and requires-grad causal product samples."""
    g = torch.Generator().manual_seed(3)
    Q, K = (torch.rand(N, H, L, E, generator=g) + 0.1 for _ in range(2))
    V = torch.randn(N, H, L, M, generator=g)
    S0, z0 = torch.randn(N, H, E, M, generator=g), torch.rand(N, H, E, generator=g)
    seq_first = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (Q, K, V)]
    return [
        (Q, K, V, None, None, False, 0.0, False),
        (Q, K, V, S0, z0, True, EPS, False),
        (*seq_first, S0, z0, True, EPS, True),
        (*(t.clone().requires_grad_() for t in (Q, K, V, S0, z0)), True, EPS, False),
    ]


@pytest.mark.usefixtures("triton_as_cpu_kernels")
def test_causal_op_opcheck_through_triton():
    # test_aot_dispatch_dynamic (slow under the interpreter) is device-independent: the CPU
    # kernel tests run it
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in opcheck_samples(1, 2, 9, 3, 4):
        torch.library.opcheck(causal_op.causal_product_forward, args, test_utils=checks)


def other_op_samples():
    """(op name, args) samples of the local and sparse ops, with transposed operands."""
    g = torch.Generator().manual_seed(4)
    N, H, L, S, E = 1, 2, 7, 6, 3
    Q = torch.randn(N, L, H, E, generator=g).transpose(1, 2).requires_grad_()
    K = torch.randn(N, H, S, E, generator=g, requires_grad=True)
    V = torch.randn(N, H, S, 5, generator=g, requires_grad=True)
    mask, lengths = torch.randn(S, L, generator=g).t(), torch.tensor([5])
    A = torch.rand(N, H, L, 4, generator=g, requires_grad=True)
    topk = torch.randint(0, S, (N, H, L, 2), generator=g)
    clusters = torch.randint(0, S, (N, H, 3, 2), generator=g)
    groups, limits = torch.randint(-1, 4, (N, H, L), generator=g), torch.tensor([[6, 4]])
    W = torch.rand(N, H, L, 2, generator=g, requires_grad=True)
    return [
        ("local_dot_product_forward", (Q, K, mask, lengths, 4)),
        ("local_weighted_average_forward", (A, V)),
        ("sparse_dot_product_forward", (Q, K, topk, None, None)),
        ("sparse_dot_product_forward", (Q, K, clusters, groups, limits)),
        ("sparse_weighted_average_forward", (W, V, topk, None, None)),
        ("sparse_weighted_average_forward", (W, V, clusters, groups, limits)),
        ("aggregate_forward", (Q, groups, torch.rand(N, H, 3, requires_grad=True), limits)),
        ("broadcast_forward", (V[:, :, :3], groups, torch.rand(N, H, 3, requires_grad=True), None)),
    ]


@pytest.mark.usefixtures("triton_as_cpu_kernels")
def test_local_and_sparse_ops_opcheck_through_triton():
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for name, args in other_op_samples():
        torch.library.opcheck(CUDA_OPS[name][0], args, test_utils=checks)


@pytest.mark.usefixtures("triton_as_cpu_kernels")
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_public_causal_functions_through_triton(normalize):
    inputs, grads = make_inputs(
        2, 2, 70, 5, 6, with_state=True, normalize=normalize, dtype=torch.float32
    )
    (ref_out, ref_S, _), ref_grads = reference_gradients(inputs, grads, normalize)
    leaves = [t.float().requires_grad_() for t in inputs if t is not None]
    if normalize:
        out, (S, z) = normalized_causal_dot_product(
            *leaves[:3], eps=EPS, state=(leaves[3], leaves[4]), return_state=True
        )
        loss = (out * grads[0]).sum() + (S * grads[1]).sum() + (z * grads[2]).sum()
    else:
        out, S = causal_dot_product(*leaves[:3], state=leaves[3], return_state=True)
        loss = (out * grads[0]).sum() + (S * grads[1]).sum()
    loss.backward()
    assert_close("out", out, ref_out)
    assert_close("S", S, ref_S)
    for name, leaf, expected in zip(("dQ", "dK", "dV", "dS0", "dz0"), leaves, ref_grads):
        assert_close(name, leaf.grad, expected)


@pytest.mark.usefixtures("triton_as_cpu_kernels")
def test_public_other_functions_through_triton():
    from attention_core.aggregate import broadcast, clustered_aggregate
    from attention_core.local_product import local_dot_product, local_weighted_average
    from attention_core.sparse_product import sparse_dot_product, sparse_weighted_average

    N, H, L, S, E, C = 2, 2, 23, 19, 5, 6
    Q, K, mask, lengths = local_inputs(N, H, L, S, E, C)
    Q.requires_grad_()
    K.requires_grad_()
    expected, valid = local_dot_reference(Q, K, mask, lengths, C)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    refs = torch.autograd.grad(expected.masked_fill(~valid, 0.0), (Q, K), grad)
    q, k = (t.detach().float().requires_grad_() for t in (Q, K))
    out = local_dot_product(q, k, mask.float(), lengths, C)
    assert_close("local dot", out.masked_fill(~valid, 0), expected.masked_fill(~valid, 0))
    out.masked_fill(~valid, 0).backward(grad.float())
    assert_close("local dQ", q.grad, refs[0])
    assert_close("local dK", k.grad, refs[1])

    A = torch.rand(N, H, L, C, dtype=torch.float64, requires_grad=True)
    V = torch.randn(N, H, S, 4, dtype=torch.float64, requires_grad=True)
    expected = local_average_reference(A, V)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    refs = torch.autograd.grad(expected, (A, V), grad)
    a, v = (t.detach().float().requires_grad_() for t in (A, V))
    out = local_weighted_average(a, v)
    out.backward(grad.float())
    assert_close("local average", out, expected)
    assert_close("local dA", a.grad, refs[0])
    assert_close("local dV", v.grad, refs[1])

    topk = torch.randint(0, S, (N, H, L, 3))
    expected = sparse_dot_reference(Q, K, topk, None, None)
    refs = torch.autograd.grad(expected.sum(), (Q, K))
    q, k = (t.detach().float().requires_grad_() for t in (Q, K))
    out = sparse_dot_product(q, k, topk)
    out.sum().backward()
    assert_close("sparse dot", out, expected)
    assert_close("sparse dQ", q.grad, refs[0])
    assert_close("sparse dK", k.grad, refs[1])

    W = torch.rand(N, H, L, 3, dtype=torch.float64, requires_grad=True)
    expected = sparse_average_reference(W, V, topk, None, None)
    refs = torch.autograd.grad(expected.sum(), (W, V))
    w, v = (t.detach().float().requires_grad_() for t in (W, V))
    out = sparse_weighted_average(w, v, topk)
    out.sum().backward()
    assert_close("sparse average", out, expected)
    assert_close("sparse dW", w.grad, refs[0])
    assert_close("sparse dV", v.grad, refs[1])

    groups, lengths = torch.randint(-1, 4, (N, H, L)), torch.tensor([L, 9])
    F = torch.rand(N, H, 3, dtype=torch.float64, requires_grad=True)
    expected = F[..., None] * (membership(groups, 3, lengths.view(N, 1).expand(N, H)) @ Q)
    refs = torch.autograd.grad(expected.sum(), (Q, F))
    q, f = (t.detach().float().requires_grad_() for t in (Q, F))
    out = clustered_aggregate(q, groups, f, lengths)
    out.sum().backward()
    assert_close("clustered aggregate", out, expected)
    assert_close("aggregate dX", q.grad, refs[0])
    assert_close("aggregate dF", f.grad, refs[1])
    Y = torch.randn(N, H, 3, E, dtype=torch.float64, requires_grad=True)
    expected = membership(groups, 3, None).transpose(-1, -2) @ (F[..., None] * Y)
    refs = torch.autograd.grad(expected.sum(), (Y, F))
    y, f = (t.detach().float().requires_grad_() for t in (Y, F))
    out = broadcast(y, groups, f)
    out.sum().backward()
    assert_close("broadcast", out, expected)
    assert_close("broadcast dY", y.grad, refs[0])
    assert_close("broadcast dF", f.grad, refs[1])


# ---------------------------------------------------------------------------------------
# registration and dispatch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CUDA_OPS))
def test_cuda_kernels_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attention_core::{name}", "CUDA")


@runs_kernels
def test_cuda_op_kernel_matches_reference():
    """The function registered for "cuda" (on CPU tensors under the interpreter): states in
    the input dtype, as the op's fake allocates them."""
    inputs, grads = make_inputs(
        1, 2, 20, 3, 5, with_state=True, normalize=True, dtype=torch.float32
    )
    Q, K, V, S0, z0 = (cast(t, torch.float32) for t in inputs)
    grads = [cast(t, torch.float32) for t in grads]
    out, S, z = causal_op.causal_product_forward_cuda(Q, K, V, S0, z0, True, EPS, False)
    dQ, dK, dV, dS0, dz0 = causal_op.causal_product_backward_cuda(
        grads[0], Q, K, V, out, S0, z0, grads[1], grads[2], True, EPS, False
    )
    (ref_out, ref_S, ref_z), ref_grads = reference_gradients(
        inputs, [t.cpu().double() for t in grads], True
    )
    for name, actual, expected in zip(
        ("out", "S", "z", "dQ", "dK", "dV", "dS0", "dz0"),
        (out, S, z, dQ, dK, dV, dS0, dz0),
        (ref_out, ref_S, ref_z, *ref_grads),
    ):
        assert actual.dtype == torch.float32
        assert_close(name, actual.cpu(), expected)


def like(device, dtype):
    """Enough of a tensor for use_kernels (a CUDA tensor cannot be made without CUDA)."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype)


@pytest.mark.parametrize(
    ("device", "dtype", "triton", "expected"),
    [
        pytest.param("cuda", torch.float32, True, True, id="cuda-float32"),
        pytest.param("cuda", torch.bfloat16, True, True, id="cuda-bfloat16"),
        pytest.param("cuda", torch.float64, True, False, id="cuda-float64-reference"),
        pytest.param("cuda", torch.float32, False, False, id="cuda-op-without-triton-kernel"),
        pytest.param("cpu", torch.float16, True, False, id="cpu-float16"),
    ],
)
def test_use_kernels_dispatch(device, dtype, triton, expected):
    tensors = [like(device, dtype)] * 3
    assert _extension.use_kernels(*tensors, triton=triton) is expected


def test_use_kernels_cpu_unchanged_and_forced_reference(monkeypatch):
    Q = torch.rand(1, 1, 2, 2)
    assert _extension.use_kernels(Q, triton=True) is _extension.kernels_available()
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    assert not _extension.use_kernels(like("cuda", torch.float32), triton=True)


@needs_cuda
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_public_functions_on_cuda(normalize):
    inputs, grads = make_inputs(
        2, 2, 70, 5, 6, with_state=False, normalize=normalize, dtype=torch.float32
    )
    (ref_out, _, _), ref_grads = reference_gradients(inputs, grads, normalize)
    leaves = [t.float().cuda().requires_grad_() for t in inputs[:3]]
    if normalize:
        out = normalized_causal_dot_product(*leaves, eps=EPS)
    else:
        out = causal_dot_product(*leaves)
    out.backward(grads[0].float().cuda())
    assert_close("out", out.cpu(), ref_out)
    for name, leaf, expected in zip(("dQ", "dK", "dV"), leaves, ref_grads):
        assert_close(name, leaf.grad.cpu(), expected)


@needs_cuda
def test_other_public_functions_on_cuda():
    """The public functions send CUDA tensors through the ops to the Triton kernels; their
    outputs and gradients match the float64 dense references."""
    from attention_core.aggregate import aggregate
    from attention_core.local_product import local_dot_product, local_weighted_average
    from attention_core.sparse_product import sparse_dot_product, sparse_weighted_average

    N, H, L, S, E, C = 2, 2, 37, 37, 5, 7
    Q, K, mask, lengths = local_inputs(N, H, L, S, E, C)
    expected, valid = local_dot_reference(Q, K, mask, lengths, C)
    q, k = (t.float().cuda().requires_grad_() for t in (Q, K))
    out = local_dot_product(q, k, mask.float().cuda(), lengths.cuda(), C)
    assert_close("local dot", out.cpu().masked_fill(~valid, 0), expected.masked_fill(~valid, 0))
    out.masked_fill(~valid.cuda(), 0).sum().backward()
    assert q.grad is not None and k.grad is not None
    A = torch.rand(N, H, L, C, dtype=torch.float64)
    V = torch.randn(N, H, S, 4, dtype=torch.float64)
    out = local_weighted_average(A.float().cuda(), V.float().cuda())
    assert_close("local average", out.cpu(), local_average_reference(A, V))
    topk = torch.randint(0, S, (N, H, L, 3))
    out = sparse_dot_product(Q.float().cuda(), K.float().cuda(), topk.cuda())
    assert_close("sparse dot", out.cpu(), sparse_dot_reference(Q, K, topk, None, None))
    W = torch.rand(N, H, L, 3, dtype=torch.float64)
    out = sparse_weighted_average(W.float().cuda(), V.float().cuda(), topk.cuda())
    assert_close("sparse average", out.cpu(), sparse_average_reference(W, V, topk, None, None))
    G, F = torch.randint(-1, 4, (N, H, L)), torch.rand(N, H, 3, dtype=torch.float64)
    out = aggregate(Q.float().cuda(), G.cuda(), F.float().cuda())
    assert_close("aggregate", out.cpu(), F[..., None] * (membership(G, 3, None) @ Q))
