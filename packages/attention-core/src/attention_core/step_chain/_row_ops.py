"""The row ops of a `StepChain` that hold no products: a layer norm and a weighted sum of
values (``csrc/step_chain.h``: ``LayerNormRows``, ``WeightedSum``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_like
from ..checks import check_tensor
from ..residual_step._op import check_layer_norm
from ._ops import Bases, Op, Slot, value, weight_address

__all__ = ["LAYER_NORM", "WEIGHTED_SUM", "LayerNormOp", "WeightedSumOp"]

LAYER_NORM, WEIGHTED_SUM = 3, 4
MAX_VALUES = 256  # the most values a weighted sum adds (csrc/step_chain_bindings.h)


@dataclasses.dataclass(eq=False)
class LayerNormOp(Op):
    """``LN(x)`` over the columns of ``x``, with an optional scale and shift."""

    x: Slot
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    dtype: torch.dtype
    device: torch.device
    kind = LAYER_NORM

    def __post_init__(self) -> None:
        self.width = self.x.width
        like = torch.empty(0, self.width, dtype=self.dtype, device=self.device)
        check_layer_norm(like, self.weight, self.bias, self.eps)

    def weights(self) -> tuple[Tensor | None, ...]:
        return (self.weight, self.bias)

    def fields(self, bases: Bases, out: tuple[int, int], weight_index: int) -> list[int]:
        x_base, x_offset, ldx = bases.of(self.x)
        w, b = (weight_address(bases, weight_index + i, t) for i, t in enumerate(self.weights()))
        return [x_base, x_offset, ldx, bases.rows, self.width, *w, *b, *out]

    def compose(
        self, values: list[Tensor], state: tuple[Tensor, Tensor] | None, positions: Sequence[int]
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        x = value(values, self.x)
        return F.layer_norm(x, (self.width,), self.weight, self.bias, self.eps), None


@dataclasses.dataclass(eq=False)
class WeightedSumOp(Op):
    """``sum_i coefficients[i] values[i]``, added in the order of ``values``."""

    values: tuple[Slot, ...]
    coefficients: Tensor
    dtype: torch.dtype
    device: torch.device
    kind = WEIGHTED_SUM
    eps = 0.0

    def __post_init__(self) -> None:
        n = len(self.values)
        if not 1 <= n <= MAX_VALUES:
            raise ValueError(f"values must hold 1 to {MAX_VALUES} values; got {n}")
        widths = {slot.width for slot in self.values}
        if len(widths) != 1:
            raise ValueError(f"values must have one width; got widths {sorted(widths)}")
        self.width = widths.pop()
        check_tensor("coefficients", self.coefficients, shape=(n,), floating=True)
        like = torch.empty(0, dtype=self.dtype, device=self.device)
        check_like("coefficients", self.coefficients, like, "the chain's weights")

    def weights(self) -> tuple[Tensor | None, ...]:
        return (self.coefficients,)

    def fields(self, bases: Bases, out: tuple[int, int], weight_index: int) -> list[int]:
        fields = [bases.rows, self.width, len(self.values),
                  *weight_address(bases, weight_index, self.coefficients)]  # fmt: skip
        for slot in self.values:
            fields += bases.of(slot)
        return [*fields, *out]

    def compose(
        self, values: list[Tensor], state: tuple[Tensor, Tensor] | None, positions: Sequence[int]
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        c = self.coefficients
        out = c[0] * value(values, self.values[0])
        for i, slot in enumerate(self.values[1:], start=1):
            out = out + c[i] * value(values, slot)
        return out, None
