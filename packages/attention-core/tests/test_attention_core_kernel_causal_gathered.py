"""The packed form of the causal-product kernel on rows that are not adjacent in memory (the
(N, L, H, E) layout of the attention modules seen as (N, H, L, E)): it walks each 64-token
chunk of all of a worker's heads, one head after the other (the backward pass gathers the
chunk's rows of every head in memory order). Against a dense float64 reference: many heads
per worker (one and two threads, bitwise equal), lengths below, at and across the chunk
size, states in and out (gradcheck), the fused feature map, the normaliser's widths (its
register blocks and the general loop) at every CPU level, and the same values in compact
rows (the per-token recurrence) for the other side of the choice."""

import pytest
import torch

from attention_core import _extension
from attention_core.causal_product import (
    causal_dot_product,
    elu_normalized_causal_dot_product,
    normalized_causal_dot_product,
)
from attention_core.testing import assert_close

pytestmark = pytest.mark.skipif(
    not _extension.kernels_available(), reason="attention_core._C is not compiled"
)

EPS = 0.1
NORMALIZE = [pytest.param(False, id="numerator"), pytest.param(True, id="normalized")]
LAYOUTS = [pytest.param(True, id="sequence-first"), pytest.param(False, id="compact")]


def inputs(N, H, L, E, M, *, seed=0, dtype=torch.float64, sequence_first=True, positive=True):
    """Q, K (N, H, L, E) and V (N, H, L, M), stored as (N, L, H, .) when sequence_first."""
    g = torch.Generator().manual_seed(seed)
    Q, K = (torch.randn(N, L, H, E, generator=g, dtype=dtype) for _ in range(2))
    if positive:  # as after a feature map
        Q, K = Q.abs() + 0.1, K.abs() + 0.1
    V = torch.randn(N, L, H, M, generator=g, dtype=dtype)
    tensors = [t.transpose(1, 2) for t in (Q, K, V)]
    return tensors if sequence_first else [t.contiguous() for t in tensors]


def dense(Q, K, V, normalize):
    """The float64 masked product, normalised by ``Q_i . sum_{j<=i} K_j + EPS`` if asked."""
    scores = torch.einsum("nhle,nhse->nhls", Q, K).tril()
    out = scores @ V
    return out / (scores.sum(-1, keepdim=True) + EPS) if normalize else out


def run(Q, K, V, normalize):
    if normalize:
        return normalized_causal_dot_product(Q, K, V, EPS)
    return causal_dot_product(Q, K, V)


def out_and_grads(fn, tensors, G):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(G.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check(fn, reference, tensors, name=""):
    G = torch.randn(
        tensors[2].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    got = out_and_grads(fn, tensors, G)
    expected = out_and_grads(reference, [t.double() for t in tensors], G)
    for label, a, b in zip(["out", "dQ", "dK", "dV"], got, expected):
        scale = b.abs().max()
        # float32: the normalised dQ of the first tokens is mostly cancellation
        atol = 5e-5 if a.dtype == torch.float32 else 1e-12
        assert_close(f"{name}{label}", a.double() / scale, b / scale, rtol=0, atol=atol)


@pytest.fixture
def threads():
    """Set torch's thread count for one test, then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("sequence_first", LAYOUTS)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("L", [1, 63, 64, 65, 131, 200])
def test_many_heads_per_worker(L, normalize, sequence_first, threads):
    """Ten heads over two batches: each worker gathers several heads, rows of two batches."""
    expected_form = "packed" if sequence_first else "recurrence"
    assert _extension._C.causal_form(L, 7, 9, not sequence_first, False) == expected_form
    tensors = inputs(2, 5, L, 7, 9, seed=L, sequence_first=sequence_first)
    for dtype in (torch.float64, torch.float32):
        cast = [t.to(dtype) for t in tensors]
        check(lambda *t: run(*t, normalize), lambda *t: dense(*t, normalize), cast, f"{dtype} ")


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_one_and_two_threads_give_the_same_bits(normalize, threads):
    tensors = [t.float() for t in inputs(1, 8, 150, 64, 64, seed=3)]
    G = torch.randn(tensors[2].shape, dtype=torch.float64)
    results = []
    for n in (1, 2):
        threads(n)
        results.append(out_and_grads(lambda *t: run(*t, normalize), tensors, G))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sequence_first", LAYOUTS)
@pytest.mark.parametrize("L", [5, 64, 131])
def test_fused_feature_map(L, sequence_first):
    """elu(x) + 1 applied in the gather, its gradient in the scatter."""
    tensors = inputs(2, 3, L, 16, 24, seed=L, sequence_first=sequence_first, positive=False)

    def mapped_first(Q, K, V):
        phi = torch.nn.functional.elu
        return dense(phi(Q) + 1, phi(K) + 1, V, True)

    for dtype in (torch.float64, torch.float32):
        cast = [t.to(dtype) for t in tensors]
        check(lambda *t: elu_normalized_causal_dot_product(*t, EPS), mapped_first, cast)


@pytest.fixture
def cpu_level():
    """Set the instruction-set level for one test, then restore automatic selection."""
    yield _extension._C.set_cpu_level
    _extension._C.set_cpu_level(-1)


@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("E", [1, 8, 16, 24, 32, 48, 64, 65])
def test_normaliser_widths(E, level, cpu_level):
    """The chunk normaliser keeps z in registers when E is one to four whole vectors (16, 32,
    48, 64 floats; 8, 16, 24, 32 doubles) and runs a general loop with a scalar tail
    otherwise; with and without the fused map, 2 chunks and a part, states in and out."""
    cpu_level(level)
    if _extension._C.cpu_level() != level:
        pytest.skip(f"this CPU does not support level {level}")
    for dtype in (torch.float64, torch.float32):
        tensors = [t.to(dtype) for t in inputs(1, 3, 150, E, 5, seed=E, positive=False)]
        Q, K, V = tensors
        z0 = torch.rand(1, 3, E, dtype=dtype)
        S0 = torch.rand(1, 3, E, 5, dtype=dtype)
        out, (S, z) = normalized_causal_dot_product(
            Q.abs(), K.abs(), V, EPS, state=(S0, z0), return_state=True
        )
        Qd, Kd, Vd = (t.double() for t in (Q.abs(), K.abs(), V))
        prefix = z0.double()[:, :, None] + Kd.cumsum(2)
        numerator = (S0.double()[:, :, None] * Qd[..., None]).sum(3) + dense(Qd, Kd, Vd, False)
        expected = numerator / ((Qd * prefix).sum(-1, keepdim=True) + EPS)
        atol = 1e-5 if dtype == torch.float32 else 1e-12
        scale = expected.abs().max()
        assert_close(f"{dtype} out", out.double() / scale, expected / scale, rtol=0, atol=atol)
        assert_close(f"{dtype} z", z.double(), prefix[:, :, -1], rtol=1e-6, atol=0)
        state = S0.double() + torch.einsum("nhle,nhlm->nhem", Kd, Vd)
        assert_close(f"{dtype} S", S.double(), state, rtol=1e-5, atol=1e-5)
        phi = torch.nn.functional.elu
        mapped = elu_normalized_causal_dot_product(Q, K, V, EPS).double()
        reference = dense(phi(Q.double()) + 1, phi(K.double()) + 1, V.double(), True)
        scale = reference.abs().max()
        assert_close(f"{dtype} fused", mapped / scale, reference / scale, rtol=0, atol=atol)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_with_states_across_chunks(normalize):
    """States in and out, and a length across the chunk boundary, on sequence-first rows."""
    Q, K, V = (t.requires_grad_(True) for t in inputs(1, 2, 67, 3, 2, seed=4))
    S0 = torch.rand(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    z0 = torch.rand(1, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(Q, K, V, S0, z0):
        if normalize:
            out, (S, z) = normalized_causal_dot_product(
                Q, K, V, EPS, state=(S0, z0), return_state=True
            )
            return out, S, z
        out, S = causal_dot_product(Q, K, V, state=S0, return_state=True)
        return out, S

    assert torch.autograd.gradcheck(fn, (Q, K, V, S0, z0))


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_heads_in_several_groups(normalize, threads):
    """A worker gathers at most about 1 MiB of chunk rows at a time: with E = M = 64 in
    float64 that is 4 heads, so 2 batches of 5 heads on one thread run as groups of 4, 4
    and 2, one of them across the batch boundary."""
    threads(1)
    tensors = inputs(2, 5, 70, 64, 64, seed=11)
    check(lambda *t: run(*t, normalize), lambda *t: dense(*t, normalize), tensors)
