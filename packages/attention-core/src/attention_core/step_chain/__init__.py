"""This module runs a chain of step ops on a few rows in one call.

A recurrent model steps one element of each sequence at a time, so its ops work on a few rows
and each costs little arithmetic. Called from Python one by one, every op also pays its call,
its checks and the Python around it, and inside a model, whose weight reads push the
interpreter's own data out of the caches, that costs several times what it costs in a tight
loop: in the 8-layer step of fast-transformers' recurrent example (batch 10, d_model 384)
the calls around the kernels took longer than the 48 dense products themselves.

A `StepChain` holds a sequence of the core's step ops and their weights, checked when each op
is added, and runs the whole sequence in one call of the compiled extension:

- `StepChain.linear`: ``inputs W^T + b``, optionally plus a residual and followed by a layer
  norm (`attention_core.residual_step.residual_linear`);
- `StepChain.feed_forward`: the feed-forward sublayer with its residual and layer norm
  (`attention_core.residual_step.residual_feed_forward`);
- `StepChain.linear_attention_step`: one step of causal linear attention, with its state
  (`attention_core.linear_step.linear_attention_step`);
- `StepChain.layer_norm`: a layer norm of a value's columns;
- `StepChain.weighted_sum`: ``sum_i c_i values_i`` with held coefficients;
- `StepChain.cache_attention`: softmax attention over a range of positions of a held key/value
  cache, with a position bias from a held table
  (`attention_core.cache_attention.cache_attention`);
- `StepChain.cache_write`: a value's rows written into a held cache;
- `StepChain.columns`: a range of columns of a value (e.g. the queries of a stacked
  query-key-value product).

Where the cache ops read and write may change from call to call: `StepChain.position` makes a
`Position`, whose int each call passes in ``positions``.

Each op reads values made before it (`Slot`) and makes a new one. A call checks the input, the
states and that every held weight still has the address, dtype, device, shape and strides it
was checked with (a weight given other storage is checked again), then runs the compiled
chain for float32 and float64 CPU tensors with grad mode off. Anything else (autograd, other
dtypes or devices, ``torch.compile``, ``ATTENTION_CORE_FORCE_REFERENCE=1``) runs each op's
public function in turn: the same results, the same checks.

Example:
    >>> D, H = 16, 2
    >>> w_qkv, w_out = torch.rand(3 * D, D), torch.rand(D, D)
    >>> w1, w2 = torch.rand(64, D), torch.rand(D, 64)
    >>> g, b = torch.ones(D), torch.zeros(D)
    >>> chain = StepChain(D)
    >>> qkv = chain.linear(chain.input, w_qkv)
    >>> q, k, v = (chain.columns(qkv, i * D, (i + 1) * D) for i in range(3))
    >>> heads = chain.linear_attention_step(q, k, v, heads=H)
    >>> x1 = chain.linear(heads, w_out, residual=chain.input,
    ...                   norm_weight=g, norm_bias=b, norm=True)
    >>> y = chain.feed_forward(x1, w1, None, w2, None, g, b)
    >>> x = torch.rand(4, D)
    >>> with torch.no_grad():
    ...     out, states = chain(x)             # the first step
    ...     out, states = chain(x, states)     # the next one
    >>> out.shape, states[0][0].shape
    (torch.Size([4, 16]), torch.Size([4, 2, 8, 8]))
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import Tensor

from ..checks import check_tensor
from ._cache_ops import CacheAttentionOp, CacheWriteOp, Position
from ._ops import (
    Bases,
    FeedForwardOp,
    LinearOp,
    LinearStepOp,
    Op,
    Slot,
    check_states,
)
from ._row_ops import LayerNormOp, WeightedSumOp
from ._run import ChainRunner, WeightChangedError

__all__ = ["Position", "Slot", "StepChain", "WeightChangedError"]

_IDS = itertools.count()


class StepChain(ChainRunner):
    """Step ops on the rows of one input, run in one call.

    Build the chain with its op methods, each taking `Slot` values of this chain and returning
    a new one; then call it with the input ``x`` `(R, width)` and the states of its attention
    steps. See the module docstring.

    Arguments:
        width: the number of columns of the input.

    Attributes:
        input: the `Slot` of the input ``x``.
    """

    def __init__(self, width: int):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int; got {width!r}")
        self._id = next(_IDS)
        self.input = Slot(self._id, 0, 0, width)
        self._last = self.input  # the value a call returns by default
        self._widths = [width]  # buffer b's row length; buffer 0 is the input
        self._ops: list[Op] = []
        self._scalars: list[float] = []  # each op's eps or scale, in program order
        self._positions: list[Position] = []
        self._specs: list[tuple | None] = []  # each weight's shape, dtype and device when added
        self._held: tuple[Tensor | None, ...] | None = None
        self._steps: list[LinearStepOp] = []
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None
        # after a call that ran the compiled chain: the weights' layouts, addresses and
        # storages (held so that the addresses stay theirs), and the programs by row count
        self._checked: tuple | None = None
        self._programs: dict[int, tuple[Tensor, Bases, int]] = {}

    # building

    def _own(self, name: str, slot: Slot | None, optional: bool = False) -> None:
        if slot is None and optional:
            return
        if (
            not isinstance(slot, Slot)
            or slot.chain != self._id
            or not 0 <= slot.buffer < len(self._widths)
            or not 0 <= slot.start < slot.start + slot.width <= self._widths[slot.buffer]
        ):
            raise ValueError(f"{name} must be a Slot of this chain; got {slot!r}")

    def __setstate__(self, state: dict) -> None:
        # a copy (copy.deepcopy, pickle) is another chain: the values of the original are not
        # its values, and its own are made from its `input`
        self.__dict__.update(state)
        # its own containers (a shallow copy would share the original's): ops added to one
        # are not the other's, and programs, checks and held weights are made again
        for name in ("_ops", "_widths", "_scalars", "_specs", "_steps"):
            setattr(self, name, list(getattr(self, name)))
        self._programs, self._checked, self._held = {}, None, None
        self._id = next(_IDS)
        self.input = Slot(self._id, 0, 0, self._widths[0])
        self._last = dataclasses.replace(self._last, chain=self._id)
        self._positions = [dataclasses.replace(p, chain=self._id) for p in self._positions]

    def _add(self, op: Op, dtype: torch.dtype, device: torch.device) -> Slot:
        if self._dtype is None:
            self._dtype, self._device = dtype, device
        elif (dtype, device) != (self._dtype, self._device):
            raise TypeError(
                f"every op of a chain must have the dtype and device of its first op "
                f"({self._dtype}, {self._device}); got {dtype}, {device}"
            )
        self._ops.append(op)
        self._scalars.append(op.scalar())
        self._specs += [None if w is None else (w.shape, w.dtype, w.device) for w in op.weights()]
        self._widths.append(op.width)
        self._programs.clear()
        self._checked = None
        self._held = None
        slot = Slot(self._id, len(self._widths) - 1, 0, op.width)
        if op.width:
            self._last = slot
        return slot

    def linear(
        self,
        inputs: Slot,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        residual: Slot | None = None,
        norm_weight: Tensor | None = None,
        norm_bias: Tensor | None = None,
        norm: bool = False,
        eps: float = 1e-5,
    ) -> Slot:
        """Add ``inputs W^T + b`` (plus ``residual``), then a layer norm when ``norm``.

        Arguments:
            inputs: `(R, K)`.
            weight: `(D, K)`.
            bias: `(D,)` or ``None``.
            residual: `(R, D)` added to the product, or ``None``.
            norm_weight: `(D,)` the layer norm's scale, or ``None``.
            norm_bias: `(D,)` the layer norm's shift, or ``None``.
            norm: apply the layer norm (default: False).
            eps: the layer norm's epsilon (default: 1e-5).

        Returns:
            The `(R, D)` result.
        """
        self._own("inputs", inputs)
        self._own("residual", residual, optional=True)
        op = LinearOp(inputs, residual, weight, bias, norm, norm_weight, norm_bias, eps)
        return self._add(op, weight.dtype, weight.device)

    def feed_forward(
        self,
        x: Slot,
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
    ) -> Slot:
        """Add the feed-forward sublayer of `attention_core.residual_step.residual_feed_forward`.

        Arguments:
            x: `(R, D)`.
            linear1_weight: `(F, D)`, or `(2 F, D)` for ``geglu``.
            linear1_bias: `(F,)` / `(2 F,)` or ``None``.
            linear2_weight: `(D, F)`.
            linear2_bias: `(D,)` or ``None``.
            norm_weight: `(D,)` the layer norm's scale, or ``None``.
            norm_bias: `(D,)` the layer norm's shift, or ``None``.
            activation: ``"relu"`` (default), ``"gelu"`` or ``"geglu"``.
            norm_first: pre-norm (True) or post-norm (False, default).
            eps: the layer norm's epsilon (default: 1e-5).

        Returns:
            The `(R, D)` result.
        """
        self._own("x", x)
        op = FeedForwardOp(
            x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight,
            norm_bias, activation, norm_first, eps,
        )  # fmt: skip
        return self._add(op, linear1_weight.dtype, linear1_weight.device)

    def linear_attention_step(
        self,
        query: Slot,
        key: Slot,
        value: Slot,
        heads: int,
        eps: float = 1e-6,
        *,
        elu_feature_map: bool = True,
    ) -> Slot:
        """Add a step of causal linear attention (`attention_core.linear_step`).

        Each call of the chain takes this step's state ``(S, Z)`` from the previous call (or
        ``None``, the first step) and returns the new one; the chain's attention steps are
        numbered in the order they are added.

        Arguments:
            query: `(R, H E)`, the ``H`` heads side by side.
            key: `(R, H E)`.
            value: `(R, H M)`.
            heads: the number of heads ``H``.
            eps: added to the normaliser (default: 1e-6).
            elu_feature_map: apply ``elu(x) + 1`` to queries and keys (default: True).

        Returns:
            The `(R, H M)` output, its heads side by side.
        """
        for name, slot in (("query", query), ("key", key), ("value", value)):
            self._own(name, slot)
        dtype, device = self._chain_dtype("linear_attention_step")
        op = LinearStepOp(
            query, key, value, heads, eps, elu_feature_map, len(self._steps), dtype, device
        )
        self._steps.append(op)
        return self._add(op, dtype, device)

    def columns(self, slot: Slot, start: int, stop: int) -> Slot:
        """The columns ``[start, stop)`` of ``slot``, as a value of their own (no copy).

        Returns:
            `(R, stop - start)`.
        """
        self._own("slot", slot)
        if not (type(start) is int and type(stop) is int and 0 <= start < stop <= slot.width):
            raise ValueError(
                f"columns must satisfy 0 <= start < stop <= {slot.width}; got {start!r}, {stop!r}"
            )
        return Slot(self._id, slot.buffer, slot.start + start, stop - start)

    def position(self, limit: int) -> Position:
        """Add a position: an int from 0 to ``limit`` given at each call.

        A call's ``positions`` hold one int per position, in the order the positions are made.

        Returns:
            The `Position`, for the cache ops.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit < 2**62:
            raise ValueError(f"limit must be an int from 0 to 2**62 - 1; got {limit!r}")
        position = Position(self._id, len(self._positions), limit)
        self._positions.append(position)
        return position

    def _own_position(self, name: str, position: object) -> Position:
        if not isinstance(position, Position) or position.chain != self._id:
            raise ValueError(f"{name} must be a Position of this chain; got {position!r}")
        return position

    def _chain_dtype(self, op: str) -> tuple[torch.dtype, torch.device]:
        if self._dtype is None:
            raise ValueError(f"{op}: a chain's first op must hold weights (linear or feed_forward)")
        return self._dtype, self._device  # type: ignore[return-value]

    def layer_norm(
        self, x: Slot, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
    ) -> Slot:
        """Add a layer norm over the columns of ``x``.

        Arguments:
            x: `(R, D)`.
            weight: `(D,)` the scale, or ``None``.
            bias: `(D,)` the shift, or ``None``.
            eps: added to the variance (default: 1e-5).

        Returns:
            The `(R, D)` result.
        """
        self._own("x", x)
        held = weight if weight is not None else bias
        if isinstance(held, Tensor):
            dtype, device = held.dtype, held.device
        else:
            dtype, device = self._chain_dtype("layer_norm")
        op = LayerNormOp(x, weight, bias, eps, dtype, device)
        return self._add(op, dtype, device)

    def weighted_sum(self, values: list[Slot] | tuple[Slot, ...], coefficients: Tensor) -> Slot:
        """Add ``sum_i coefficients[i] values[i]``.

        Arguments:
            values: ``n`` values `(R, D)`, added in this order.
            coefficients: `(n,)`, held like a weight.

        Returns:
            The `(R, D)` result.
        """
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"values must be a list of Slots; got {type(values).__name__}")
        for i, slot in enumerate(values):
            self._own(f"values[{i}]", slot)
        dtype, device = self._chain_dtype("weighted_sum")
        op = WeightedSumOp(tuple(values), coefficients, dtype, device)
        return self._add(op, dtype, device)

    def cache_attention(
        self,
        query: Slot,
        keys: Tensor,
        values: Tensor,
        start: Position,
        end: Position,
        bias: Tensor | None = None,
        bias_start: Position | None = None,
        *,
        scale: float | None = None,
    ) -> Slot:
        """Add softmax attention over the cached positions ``start .. end - 1``.

        The op is `attention_core.cache_attention.cache_attention` over a held cache.
        The ``R`` rows are ``B`` batch elements of ``W = R / B`` queries each, in ``(B, W)``
        order. The cache is held like a weight: a call reads what it holds then (what
        `cache_write` ops wrote included).

        Arguments:
            query: `(R, H E)`, the heads side by side.
            keys: `(B, H, C, E)`, contiguous, or feature-major (the transpose of a contiguous
                `(B, H, E, C)`, as a cache that grows along its last dimension stores
                them), read in place.
            values: `(B, H, C, M)`.
            start: the first position read (a `Position` of this chain, at most ``C``).
            end: one past the last (a `Position`, at most ``C``).
            bias: `(H, W', J')` added to the scores, or `(B, H, W', J')` (one per batch
                element, for example ``-inf`` at a padded memory's positions), or ``None``:
                query ``i`` over position ``start + j`` takes ``bias[..., i, bias_start + j]``;
                it must hold the ``W`` rows and the columns that a call reads.
            bias_start: the bias column of position ``start`` (a `Position`; default:
                ``start``, a bias indexed by cache position).
            scale: the multiplier of ``q . k`` (default: ``1 / sqrt(E)``).

        Returns:
            The `(R, H M)` output, its heads side by side.
        """
        self._own("query", query)
        start, end = self._own_position("start", start), self._own_position("end", end)
        bias_start = start if bias_start is None else self._own_position("bias_start", bias_start)
        dtype, device = self._chain_dtype("cache_attention")
        if scale is None:
            # 1 / sqrt(E) of a (B, H, C, E) cache; anything else is refused by the op's checks
            well_formed = isinstance(keys, Tensor) and keys.dim() == 4
            scale = float(keys.shape[3]) ** -0.5 if well_formed else 1.0
        op = CacheAttentionOp(query, keys, values, start, end, bias, bias_start, scale, dtype,
                              device)  # fmt: skip
        return self._add(op, dtype, device)

    def cache_write(self, x: Slot, cache: Tensor, position: Position) -> None:
        """Add a write of ``x``'s rows into ``cache`` at ``position``.

        The ``R`` rows are ``B`` batch elements of ``W = R / B`` positions each: row
        ``b W + w`` goes to ``cache[b, :, position + w]``, its heads split. In grad mode
        (the ops' public functions) autograd records the write like any in-place copy: the
        cache then carries the history of every call that wrote it, until the caller detaches
        it (``cache.detach_()``); the compiled chain (grad mode off) records nothing.

        Arguments:
            x: `(R, H E)`.
            cache: `(B, H, C, E)`, held like a weight and written in place (not one that
                requires grad); contiguous or feature-major, as ``keys`` of `cache_attention`.
            position: where the first row of each batch element goes (a `Position`).
        """
        self._own("x", x)
        position = self._own_position("position", position)
        dtype, device = self._chain_dtype("cache_write")
        self._add(CacheWriteOp(x, cache, position, dtype, device), dtype, device)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the chain's weights (of its input), ``None`` before its first op."""
        return self._dtype

    @property
    def device(self) -> torch.device | None:
        """The device of the chain's weights (of its input), ``None`` before its first op."""
        return self._device

    @property
    def steps(self) -> int:
        """The number of attention steps (states a call takes and returns)."""
        return len(self._steps)

    # calling

    def __call__(
        self,
        x: Tensor,
        states: list[tuple[Tensor, Tensor] | None] | tuple | None = None,
        *,
        output: Slot | None = None,
        positions: list[int] | tuple[int, ...] = (),
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Run the chain on ``x``.

        Arguments:
            x: `(R, width)`.
            states: a list (or tuple) of one ``(S, Z)`` per attention step, ``S``
                `(R, H, E, M)` and ``Z`` `(R, H, E)`, or ``None`` for a step's first call;
                ``None``: all first calls.
            output: the value to return (default: the last value made).
            positions: one int per `position` of the chain, each from 0 to its limit.

        Returns:
            ``output``'s `(R, D)` value and the new states, one ``(S, Z)`` per attention step.
        """
        if not self._ops:
            raise ValueError("the chain has no ops")
        self._own("output", output, optional=True)
        x = check_tensor("x", x, floating=True)
        width = self._widths[0]
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"x must have shape (R, {width}); got {tuple(x.shape)}")
        if x.dtype != self._dtype or x.device != self._device:
            raise TypeError(
                f"x must have the dtype and device of the chain's weights ({self._dtype}, "
                f"{self._device}); got {x.dtype}, {x.device}"
            )
        checked = check_states(states, self._steps, x.shape[0])
        # the held tensors first: one that changed shape (a longer cache) makes the chain's
        # limits stale, which `WeightChangedError` tells its maker
        compiled = self._check_weights()
        positions = self._check_positions(positions)
        target = output if output is not None else self._last
        if compiled is not None and self._compiled_serves(x, checked):
            return self._run_compiled(x, checked, target, compiled, positions)
        return self._run_composed(x, checked, target, positions)

    def _check_positions(self, positions: object) -> list[int]:
        if not isinstance(positions, (list, tuple)) or len(positions) != len(self._positions):
            got = (
                f"{len(positions)} positions"
                if isinstance(positions, (list, tuple))
                else type(positions).__name__
            )
            raise ValueError(
                f"positions must be a list of {len(self._positions)} ints (one per position of "
                f"the chain); got {got}"
            )
        for i, (p, position) in enumerate(zip(positions, self._positions)):
            if type(p) is not int or not 0 <= p <= position.limit:
                raise ValueError(f"positions[{i}] must be an int from 0 to {position.limit}; "
                                 f"got {p!r}")  # fmt: skip
        return list(positions)
