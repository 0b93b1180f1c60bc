"""Attention of one window of queries over the feedback memory and the window itself.

Every layer of the Feedback Transformer (Fan et al. 2021, arXiv 2002.09402) attends, at step
``t``, to the memory of the steps before it, ``[m_{t-τ}, ..., m_{t-1}]``. When a window of
``w > 1`` steps is processed at once, the memory of the window's own earlier steps does not
exist yet, so query ``i`` of the window also attends to the window's keys ``j < i``
(strictly earlier, like the memory), computed from the layer's input: with ``w = 1`` this is
exactly the paper's attention, with ``w > 1`` an approximation.

Keys and values live in a preallocated buffer (``memory.KVStore`` or ``memory.RingBuffer``):
the memory is slots ``lo .. hi - 1`` and the window's own keys are written to the scratch
slots ``hi .. hi + w - 1`` (later overwritten by the window's memory), so one product covers
both and nothing is concatenated. With autograd, `MemoryAttention` saves the
attention weights, not the memory, and adds the memory's gradients to the store.

Einstein notation: ``b`` batch, ``h`` heads, ``i`` queries of the window (``w`` of them),
``m`` memory slots, ``j`` keys (``m`` memory slots, then the window), ``d`` head feature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ._kv_store import KVStore

if TYPE_CHECKING:
    from ._kv_store import RingBuffer

__all__ = [
    "MemoryAttention",
    "MemorySlice",
    "attend_window",
    "attention_backward",
    "attention_forward",
    "window_bias",
]


class MemorySlice:
    """Memory slots ``lo .. hi - 1`` of a key/value buffer ``source`` (``.keys``/``.values``
    of shape ``(b h, c, d)``, with room for the window's keys after ``hi``); ``link`` is the
    autograd link of the buffer's last write (or ``None``)."""

    __slots__ = ("hi", "link", "lo", "source")

    def __init__(self, source: KVStore | RingBuffer, lo: int, hi: int, link: Tensor | None = None):
        self.source, self.lo, self.hi, self.link = source, lo, hi, link

    def views(self, extra: int = 0) -> tuple[Tensor, Tensor]:
        """Keys and values ``(b h, hi - lo + extra, d)``: the memory and ``extra`` slots
        after it (views of the buffer)."""
        lo, hi = self.lo, self.hi + extra
        return self.source.keys[:, lo:hi], self.source.values[:, lo:hi]


def window_bias(bias: Tensor, m: int, w: int, w_max: int) -> tuple[Tensor, bool]:
    """The logit bias of a window of ``w`` queries over ``m`` memory slots and (if ``w > 1``)
    the window's own keys, from ``bias`` ``(h, w_max, M + w_max)`` (queries ``0 .. w_max - 1``
    over keys at ``-M .. w_max - 1``).

    Window keys that are not strictly earlier than the query get ``-inf``. Without memory the
    first query sees nothing; it is then allowed to see the first window key (so that no
    softmax row is empty) and the caller zeroes its output: the returned flag says so.

    Returns:
        bias ``(h, w, m + w)`` (``(h, 1, m)`` when ``w == 1``) and that flag.
    """
    M = bias.shape[2] - w_max
    if w == 1:
        return bias[:, :1, M - m : M], False
    hidden = torch.ones(w, w, dtype=torch.bool, device=bias.device).triu()
    if not m:
        hidden[0, 0] = False
    full = torch.zeros(w, m + w, dtype=torch.bool, device=bias.device)
    full[:, m:] = hidden
    return bias[:, :w, M - m : M + w].masked_fill(full, float("-inf")), not m


def _weights(
    q: Tensor, k: Tensor, bias: Tensor, dropout_p: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Attention weights ``(b h, i, j)`` (before and after dropout) and the dropout mask."""
    scores = torch.bmm(q, k.mT)
    scores.view(-1, *bias.shape).add_(bias)  # "(b h) i j + h i j"
    p = scores.softmax(dim=-1)
    if not dropout_p:
        return p, p, None
    keep = torch.empty_like(p, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
    return p, p * keep / (1.0 - dropout_p), keep


def _keys_values(
    memory: MemorySlice, kw: Tensor | None, vw: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The memory's keys and values followed by the window's, written to the scratch slots
    after the memory: ``(b h, j, d)`` views of the buffer."""
    if kw is None:
        return memory.views()
    if vw is None:
        raise ValueError("kw and vw must be both given or both None")
    hi, w = memory.hi, kw.shape[2]
    b, h = kw.shape[:2]
    for buffer, new in ((memory.source.keys, kw), (memory.source.values, vw)):
        buffer.view(b, h, *buffer.shape[1:])[:, :, hi : hi + w].copy_(new)
    return memory.views(w)


def attend_window(
    q: Tensor,
    kw: Tensor | None,
    vw: Tensor | None,
    bias: Tensor,
    memory: MemorySlice,
    first_empty: bool,
    dropout_p: float,
) -> Tensor:
    """``softmax(q [km; kw]^T + bias) [vm; vw]`` for one window.

    Arguments:
        q: ``(b h, i, d)`` queries, already multiplied by the softmax scale.
        kw: ``(b, h, i, d)`` the window's keys, or ``None`` (single step).
        vw: ``(b, h, i, d)`` the window's values, or ``None``.
        bias: from `window_bias`, ``(h, i, m + i)`` or ``(h, 1, m)``.
        memory: the memory slots (``m`` of them, maybe 0) and the buffer holding them.
        first_empty: zero the first query's output (it sees no key).
        dropout_p: dropout on the attention weights (``0`` outside training).

    Returns:
        ``(b h, i, d)``. Uses `MemoryAttention` when gradients are recorded.
    """
    if torch.is_grad_enabled():
        return MemoryAttention.apply(q, kw, vw, bias, memory.link, memory, first_empty, dropout_p)
    return attention_forward(q, kw, vw, bias, memory, first_empty, dropout_p)[0]


def attention_forward(
    q: Tensor,
    kw: Tensor | None,
    vw: Tensor | None,
    bias: Tensor,
    memory: MemorySlice,
    first_empty: bool,
    dropout_p: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`attend_window` without autograd: the output ``(b h, i, d)``, the attention
    weights ``(b h, i, j)`` before dropout and the dropout mask (or ``None``), which
    `attention_backward` takes (weights ``None``: a single step without memory)."""
    if kw is None and memory.hi == memory.lo:
        return q.new_zeros(q.shape), None, None  # a single step without memory sees nothing
    k, v = _keys_values(memory, kw, vw)
    p, pd, keep = _weights(q, k, bias, dropout_p)
    out = torch.bmm(pd, v)
    if first_empty:
        out[:, 0] = 0.0
    return out, p, keep


def attention_backward(
    dout: Tensor,
    q: Tensor,
    kw: Tensor | None,
    vw: Tensor | None,
    p: Tensor | None,
    keep: Tensor | None,
    out: Tensor,
    memory: MemorySlice,
    first_empty: bool,
    dropout_p: float,
    bias_shape: torch.Size | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `attention_forward` for ``dout`` ``(b h, i, d)``: ``dq``, the
    window's ``dkw``/``dvw`` (shaped like ``kw``/``vw``), and the bias gradient (of shape
    ``bias_shape``; ``None`` skips it); all ``None`` for a single step without memory. The
    memory's key and value gradients go to ``memory.source`` (its ``accumulate_products``);
    the memory is read from the buffer, not saved."""
    if p is None:  # the output was zero whatever the inputs: no gradient reaches them
        return None, None, None, None
    km, vm = memory.views()
    m = km.shape[1]
    if first_empty:
        dout = dout.clone()
        dout[:, 0] = 0.0
    pd = p if keep is None else p * keep / (1.0 - dropout_p)
    window_shape = None if kw is None else kw.shape
    if kw is not None:  # "b h w d -> (b h) w d"
        if vw is None:
            raise ValueError("kw and vw must be both given or both None")
        kw, vw = kw.reshape(-1, *kw.shape[2:]), vw.reshape(-1, *vw.shape[2:])

    # values, and the gradient of the (dropped-out) weights
    if vw is None:
        dpd = torch.bmm(dout, vm.mT)
    elif not m:
        dpd = torch.bmm(dout, vw.mT)
    else:
        dpd = torch.cat((torch.bmm(dout, vm.mT), torch.bmm(dout, vw.mT)), dim=-1)
    dp = dpd if keep is None else dpd * keep / (1.0 - dropout_p)

    # softmax: rowsum(dp * p) = rowsum(dout * out), with or without dropout
    ds = p * (dp - (dout * out).sum(dim=-1, keepdim=True))
    if kw is None:
        dq = torch.bmm(ds, km)
    elif not m:
        dq = torch.bmm(ds, kw)
    else:
        dq = torch.baddbmm(torch.bmm(ds[..., m:], kw), ds[..., :m], km)
    if m:  # the memory's key and value gradients: ds^T q and pd^T dout, added by the store
        if not isinstance(memory.source, KVStore):
            raise TypeError("gradients of the memory need a KVStore")
        memory.source.accumulate_products(memory.lo, ds[..., :m], q, pd[..., :m], dout)
    dkw = dvw = None
    if window_shape is not None:
        dkw = torch.bmm(ds[..., m:].mT, q).reshape(window_shape)
        dvw = torch.bmm(pd[..., m:].mT, dout).reshape(window_shape)
    dbias = None if bias_shape is None else ds.view(-1, *bias_shape).sum(dim=0)
    return dq, dkw, dvw, dbias


class MemoryAttention(Function):
    """`attend_window` with a backward pass that reads the memory from the buffer
    (no copy of it is saved, only the attention weights) and adds its gradients to the
    store (``accumulate``).

    ``apply(q, kw, vw, bias, link, memory, first_empty, dropout_p)``; ``link`` orders the
    backward pass after every later reader of the memory.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        kw: Tensor | None,
        vw: Tensor | None,
        bias: Tensor,
        link: Tensor | None,
        memory: MemorySlice,
        first_empty: bool,
        dropout_p: float,
    ) -> Tensor:
        out, p, keep = attention_forward(q, kw, vw, bias, memory, first_empty, dropout_p)
        ctx.memory, ctx.first_empty, ctx.dropout_p = memory, first_empty, dropout_p
        ctx.bias_shape = bias.shape
        ctx.save_for_backward(q, kw, vw, p, keep, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, dout: Tensor
    ) -> tuple[
        Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None, None, None, None
    ]:
        q, kw, vw, p, keep, out = ctx.saved_tensors
        memory = ctx.memory
        bias_shape = ctx.bias_shape if ctx.needs_input_grad[3] else None
        dq, dkw, dvw, dbias = attention_backward(
            dout, q, kw, vw, p, keep, out, memory, ctx.first_empty, ctx.dropout_p, bias_shape
        )
        dlink = None if memory.link is None else memory.link.new_zeros(())
        return dq, dkw, dvw, dbias, dlink, None, None, None
