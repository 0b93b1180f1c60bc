"""The accepting fast paths of the step ops' checks (``residual_step`` and ``linear_step``):
whatever they accept, the full checks accept too (so no wrong argument skips a message), and
they accept the common case (so the step takes them). Arguments are drawn by hypothesis from
valid ones with one or more of them broken: wrong shapes, dtypes, devices, types, options."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_core.linear_step import _op as step_op
from attention_core.residual_step import _op as residual_op


def _breakers():
    """Ways to break a tensor argument (the identity first)."""
    return [
        lambda t: t,
        lambda t: None,
        lambda t: t[..., :1] if t is not None and t.dim() else t,
        lambda t: t[:1] if t is not None and t.dim() else t,
        lambda t: t.double() if t is not None else t,
        lambda t: t.long() if t is not None else t,
        lambda t: t.to("meta") if t is not None else t,
        lambda t: t.unsqueeze(0) if t is not None else t,
        lambda t: t.tolist() if t is not None else t,
        lambda t: torch.nn.Parameter(t) if t is not None and t.is_floating_point() else t,
    ]


BREAKERS = _breakers()
EPS = [1e-5, 0.0, -1.0, math.nan, math.inf, 1, True, "1e-5"]
BOOLS = [True, False, 1, None]


def _full_check_accepts(module, fast: str, check: str, args) -> bool:
    """Whether ``module.check`` accepts ``args`` with its fast path turned off."""
    with mock.patch.object(module, fast, lambda *args: False):
        try:
            getattr(module, check)(*args)
        except (TypeError, ValueError):
            return False
    return True


def _ff_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g)
    return [x, torch.randn(6, 4), torch.randn(6), torch.randn(4, 6), torch.randn(4),
            torch.randn(4), torch.randn(4)]  # fmt: skip


def _linear_args():
    return [torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5), torch.randn(4),
            torch.randn(4), torch.randn(4)]  # fmt: skip


def _step_args():
    return [torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 5),
            torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4)]  # fmt: skip


def test_the_fast_paths_accept_the_common_case():
    x, w1, b1, w2, b2, g, b = _ff_args()
    assert residual_op._feed_forward_accepted(x, w1, b1, w2, b2, g, b, "relu", False, 1e-5)
    assert residual_op._feed_forward_accepted(x, w1, None, w2, None, None, None, "gelu", True, 0.0)
    x, a, w, bias, g, b = _linear_args()
    assert residual_op._linear_accepted(x, a, w, bias, True, g, b, 1e-5)
    assert residual_op._linear_accepted(x, a, torch.nn.Parameter(w), None, False, None, None, 0.0)
    q, k, v, S, Z = _step_args()
    assert step_op._step_accepted(q, k, v, S, Z, 1e-6)
    assert step_op._step_accepted(q, k, v, None, None, 0.0)


@settings(max_examples=400, deadline=None)
@given(
    breaks=st.lists(st.integers(0, len(BREAKERS) - 1), min_size=7, max_size=7),
    activation=st.sampled_from(["relu", "gelu", "geglu", "swish", None]),
    norm_first=st.sampled_from(BOOLS),
    eps=st.sampled_from(EPS),
)
def test_feed_forward_fast_path_accepts_only_what_the_checks_accept(
    breaks, activation, norm_first, eps
):
    args = [BREAKERS[i](t) for i, t in zip(breaks, _ff_args())] + [activation, norm_first, eps]
    if residual_op._feed_forward_accepted(*args):
        assert _full_check_accepts(
            residual_op, "_feed_forward_accepted", "check_feed_forward", args
        )


@settings(max_examples=400, deadline=None)
@given(
    breaks=st.lists(st.integers(0, len(BREAKERS) - 1), min_size=6, max_size=6),
    norm=st.sampled_from(BOOLS),
    eps=st.sampled_from(EPS),
)
def test_linear_fast_path_accepts_only_what_the_checks_accept(breaks, norm, eps):
    x, a, w, bias, g, b = (BREAKERS[i](t) for i, t in zip(breaks, _linear_args()))
    args = (x, a, w, bias, norm, g, b, eps)
    if residual_op._linear_accepted(*args):
        assert _full_check_accepts(residual_op, "_linear_accepted", "check_linear", args)


@settings(max_examples=400, deadline=None)
@given(
    breaks=st.lists(st.integers(0, len(BREAKERS) - 1), min_size=5, max_size=5),
    eps=st.sampled_from(EPS),
)
def test_linear_step_fast_path_accepts_only_what_the_checks_accept(breaks, eps):
    args = [BREAKERS[i](t) for i, t in zip(breaks, _step_args())] + [eps]
    if step_op._step_accepted(*args):
        assert _full_check_accepts(step_op, "_step_accepted", "check_step", args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_linear_step_fast_path_wants_a_float32_state_for_half_inputs(dtype):
    q, k, v, S, Z = (t.to(dtype) for t in _step_args())
    assert not step_op._step_accepted(q, k, v, S, Z, 1e-6)
    assert step_op._step_accepted(q, k, v, S.float(), Z.float(), 1e-6)
