"""This module holds the plain-PyTorch forms of the residual sublayer steps.

They are the oracle of the tests and the path for autograd, for dtypes and devices without a
compiled kernel. Shapes: ``x`` `(..., D)`, hidden width ``F``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "residual_feed_forward_reference", "residual_linear_reference"]

# the activations of the feed-forward sublayer, by name, in the order of the kernel's codes
ACTIVATIONS = ("relu", "gelu", "geglu")


def _activate(hidden: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return F.relu(hidden)
    if activation == "gelu":
        return F.gelu(hidden)
    value, gate = hidden.chunk(2, dim=-1)
    return value * F.gelu(gate)


def residual_feed_forward_reference(
    x: Tensor,
    linear1_weight: Tensor,
    linear1_bias: Tensor | None,
    linear2_weight: Tensor,
    linear2_bias: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    activation: str = "relu",
    norm_first: bool = False,
    eps: float = 1e-5,
) -> Tensor:
    """Apply a feed-forward sublayer with its residual connection and layer norm.

    Pre-norm (``norm_first``): ``x + W2 act(W1 LN(x) + b1) + b2``; post-norm:
    ``LN(x + W2 act(W1 x + b1) + b2)``. ``act`` is ``relu``, ``gelu`` (exact, erf form) or
    ``geglu``: ``W1 a + b1`` is split in halves ``[value, gate]`` and ``act = value * gelu(gate)``.

    Arguments:
        x: `(..., D)`.
        linear1_weight: `(F, D)`, or `(2 F, D)` for ``geglu``.
        linear1_bias: `(F,)` / `(2 F,)` or ``None``.
        linear2_weight: `(D, F)`.
        linear2_bias: `(D,)` or ``None``.
        norm_weight: `(D,)` or ``None`` (no scale).
        norm_bias: `(D,)` or ``None`` (no shift).
        activation: ``"relu"``, ``"gelu"`` or ``"geglu"``.
        norm_first: pre-norm (True) or post-norm (False).
        eps: the layer norm's epsilon.

    Returns:
        `(..., D)`.
    """
    shape = (x.shape[-1],)
    a = F.layer_norm(x, shape, norm_weight, norm_bias, eps) if norm_first else x
    hidden = _activate(F.linear(a, linear1_weight, linear1_bias), activation)
    y = x + F.linear(hidden, linear2_weight, linear2_bias)
    return y if norm_first else F.layer_norm(y, shape, norm_weight, norm_bias, eps)


def residual_linear_reference(
    x: Tensor,
    inputs: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    norm: bool = False,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Add a projection of ``inputs`` to ``x``, then (``norm``) apply a layer norm.

    ``y = x + inputs W^T + b``, and ``LN(y)`` when ``norm`` is set (a post-norm sublayer's
    output projection, residual and norm).

    Arguments:
        x: `(..., D)` the residual.
        inputs: `(..., K)`, the same leading shape as ``x``.
        weight: `(D, K)`.
        bias: `(D,)` or ``None``.
        norm: apply the layer norm after the residual add.
        norm_weight: `(D,)` or ``None`` (no scale).
        norm_bias: `(D,)` or ``None`` (no shift).
        eps: the layer norm's epsilon.

    Returns:
        `(..., D)`.
    """
    y = x + F.linear(inputs, weight, bias)
    if norm:
        y = F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, eps)
    return y
