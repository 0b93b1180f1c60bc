"""The per-step path of recurrent linear attention: the fused step (attention_core.linear_step)
against the plain formula in float64 for both feature-map paths, the state passed in left
untouched (beam search branches from it), checks done once by the model while layers called
directly still check, the one-reduction finiteness test, and torch.compile(fullgraph=True) of
a model step."""

import pytest
import torch

from attention_core.feature_maps import ActivationFunctionFeatureMap
from attention_core.testing import assert_close
from recurrent_transformer._checks import check_finite
from recurrent_transformer.attention import RecurrentLinearAttention
from recurrent_transformer.builders import RecurrentEncoderBuilder
from recurrent_transformer.state import LinearState


def formula(phi, q, k, v, S, Z, eps):
    a, b = phi(q), phi(k)
    S = S + torch.einsum("nhe,nhm->nhem", b, v)
    Z = Z + b
    out = torch.einsum("nhe,nhem->nhm", a, S) / (torch.einsum("nhe,nhe->nh", a, Z)[..., None] + eps)
    return out, S, Z


@pytest.mark.parametrize("feature_map", ["elu", "relu+1"])
def test_step_equals_the_formula_and_keeps_the_old_state(feature_map):
    """elu(x)+1 runs inside the fused op; any other map is applied first."""
    if feature_map == "elu":
        attention = RecurrentLinearAttention(4, eps=0.1)

        def phi(x):
            return torch.nn.functional.elu(x) + 1
    else:

        def phi(x):
            return torch.relu(x) + 1

        attention = RecurrentLinearAttention(
            4, feature_map=ActivationFunctionFeatureMap.factory(phi), eps=0.1
        )
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    S = torch.rand(3, 2, 4, 5, generator=g, dtype=torch.float64)
    Z = torch.rand(3, 2, 4, generator=g, dtype=torch.float64) + 1
    state = LinearState(S.clone(), Z.clone())
    out, new = attention(q, k, v, state)
    expected = formula(phi, q, k, v, S, Z, 0.1)
    for name, got, want in zip(("out", "S", "Z"), (out, new.S, new.Z), expected):
        assert_close(name, got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(state.S, S) and torch.equal(state.Z, Z)  # untouched: branch again
    again, _ = attention(q, k, v, state)
    assert torch.equal(again, out)


def small_model():
    torch.manual_seed(0)
    return (
        RecurrentEncoderBuilder.from_kwargs(
            attention_type="linear", n_layers=2, n_heads=2, query_dimensions=4,
            value_dimensions=4, feed_forward_dimensions=16,
        )
        .get()
        .eval()
    )  # fmt: skip


def test_layers_called_directly_still_check_their_input():
    model = small_model()
    with pytest.raises(ValueError, match=r"x must have shape \(N, 8\); got \(3, 7\)"):
        model.layers[0](torch.rand(3, 7))
    with pytest.raises(ValueError, match=r"query must have shape \(N, 8\)"):
        model.layers[0].attention(torch.rand(3, 7), torch.rand(3, 7), torch.rand(3, 7))
    with pytest.raises(TypeError, match="x"):
        model(torch.rand(3, 8, dtype=torch.float64))  # the model checks the dtype once


def test_finiteness_is_exact_when_the_sum_overflows():
    big = torch.full((4, 8), 3e38)  # finite, but the sum overflows to inf
    check_finite("x", big)  # no error
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.rand(4, 8)
        x[2, 3] = bad
        with pytest.raises(ValueError, match="x holds NaN or infinite values"):
            check_finite("x", x)


def test_a_model_step_compiles_without_graph_breaks():
    model = small_model()
    x = torch.randn(3, 8)
    with torch.no_grad():
        _, state = model(x)
        expected, expected_state = model(x, state=state)
        step = torch.compile(lambda x, s: model(x, state=s), backend="aot_eager", fullgraph=True)
        out, new_state = step(x, state)
    assert_close("out", out, expected)
    for i, (a, b) in enumerate(zip(new_state, expected_state)):
        assert_close(f"layer {i} S", a.S, b.S)
        assert_close(f"layer {i} Z", a.Z, b.Z)
