"""Preallocated key/value buffers of the fast paths: one write per step, no re-stacking.

* ``KVStore``, the buffer that one forward call writes each step into (no re-stacking of the
  past per step), with two autograd functions that let gradients reach the steps that wrote
  it without saving a copy of the memory per step: attention steps add the gradients of the
  slots they read into ``grad_keys``/``grad_values``, and each write collects the gradient of
  its own slots (see ``Write``);
* ``RingBuffer``, the fixed-size memory of token-by-token decoding, written in place.

Einstein notation: ``b`` batch, ``h`` heads, ``m``/``c`` memory slots / buffer capacity,
``n`` steps written at once, ``d`` head feature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from .memory import FeedbackMemory

__all__ = ["KVStore", "Read", "RingBuffer", "Write"]


class KVStore:
    """Keys and values of every step of one forward call, preallocated.

    ``keys``/``values`` have shape ``(b h, c, d)`` (heads folded into the batch, the layout
    of the batched products), the two halves of one buffer ``kv`` ``(2, b h, c, d)``;
    ``keys4``/``values4`` are their ``(b, h, c, d)`` views. Slot
    ``i`` is written once (by `write`) and read by the attention of later steps as a
    narrowed view, never copied. ``grad_keys``/``grad_values`` collect the gradients of the
    slots during the backward pass (allocated on first use).
    """

    def __init__(self, like: Tensor, batch: int, heads: int, capacity: int, dim_head: int):
        self.batch, self.heads = batch, heads
        self.kv = like.new_empty(2, batch * heads, capacity, dim_head)
        self.keys, self.values = self.kv[0], self.kv[1]
        self.grad_keys: Tensor | None = None
        self.grad_values: Tensor | None = None
        self.size = 0
        # (lo, m, [(ds, q, pd, dout)]): readers of slots lo .. lo + m - 1 not yet added
        self._pending: tuple[int, int, list[tuple[Tensor, Tensor, Tensor, Tensor]]] | None = None

    @property
    def keys4(self) -> Tensor:
        return self.keys.view(self.batch, self.heads, *self.keys.shape[1:])

    @property
    def values4(self) -> Tensor:
        return self.values.view(self.batch, self.heads, *self.values.shape[1:])

    def write(self, keys: Tensor, values: Tensor) -> Tensor | None:
        """Append ``keys``/``values`` ``(b, h, n, d)``; returns the write's autograd link.

        The link is a scalar that every later reader takes as an input, so that the backward
        pass runs the readers before the writers (it is ``None`` without autograd).
        """
        start = self.size
        self.size += keys.shape[2]
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            return Write.apply(keys, values, self, start)
        self.keys4[:, :, start : self.size].copy_(keys)
        self.values4[:, :, start : self.size].copy_(values)
        return None

    def read(self, lo: int, hi: int, link: Tensor | None, detach: bool) -> tuple[Tensor, Tensor]:
        """Copies ``(b, h, hi - lo, d)`` of slots ``lo .. hi - 1`` (differentiable unless
        ``detach``)."""
        if detach or link is None or not torch.is_grad_enabled():
            return self.keys4[:, :, lo:hi].clone(), self.values4[:, :, lo:hi].clone()
        return Read.apply(link, self, lo, hi)

    def _grads(self) -> tuple[Tensor, Tensor]:
        if self.grad_keys is None or self.grad_values is None:
            self.grad_keys = torch.zeros_like(self.keys)
            self.grad_values = torch.zeros_like(self.values)
        return self.grad_keys, self.grad_values

    def accumulate(self, lo: int, dk: Tensor, dv: Tensor) -> None:
        """Add the gradients ``dk``/``dv`` ``(b h, m, d)`` of slots ``lo .. lo + m - 1``."""
        grad_keys, grad_values = self._grads()
        hi = lo + dk.shape[1]
        grad_keys[:, lo:hi].add_(dk)
        grad_values[:, lo:hi].add_(dv)

    def accumulate_products(self, lo: int, ds: Tensor, q: Tensor, pd: Tensor, dout: Tensor) -> None:
        """Add ``ds^T q`` to the key gradients and ``pd^T dout`` to the value gradients of
        slots ``lo .. lo + m - 1`` (``ds``/``pd`` ``(b h, i, m)``, ``q``/``dout``
        ``(b h, i, d)``: one reader's score gradients and attention weights).

        Every layer of a window reads the same slots, so the products are held back and
        added together, one pass over the gradient slice per window instead of one per
        layer: a different slice, or `take_grad`, adds them.
        """
        m = ds.shape[2]
        if self._pending is not None and self._pending[:2] != (lo, m):
            self._flush()
        if self._pending is None:
            self._pending = (lo, m, [])
        self._pending[2].append((ds, q, pd, dout))

    def _flush(self) -> None:
        if self._pending is None:
            return
        (lo, m, readers), self._pending = self._pending, None
        grad_keys, grad_values = self._grads()
        if len(readers) == 1:
            ds, q, pd, dout = readers[0]
        else:  # "r (b h) i m -> (b h) (r i) m": the readers as more queries
            ds, q, pd, dout = (torch.cat(parts, dim=1) for parts in zip(*readers))
        grad_keys[:, lo : lo + m].baddbmm_(ds.mT, q)
        grad_values[:, lo : lo + m].baddbmm_(pd.mT, dout)

    def take_grad(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Remove and return the gradients ``(b, h, hi - lo, d)`` collected for slots
        ``lo .. hi - 1``."""
        self._flush()
        b, h, d = self.batch, self.heads, self.keys.shape[2]
        if self.grad_keys is None or self.grad_values is None:
            zeros = self.keys.new_zeros(b, h, hi - lo, d)
            return zeros, zeros
        dk = self.grad_keys[:, lo:hi].clone()
        dv = self.grad_values[:, lo:hi].clone()
        self.grad_keys[:, lo:hi].zero_()  # ready for another backward (retain_graph)
        self.grad_values[:, lo:hi].zero_()
        return dk.view(b, h, hi - lo, d), dv.view(b, h, hi - lo, d)


class Write(Function):
    """Copy ``keys``/``values`` ``(b, h, n, d)`` into ``store`` at ``start``; returns a link.

    Backward: the gradient of the written slots is what the readers have accumulated in
    ``store`` by then. Every reader of slot ``i`` depends (through the link of a write at or
    after ``i``) on this write, so autograd runs all of them first.
    """

    @staticmethod
    def forward(ctx: Any, keys: Tensor, values: Tensor, store: KVStore, start: int) -> Tensor:
        stop = start + keys.shape[2]
        store.keys4[:, :, start:stop].copy_(keys)
        store.values4[:, :, start:stop].copy_(values)
        ctx.store, ctx.start, ctx.stop = store, start, stop
        return keys.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, _grad_link: Tensor) -> tuple[Tensor, Tensor, None, None]:
        dk, dv = ctx.store.take_grad(ctx.start, ctx.stop)
        return dk, dv, None, None


class Read(Function):
    """Copies ``(b, h, hi - lo, d)`` of slots ``lo .. hi - 1`` of ``store``, differentiable:
    their gradients are added to the store for the writers (used to return a memory that
    keeps its graph)."""

    @staticmethod
    def forward(ctx: Any, link: Tensor, store: KVStore, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        ctx.store, ctx.lo = store, lo
        return store.keys4[:, :, lo:hi].clone(), store.values4[:, :, lo:hi].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dk: Tensor, dv: Tensor) -> tuple[Tensor, None, None, None]:
        bh = ctx.store.keys.shape[0]
        ctx.store.accumulate(ctx.lo, dk.reshape(bh, *dk.shape[2:]), dv.reshape(bh, *dv.shape[2:]))
        return dk.new_zeros(()), None, None, None


class RingBuffer:
    """The memory of token-by-token decoding: the last ``capacity`` steps, in place.

    Every step is written twice, at ``slot`` and ``slot + capacity`` of a ``(b h, 2c, d)``
    buffer, so that the last ``filled`` steps are always the contiguous slots
    ``[next + c - filled, next + c)`` in time order: one step costs two small copies per
    tensor whatever the memory length (no shifting, no concatenation). Keys and values are the
    halves of one buffer ``kv`` ``(2, b h, 2c + scratch, d)``. ``scratch`` more slots
    at the end leave room after the memory for a window's own keys (slots ``next + c`` and
    later are never read as memory before a write refreshes them).
    """

    def __init__(self, memory: FeedbackMemory, capacity: int, scratch: int = 0):
        """Arguments: ``memory``, keys and values ``(b, h, m, d)`` to start from,
        ``capacity``, the number of steps kept, and ``scratch``, the most window keys
        written after the memory."""
        b, h, m, d = memory.keys.shape
        self.batch, self.heads, self.capacity = b, h, capacity
        self.kv = memory.keys.new_zeros(2, b * h, 2 * capacity + scratch, d)
        self.keys, self.values = self.kv[0], self.kv[1]
        self.filled = 0
        self.next = 0  # slot of the next write, in [0, capacity)
        if m:
            self.append(memory.keys, memory.values)

    def append(self, keys: Tensor, values: Tensor) -> None:
        """Write ``keys``/``values`` ``(b, h, n, d)`` (the oldest ones drop out if full)."""
        c = self.capacity
        if c == 0:
            return
        n = keys.shape[2]
        if n > c:
            keys, values, n = keys[:, :, -c:], values[:, :, -c:], c
        shape = (self.batch, self.heads, self.keys.shape[1], keys.shape[3])
        if n == 1:  # the decoding step: two small copies per tensor
            s = self.next
            for buffer, new in ((self.keys, keys), (self.values, values)):
                buffer = buffer.view(shape)
                buffer[:, :, s : s + 1].copy_(new)
                buffer[:, :, s + c : s + c + 1].copy_(new)
        else:
            slots = (self.next + torch.arange(n, device=keys.device)) % c
            for buffer, new in ((self.keys, keys), (self.values, values)):
                buffer = buffer.view(shape)
                buffer.index_copy_(2, slots, new)
                buffer.index_copy_(2, slots + c, new)
        self.advance(n)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` steps whose keys and values are written at the slots from ``next``
        (and ``capacity`` later): by `append`, or by the caller (a decoding chain)."""
        self.next = (self.next + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)

    def bounds(self) -> tuple[int, int]:
        """Slots ``(lo, hi)`` of the last ``filled`` steps, oldest first."""
        hi = self.next + self.capacity
        return hi - self.filled, hi

    def view(self) -> tuple[Tensor, Tensor]:
        """The last ``filled`` keys and values ``(b, h, filled, d)``, oldest first (views)."""
        lo, hi = self.bounds()
        shape = (self.batch, self.heads, -1, self.keys.shape[2])
        return self.keys[:, lo:hi].view(shape), self.values[:, lo:hi].view(shape)
