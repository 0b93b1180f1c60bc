"""The ops of a `StepChain`: what each holds, how it is checked when it is added, how it is
written into the compiled program (``csrc/step_chain_bindings.h``) and how it runs as the
public function it stands for (the composed path).

A value of the chain lives in a buffer of rows: buffer 0 is the input ``x``, buffer ``b >= 1``
the output of op ``b - 1``. In the program an address is two fields, a base (an index into the
call's base addresses) and an offset in elements; the bases of a call are, in order, ``x``,
the workspace that holds buffers ``1..``, every held weight (``0`` for ``None``), the states
passed in (``S``, ``Z`` per attention step, ``0`` for none) and the new states (``S'``,
``Z'`` per attention step, each its own tensor).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..linear_step import linear_attention_step
from ..linear_step._op import check_step
from ..linear_step.reference import accumulation_dtype
from ..residual_step import residual_feed_forward, residual_linear
from ..residual_step._op import check_feed_forward, check_linear
from ..residual_step.reference import ACTIVATIONS

__all__ = [
    "NULL", "Bases", "FeedForwardOp", "LinearOp", "LinearStepOp", "Op", "Slot", "check_states",
    "columns_of", "value", "weight_address",
]  # fmt: skip

LINEAR, FEED_FORWARD, LINEAR_STEP = 0, 1, 2
NULL = (-1, 0)  # a null address in the program


@dataclasses.dataclass(frozen=True)
class Slot:
    """A value of a `StepChain`: ``(R, width)`` for the ``R`` rows of a call, the columns
    ``[start, start + width)`` of one of the chain's buffers (the input or an op's output).

    Made by the chain (`StepChain.input`, its op methods, `StepChain.columns`); pass it to
    that chain's ops."""

    chain: int  # id of the chain that made it
    buffer: int
    start: int
    width: int


@dataclasses.dataclass(frozen=True)
class Bases:
    """Where the buffers of one call are, as program fields: ``offsets[b]`` is the element
    offset of buffer ``b`` in its base (the input for ``b = 0``, the workspace after it)
    and ``widths[b]`` its row length; ``first_weight`` the base index of the first held
    weight, ``first_state`` that of the first state passed in, ``first_new`` that of the
    first new state."""

    rows: int
    offsets: tuple[int, ...]
    widths: tuple[int, ...]
    first_weight: int
    first_state: int
    first_new: int

    def of(self, slot: Slot) -> tuple[int, int, int]:
        """``(base, offset, row stride)`` of ``slot``'s first element."""
        base = 0 if slot.buffer == 0 else 1
        return base, self.offsets[slot.buffer] + slot.start, self.widths[slot.buffer]


def _like(width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An empty ``(0, width)`` tensor that stands for a value in the ops' own checks."""
    return torch.empty(0, width, dtype=dtype, device=device)


def weight_address(bases: Bases, index: int, weight: Tensor | None) -> tuple[int, int]:
    """The program address of held weight ``index`` (null for ``None``)."""
    return NULL if weight is None else (bases.first_weight + index, 0)


class Op(abc.ABC):
    """An op of the chain: its weights (in the order the program reads them), its kind and
    eps, its input slots and the width of its output."""

    kind: int
    eps: float
    width: int

    def scalar(self) -> float:
        """The op's number in the call's scalars: its eps."""
        return float(self.eps)

    def readable(self) -> bool:
        """Whether the compiled program reads the op's held tensors in their current layout:
        contiguous (the cache ops also take feature-major caches)."""
        return all(w is None or w.is_contiguous() for w in self.weights())

    def written(self) -> tuple[Tensor, ...]:
        """The held tensors the op writes in place (none but a cache write's cache)."""
        return ()

    @abc.abstractmethod
    def weights(self) -> tuple[Tensor | None, ...]:
        """The tensors the op holds, ``None`` kept, in the order the program reads them."""

    @abc.abstractmethod
    def fields(self, bases: Bases, out: tuple[int, int], weight_index: int) -> list[int]:
        """The op's program fields: its output at ``out`` ``(base, offset)``, its first weight
        the held weight ``weight_index``."""

    def check_call(self, rows: int, positions: Sequence[int]) -> None:  # noqa: B027 (most ops check nothing)
        """Refuse a call of ``rows`` rows at ``positions`` that the op cannot run (before any
        op of the call runs: an op that writes a held tensor must not have written it)."""

    @abc.abstractmethod
    def compose(
        self, values: list[Tensor], state: tuple[Tensor, Tensor] | None, positions: Sequence[int]
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The op on tensors (``values[b]`` is buffer ``b``, ``positions`` the call's) through
        its public function: its output and its new state (``None`` for the ops without
        one)."""


def columns_of(t: Tensor, slot: Slot) -> Tensor:
    """``slot``'s columns of its buffer's rows ``t``."""
    if slot.start == 0 and slot.width == t.shape[1]:
        return t
    return t[:, slot.start : slot.start + slot.width]


def value(values: list[Tensor], slot: Slot) -> Tensor:
    """``slot``'s ``(R, width)`` rows among the buffers ``values``."""
    return columns_of(values[slot.buffer], slot)


@dataclasses.dataclass(eq=False)
class LinearOp(Op):
    """``inputs W^T + b``, plus ``residual`` when given, then a layer norm when ``norm``."""

    inputs: Slot
    residual: Slot | None
    weight: Tensor
    bias: Tensor | None
    norm: bool
    norm_weight: Tensor | None
    norm_bias: Tensor | None
    eps: float
    kind = LINEAR

    def __post_init__(self) -> None:
        if not isinstance(self.norm, bool):
            raise TypeError(f"norm must be a bool; got {type(self.norm).__name__}")
        if not isinstance(self.weight, Tensor) or self.weight.dim() != 2:
            raise ValueError(
                "weight must be a (D, K) tensor; got "
                f"{tuple(self.weight.shape) if isinstance(self.weight, Tensor) else self.weight!r}"
            )
        self.width = self.weight.shape[0]
        if self.residual is not None and self.residual.width != self.width:
            raise ValueError(
                f"residual must have the width of the product ({self.width}); got "
                f"{self.residual.width}"
            )
        like = _like(self.width, self.weight.dtype, self.weight.device)
        check_linear(
            like, _like(self.inputs.width, like.dtype, like.device), self.weight, self.bias,
            self.norm, self.norm_weight, self.norm_bias, self.eps,
        )  # fmt: skip

    def weights(self) -> tuple[Tensor | None, ...]:
        return (self.weight, self.bias, self.norm_weight, self.norm_bias)

    def fields(self, bases: Bases, out: tuple[int, int], weight_index: int) -> list[int]:
        a_base, a_offset, lda = bases.of(self.inputs)
        if self.residual is None:
            x: tuple[int, int] = NULL
            ldx = self.width
        else:
            x_base, x_offset, ldx = bases.of(self.residual)
            x = (x_base, x_offset)
        w, b, nw, nb = (
            weight_address(bases, weight_index + i, t) for i, t in enumerate(self.weights())
        )
        return [
            *x, ldx, a_base, a_offset, lda, bases.rows, self.width, self.inputs.width,
            *w, *b, int(self.norm), *nw, *nb, *out,
        ]  # fmt: skip

    def compose(
        self, values: list[Tensor], state: tuple[Tensor, Tensor] | None, positions: Sequence[int]
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        inputs = value(values, self.inputs)
        if self.residual is not None:
            y = residual_linear(
                value(values, self.residual), inputs, self.weight, self.bias,
                self.norm_weight, self.norm_bias, norm=self.norm, eps=self.eps,
            )  # fmt: skip
            return y, None
        y = F.linear(inputs, self.weight, self.bias)
        if self.norm:
            y = F.layer_norm(y, (self.width,), self.norm_weight, self.norm_bias, self.eps)
        return y, None


@dataclasses.dataclass(eq=False)
class FeedForwardOp(Op):
    """`residual_feed_forward` of ``x``."""

    x: Slot
    linear1_weight: Tensor
    linear1_bias: Tensor | None
    linear2_weight: Tensor
    linear2_bias: Tensor | None
    norm_weight: Tensor | None
    norm_bias: Tensor | None
    activation: str
    norm_first: bool
    eps: float
    kind = FEED_FORWARD

    def __post_init__(self) -> None:
        dtype = getattr(self.linear1_weight, "dtype", torch.float32)
        device = getattr(self.linear1_weight, "device", torch.device("cpu"))
        check_feed_forward(
            _like(self.x.width, dtype, device), self.linear1_weight, self.linear1_bias,
            self.linear2_weight, self.linear2_bias, self.norm_weight, self.norm_bias,
            self.activation, self.norm_first, self.eps,
        )  # fmt: skip
        self.width = self.x.width

    def weights(self) -> tuple[Tensor | None, ...]:
        return (
            self.linear1_weight, self.linear1_bias, self.linear2_weight, self.linear2_bias,
            self.norm_weight, self.norm_bias,
        )  # fmt: skip

    def fields(self, bases: Bases, out: tuple[int, int], weight_index: int) -> list[int]:
        x_base, x_offset, ldx = bases.of(self.x)
        hidden = self.linear2_weight.shape[1]
        w1, b1, w2, b2, nw, nb = (
            weight_address(bases, weight_index + i, t) for i, t in enumerate(self.weights())
        )
        return [
            x_base, x_offset, ldx, bases.rows, self.width, hidden, *w1, *b1, *w2, *b2, *nw, *nb,
            ACTIVATIONS.index(self.activation), int(self.norm_first), *out,
        ]  # fmt: skip

    def compose(
        self, values: list[Tensor], state: tuple[Tensor, Tensor] | None, positions: Sequence[int]
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        y = residual_feed_forward(
            value(values, self.x), self.linear1_weight, self.linear1_bias, self.linear2_weight,
            self.linear2_bias, self.norm_weight, self.norm_bias, activation=self.activation,
            norm_first=self.norm_first, eps=self.eps,
        )  # fmt: skip
        return y, None


@dataclasses.dataclass(eq=False)
class LinearStepOp(Op):
    """`linear_attention_step` of the heads of three slots, with the state of step ``index``
    (the ``index``-th attention step of the chain)."""

    query: Slot
    key: Slot
    value: Slot
    heads: int
    eps: float
    elu_feature_map: bool
    index: int
    dtype: torch.dtype
    device: torch.device
    kind = LINEAR_STEP

    def __post_init__(self) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1:
            raise ValueError(f"heads must be a positive int; got {self.heads!r}")
        if not isinstance(self.elu_feature_map, bool):
            raise TypeError(
                f"elu_feature_map must be a bool; got {type(self.elu_feature_map).__name__}"
            )
        for name, slot in (("query", self.query), ("key", self.key), ("value", self.value)):
            if slot.width % self.heads:
                raise ValueError(
                    f"{name} must have a width divisible by heads ({self.heads}); got {slot.width}"
                )
        if self.key.width != self.query.width:
            raise ValueError(
                f"key must have the width of query ({self.query.width}); got {self.key.width}"
            )
        self.E = self.query.width // self.heads
        self.M = self.value.width // self.heads
        qk = torch.empty(0, self.heads, self.E, dtype=self.dtype, device=self.device)
        v = torch.empty(0, self.heads, self.M, dtype=self.dtype, device=self.device)
        check_step(qk, qk, v, None, None, self.eps)
        self.width = self.value.width
        self.state_dtype = accumulation_dtype(self.dtype)

    def weights(self) -> tuple[Tensor | None, ...]:
        return ()

    def state_shapes(self, rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``S`` and ``Z`` for ``rows`` rows."""
        return (rows, self.heads, self.E, self.M), (rows, self.heads, self.E)

    def fields(self, bases: Bases, out: tuple[int, int], weight_index: int) -> list[int]:
        fields: list[int] = []
        for slot, width in ((self.query, self.E), (self.key, self.E), (self.value, self.M)):
            base, offset, ld = bases.of(slot)
            fields += (base, offset, ld, width)
        state, new_state = bases.first_state + 2 * self.index, bases.first_new + 2 * self.index
        return [
            *fields, state, 0, state + 1, 0, *out, new_state, 0, new_state + 1, 0,
            bases.rows, self.heads, self.E, self.M, int(self.elu_feature_map),
        ]  # fmt: skip

    def compose(
        self, values: list[Tensor], state: tuple[Tensor, Tensor] | None, positions: Sequence[int]
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        R = values[0].shape[0]
        q, k, v = (
            value(values, slot).reshape(R, self.heads, width)
            for slot, width in ((self.query, self.E), (self.key, self.E), (self.value, self.M))
        )
        out, new = linear_attention_step(
            q, k, v, state, self.eps, elu_feature_map=self.elu_feature_map
        )
        return out.reshape(R, self.width), new


def check_states(
    states: Sequence[tuple[Tensor, Tensor] | None] | None, steps: list[LinearStepOp], rows: int
) -> list[tuple[Tensor, Tensor] | None]:
    """The states of a call, one per attention step (``None``: the first step), checked."""
    if states is None:
        return [None] * len(steps)
    if not isinstance(states, (list, tuple)) or len(states) != len(steps):
        got = (
            f"{len(states)} states" if isinstance(states, (list, tuple)) else type(states).__name__
        )
        raise ValueError(
            f"states must be a list of {len(steps)} states (one per attention step, None for "
            f"the first step) or None; got {got}"
        )
    checked: list[tuple[Tensor, Tensor] | None] = []
    for i, (state, step) in enumerate(zip(states, steps)):
        if state is None:
            checked.append(None)
            continue
        if not isinstance(state, (list, tuple)) or len(state) != 2:
            raise TypeError(
                f"states[{i}] must be a pair (S, Z) or None; got {type(state).__name__}"
            )
        for name, t, shape in zip(("S", "Z"), state, step.state_shapes(rows)):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"states[{i}].{name} must be a torch.Tensor; got {type(t).__name__}"
                )
            if t.shape != shape or t.dtype != step.state_dtype or t.device != step.device:
                raise ValueError(
                    f"states[{i}].{name} must be a {step.state_dtype} tensor of shape {shape} on "
                    f"{step.device}; got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        checked.append((state[0], state[1]))
    return checked
