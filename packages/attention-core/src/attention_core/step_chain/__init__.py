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
- `StepChain.columns`: a range of columns of a value (e.g. the queries of a stacked
  query-key-value product).

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

import itertools

import torch
from torch import Tensor

from .._checks import PLAIN_TENSORS, layouts, storage_holds, storages
from .._extension import address, binding, direct_call_mode, use_kernels
from ..checks import check_tensor
from ._ops import (
    Bases,
    FeedForwardOp,
    LinearOp,
    LinearStepOp,
    Op,
    Slot,
    check_states,
    columns_of,
)

__all__ = ["Slot", "StepChain", "WeightChangedError"]

_IDS = itertools.count()
_PROGRAMS = 8  # programs kept per chain, one per row count


class WeightChangedError(ValueError):
    """A weight of a `StepChain` changed its shape, dtype or device after it was added.

    Also raised when a weight's storage no longer holds it. The chain's ops no longer fit the
    weight: make a new chain."""


class StepChain:
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
        self._widths = [width]  # buffer b's row length; buffer 0 is the input
        self._ops: list[Op] = []
        self._eps: list[float] = []  # each op's eps, in program order
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
        self._id = next(_IDS)
        self.input = Slot(self._id, 0, 0, self._widths[0])

    def _add(self, op: Op, dtype: torch.dtype, device: torch.device) -> Slot:
        if self._dtype is None:
            self._dtype, self._device = dtype, device
        elif (dtype, device) != (self._dtype, self._device):
            raise TypeError(
                f"every op of a chain must have the dtype and device of its first op "
                f"({self._dtype}, {self._device}); got {dtype}, {device}"
            )
        self._ops.append(op)
        self._eps.append(float(op.eps))
        self._specs += [None if w is None else (w.shape, w.dtype, w.device) for w in op.weights()]
        self._widths.append(op.width)
        self._programs.clear()
        self._checked = None
        self._held = None
        return Slot(self._id, len(self._widths) - 1, 0, op.width)

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
        if self._dtype is None:
            raise ValueError("a chain's first op must hold weights (linear or feed_forward)")
        op = LinearStepOp(
            query, key, value, heads, eps, elu_feature_map, len(self._steps), self._dtype,
            self._device,  # type: ignore[arg-type]
        )  # fmt: skip
        self._steps.append(op)
        return self._add(op, self._dtype, self._device)  # type: ignore[arg-type]

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
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Run the chain on ``x``.

        Arguments:
            x: `(R, width)`.
            states: a list (or tuple) of one ``(S, Z)`` per attention step, ``S``
                `(R, H, E, M)` and ``Z`` `(R, H, E)`, or ``None`` for a step's first call;
                ``None``: all first calls.
            output: the value to return (default: the last op's).

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
        target = (
            output if output is not None else Slot(self._id, len(self._ops), 0, self._widths[-1])
        )
        compiled = self._check_weights()
        if compiled is not None and self._compiled_serves(x, checked):
            return self._run_compiled(x, checked, target, compiled)
        return self._run_composed(x, checked, target)

    def _weights(self) -> tuple[Tensor | None, ...]:
        """Every op's weights in program order (kept: the ops do not change once added)."""
        if self._held is None:
            self._held = tuple(w for op in self._ops for w in op.weights())
        return self._held

    def _check_weights(self) -> tuple | None:
        """Compare the weights' layouts with the last checked ones and, when one changed,
        check them again: a weight must keep the shape, dtype and device it was added with
        (`WeightChangedError`) and its storage must hold it. Returns what the compiled chain
        reads (layouts, addresses, storages), ``None`` when it cannot read them (a tensor
        subclass, a weight that is not contiguous)."""
        checked = self._checked
        weights = self._weights()
        current = layouts(weights)
        if checked is not None and current == checked[0]:
            return checked if checked[1] is not None else None
        for i, (w, spec) in enumerate(zip(weights, self._specs)):
            got = None if w is None else (w.shape, w.dtype, w.device)
            if got != spec:
                raise WeightChangedError(
                    f"weight {i} of the chain changed since it was added: it was "
                    f"{_spec(spec)}, now {_spec(got)} (make a new chain)"
                )
            if w is not None and not storage_holds(w):
                raise WeightChangedError(
                    f"weight {i} of the chain has lost its storage (it holds fewer elements "
                    "than the weight's shape and strides need)"
                )
        held = [w for w in weights if w is not None]
        if any(type(w) not in PLAIN_TENSORS or not w.is_contiguous() for w in held):
            self._checked = (current, None, None)
            return None
        self._checked = (current, [address(w) for w in weights], storages(weights))
        return self._checked

    def _compiled_serves(self, x: Tensor, states: list[tuple[Tensor, Tensor] | None]) -> bool:
        """Whether the compiled chain runs this call: plain float32/float64 CPU tensors, grad
        mode off, not compiling, rows to compute."""
        if type(x) not in PLAIN_TENSORS or not direct_call_mode() or not use_kernels(x):
            return False
        return x.shape[0] > 0 and all(
            type(t) in PLAIN_TENSORS for state in states if state for t in state
        )

    def _program(self, rows: int) -> tuple[Tensor, Bases, int]:
        """The compiled program for ``rows`` rows, its buffers and the workspace's size."""
        cached = self._programs.get(rows)
        if cached is not None:
            return cached
        offsets, total = [0], 0
        for w in self._widths[1:]:
            offsets.append(total)
            total += rows * w
        n_weights, n_states = len(self._weights()), 2 * len(self._steps)
        first_state = 2 + n_weights
        bases = Bases(
            rows, tuple(offsets), tuple(self._widths), 2, first_state, first_state + n_states
        )
        program: list[int] = []
        weight_index = 0
        for b, op in enumerate(self._ops, start=1):
            program.append(op.kind)
            program += op.fields(bases, (1, offsets[b]), weight_index)
            weight_index += len(op.weights())
        # as an int64 tensor: the binding reads it in place (a list would be converted at
        # every call)
        entry = (torch.tensor(program, dtype=torch.int64), bases, total)
        if len(self._programs) >= _PROGRAMS:
            self._programs.clear()  # many row counts: keep the latest ones only
        self._programs[rows] = entry
        return entry

    def _run_compiled(
        self,
        x: Tensor,
        states: list[tuple[Tensor, Tensor] | None],
        target: Slot,
        checked: tuple,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        rows = x.shape[0]
        if x.stride(1) != 1 or x.stride(0) != x.shape[1]:
            x = x.contiguous()
        program, bases, work_size = self._program(rows)
        work = x.new_empty(work_size)
        # contiguous states (copies only where they are not), alive until the call returns
        given = [None if s is None else (s[0].contiguous(), s[1].contiguous()) for s in states]
        new_states = []
        for step in self._steps:  # each S and Z its own tensor, as the ops' own results
            S_shape, Z_shape = step.state_shapes(rows)
            new_states.append((x.new_empty(S_shape), x.new_empty(Z_shape)))
        # `checked` holds the weights' storages for the call, whatever another thread does
        addresses = [x.data_ptr(), work.data_ptr(), *checked[1]]
        for pair in given:
            addresses += (0, 0) if pair is None else (pair[0].data_ptr(), pair[1].data_ptr())
        for S, Z in new_states:
            addresses += (S.data_ptr(), Z.data_ptr())
        binding("step_chain", x.dtype)(
            program.data_ptr(), program.numel(), addresses, self._eps, torch.get_num_threads()
        )
        if target.buffer == 0:
            return columns_of(x, target), new_states
        start, width = bases.offsets[target.buffer], bases.widths[target.buffer]
        out = columns_of(work[start : start + rows * width].view(rows, width), target)
        # a copy of the output's rows, not a view that would keep the workspace alive
        return out.clone(memory_format=torch.contiguous_format), new_states

    def _run_composed(
        self, x: Tensor, states: list[tuple[Tensor, Tensor] | None], target: Slot
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        values = [x]
        new_states: list[tuple[Tensor, Tensor]] = []
        for op in self._ops:
            state = states[op.index] if isinstance(op, LinearStepOp) else None
            y, new = op.compose(values, state)
            values.append(y)
            if new is not None:
                new_states.append(new)
        return columns_of(values[target.buffer], target), new_states


def _spec(spec: tuple | None) -> object:
    return None if spec is None else (tuple(spec[0]), *spec[1:])
