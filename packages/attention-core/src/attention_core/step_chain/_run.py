"""How a `StepChain` runs: the checks of its held weights at each call, its compiled program
per row count and the two paths of a call (the compiled chain, the ops' public functions).

`ChainRunner` is `StepChain`'s base: it holds the state of the calls, the chain the ops."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import PLAIN_TENSORS, layouts, storage_holds, storages
from .._extension import address, binding, direct_call_mode, use_kernels
from ._ops import Bases, LinearStepOp, Op, Slot, columns_of

__all__ = ["ChainRunner", "WeightChangedError"]

_PROGRAMS = 8  # programs kept per chain, one per row count


class WeightChangedError(ValueError):
    """A weight of a `StepChain` changed its shape, dtype or device after it was added.

    Also raised when a weight's storage no longer holds it. The chain's ops no longer fit the
    weight: make a new chain."""


class ChainRunner:
    """The calls of a chain of ops (`StepChain` builds them)."""

    _ops: list[Op]
    _widths: list[int]
    _scalars: list[float]
    _specs: list[tuple | None]
    _held: tuple[Tensor | None, ...] | None
    _distinct: tuple[Tensor, ...]
    _steps: list[LinearStepOp]
    _checked: tuple | None
    _programs: dict[int, tuple[Tensor, Bases, int]]
    _written: tuple[Tensor, ...]

    def _weights(self) -> tuple[Tensor | None, ...]:
        """Every op's weights in program order (kept: the ops do not change once added)."""
        if self._held is None:
            self._held = tuple(w for op in self._ops for w in op.weights())
            # each tensor once (a norm or a cache several ops hold): the layouts compared at
            # every call
            unique: dict[int, Tensor] = {}
            for w in self._held:
                if w is not None:
                    unique.setdefault(id(w), w)
            self._distinct = tuple(unique.values())
            self._written = tuple(t for op in self._ops for t in op.written())
        return self._held

    def _check_weights(self) -> tuple | None:
        """Compare the weights' layouts with the last checked ones and, when one changed,
        check them again: a weight must keep the shape, dtype and device it was added with
        (`WeightChangedError`) and its storage must hold it. Returns what the compiled chain
        reads (layouts, addresses, storages), ``None`` when it cannot read them (a tensor
        subclass, a weight in a layout its op does not read: see `Op.readable`)."""
        checked = self._checked
        weights = self._weights()
        current = layouts(self._distinct)
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
        self._programs.clear()  # their strides are the weights' layouts' (a cache's included)
        held = [w for w in weights if w is not None]
        if any(type(w) not in PLAIN_TENSORS for w in held) or not all(
            op.readable() for op in self._ops
        ):
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
        positions: list[int],
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
            program.data_ptr(), program.numel(), addresses, self._scalars, positions,
            torch.get_num_threads(),
        )  # fmt: skip
        if self._written:  # what torch's in-place ops do: autograd sees the caches changed
            written = [c for c in self._written if not c.is_inference()]
            if written:
                torch.autograd.graph.increment_version(written)
        if target.buffer == 0:
            return columns_of(x, target), new_states
        start, width = bases.offsets[target.buffer], bases.widths[target.buffer]
        out = columns_of(work[start : start + rows * width].view(rows, width), target)
        # a copy of the output's rows, not a view that would keep the workspace alive
        return out.clone(memory_format=torch.contiguous_format), new_states

    def _run_composed(
        self,
        x: Tensor,
        states: list[tuple[Tensor, Tensor] | None],
        target: Slot,
        positions: list[int],
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        for op in self._ops:  # all before any op runs, as the compiled chain's checks
            op.check_call(x.shape[0], positions)
        values = [x]
        new_states: list[tuple[Tensor, Tensor]] = []
        for op in self._ops:
            state = states[op.index] if isinstance(op, LinearStepOp) else None
            y, new = op.compose(values, state, positions)
            values.append(y)
            if new is not None:
                new_states.append(new)
        return columns_of(values[target.buffer], target), new_states


def _spec(spec: tuple | None) -> object:
    return None if spec is None else (tuple(spec[0]), *spec[1:])
