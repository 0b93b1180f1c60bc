"""Local attention: every query attends to a window of ``local_context`` keys around it.

The window is centred on the query's own position. References: Parmar et al. 2018, "Image
Transformer", arXiv 1802.05751; Beltagy et al. 2020, "Longformer", arXiv 2004.05150.

Einstein notation: n batch, h heads, l queries, k window slots, e/d features.
"""

from __future__ import annotations

from math import sqrt

import torch
from einops import rearrange
from torch import nn

from .._checks import check_positive_int
from ..attention_registry import (
    AttentionRegistry,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
)
from ..events import AttentionEvent, EventDispatcher
from ..local_product import local_dot_product, local_weighted_average
from ..masking import zero_padding
from ._inputs import check_attention_inputs
from .full_attention import masked_softmax

__all__ = ["LocalAttention"]


class LocalAttention(nn.Module):
    """Softmax attention restricted to a band of keys around each query.

    Query ``l`` may attend to the keys ``j`` in
    ``[l - local_context // 2, l - local_context // 2 + local_context)`` that ``attn_mask``
    and ``key_lengths`` allow; it is the same as `FullAttention` with that band
    combined into the masks, but costs ``O(L * local_context)`` instead of ``O(L * S)``.
    Queries with no allowed key get zeros. Queries and keys may differ in length.
    Dispatches an `AttentionEvent` with the ``(N, H, L, local_context)`` band of
    attention weights.

    Arguments:
        local_context: the window size, a positive int.
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights (default: 0.1).
        event_dispatcher: dispatcher instance or key.

    Shapes: queries ``(N, L, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``;
    returns ``(N, L, H, D)``.
    """

    def __init__(
        self, local_context, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""
    ):
        super().__init__()
        self.local_context = check_positive_int("local_context", local_context)
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return the local softmax attention as ``(N, L, H, D)``."""
        E = check_attention_inputs(queries, keys, values, attn_mask, query_lengths, key_lengths)[4]
        keys = zero_padding(keys, key_lengths)
        values = zero_padding(values, key_lengths)
        softmax_temp = self.softmax_temp or 1.0 / sqrt(E)
        q, k, v = (rearrange(t, "n l h e -> n h l e") for t in (queries, keys, values))
        QK = local_dot_product(
            q, k, attn_mask.additive_matrix, key_lengths.lengths, self.local_context
        )
        # local_dot_product marks every key outside the window or the masks with -inf
        A = masked_softmax(softmax_temp * QK, ~torch.isneginf(QK))
        A = self.dropout(A)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(AttentionEvent(self, A))
        return rearrange(local_weighted_average(A, v), "n h l d -> n l h d").contiguous()


AttentionRegistry.register(
    "local",
    LocalAttention,
    [
        ("local_context", Int),
        ("softmax_temp", Optional(Float)),
        ("attention_dropout", Optional(Float, 0.1)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
