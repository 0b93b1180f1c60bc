"""Linear maps applied at every sequential step, with one weight gradient per call.

The Feedback Transformer (Fan et al. 2021, arXiv 2002.09402) runs its steps one after
another, so every weight is applied once per step to a few rows (``b * w``). Plain autograd
then computes and accumulates a full weight-sized gradient per step, which costs more than
the step's forward product. `StepLinear` instead records each step's input and output
gradient during the backward pass and forms the weight gradient once, as one matrix product
over all steps' rows, ``dW = cat(dY)^T cat(X)`` (and ``db = sum(dY)``).

How: for each weight, a `Gather` node is put *before* all uses; it outputs a scalar
token that every step's `Linear` takes as an input. The backward pass therefore runs
every step's ``Linear.backward`` (which returns the input gradient and records ``(X, dY)``)
before ``Gather.backward``, which returns the summed weight and bias gradients.

Einstein notation: ``r`` rows of one step, ``R`` rows of all steps, ``i`` input and ``o``
output features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

__all__ = ["Gather", "Linear", "StepLinear"]


class _Record:
    """The ``(X (r, i), dY (r, o))`` pairs of the steps of one weight."""

    __slots__ = ("pairs",)

    def __init__(self) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []


class Gather(Function):
    """``apply(weight, bias, record) -> token``: a scalar placed before every use of
    ``weight``; its backward turns the recorded pairs into ``dW (o, i)`` and ``db (o,)``."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, bias: Tensor | None, record: _Record) -> Tensor:
        ctx.record, ctx.has_bias = record, bias is not None
        ctx.weight_shape = weight.shape
        return weight.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, _token_grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pairs, ctx.record.pairs = ctx.record.pairs, []
        if not pairs:
            return None, None, None
        x = torch.cat([x for x, _ in pairs])  # (R, i)
        dy = torch.cat([dy for _, dy in pairs])  # (R, o)
        dw = dy.mT @ x
        db = dy.sum(dim=0) if ctx.has_bias else None
        return dw, db, None


class Linear(Function):
    """``apply(x, weight, bias, token, record)``: ``F.linear(x, weight, bias)`` for ``x``
    ``(r, i)``; the backward returns ``dX = dY W`` and records ``(X, dY)`` for
    `Gather` (nothing when no gradient reached the output: the weight then gets
    none from this use, as with ``F.linear``)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, token: Tensor, record: _Record
    ) -> Tensor:
        ctx.record = record
        ctx.save_for_backward(x, weight)
        ctx.set_materialize_grads(False)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, dy: Tensor | None
    ) -> tuple[Tensor | None, None, None, Tensor | None, None]:
        if dy is None:
            return None, None, None, None, None
        x, weight = ctx.saved_tensors
        ctx.record.pairs.append((x, dy))
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        return dx, None, None, dy.new_zeros(()), None


class StepLinear:
    """``linear(x, weight, bias=None)``: ``F.linear`` for ``x`` ``(r, i)`` -> ``(r, o)``
    that, while gradients are recorded, defers the weight (and bias) gradient of every use
    of the same ``weight`` tensor to one product per call (see the module docstring).
    Create one per forward call; a weight must always come with the same bias."""

    def __init__(self) -> None:
        self._tokens: dict[int, tuple[Tensor, _Record]] = {}

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        entry = self.entry(weight, bias)
        if entry is None:
            return F.linear(x, weight, bias)
        return Linear.apply(x, weight, bias, *entry)

    def entry(self, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, _Record] | None:
        """The ``(token, record)`` of ``weight``: a use takes the token as an input and, in
        its backward pass, appends ``(X, dY)`` to ``record.pairs``; ``None`` when no
        gradient of the weight or bias is recorded."""
        if not torch.is_grad_enabled() or not (
            weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return None
        key = id(weight)  # the weights live for the whole call: ids are stable
        if key not in self._tokens:
            record = _Record()
            self._tokens[key] = (Gather.apply(weight, bias, record), record)
        return self._tokens[key]
