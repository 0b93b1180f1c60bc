"""Softmax cross attention with the memory projected once (Vaswani et al. 2017, arXiv 1706.03762).

The projected keys and values of the memory are kept in a
`MemoryState`; each step attends to them with a full mask
(padded memory positions excluded).

Einstein notation: n batch, t queries, s memory positions, h heads, e query features, d value
features.
"""

from __future__ import annotations

from math import sqrt
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from attention_core.attention.full_attention import FullAttention, masked_softmax
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentCrossAttentionRegistry,
)
from attention_core.events import AttentionEvent
from attention_core.masking import BaseMask, zero_padding

from ...state import MemoryState, check_state_tensor, check_state_type
from .base import RecurrentCrossAttention, check_memory_heads

__all__ = ["RecurrentCrossFullAttention"]


# the batch attention gives the constructor, parameters and registry entry; the
# recurrent interface (first in the MRO) replaces its forward
class RecurrentCrossFullAttention(RecurrentCrossAttention, FullAttention):  # type: ignore[misc]
    """Recurrent softmax cross attention, the dual of ``full`` with a full mask.

    Queries whose memory is empty (length 0) get zeros, as in the batch attention.

    Arguments:
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights in training mode (default: 0.1).
        event_dispatcher: dispatcher instance or key for `AttentionEvent` (weights of
            shape ``(N, H, T, S)``).

    Shapes: query ``(N, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``; returns
    ``(N, H, D)``.
    """

    def make_state(
        self,
        queries: Tensor,
        keys: Tensor | None,
        values: Tensor | None,
        key_lengths: BaseMask | None,
    ) -> Any:
        """Keep the memory's keys ``(N, H, S, E)``, values ``(N, H, S, D)`` and mask."""
        keys, values, key_lengths = check_memory_heads(queries, keys, values, key_lengths)
        key_mask = None if key_lengths.all_ones else key_lengths.bool_matrix
        # padded memory positions cannot leak, whatever they hold (NaN, inf)
        keys, values = zero_padding(keys, key_lengths), zero_padding(values, key_lengths)
        to_heads = lambda t: rearrange(t, "n s h e -> n h s e").contiguous()  # noqa: E731
        return MemoryState(to_heads(keys), to_heads(values), key_mask)

    def check_state(self, state: Any, queries: Tensor) -> Any:
        state = check_state_type("state", state, MemoryState, type(self).__name__)
        N, _, H, E = queries.shape
        check_state_tensor("state.keys", state.keys, (N, H, -1, E), queries)
        check_state_tensor("state.values", state.values, (N, H, state.keys.shape[2], -1), queries)
        return state

    def attend(self, queries: Tensor, state: Any) -> Tensor:
        """Softmax attention of ``(N, T, H, E)`` queries over the memory."""
        q = rearrange(queries, "n t h e -> n h t e")
        temp = self.softmax_temp or 1.0 / sqrt(queries.shape[-1])
        allowed = None if state.key_mask is None else state.key_mask[:, None, None, :]
        empty_rows = allowed is not None and not bool(allowed.any(dim=-1).all())
        if self.event_dispatcher.has_listeners or empty_rows:
            scores = torch.einsum("nhte,nhse->nhts", q * temp, state.keys)
            A = self.dropout(masked_softmax(scores, allowed))
            if self.event_dispatcher.has_listeners:
                self.event_dispatcher.dispatch(AttentionEvent(self, A))
            out = torch.einsum("nhts,nhsd->nhtd", A, state.values)
        else:
            p = self.dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(
                q, state.keys, state.values, attn_mask=allowed, dropout_p=p, scale=temp
            )
        return rearrange(out, "n h t d -> n t h d")


RecurrentCrossAttentionRegistry.register(
    "full", RecurrentCrossFullAttention, AttentionRegistry.parameter_tuples("full")
)
