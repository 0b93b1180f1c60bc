"""Oracle top-k softmax attention: each query attends only to its ``topk`` best keys.

The keys are found exactly from the dense scores: the "exact top-k" baseline of Vyas et al. 2020,
"Fast Transformers with Clustered Attention", arXiv 2007.04825."""

from __future__ import annotations

from math import sqrt

import torch
from torch import nn

from .._checks import check_positive_int
from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Float, Int, Optional
from ..events import AttentionEvent, EventDispatcher
from ..masking import zero_padding
from ..nn.attend import attend
from ._inputs import check_attention_inputs
from .full_attention import attention_allowed, masked_softmax

__all__ = ["ExactTopKAttention"]


class ExactTopKAttention(nn.Module):
    """Softmax attention restricted to the ``topk`` highest-scoring allowed keys per query.

    The scores ``Q K^T`` are computed densely (``O(L S)``), the ``min(topk, S)`` largest
    among the keys allowed by ``attn_mask`` and ``key_lengths`` are kept and the softmax is
    taken over those only. A query with fewer allowed keys than ``topk`` attends to all of
    them; one with none gets a zero output. Ties are broken arbitrarily by ``torch.topk``.
    The scores only choose the keys (no gradient flows through the choice); the softmax
    attention under the resulting mask runs on PyTorch's fused ``scaled_dot_product_attention``
    unless a listener is registered on ``event_dispatcher``, which then receives the weights.

    Arguments:
        topk: how many keys each query attends to (default: 32).
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights (default: 0.1).
        event_dispatcher: dispatcher instance or key for `AttentionEvent` (the sparse
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
        _, _, S, _, E, _ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths
        )
        softmax_temp = self.softmax_temp or 1.0 / sqrt(E)
        keys = zero_padding(keys, key_lengths)
        values = zero_padding(values, key_lengths)
        allowed = attention_allowed(attn_mask, key_lengths)  # None: nothing masked
        listening = self.event_dispatcher.has_listeners
        scores = None
        topk = min(self.topk, S)
        if topk < S or listening:
            # with a listener the scores are kept for the softmax; otherwise they only choose
            with torch.set_grad_enabled(listening and torch.is_grad_enabled()):
                scores = torch.einsum("nlhe,nshe->nhls", queries, keys)
        if topk < S:
            with torch.no_grad():
                ranked = scores if allowed is None else scores.masked_fill(~allowed, -torch.inf)
                best = ranked.topk(topk, dim=-1, sorted=False).indices
                kept = torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, best, True)
            allowed = kept if allowed is None else allowed & kept
        if listening:
            A = self.dropout(masked_softmax(scores * softmax_temp, allowed))
            self.event_dispatcher.dispatch(AttentionEvent(self, A))
            return torch.einsum("nhls,nshd->nlhd", A, values).contiguous()
        # SDPA under the top-k mask: Q K^T is computed again inside the fused kernel, but
        # neither the scores nor the weights are stored for the backward pass
        out = attend(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            mask=allowed,
            dropout_p=self.dropout.p,
            scale=softmax_temp,
            training=self.training,
        )
        return out.transpose(1, 2).contiguous()


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
