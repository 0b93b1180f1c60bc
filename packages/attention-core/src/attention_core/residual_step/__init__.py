"""This module applies a transformer's residual sublayers to a few rows in one call each.

A recurrent model, or one with a memory, steps one element (or a short window) of each
sequence at a time, so each sublayer works on a few rows: its dense products are bound by
reading the weights, and everything around them (layer norm, bias, activation, residual
add) costs more in dispatched ops than in arithmetic. These ops run a whole sublayer in one call:

- `residual_feed_forward`: the position-wise feed-forward sublayer with its residual and its
  layer norm, pre-norm ``x + W2 act(W1 LN(x) + b1) + b2`` or post-norm
  ``LN(x + W2 act(W1 x + b1) + b2)``, with ``act`` ``relu``, ``gelu`` or ``geglu``;
- `residual_linear`: an output projection with its residual, optionally followed by a layer
  norm, ``x + inputs W^T + b`` or ``LN(x + inputs W^T + b)``.

Implementations behind each function: the plain-PyTorch reference
(`attention_core.residual_step.reference`), the oracle of the tests and the path for other
dtypes and devices; and the compiled CPU kernel of ``attention_core._C``
(``csrc/residual_step.h``) for float32 and float64 CPU tensors: each block of four weight rows
is read once for every input row, the output columns split over torch's thread pool, the
norm, bias, activation and residual fused into the passes around the products.
``ATTENTION_CORE_FORCE_REFERENCE=1`` forces the reference.

Both are the ``torch.library`` ops ``torch.ops.attention_core.residual_feed_forward`` and
``torch.ops.attention_core.residual_linear``, with fake registrations for ``torch.compile``;
their backward differentiates the reference (the kernels serve inference, where a step is
taken under ``torch.no_grad``).

`PreparedFeedForward` and `PreparedResidualLinear` hold one sublayer's weights for many calls
(the windows of a forward pass, the steps of a decoding loop): they are checked with its
first call, and later calls check the inputs and compare the weights' layout with what was
checked.
"""

from __future__ import annotations

from torch import Tensor

from ._op import feed_forward, linear
from .prepared import PreparedFeedForward, PreparedResidualLinear
from .reference import ACTIVATIONS, residual_feed_forward_reference, residual_linear_reference

__all__ = [
    "ACTIVATIONS",
    "MIN_ROWS",
    "PreparedFeedForward",
    "PreparedResidualLinear",
    "residual_feed_forward",
    "residual_feed_forward_reference",
    "residual_linear",
    "residual_linear_reference",
]


#: The fewest rows at which these calls beat the composed torch ops they replace, measured in
#: the 8-layer step of a recurrent encoder (d_model 384, feed-forward 1536): with 1 thread the
#: calls were 3-10% faster already at one or two rows, with 2 threads the composed ops were
#: 2-4% faster there; from 3 rows on the calls are faster with either.
MIN_ROWS = 3


def residual_feed_forward(
    x: Tensor,
    linear1_weight: Tensor,
    linear1_bias: Tensor | None,
    linear2_weight: Tensor,
    linear2_bias: Tensor | None,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    *,
    activation: str = "relu",
    norm_first: bool = False,
    eps: float = 1e-5,
) -> Tensor:
    """Apply a position-wise feed-forward sublayer with its residual connection and layer norm.

    Pre-norm (``norm_first=True``): ``x + W2 act(W1 LN(x) + b1) + b2``; post-norm
    (``norm_first=False``, the original transformer's and fast-transformers' layers):
    ``LN(x + W2 act(W1 x + b1) + b2)``. ``act`` is ``relu``, ``gelu`` (the exact erf form) or
    ``geglu`` (Shazeer 2020, arXiv 2002.05202): ``W1 a + b1`` is split in halves
    ``[value, gate]`` and ``act = value * gelu(gate)``. The weights are those of
    ``nn.Linear`` layers, e.g. ``linear1.weight``; the norm those of an ``nn.LayerNorm``.

    Differentiable (the backward differentiates the reference); works under
    ``torch.compile``. Dropout is not part of the op: use it in evaluation.

    Arguments:
        x: `(..., D)` the sublayer's input.
        linear1_weight: `(F, D)`, or `(2 F, D)` for ``geglu``.
        linear1_bias: `(F,)` / `(2 F,)` or ``None``.
        linear2_weight: `(D, F)`.
        linear2_bias: `(D,)` or ``None``.
        norm_weight: `(D,)` the layer norm's scale, or ``None`` (no scale).
        norm_bias: `(D,)` the layer norm's shift, or ``None`` (no shift).
        activation: ``"relu"`` (default), ``"gelu"`` or ``"geglu"``.
        norm_first: pre-norm (True) or post-norm (False, default).
        eps: the layer norm's epsilon (default: 1e-5).

    Returns:
        `(..., D)`, a new tensor.

    Raises:
        TypeError: a tensor argument is missing, not a tensor or of another dtype than ``x``.
        ValueError: a shape or device disagrees, ``activation`` is unknown or ``eps`` is
            negative or not finite.

    Example:
        >>> x = torch.rand(4, 16)
        >>> w1, b1 = torch.rand(64, 16), torch.rand(64)
        >>> w2, b2 = torch.rand(16, 64), torch.rand(16)
        >>> g, b = torch.ones(16), torch.zeros(16)
        >>> y = residual_feed_forward(x, w1, b1, w2, b2, g, b)
        >>> y.shape
        torch.Size([4, 16])
    """
    return feed_forward(
        x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight, norm_bias,
        activation, norm_first, eps,
    )  # fmt: skip


def residual_linear(
    x: Tensor,
    inputs: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    *,
    norm: bool = False,
    eps: float = 1e-5,
) -> Tensor:
    """Add a linear projection of ``inputs`` to ``x``, then optionally apply a layer norm.

    ``y = x + inputs W^T + b``, and ``LN(y)`` with ``norm=True``: an attention sublayer's
    output projection with its residual (pre-norm layers) or with its residual and layer norm
    (post-norm layers). ``weight`` and ``bias`` are those of an ``nn.Linear``.

    Differentiable (the backward differentiates the reference); works under
    ``torch.compile``.

    Arguments:
        x: `(..., D)` the residual.
        inputs: `(..., K)` the projection's input (e.g. the attention's heads, joined).
        weight: `(D, K)`.
        bias: `(D,)` or ``None``.
        norm_weight: `(D,)` the layer norm's scale, or ``None`` (no scale).
        norm_bias: `(D,)` the layer norm's shift, or ``None`` (no shift).
        norm: apply the layer norm after the residual add (default: False).
        eps: the layer norm's epsilon (default: 1e-5).

    Returns:
        `(..., D)`, a new tensor.

    Raises:
        TypeError: a tensor argument is not a tensor or of another dtype than ``x``.
        ValueError: a shape or device disagrees, or ``eps`` is negative or not finite.

    Example:
        >>> x, heads = torch.rand(4, 16), torch.rand(4, 32)
        >>> w, bias = torch.rand(16, 32), torch.rand(16)
        >>> y = residual_linear(x, heads, w, bias, norm=True)
        >>> y.shape
        torch.Size([4, 16])
    """
    return linear(x, inputs, weight, bias, norm, norm_weight, norm_bias, eps)
