"""Softmax attention, ``softmax(Q K^T / sqrt(E)) V`` (Vaswani et al. 2017, arXiv 1706.03762)."""

from __future__ import annotations

from math import sqrt

import torch
from torch import Tensor, nn

from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Float, Optional
from ..events import AttentionEvent, EventDispatcher
from ..masking import BaseMask
from ._inputs import check_attention_inputs

__all__ = ["FullAttention", "masked_softmax"]


def masked_softmax(scores: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over the last axis where ``allowed`` is ``True``; rows with no allowed
    entry become zeros instead of NaN.

    Arguments:
        scores: ``(..., S)`` logits.
        allowed: boolean tensor broadcastable to ``scores``, or ``None`` for no mask.
    """
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(dim=-1, keepdim=True)
    # under torch.compile, always take the (equivalent) branch: no data-dependent control flow
    if torch.compiler.is_compiling() or bool(empty.any()):
        scores = scores.masked_fill(empty, 0.0)
        return torch.softmax(scores, dim=-1).masked_fill(empty | ~allowed, 0.0)
    return torch.softmax(scores, dim=-1)


def attention_allowed(attn_mask: BaseMask, key_lengths: BaseMask) -> Tensor | None:
    """Combine an ``(L, S)`` attention mask and ``(N, S)`` key lengths into an
    ``(N, 1, L, S)`` boolean mask, or ``None`` when nothing is masked."""
    allowed = None
    if not attn_mask.all_ones:
        allowed = attn_mask.bool_matrix[None, None]
    if not key_lengths.all_ones:
        keys = key_lengths.bool_matrix[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


class FullAttention(nn.Module):
    """Scaled dot-product (softmax) attention with arbitrary masks.

    Queries whose keys are all masked out get a zero output rather than NaN.

    Arguments:
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights (default: 0.1).
        event_dispatcher: dispatcher instance or key for :class:`AttentionEvent`.

    Shapes: queries ``(N, L, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``,
    masks ``(L, S)``, ``(N, L)``, ``(N, S)``; returns ``(N, L, H, D)``.
    """

    def __init__(self, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return ``softmax(softmax_temp * Q K^T + masks) V`` as ``(N, L, H, D)``."""
        E = check_attention_inputs(queries, keys, values, attn_mask, query_lengths, key_lengths)[4]
        softmax_temp = self.softmax_temp or 1.0 / sqrt(E)
        scores = torch.einsum("nlhe,nshe->nhls", queries * softmax_temp, keys)
        A = masked_softmax(scores, attention_allowed(attn_mask, key_lengths))
        A = self.dropout(A)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(AttentionEvent(self, A))
        return torch.einsum("nhls,nshd->nlhd", A, values).contiguous()


AttentionRegistry.register(
    "full",
    FullAttention,
    [
        ("softmax_temp", Optional(Float)),
        ("attention_dropout", Optional(Float, 0.1)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
