"""Feature maps: the kernels they estimate (statistically, with fixed seeds), their exact
formulas for a given random matrix, redraw semantics and their use in linear attentions."""

from __future__ import annotations

import math

import pytest
import torch

from attention_core.attention.causal_linear_attention import CausalLinearAttention
from attention_core.attention.full_attention import FullAttention
from attention_core.attention.linear_attention import LinearAttention
from attention_core.feature_maps import (
    ActivationFunctionFeatureMap,
    Favor,
    FeatureMap,
    GeneralizedRandomFeatures,
    RandomFourierFeatures,
    SmoothedRandomFourierFeatures,
    elu_feature_map,
)
from attention_core.feature_maps.fourier_features import orthogonal_random_matrix_
from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
from attention_core.testing import assert_close, seeded

# helpers


def drawn(feature_map: FeatureMap, seed: int = 0) -> FeatureMap:
    """``feature_map`` in float64 after drawing its random matrix with ``seed``."""
    torch.manual_seed(seed)
    feature_map.new_feature_map("cpu")
    feature_map.omega = feature_map.omega.double()
    return feature_map


def point_pairs(E: int, seed: int = 0, scale: float = 1.0):
    """Pairs ``(x, y)`` of shape ``(P, E)`` at distances from 0 to about 3 * scale."""
    g = seeded(seed)
    x = torch.randn(12, E, generator=g, dtype=torch.float64) * scale
    direction = torch.nn.functional.normalize(torch.randn(12, E, generator=g, dtype=torch.float64))
    y = x + direction * torch.linspace(0, 3, 12, dtype=torch.float64)[:, None] * scale
    return x, y


def kernel(feature_map: FeatureMap, x, y):
    return (feature_map(x) * feature_map(y)).sum(-1)


# random Fourier features


@pytest.mark.parametrize(("E", "orthogonal"), [(4, False), (16, True)], ids=["iid", "orthogonal"])
def test_random_fourier_features_approximate_the_rbf_kernel(E, orthogonal):
    t = 0.6
    rff = drawn(RandomFourierFeatures(E, n_dims=20000, softmax_temp=t, orthogonal=orthogonal))
    x, y = point_pairs(E)
    expected = torch.exp(-t * ((x - y) ** 2).sum(-1) / 2)
    # each estimate averages 10000 cosines: standard deviation below 0.0071
    assert (kernel(rff, x, y) - expected).abs().max() < 0.035
    assert expected.min() < 0.1 and expected.max() == 1.0


def test_random_fourier_features_formula():
    E = 3
    for n_dims in (2, 7, 10):
        rff = drawn(RandomFourierFeatures(E, n_dims=n_dims, softmax_temp=0.3), seed=n_dims)
        assert rff.omega.shape == (E, n_dims // 2)
        x, y = point_pairs(E, seed=n_dims)
        # the mean over the drawn frequencies of cos(w . (x - y) sqrt(t))
        expected = torch.cos(math.sqrt(0.3) * (x - y) @ rff.omega).mean(-1)
        assert_close(f"kernel n_dims={n_dims}", kernel(rff, x, y), expected)
        assert rff(x).shape == (12, 2 * (n_dims // 2))


def test_random_fourier_features_default_temperature_and_size():
    rff = RandomFourierFeatures(16)
    assert rff.n_dims == 16 and rff.softmax_temp == pytest.approx(0.25)
    with pytest.raises(ValueError, match="n_dims must be at least 2; got 1"):
        RandomFourierFeatures(4, n_dims=1)
    with pytest.raises(ValueError, match="redraw must be a positive int; got 0"):
        RandomFourierFeatures(4, redraw=0)


def test_smoothed_features_add_smoothing_to_the_kernel():
    E, t, s = 4, 0.6, 2.0
    smoothed = drawn(SmoothedRandomFourierFeatures(E, n_dims=9, softmax_temp=t, smoothing=s))
    x, y = point_pairs(E, seed=3)
    features = smoothed(x)
    assert features.shape == (12, 9)
    assert_close("constant feature", features[:, -1], torch.full((12,), math.sqrt(s)))
    expected = torch.cos(math.sqrt(t) * (x - y) @ smoothed.omega).mean(-1) + s
    assert_close("kernel", kernel(smoothed, x, y), expected)

    many = drawn(SmoothedRandomFourierFeatures(E, n_dims=20001, softmax_temp=t, smoothing=s))
    rbf = torch.exp(-t * ((x - y) ** 2).sum(-1) / 2)
    assert (kernel(many, x, y) - (rbf + s)).abs().max() < 0.035


def test_smoothed_default_size_is_unbiased():
    # default n_dims = E leaves an odd number of Fourier features for even E
    smoothed = drawn(SmoothedRandomFourierFeatures(8, smoothing=0.5), seed=1)
    assert smoothed.omega.shape == (8, 3)
    x = torch.randn(5, 8, dtype=torch.float64)
    assert_close("k(x, x)", kernel(smoothed, x, x), torch.full((5,), 1.5, dtype=torch.float64))


# FAVOR+


def softmax_kernel_pairs(E: int, seed: int = 0):
    """Pairs ``(x, y)`` of shape ``(24, E)`` with ``x . y`` from about -2.2 to 0.1 but
    ``|x + y| <= 0.4``, where the positive random features have a small variance."""
    g = seeded(seed)

    def unit():
        return torch.nn.functional.normalize(torch.randn(12, E, generator=g, dtype=torch.float64))

    x = unit() * torch.linspace(0.1, 1.5, 12, dtype=torch.float64)[:, None]
    y = -x + unit() * torch.linspace(0.0, 0.4, 12, dtype=torch.float64)[:, None]
    small = unit() * 0.3
    same_line = small * torch.linspace(-1, 1, 12, dtype=torch.float64)[:, None]
    return torch.cat([x, small]), torch.cat([y, same_line])


@pytest.mark.parametrize(
    ("E", "n_dims", "orthogonal"), [(4, 20000, False), (16, 4000, True)], ids=["iid", "orthogonal"]
)
def test_favor_approximates_the_softmax_kernel(E, n_dims, orthogonal):
    t = 0.5
    favor = drawn(Favor(E, n_dims=n_dims, softmax_temp=t, orthogonal=orthogonal), seed=2)
    x, y = softmax_kernel_pairs(E, seed=5)
    expected = torch.exp(t * (x * y).sum(-1))
    assert expected.min() < 0.4 and expected.max() > 1.0
    # relative standard deviation below 0.005 here; a wrong temperature or normaliser
    # is off by 10% or more
    relative_error = (kernel(favor, x, y) / expected - 1).abs().max()
    assert relative_error < 0.015
    assert (favor(x) > 0).all()


def test_favor_formula():
    E = 3
    for n_dims in (2, 5, 8):
        favor = drawn(Favor(E, n_dims=n_dims, softmax_temp=0.7), seed=n_dims)
        x, y = point_pairs(E, seed=n_dims)
        xs, ys = math.sqrt(0.7) * x, math.sqrt(0.7) * y
        # mean over the drawn w of cosh-like pairs: (e^{w.x'} e^{w.y'} + e^{-w.x'} e^{-w.y'}) / 2
        u = (xs + ys) @ favor.omega
        scale = torch.exp(-((xs**2).sum(-1) + (ys**2).sum(-1)) / 2)
        expected = scale * torch.cosh(u).mean(-1)
        assert_close(f"kernel n_dims={n_dims}", kernel(favor, x, y), expected)


def linear_attention_with(feature_map, q, k, v):
    """Normalised linear attention ``phi(q) phi(k)^T v / phi(q) sum phi(k)``, float64."""
    phi_q = feature_map(q)
    phi_k = feature_map(k)
    A = torch.einsum("nlhf,nshf->nhls", phi_q, phi_k)
    return torch.einsum("nhls,nshd->nlhd", A / A.sum(-1, keepdim=True), v)


def test_favor_stabilize_gives_the_same_normalised_attention():
    E = 4
    g = seeded(7)
    q = torch.randn(2, 9, 3, E, generator=g, dtype=torch.float64) * 3
    k = torch.randn(2, 11, 3, E, generator=g, dtype=torch.float64) * 3
    v = torch.randn(2, 11, 3, 5, generator=g, dtype=torch.float64)
    plain = drawn(Favor(E, n_dims=32), seed=4)
    stable = Favor(E, n_dims=32, stabilize=True)
    stable.omega = plain.omega.clone()
    assert not torch.allclose(stable(q), plain(q))
    assert stable(q).max() < plain(q).max()
    assert_close(
        "attention",
        linear_attention_with(stable, q, k, v),
        linear_attention_with(plain, q, k, v),
    )


def test_favor_stabilize_warns_on_unexpected_shapes():
    favor = drawn(Favor(4, stabilize=True))
    with pytest.warns(UserWarning, match="does not have the shape"):
        favor(torch.randn(3, 4, dtype=torch.float64))
    with pytest.warns(UserWarning, match="fewer positions than heads"):
        favor(torch.randn(1, 2, 8, 4, dtype=torch.float64))


# generalized random features


def test_generalized_random_features_apply_kernel_fn_to_the_projection():
    E = 5
    grf = drawn(GeneralizedRandomFeatures(E, n_dims=7, kernel_fn=torch.abs))
    assert grf.omega.shape == (E, 7)
    x = torch.randn(4, 3, E, dtype=torch.float64)
    assert_close("phi", grf(x), torch.abs(x @ grf.omega))
    default = drawn(GeneralizedRandomFeatures(E, softmax_temp=0.25), seed=1)
    assert default.omega.shape == (E, E)
    assert_close("phi relu", default(x), torch.relu(0.5 * x @ default.omega))


# orthogonal random matrices


def test_orthogonal_random_matrix_blocks():
    rows, columns = 6, 15
    w = orthogonal_random_matrix_(torch.empty(rows, columns, dtype=torch.float64))
    for start in range(0, columns, rows):
        block = w[:, start : start + rows]
        gram = block.T @ block
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-10, f"block at {start}"
    across = w[:, :rows].T @ w[:, rows : 2 * rows]
    assert across.abs().max() > 1e-3


def test_orthogonal_random_matrix_norms_follow_chi():
    torch.manual_seed(0)
    rows = 16
    w = orthogonal_random_matrix_(torch.empty(rows, rows * 100))
    squared_norms = (w**2).sum(0)
    # |g|^2 ~ chi^2(16) for g ~ N(0, I_16): mean 16, variance 32; over 1600 samples the
    # mean has std 0.14 and the sample variance std 1.3 (unit columns would give 1 and 0)
    assert abs(squared_norms.mean().item() - rows) < 0.7
    assert abs(squared_norms.var().item() - 2 * rows) < 6.5


# redraw semantics


def omegas_after_calls(feature_map, calls):
    seen = []
    torch.manual_seed(0)
    for _ in range(calls):
        feature_map.new_feature_map("cpu")
        seen.append(feature_map.omega.clone())
    return seen


@pytest.mark.parametrize("redraw", [1, 3], ids=["every-call", "every-3"])
def test_redraw_every_n_calls(redraw):
    seen = omegas_after_calls(RandomFourierFeatures(4, redraw=redraw), 7)
    changed = [i for i in range(1, 7) if not torch.equal(seen[i], seen[i - 1])]
    assert changed == list(range(redraw, 7, redraw))
    assert seen[0].abs().sum() > 0


def test_deterministic_eval_freezes_the_matrix():
    favor = Favor(4, deterministic_eval=True)
    favor.new_feature_map("cpu")
    frozen = favor.omega.clone()
    favor.eval()
    seen = omegas_after_calls(favor, 3)
    assert all(torch.equal(o, frozen) for o in seen)
    favor.train()
    assert not torch.equal(omegas_after_calls(favor, 1)[0], frozen)


def test_eval_without_deterministic_eval_still_redraws():
    favor = Favor(4).eval()
    first, second = omegas_after_calls(favor, 2)
    assert not torch.equal(first, second)


# factories and deterministic maps


def test_factory_passes_arguments():
    make = Favor.factory(n_dims=10, stabilize=True)
    favor = make(6)
    assert isinstance(favor, Favor)
    assert (favor.query_dims, favor.n_dims, favor.stabilize) == (6, 10, True)
    smoothed = SmoothedRandomFourierFeatures.factory(12, None, False, 0.5)(4)
    assert smoothed.omega.shape == (4, 5) and smoothed.smoothing == 0.5
    assert make(3) is not make(3)


def test_elu_feature_map_is_positive():
    phi = elu_feature_map(7)
    assert isinstance(phi, ActivationFunctionFeatureMap) and phi.query_dims == 7
    phi.new_feature_map("cpu")
    x = torch.linspace(-30, 30, 601, dtype=torch.float64)
    assert (phi(x) > 0).all()
    assert_close("elu + 1", phi(x), torch.where(x < 0, torch.exp(x), x + 1))
    assert_close("queries == keys", phi.forward_queries(x), phi.forward_keys(x))


def test_base_feature_map_is_abstract():
    with pytest.raises(NotImplementedError):
        FeatureMap(3).new_feature_map("cpu")


# use in linear attentions


def test_linear_attention_with_favor_matches_its_features():
    N, L, S, H, E = 2, 7, 10, 2, 4
    g = seeded(3)
    q = torch.randn(N, L, H, E, generator=g)
    k = torch.randn(N, S, H, E, generator=g)
    v = torch.randn(N, S, H, 3, generator=g)
    attention = LinearAttention(E, feature_map=Favor.factory(n_dims=16))
    assert isinstance(attention.feature_map, Favor) and attention.feature_map.n_dims == 16
    lengths = LengthMask(torch.tensor([S, S]))
    out = attention(q, k, v, FullMask(L, S), LengthMask(torch.tensor([L, L])), lengths)
    expected = linear_attention_with(attention.feature_map, q.double(), k.double(), v.double())
    assert_close("out", out, expected, rtol=1e-4, atol=1e-5)


def test_causal_linear_attention_with_favor_matches_its_features():
    N, L, H, E = 2, 9, 2, 4
    g = seeded(4)
    q, k = torch.randn(2, N, L, H, E, generator=g, dtype=torch.float64)
    v = torch.randn(N, L, H, 3, generator=g, dtype=torch.float64)
    attention = CausalLinearAttention(E, feature_map=Favor.factory(n_dims=16), eps=0.0)
    lengths = LengthMask(torch.tensor([L, L]))
    out = attention(q, k, v, TriangularCausalMask(L), lengths, lengths)
    phi = attention.feature_map
    A = torch.einsum("nlhf,nshf->nhls", phi(q), phi(k)).tril()
    expected = torch.einsum("nhls,nshd->nlhd", A / A.sum(-1, keepdim=True), v)
    assert_close("out", out, expected)


def test_linear_attention_with_many_favor_features_approximates_softmax():
    N, L, H, E = 1, 6, 2, 4
    g = seeded(8)
    q = torch.randn(N, L, H, E, generator=g, dtype=torch.float64) * 0.5
    k = torch.randn(N, L, H, E, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(N, L, H, 3, generator=g, dtype=torch.float64)
    masks = FullMask(L), LengthMask(torch.tensor([L])), LengthMask(torch.tensor([L]))
    torch.manual_seed(1)
    linear = LinearAttention(E, feature_map=Favor.factory(n_dims=20000))
    expected = FullAttention(attention_dropout=0.0)(q, k, v, *masks)
    # uniform attention would be 0.29 away
    assert (expected - v.mean(1, keepdim=True)).abs().max() > 0.2
    assert (linear(q, k, v, *masks) - expected).abs().max() < 0.05
