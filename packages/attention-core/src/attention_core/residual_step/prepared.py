"""The residual sublayer steps with their weights checked once, for many calls.

A forward pass that runs a window at a time, or a decoding loop, calls
`residual_feed_forward` and `residual_linear` with the same weight tensors hundreds of times
on a few rows. Checking them at every call costs as much as the kernel there, and more inside
a model, whose weight reads push the checks' own data out of the caches. `PreparedFeedForward`
and `PreparedResidualLinear` hold the weights: the first call checks every argument as the
function does, later calls check the per-call inputs and that each weight still has the
storage, dtype, device, shape and strides it was checked with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import PLAIN_TENSORS, layouts, storages
from .._extension import address, direct_call_mode, use_kernels
from ._op import _check_eps, feed_forward, linear, run_feed_forward, run_linear
from .reference import ACTIVATIONS

__all__ = ["PreparedFeedForward", "PreparedResidualLinear"]


def _fast_rows(t: Tensor, width: int, dtype: torch.dtype) -> bool:
    """``t`` is a plain CPU tensor of ``dtype`` that the kernel reads as it is: rows
    ``(R, width)`` with contiguous features."""
    return (
        type(t) in PLAIN_TENSORS
        and t.dtype is dtype
        and t.is_cpu
        and t.dim() == 2
        and t.shape[1] == width
        and t.stride(1) == 1
        and (t.shape[0] <= 1 or t.stride(0) >= width)
    )


def _kernel_serves(inputs: tuple[Tensor, ...], weights: tuple[Tensor | None, ...]) -> bool:
    """After the function accepted them: the kernel serves later calls (plain CPU tensors of
    a kernel dtype, contiguous weights)."""
    held = [t for t in weights if t is not None]
    if any(type(t) not in PLAIN_TENSORS for t in inputs) or not use_kernels(*inputs, *held):
        return False
    return all(type(t) in PLAIN_TENSORS and t.is_contiguous() for t in held)


class PreparedFeedForward:
    """Apply `residual_feed_forward` with weights fixed when the object is made.

    ``ff(x)`` equals ``residual_feed_forward(x, *weights, activation=..., norm_first=...,
    eps=...)`` for every ``x``, and costs less per call where the same weights serve many
    calls on a few rows (the windows of a forward pass, the steps of a decoding loop). The
    first call checks every argument as `residual_feed_forward` does; later calls with grad
    mode off (``torch.no_grad``, ``torch.inference_mode``) and outside ``torch.compile``
    check ``x`` and that each weight still has the data address, dtype, device, shape and
    strides it was checked with, then run the CPU kernel. Anything else (a new dtype or
    device, a weight given other storage, grad mode on, tensor subclasses) takes
    `residual_feed_forward` itself, which checks it again. The weights are read at every
    call, so in-place updates of their values are seen; the options are fixed.

    Arguments:
        linear1_weight: `(F, D)`, or `(2 F, D)` for ``geglu``.
        linear1_bias: `(F,)` / `(2 F,)` or ``None``.
        linear2_weight: `(D, F)`.
        linear2_bias: `(D,)` or ``None``.
        norm_weight: `(D,)` the layer norm's scale, or ``None`` (no scale).
        norm_bias: `(D,)` the layer norm's shift, or ``None`` (no shift).
        activation: ``"relu"`` (default), ``"gelu"`` or ``"geglu"``.
        norm_first: pre-norm (True) or post-norm (False, default).
        eps: the layer norm's epsilon (default: 1e-5).

    Raises:
        ValueError: ``activation`` is unknown or ``eps`` is negative or not finite.
        TypeError: ``norm_first`` is not a bool.

    Example:
        >>> from attention_core.residual_step import residual_feed_forward
        >>> w1, b1 = torch.rand(64, 16), torch.rand(64)
        >>> w2, b2 = torch.rand(16, 64), torch.rand(16)
        >>> g, b = torch.ones(16), torch.zeros(16)
        >>> ff = PreparedFeedForward(w1, b1, w2, b2, g, b)
        >>> x = torch.rand(4, 16)
        >>> y = residual_feed_forward(x, w1, b1, w2, b2, g, b)
        >>> torch.equal(ff(x), y)
        True
    """

    __slots__ = ("_activation", "_checked", "_eps", "_norm_first", "_weights")

    def __init__(
        self,
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
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
        if not isinstance(norm_first, bool):
            raise TypeError(f"norm_first must be a bool; got {type(norm_first).__name__}")
        _check_eps(eps)
        self._weights = (
            linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight, norm_bias
        )  # fmt: skip
        self._activation, self._norm_first, self._eps = activation, norm_first, float(eps)
        # after a call that ran the kernel: (dtype, D, F, weight layouts, weight addresses,
        # activation index, the weights' storages, held so that their addresses stay theirs)
        self._checked: tuple | None = None

    @property
    def activation(self) -> str:
        """``"relu"``, ``"gelu"`` or ``"geglu"`` (fixed when the object is made)."""
        return self._activation

    @property
    def norm_first(self) -> bool:
        """Pre-norm (True) or post-norm (False), fixed when the object is made."""
        return self._norm_first

    @property
    def eps(self) -> float:
        """The layer norm's epsilon (fixed when the object is made)."""
        return self._eps

    def __call__(self, x: Tensor) -> Tensor:
        """Apply the sublayer to ``x``.

        Arguments:
            x: `(..., D)` the sublayer's input.

        Returns:
            `(..., D)`, a new tensor.
        """
        checked = self._checked
        if (
            checked is not None
            and _fast_rows(x, checked[1], checked[0])
            and direct_call_mode()
            and layouts(self._weights) == checked[3]
        ):
            return run_feed_forward(
                x, x, checked[2], checked[4], self._eps, checked[5], self._norm_first
            )
        y = feed_forward(x, *self._weights, self._activation, self._norm_first, self._eps)
        self._checked = (
            (
                x.dtype, x.shape[-1], self._weights[2].shape[1], layouts(self._weights),
                tuple(map(address, self._weights)), ACTIVATIONS.index(self._activation),
                storages(self._weights),
            )
            if _kernel_serves((x,), self._weights)
            else None  # nor hold the storages of weights the kernel no longer reads
        )  # fmt: skip
        return y


class PreparedResidualLinear:
    """Apply `residual_linear` with weights fixed when the object is made.

    ``proj(x, inputs)`` equals ``residual_linear(x, inputs, *weights, norm=..., eps=...)`` for
    every ``x`` and ``inputs``, and costs less per call where the same weights serve many
    calls on a few rows (an attention sublayer's output projection at every step of a
    recurrent model). The first call checks every argument as `residual_linear` does; later
    calls with grad mode off (``torch.no_grad``, ``torch.inference_mode``) and outside
    ``torch.compile`` check ``x`` and ``inputs`` and that each weight still has the data
    address, dtype, device, shape and strides it was checked with, then run the CPU kernel.
    Anything else takes `residual_linear` itself, which checks it again. The weights are read
    at every call, so in-place updates of their values are seen; the options are fixed.

    Arguments:
        weight: `(D, K)`.
        bias: `(D,)` or ``None``.
        norm_weight: `(D,)` the layer norm's scale, or ``None`` (no scale).
        norm_bias: `(D,)` the layer norm's shift, or ``None`` (no shift).
        norm: apply the layer norm after the residual add (default: False).
        eps: the layer norm's epsilon (default: 1e-5).

    Raises:
        TypeError: ``norm`` is not a bool.
        ValueError: ``eps`` is negative or not finite.

    Example:
        >>> from attention_core.residual_step import residual_linear
        >>> w, bias = torch.rand(16, 32), torch.rand(16)
        >>> g, b = torch.ones(16), torch.zeros(16)
        >>> proj = PreparedResidualLinear(w, bias, g, b, norm=True)
        >>> x, heads = torch.rand(4, 16), torch.rand(4, 32)
        >>> y = residual_linear(x, heads, w, bias, g, b, norm=True)
        >>> torch.equal(proj(x, heads), y)
        True
    """

    __slots__ = ("_checked", "_eps", "_norm", "_weights")

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        norm_weight: Tensor | None = None,
        norm_bias: Tensor | None = None,
        *,
        norm: bool = False,
        eps: float = 1e-5,
    ):
        if not isinstance(norm, bool):
            raise TypeError(f"norm must be a bool; got {type(norm).__name__}")
        _check_eps(eps)
        self._weights = (weight, bias, norm_weight, norm_bias)
        self._norm, self._eps = norm, float(eps)
        # after a call that ran the kernel: (dtype, D, K, weight layouts, weight addresses,
        # the weights' storages, held so that their addresses stay theirs)
        self._checked: tuple | None = None

    @property
    def norm(self) -> bool:
        """Whether the layer norm follows the residual add (fixed when the object is made)."""
        return self._norm

    @property
    def eps(self) -> float:
        """The layer norm's epsilon (fixed when the object is made)."""
        return self._eps

    def __call__(self, x: Tensor, inputs: Tensor) -> Tensor:
        """Apply the projection with its residual (and norm).

        Arguments:
            x: `(..., D)` the residual.
            inputs: `(..., K)` the projection's input (e.g. the attention's heads, joined).

        Returns:
            `(..., D)`, a new tensor.
        """
        checked = self._checked
        if (
            checked is not None
            and _fast_rows(x, checked[1], checked[0])
            and _fast_rows(inputs, checked[2], checked[0])
            and inputs.shape[0] == x.shape[0]
            and direct_call_mode()
            and layouts(self._weights) == checked[3]
        ):
            return run_linear(x, x, inputs, checked[4], self._norm, self._eps)
        y = linear(x, inputs, *self._weights[:2], self._norm, *self._weights[2:], self._eps)
        self._checked = (
            (
                x.dtype, x.shape[-1], inputs.shape[-1], layouts(self._weights),
                tuple(map(address, self._weights)), storages(self._weights),
            )
            if _kernel_serves((x, inputs), self._weights)
            else None  # nor hold the storages of weights the kernel no longer reads
        )  # fmt: skip
        return y
