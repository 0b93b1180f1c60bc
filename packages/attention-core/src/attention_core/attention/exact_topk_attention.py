"""Oracle top-k softmax attention: each query attends only to its ``topk`` best keys, found
exactly from the dense scores (the "exact top-k" baseline of Vyas et al. 2020, "Fast
Transformers with Clustered Attention", arXiv 2007.04825)."""

from __future__ import annotations

from math import sqrt

import torch
from torch import nn

from .._checks import check_positive_int
from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Float, Int, Optional
from ..events import AttentionEvent, EventDispatcher
from ._inputs import check_attention_inputs
from .full_attention import attention_allowed, masked_softmax

__all__ = ["ExactTopKAttention"]


class ExactTopKAttention(nn.Module):
    """Softmax attention restricted to the ``topk`` highest-scoring allowed keys per query.

    The scores ``Q K^T`` are computed densely (``O(L S)``), the ``min(topk, S)`` largest
    among the keys allowed by ``attn_mask`` and ``key_lengths`` are kept and the softmax is
    taken over those only. A query with fewer allowed keys than ``topk`` attends to all of
    them; one with none gets a zero output. Ties are broken arbitrarily by ``torch.topk``.

    Arguments:
        topk: how many keys each query attends to (default: 32).
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights (default: 0.1).
        event_dispatcher: dispatcher instance or key for :class:`AttentionEvent` (the sparse
            attention as a dense ``(N, H, L, S)`` matrix).

    Shapes: queries ``(N, L, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``,
    masks ``(L, S)``, ``(N, L)``, ``(N, S)``; returns ``(N, L, H, D)``.
    """

    def __init__(self, topk=32, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.topk = check_positive_int("topk", topk)
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return the top-k softmax attention ``(N, L, H, D)``."""
        _, L, S, _, E, _ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths
        )
        softmax_temp = self.softmax_temp or 1.0 / sqrt(E)
        scores = torch.einsum("nlhe,nshe->nhls", queries, keys)
        allowed = attention_allowed(attn_mask, key_lengths)
        if allowed is None:
            allowed = torch.ones(1, 1, L, S, dtype=torch.bool, device=queries.device)
        topk = min(self.topk, S)
        if topk < S:
            with torch.no_grad():
                ranked = scores.masked_fill(~allowed, float("-inf"))
                best = ranked.topk(topk, dim=-1, sorted=False).indices
                kept = torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, best, True)
            allowed = allowed & kept
        A = self.dropout(masked_softmax(scores * softmax_temp, allowed))
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(AttentionEvent(self, A))
        return torch.einsum("nhls,nshd->nlhd", A, values).contiguous()


AttentionRegistry.register(
    "exact-topk",
    ExactTopKAttention,
    [
        ("topk", Optional(Int, 32)),
        ("softmax_temp", Optional(Float)),
        ("attention_dropout", Optional(Float, 0.1)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
