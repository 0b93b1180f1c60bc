"""Inference speed-up of the recurrent layers: each residual sublayer of a step in one call.

A step works on one element of each sequence (``N`` rows), so the layer's small ops (output
projection, residual add, layer norm, the feed-forward products and activation) cost more in
dispatch than in arithmetic. Without autograd and dropout a layer runs its sublayers as
`attention_core.residual_step.residual_linear` (output projection, residual and norm) and
`attention_core.residual_step.residual_feed_forward` (the post-norm feed-forward block): the
same formulas as the composed modules, two calls instead of about a dozen ops. Tests prove
the two paths equal in float64.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_core.residual_step import MIN_ROWS, residual_feed_forward, residual_linear

__all__ = ["attention_sublayer", "feed_forward_sublayer", "fused_step_enabled"]

_ACTIVATION_NAMES = {F.relu: "relu", F.gelu: "gelu"}


def _plain_norm(norm: Any) -> bool:
    return isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks are registered on ``module`` or its output projection (the fused
    step calls neither)."""
    modules = (module, getattr(module, "out_projection", None))
    return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def fused_step_enabled(
    layer: Any, x: Tensor, norms: tuple[Any, ...], attentions: tuple[Any, ...]
) -> bool:
    """Whether ``layer``'s step of ``x`` ``(N, E)`` may run fused.

    That is: at least ``MIN_ROWS`` rows (with fewer the composed ops are faster), no autograd
    recording, no dropout (evaluation or ``p == 0``), a relu or gelu feed-forward activation,
    ``nn.LayerNorm`` norms over the last dimension, and attention layers that have a ``heads``
    method and no forward hooks."""
    if x.shape[0] < MIN_ROWS:
        return False
    if torch.is_grad_enabled() or (layer.training and layer.dropout.p):
        return False
    if layer.activation not in _ACTIVATION_NAMES or not all(_plain_norm(n) for n in norms):
        return False
    return all(hasattr(a, "heads") and not _hooked(a) for a in attentions)


def attention_sublayer(x: Tensor, heads: Tensor, out_projection: nn.Linear, norm: Any) -> Tensor:
    """``norm(x + out_projection(heads))`` for ``x`` ``(N, E)`` and ``heads`` ``(N, H D)``."""
    return residual_linear(
        x, heads, out_projection.weight, out_projection.bias, norm.weight, norm.bias,
        norm=True, eps=norm.eps,
    )  # fmt: skip


def feed_forward_sublayer(layer: Any, x: Tensor, norm: Any) -> Tensor:
    """``norm(x + linear2(act(linear1(x))))`` of ``layer`` for ``x`` ``(N, E)``."""
    return residual_feed_forward(
        x, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias,
        norm.weight, norm.bias, activation=_ACTIVATION_NAMES[layer.activation],
        norm_first=False, eps=norm.eps,
    )  # fmt: skip
