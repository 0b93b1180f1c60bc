"""Tests of attention_core.nn against float64 references written here."""

from __future__ import annotations

import cmath
import math

import pytest
import torch
import torch.nn.functional as F

from attention_core.nn import (
    GEGLU,
    GLU,
    DynamicPositionBias,
    FeedForward,
    RMSNorm,
    RotaryEmbedding,
    T5RelativePositionBias,
    apply_rotary_pos_emb,
    attend,
    causal_mask,
    l2norm,
    relative_positions,
)
from attention_core.testing import assert_close, seeded

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


# ---------------------------------------------------------------- norms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 13)], ids=["1", "3x7", "2x5x13"])
def test_rmsnorm_matches_formula(shape, dtype):
    g = seeded(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    expected = torch.empty_like(x)
    flat_x, flat_out = x.reshape(-1, shape[-1]), expected.view(-1, shape[-1])
    for row in range(flat_x.shape[0]):
        ms = sum(float(v) ** 2 for v in flat_x[row]) / shape[-1]
        flat_out[row] = flat_x[row] / math.sqrt(ms + 1e-6) * norm.weight.double().detach()
    actual = norm.to(dtype)(x.to(dtype))
    assert_close("rmsnorm", actual, expected)


def test_rmsnorm_gradcheck_and_weight_name():
    norm = RMSNorm(5).double()
    assert [name for name, _ in norm.named_parameters()] == ["weight"]
    x = torch.randn(3, 5, dtype=torch.float64, generator=seeded(1), requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_rmsnorm_bad_inputs():
    with pytest.raises(ValueError, match="dim must be a positive int; got 0"):
        RMSNorm(0)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\); got \(2, 3\)"):
        RMSNorm(4)(torch.randn(2, 3))
    with pytest.raises(TypeError, match="x must be a floating point tensor"):
        RMSNorm(3)(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("dim", [0, -1, 1], ids=["dim0", "dim-1", "dim1"])
def test_l2norm(dim):
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=seeded(2))
    x[0, 0, 0] = 0.0
    x.select(dim, 1).zero_()  # a whole slice of zeros must stay zeros, not NaN
    norms = x.pow(2).sum(dim=dim, keepdim=True).sqrt()
    expected = torch.where(norms > 0, x / norms, torch.zeros_like(x))
    assert_close("l2norm", l2norm(x, dim=dim), expected)
    assert torch.isfinite(l2norm(x, dim=dim)).all()


# ---------------------------------------------------------------- feed-forward


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_glu_matches_formula(activation):
    t = torch.randn(2, 3, 10, dtype=torch.float64, generator=seeded(3))
    fn = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation]
    assert_close("glu", GLU(activation)(t), t[..., :5] * fn(t[..., 5:]))


def test_geglu_is_gelu_gated():
    t = torch.randn(4, 6, dtype=torch.float64, generator=seeded(4))
    x, gate = t[:, :3], t[:, 3:]
    expected = x * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    assert_close("geglu", GEGLU()(t), expected)
    with pytest.raises(ValueError, match=r"t must have an even last axis .* got shape \(4, 5\)"):
        GEGLU()(torch.randn(4, 5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "dim,mult,glu,activation",
    [
        (8, 4, False, "gelu"),
        (8, 4, True, "gelu"),
        (7, 1.5, True, "silu"),
        (5, 2, False, "relu"),
        (1, 1, True, "gelu"),
    ],
    ids=["d8-plain", "d8-geglu", "d7-swiglu-1.5", "d5-relu", "d1-geglu"],
)
def test_feedforward_matches_manual(dim, mult, glu, activation, dtype):
    torch.manual_seed(0)
    ff = FeedForward(dim, mult=mult, glu=glu, activation=activation, dropout=0.3).double().eval()
    inner = int(dim * mult)
    w1, w2 = ff.net[0], ff.net[3]
    assert (w1.in_features, w1.out_features) == (dim, 2 * inner if glu else inner)
    assert (w2.in_features, w2.out_features) == (inner, dim)
    x = torch.randn(2, 3, dim, dtype=torch.float64, generator=seeded(5))
    fn = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation]
    h = x @ w1.weight.T + w1.bias
    h = h[..., :inner] * fn(h[..., inner:]) if glu else fn(h)
    expected = h @ w2.weight.T + w2.bias
    assert_close("feedforward", ff.to(dtype)(x.to(dtype)), expected)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_gated_feedforward_gradients_match_the_sequential_net(activation):
    ff = FeedForward(6, mult=2, glu=True, activation=activation).double()
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=seeded(7), requires_grad=True)
    weights = torch.randn(3, 4, 6, dtype=torch.float64, generator=seeded(8))
    params = (x, *ff.parameters())
    grads = torch.autograd.grad((ff(x) * weights).sum(), params)
    expected = torch.autograd.grad((ff.net(x) * weights).sum(), params)  # Linear, GLU, ...
    assert_close("output", ff(x), ff.net(x))
    for i, (a, b) in enumerate(zip(grads, expected)):
        assert_close(f"gradient {i}", a, b)


def test_gated_feedforward_calls_hooked_or_replaced_modules():
    """The gated block computes its first product in halves without calling ``net[0]`` and
    ``net[1]``: a hook on either, or a replaced module, makes it call them."""
    ff = FeedForward(6, mult=2, glu=True).double()
    x = torch.randn(2, 6, dtype=torch.float64, generator=seeded(9))
    expected = ff.net(x)
    for module in (ff.net[0], ff.net[1]):
        seen: list[torch.Size] = []
        handle = module.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out.shape))
        assert_close("hooked", ff(x), expected)
        handle.remove()
        assert len(seen) == 1
    doubled = []
    ff.net[1] = type(ff.net[1])("gelu")  # the same GLU type: the halves path
    ff.net[0].register_forward_pre_hook(lambda m, args: doubled.append(1))
    ff(x)
    assert doubled == [1]


def test_feedforward_dropout_and_grad():
    ff = FeedForward(6, mult=2, dropout=0.5, glu=True)
    x = torch.randn(4, 6, generator=seeded(6), requires_grad=True)
    ff.train()
    torch.manual_seed(0)
    a = ff(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, ff(x)), "dropout must be active in training mode"
    ff.eval()
    assert torch.equal(ff(x), ff(x))
    ff(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in ff.parameters())


def test_feedforward_bad_arguments():
    with pytest.raises(ValueError, match=r"activation must be one of .* got 'tanh'"):
        FeedForward(4, activation="tanh")
    with pytest.raises(ValueError, match="mult must be a positive number; got 0"):
        FeedForward(4, mult=0)
    with pytest.raises(
        ValueError, match=r"int\(dim \* mult\) must be at least 1; got int\(3 \* 0.1\)"
    ):
        FeedForward(3, mult=0.1)
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\); got 1.0"):
        FeedForward(4, dropout=1.0)
    with pytest.raises(ValueError, match="dim must be a positive int; got -2"):
        FeedForward(-2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\); got \(2, 5\)"):
        FeedForward(4)(torch.randn(2, 5))


# ---------------------------------------------------------------- T5 relative position bias


def t5_bucket_reference(relative: int, causal: bool, num_buckets: int, max_distance: int) -> int:
    """T5 bucket of ``key - query = relative`` with exact integer arithmetic for the log part:
    the log bucket of ``n`` is the largest ``k`` with ``(n / e) ** s >= (max_distance / e) ** k``
    (``e`` exact buckets, ``s`` log buckets), i.e. ``n**s * e**k >= max_distance**k * e**s``."""
    n = -relative
    offset = 0
    if causal:
        n = max(n, 0)
    else:
        num_buckets //= 2
        if n < 0:
            offset = num_buckets
        n = abs(n)
    exact = num_buckets // 2
    if n < exact:
        return offset + n
    s = num_buckets - exact
    k = 0
    while k + 1 <= s and n**s * exact ** (k + 1) >= max_distance ** (k + 1) * exact**s:
        k += 1
    return offset + min(exact + k, num_buckets - 1)


T5_CONFIGS = [
    pytest.param(True, 32, 128, id="causal-32-128"),
    pytest.param(False, 32, 128, id="bidir-32-128"),
    pytest.param(True, 8, 20, id="causal-8-20"),
    pytest.param(False, 6, 11, id="bidir-6-11"),
    pytest.param(True, 2, 3, id="causal-2-3"),
]


@pytest.mark.parametrize("causal,num_buckets,max_distance", T5_CONFIGS)
def test_t5_buckets_match_exact_reference(causal, num_buckets, max_distance):
    rel_pos = T5RelativePositionBias(2, causal, num_buckets, max_distance)
    distances = torch.arange(-3 * max_distance - 5, 3 * max_distance + 6)
    expected = [t5_bucket_reference(int(d), causal, num_buckets, max_distance) for d in distances]
    assert rel_pos.bucket(distances).tolist() == expected
    # the log buckets are all used and grow monotonically with the distance into the past
    past = rel_pos.bucket(-torch.arange(0, 3 * max_distance))
    assert (past.diff() >= 0).all()
    half = num_buckets if causal else num_buckets // 2
    assert set(past.tolist()) == set(range(half))


@pytest.mark.parametrize("causal,num_buckets,max_distance", T5_CONFIGS[:2])
def test_t5_forward_gathers_embeddings_with_real_distances(causal, num_buckets, max_distance):
    heads = 3
    rel_pos = T5RelativePositionBias(heads, causal, num_buckets, max_distance, scale=2.5).double()
    query_positions = torch.tensor([300, 301, 307])
    key_positions = torch.cat([torch.arange(0, 40), torch.arange(290, 310)])  # far memories
    out = rel_pos(query_positions, key_positions)
    assert out.shape == (heads, 3, 60)
    table = rel_pos.relative_attention_bias.weight.detach()
    expected = torch.empty(heads, 3, 60, dtype=torch.float64)
    for a, qp in enumerate(query_positions.tolist()):
        for b, kp in enumerate(key_positions.tolist()):
            bucket = t5_bucket_reference(kp - qp, causal, num_buckets, max_distance)
            expected[:, a, b] = 2.5 * table[bucket]
    assert_close("t5 bias", out, expected)
    # keys 300 steps back are not treated like the current position
    assert rel_pos.bucket(torch.tensor([-300])).item() == (num_buckets if causal else 16) - 1


@pytest.mark.parametrize("i,j", [(1, 1), (3, 8), (5, 5), (4, 2)], ids=["1x1", "3x8", "5x5", "4x2"])
def test_t5_bias_convenience(i, j):
    rel_pos = T5RelativePositionBias(2, causal=False, num_buckets=8, max_distance=16)
    assert_close("bias(i, j)", rel_pos.bias(i, j), rel_pos(torch.arange(j - i, j), torch.arange(j)))
    assert_close(
        "bias offset",
        rel_pos.bias(i, j, offset=-7),
        rel_pos(torch.arange(-7, -7 + i), torch.arange(j)),
    )


def test_t5_gradient_reaches_table():
    rel_pos = T5RelativePositionBias(2, num_buckets=8, max_distance=16)
    rel_pos.bias(3, 6).sum().backward()
    grad = rel_pos.relative_attention_bias.weight.grad
    assert grad is not None and (grad[:3] != 0).all()


def test_t5_bad_arguments():
    with pytest.raises(ValueError, match="num_buckets must be at least 4 when causal=False; got 3"):
        T5RelativePositionBias(2, causal=False, num_buckets=3)
    with pytest.raises(ValueError, match="max_distance must exceed the 16 exact buckets; got 16"):
        T5RelativePositionBias(2, num_buckets=32, max_distance=16)
    with pytest.raises(ValueError, match="heads must be a positive int; got 0"):
        T5RelativePositionBias(0)
    rel_pos = T5RelativePositionBias(2)
    with pytest.raises(TypeError, match="query_positions must be an integer tensor"):
        rel_pos(torch.arange(3.0), torch.arange(3))
    with pytest.raises(
        ValueError, match=r"key_positions must have 1 dimensions; got shape \(1, 3\)"
    ):
        rel_pos(torch.arange(3), torch.arange(3)[None])
    with pytest.raises(TypeError, match="offset must be an int or None; got float"):
        rel_pos.bias(2, 3, offset=1.5)


def test_relative_positions():
    rel = relative_positions(torch.tensor([5, 9]), torch.tensor([-100, 5, 9, 12]))
    assert rel.tolist() == [[-105, 0, 4, 7], [-109, -4, 0, 3]]


# ---------------------------------------------------------------- dynamic position bias


@pytest.mark.parametrize(
    "depth,log_distance,norm",
    [(1, False, False), (2, True, False), (3, False, True), (2, True, True)],
    ids=["d1", "d2-log", "d3-norm", "d2-log-norm"],
)
def test_dynamic_position_bias_matches_per_pair_mlp(depth, log_distance, norm):
    torch.manual_seed(0)
    heads = 3
    dpb = DynamicPositionBias(8, heads, depth=depth, log_distance=log_distance, norm=norm).double()
    query_positions = torch.tensor([4, 7, 11])
    key_positions = torch.tensor([-40, -3, 0, 4, 5, 7, 11, 13])
    out = dpb(query_positions, key_positions)
    expected = torch.empty(heads, 3, 8, dtype=torch.float64)
    for a, qp in enumerate(query_positions.tolist()):
        for b, kp in enumerate(key_positions.tolist()):
            d = float(kp - qp)
            if log_distance:
                d = math.copysign(math.log(1 + abs(d)), d) if d else 0.0
            expected[:, a, b] = dpb.mlp(torch.tensor([[d]], dtype=torch.float64))[0]
    assert_close("dynamic bias", out, expected)


def test_dynamic_position_bias_runs_mlp_once_per_distance():
    dpb = DynamicPositionBias(4, 2)
    seen = []
    dpb.mlp[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    out = dpb.bias(6, 10)
    assert out.shape == (2, 6, 10)
    assert seen == [15]  # distances -9 .. 5
    assert_close("bias(i, j)", out, dpb(torch.arange(4, 10), torch.arange(10)))
    out.sum().backward()
    assert all(p.grad is not None for p in dpb.parameters())


def test_dynamic_position_bias_bad_arguments():
    with pytest.raises(ValueError, match="depth must be a positive int; got 0"):
        DynamicPositionBias(4, 2, depth=0)
    with pytest.raises(TypeError, match="key_positions must be an integer tensor"):
        DynamicPositionBias(4, 2)(torch.arange(2), torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------- rotary


def rotary_reference(x: torch.Tensor, positions, dim: int, theta: float, base=None, inverse=False):
    """Rotate pairs (x[k], x[k + dim/2]) as complex numbers by position * theta**(-2k/dim),
    times xPos zeta_k ** (+-position / base)."""
    out = x.clone().double()
    half = dim // 2
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape[:-2]]).reshape(
        -1, x.dim() - 2
    ).tolist() or [[]]:
        for n, pos in enumerate(positions):
            vec = x[tuple(idx)][n].double()
            for k in range(half):
                z = complex(vec[k], vec[k + half]) * cmath.exp(1j * pos * theta ** (-2 * k / dim))
                if base is not None:
                    zeta = (2 * k + 0.4 * dim) / (1.4 * dim)
                    z *= zeta ** ((-pos if inverse else pos) / base)
                out[tuple(idx)][n][k], out[tuple(idx)][n][k + half] = z.real, z.imag
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,rot_dim,theta,base",
    [
        ((2, 3, 5, 8), 8, 10000, None),
        ((1, 4, 6), 4, 10000, None),
        ((2, 7, 10), 6, 500, None),
        ((3, 5, 8), 8, 10000, 64),
        ((1, 1, 4), 2, 100, 16),
    ],
    ids=["full", "partial-4of6", "partial-6of10-theta500", "xpos", "tiny-xpos"],
)
def test_rotary_matches_complex_reference(shape, rot_dim, theta, base, dtype):
    rotary = RotaryEmbedding(rot_dim, theta=theta, xpos_scale_base=base)
    x = torch.randn(*shape, dtype=torch.float64, generator=seeded(7))
    positions = [3, -1, 0, 17, 250, 2, 9][: shape[-2]]
    pos = torch.tensor(positions)
    freqs, scale = rotary(pos, dtype=dtype), rotary.scale(pos, dtype=dtype)
    assert freqs.dtype == scale.dtype == dtype
    assert freqs.shape == scale.shape == (shape[-2], rot_dim)
    expected = rotary_reference(x, positions, rot_dim, theta, base)
    actual = apply_rotary_pos_emb(freqs, x.to(dtype), scale)
    assert_close("rotated", actual, expected)
    assert torch.equal(actual[..., rot_dim:], x[..., rot_dim:].to(dtype))
    if base is not None:
        expected_k = rotary_reference(x, positions, rot_dim, theta, base, inverse=True)
        actual_k = apply_rotary_pos_emb(freqs, x.to(dtype), scale**-1)
        assert_close("rotated key", actual_k, expected_k)


@pytest.mark.parametrize("base", [None, 32], ids=["rope", "xpos"])
def test_rotary_scores_depend_only_on_relative_position(base):
    rotary = RotaryEmbedding(8, xpos_scale_base=base).double()
    g = seeded(8)
    q, k = (
        torch.randn(12, dtype=torch.float64, generator=g),
        torch.randn(12, dtype=torch.float64, generator=g),
    )

    def score(m: int, n: int) -> float:
        pm, pn = torch.tensor([m]), torch.tensor([n])
        rq = apply_rotary_pos_emb(rotary(pm), q[None], rotary.scale(pm))
        rk = apply_rotary_pos_emb(rotary(pn), k[None], rotary.scale(pn) ** -1)
        return float(rq[0] @ rk[0])

    for delta in (0, 1, 5, -3):
        scores = torch.tensor([score(m + delta, m) for m in (0, 7, 31, 100)])
        assert_close(f"delta={delta}", scores, scores[:1].expand(4))
    assert abs(score(5, 0) - score(0, 0)) > 1e-6  # and it does depend on the difference


def test_rotary_gradcheck_and_single_step_broadcast():
    rotary = RotaryEmbedding(4, xpos_scale_base=8)
    pos = torch.arange(3)
    freqs, scale = rotary(pos, dtype=torch.float64), rotary.scale(pos, dtype=torch.float64)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=seeded(9), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rotary_pos_emb(freqs, t, scale), (x,))
    # decoding one position at a time equals the full-sequence rotation
    steps = [
        apply_rotary_pos_emb(rotary(pos[n : n + 1], dtype=torch.float64), x[:, n : n + 1])
        for n in range(3)
    ]
    assert_close("one step", torch.cat(steps, dim=1), apply_rotary_pos_emb(freqs, x))
    assert torch.equal(RotaryEmbedding(4).scale(pos), torch.ones(3, 4))


def test_rotary_bad_arguments():
    with pytest.raises(ValueError, match="dim must be even; got 5"):
        RotaryEmbedding(5)
    with pytest.raises(
        ValueError, match="xpos_scale_base must be a positive number or None; got 0"
    ):
        RotaryEmbedding(4, xpos_scale_base=0)
    freqs = RotaryEmbedding(8)(torch.arange(3))
    with pytest.raises(
        ValueError, match=r"freqs.shape\[-1\] must be even and at most t.shape\[-1\] = 6; got 8"
    ):
        apply_rotary_pos_emb(freqs, torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"freqs must have 4 positions .* got shape \(3, 8\)"):
        apply_rotary_pos_emb(freqs, torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"positions must have 1 dimensions; got shape \(1, 3\)"):
        RotaryEmbedding(8)(torch.arange(3)[None])


# ---------------------------------------------------------------- attend


def attend_reference(q, k, v, mask=None, causal=False, bias=None, scale=None):
    """Dense float64 softmax attention with masks; rows with nothing allowed give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, I, D = q.shape
    J = k.shape[2]
    k, v = k.expand(B, H, J, D), v.expand(B, H, J, v.shape[-1])
    scale = D**-0.5 if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = torch.ones(B, H, I, J, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    if causal:
        tri = torch.tensor([[kj <= qi + J - I for kj in range(J)] for qi in range(I)])
        allowed = allowed & tri.reshape(I, J)
    weights = torch.where(allowed, (scores - scores.amax(-1, keepdim=True)).exp(), 0.0)
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total > 0, weights / total.clamp(min=1e-300), 0.0)
    return torch.einsum("bhij,bhjd->bhid", weights, v)


ATTEND_CASES = [
    # B, H, Hkv, I, J, D, Dv, causal, mask, bias
    pytest.param(2, 3, 3, 5, 5, 4, 4, False, None, None, id="self-plain"),
    pytest.param(2, 3, 3, 5, 5, 4, 6, True, None, None, id="self-causal"),
    pytest.param(1, 2, 2, 3, 7, 8, 5, True, None, None, id="memory-causal-3of7"),
    pytest.param(2, 4, 1, 3, 11, 4, 4, True, None, "h", id="mqa-causal-bias"),
    pytest.param(3, 2, 2, 1, 13, 4, 4, False, "lengths", "bhij", id="step-lengths-bias"),
    pytest.param(2, 2, 1, 5, 3, 4, 4, True, None, None, id="more-queries-than-keys"),
    pytest.param(2, 3, 3, 4, 6, 5, 3, False, "random", "h", id="random-mask-empty-rows"),
    pytest.param(1, 1, 1, 1, 1, 2, 2, True, "ij", None, id="1x1"),
]


def _make_attend_inputs(B, H, Hkv, I, J, D, Dv, mask_kind, bias_kind, dtype):
    g = seeded(10)
    q = torch.randn(B, H, I, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, J, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, J, Dv, generator=g, dtype=torch.float64)
    mask = None
    if mask_kind == "lengths":
        lengths = torch.tensor([J, 1, 0][:B])  # the last row of the batch has no keys
        mask = (torch.arange(J)[None, :] < lengths[:, None])[:, None, None, :]
    elif mask_kind == "random":
        mask = torch.rand(B, 1, I, J, generator=g) > 0.5
        mask[0, 0, 1] = False  # one fully masked row
    elif mask_kind == "ij":
        mask = torch.ones(I, J, dtype=torch.bool)
    bias = None
    if bias_kind == "h":
        bias = torch.randn(H, I, J, generator=g, dtype=torch.float64)
    elif bias_kind == "bhij":
        bias = torch.randn(B, H, I, J, generator=g, dtype=torch.float64)
    tensors = [t.to(dtype) if t is not None else None for t in (q, k, v, bias)]
    return *tensors, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,I,J,D,Dv,causal,mask_kind,bias_kind", ATTEND_CASES)
def test_attend_matches_reference(B, H, Hkv, I, J, D, Dv, causal, mask_kind, bias_kind, dtype):
    q, k, v, bias, mask = _make_attend_inputs(B, H, Hkv, I, J, D, Dv, mask_kind, bias_kind, dtype)
    tensors = [t.requires_grad_() for t in (q, k, v, bias) if t is not None]
    out = attend(q, k, v, mask=mask, causal=causal, bias=bias)
    assert out.shape == (B, H, I, Dv) and out.dtype == dtype
    assert torch.isfinite(out).all()
    refs = [t.detach().double().requires_grad_() for t in tensors]
    ref_q, ref_k, ref_v, *ref_bias = refs
    expected = attend_reference(
        ref_q, ref_k, ref_v, mask, causal, ref_bias[0] if ref_bias else None
    )
    assert_close("out", out, expected)
    grad_out = torch.randn(out.shape, generator=seeded(11), dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    expected.backward(grad_out)
    for name, t, r in zip(["dq", "dk", "dv", "dbias"], tensors, refs, strict=False):
        assert_close(name, t.grad, r.grad)
        assert torch.isfinite(t.grad).all()


def test_attend_fully_masked_rows_are_zero_without_nan():
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    out = attend(q, k, k, causal=True)  # 4 queries, 2 keys: the first two see nothing
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2:].abs() > 0).any()
    out.sum().backward()
    assert (q.grad[:, :, :2] == 0).all() and torch.isfinite(k.grad).all()
    nothing = torch.zeros(3, 2, dtype=torch.bool)
    assert (attend(q[:, :, :3], k, k, mask=nothing) == 0).all()
    assert attend(q, k[:, :, :0], k[:, :, :0]).shape == (1, 2, 4, 3)


def test_attend_gradcheck():
    q, k, v, bias, mask = _make_attend_inputs(1, 2, 1, 3, 4, 2, 3, "random", "h", torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attend(q, k, v, mask=mask, causal=True, bias=b, scale=0.7), inputs
    )


def test_attend_scale_and_dropout():
    q, k, v, _, _ = _make_attend_inputs(2, 2, 2, 4, 4, 8, 8, None, None, torch.float64)
    assert_close("scale", attend(q, k, v, scale=0.3), attend_reference(q, k, v, scale=0.3))
    inference = attend(q, k, v, dropout_p=0.5)  # training=False: no dropout
    assert_close("eval dropout", inference, attend_reference(q, k, v))
    torch.manual_seed(0)
    assert not torch.allclose(attend(q, k, v, dropout_p=0.5, training=True), inference)


def test_causal_mask():
    assert causal_mask(2, 5).tolist() == [[True] * 4 + [False], [True] * 5]
    assert causal_mask(3, 3).equal(torch.ones(3, 3, dtype=torch.bool).tril())


def test_attend_bad_inputs():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match=r"k must have shape \(B, H or 1, J, ·\) = \(2, 4 or 1, 5"):
        attend(q, torch.randn(2, 2, 5, 8), k)
    with pytest.raises(ValueError, match="q and k must have the same feature size; got 8 and 6"):
        attend(q, torch.randn(2, 4, 5, 6), k)
    with pytest.raises(ValueError, match=r"v must have shape .* got \(2, 4, 6, 8\)"):
        attend(q, k, torch.randn(2, 4, 6, 8))
    with pytest.raises(TypeError, match=r"k must have dtype torch.float32; got torch.float64"):
        attend(q, k.double(), k)
    with pytest.raises(TypeError, match=r"mask must have dtype torch.bool; got torch.float32"):
        attend(q, k, k, mask=torch.ones(3, 5))
    with pytest.raises(
        ValueError,
        match=r"mask must be broadcastable to \(B, H, I, J\) = \(2, 4, 3, 5\); got shape \(3, 4\)",
    ):
        attend(q, k, k, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bias must be broadcastable .* got shape \(5, 3, 5\)"):
        attend(q, k, k, bias=torch.randn(5, 3, 5))
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\); got 1.5"):
        attend(q, k, k, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"q must have 4 dimensions; got shape \(4, 3, 8\)"):
        attend(q[0], k, k)
