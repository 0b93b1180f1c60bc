"""Oracle top-k softmax attention as a recurrence over a key/value cache.

Reference: the "exact top-k" baseline of Vyas et al. 2020, "Fast Transformers with Clustered
Attention", arXiv 2007.04825.

Each step appends its key and value to a `KVCache` and
attends with a softmax over the ``min(topk, t + 1)`` highest-scoring cached keys: the row of
the batch ``exact-topk`` attention with a causal mask.

Einstein notation: n batch, h heads, s cached positions, e query features, d value features.
"""

from __future__ import annotations

from math import sqrt
from typing import Any

import torch
from torch import Tensor

from attention_core.attention.exact_topk_attention import ExactTopKAttention
from attention_core.attention.full_attention import masked_softmax
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
)
from attention_core.events import AttentionEvent

from ...state import KVCache
from .base import RecurrentAttention
from .full_attention import check_cache

__all__ = ["RecurrentExactTopKAttention"]


# the batch attention gives the constructor, parameters and registry entry; the
# recurrent interface (first in the MRO) replaces its forward
class RecurrentExactTopKAttention(RecurrentAttention, ExactTopKAttention):  # type: ignore[misc]
    """Recurrent exact top-k attention, the dual of ``exact-topk`` with a causal mask.

    Arguments:
        topk: how many keys each step attends to (default: 32).
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights in training mode (default: 0.1).
        event_dispatcher: dispatcher instance or key for `AttentionEvent` (the sparse
            weights as ``(N, H, 1, t)``).

    Shapes: query and key ``(N, H, E)``, value ``(N, H, D)``; returns ``(N, H, D)``. The state
    is a `KVCache`; step ``t`` costs ``O(t)``.
    """

    def step(self, query: Tensor, key: Tensor, value: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Append ``key``/``value`` and attend to the ``topk`` best cached keys."""
        N, H, E = query.shape
        if state is None:
            state = KVCache.empty(N, H, E, value.shape[-1], dtype=query.dtype, device=query.device)
        else:
            state = check_cache(state, query, value, type(self).__name__)
        cache = state.append(key.unsqueeze(2), value.unsqueeze(2))
        # batched products on the feature-major cache (see full_attention.attend_cache)
        scores = torch.matmul(query.unsqueeze(2), cache.keys.transpose(-1, -2)).squeeze(2)
        allowed = None
        if self.topk < cache.length:
            with torch.no_grad():
                best = scores.topk(self.topk, dim=-1, sorted=False).indices
                allowed = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, best, True)
        temp = self.softmax_temp or 1.0 / sqrt(E)
        A = self.dropout(masked_softmax(scores * temp, allowed))
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(AttentionEvent(self, A.unsqueeze(2)))
        return torch.matmul(A.unsqueeze(2), cache.values).squeeze(2), cache


RecurrentAttentionRegistry.register(
    "exact-topk", RecurrentExactTopKAttention, AttentionRegistry.parameter_tuples("exact-topk")
)
