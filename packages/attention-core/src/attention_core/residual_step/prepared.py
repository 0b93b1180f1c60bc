"""The feed-forward sublayer step with its weights checked once, for many calls.

A forward pass that runs a window at a time, or a decoding loop, calls
`residual_feed_forward` with the same six weight tensors hundreds of times on a few rows.
Checking them at every call costs as much as the kernel there, and more inside a model,
whose weight reads push the checks' own data out of the caches. `PreparedFeedForward` holds
the weights: its first call checks every argument as `residual_feed_forward` does, later
calls check the input and that each weight still has the storage, shape and strides it was
checked with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import PLAIN_TENSORS, layouts, storages
from .._extension import _reference_forced, address, use_kernels
from ._op import _check_eps, feed_forward, run_feed_forward
from .reference import ACTIVATIONS

__all__ = ["PreparedFeedForward"]


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
            and type(x) in PLAIN_TENSORS
            and x.dtype is checked[0]
            and x.is_cpu
            and x.dim() == 2
            and x.shape[1] == checked[1]
            and x.stride(1) == 1
            and (x.shape[0] <= 1 or x.stride(0) >= checked[1])
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not _reference_forced()
            and layouts(self._weights) == checked[3]
        ):
            return run_feed_forward(
                x, x, checked[2], checked[4], self._eps, checked[5], self._norm_first
            )
        y = feed_forward(x, *self._weights, self._activation, self._norm_first, self._eps)
        self._remember(x)
        return y

    def _remember(self, x: Tensor) -> None:
        """Keep what the fast path needs once `residual_feed_forward` has accepted ``x`` and
        the weights, where the kernel can serve later calls (contiguous weights, CPU)."""
        weights = [t for t in self._weights if t is not None]
        if type(x) not in PLAIN_TENSORS or not use_kernels(x, *weights):
            return
        if any(type(t) not in PLAIN_TENSORS or not t.is_contiguous() for t in weights):
            return
        self._checked = (
            x.dtype, x.shape[-1], self._weights[2].shape[1], layouts(self._weights),
            tuple(map(address, self._weights)), ACTIVATIONS.index(self._activation),
            storages(self._weights),
        )  # fmt: skip
