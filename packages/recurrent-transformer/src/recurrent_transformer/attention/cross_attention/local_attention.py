"""Local (windowed) softmax cross attention with the memory projected once.

Reference: Parmar et al. 2018, "Image Transformer", arXiv 1802.05751.

The batch ``local`` attention lets query ``t`` see the memory positions
``t - w // 2 .. t - w // 2 + w - 1`` (``w = local_context``, clipped to the memory and its
length mask). Row ``t`` depends only on query ``t``, its position and the memory, so the
recurrent form keeps the projected memory and the position in a
`MemoryState` and reads only the ``w`` positions of the
window at each step: a constant cost per step whatever the memory length.

Einstein notation: n batch, t queries, s memory positions (of the window), h heads, e query
features, d value features.
"""

from __future__ import annotations

import dataclasses
from math import sqrt
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from attention_core.attention.full_attention import masked_softmax
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentCrossAttentionRegistry,
)
from attention_core.checks import check_positive_int
from attention_core.events import AttentionEvent, EventDispatcher
from attention_core.masking import BaseMask

from .full_attention import RecurrentCrossFullAttention

__all__ = ["RecurrentCrossLocalAttention"]


class RecurrentCrossLocalAttention(RecurrentCrossFullAttention):
    """Recurrent local cross attention, the dual of ``local`` with a full mask.

    It keeps the memory as `RecurrentCrossFullAttention` does.

    Arguments:
        local_context: the window size ``w``: step ``t`` (counting from 0) sees memory
            positions ``t - w // 2 .. t - w // 2 + w - 1``.
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights in training mode (default: 0.1).
        event_dispatcher: dispatcher instance or key for `AttentionEvent` (the weights
            over the window, ``(N, H, T, s)`` with ``s <= w + T - 1``).

    Shapes: query ``(N, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``; returns
    ``(N, H, D)``. The state is a `MemoryState` whose ``position`` counts the steps.
    Steps whose window holds no (unpadded) memory position return zeros, as the batch
    attention does.
    """

    def __init__(
        self,
        local_context: int,
        softmax_temp: float | None = None,
        attention_dropout: float = 0.1,
        event_dispatcher: EventDispatcher | str = "",
    ):
        super().__init__(softmax_temp, attention_dropout, event_dispatcher)
        self.local_context = check_positive_int("local_context", local_context)

    def prefill(
        self,
        queries: Tensor,
        keys: Tensor | None,
        values: Tensor | None,
        key_lengths: BaseMask | None,
        state: Any = None,
    ) -> tuple[Tensor, Any]:
        """As `RecurrentCrossAttention.prefill`.

        The returned state's ``position`` is advanced by the number of queries ``T``."""
        out, state = super().prefill(queries, keys, values, key_lengths, state)
        return out, dataclasses.replace(state, position=state.position + queries.shape[1])

    def attend(self, queries: Tensor, state: Any) -> Tensor:
        """Softmax attention of queries over their windows of the memory.

        The queries are ``(N, T, H, E)`` at positions ``state.position ..``."""
        T, S, w = queries.shape[1], state.keys.shape[2], self.local_context
        first = state.position - w // 2  # the first window position of the first query
        lo, hi = max(0, first), min(S, first + T - 1 + w)
        if hi <= lo:  # every window lies outside the memory
            shape = (*queries.shape[:3], state.values.shape[-1])
            return queries.new_zeros(shape)
        device = queries.device
        positions = torch.arange(lo, hi, device=device)
        starts = first + torch.arange(T, device=device)[:, None]
        allowed = ((positions >= starts) & (positions < starts + w))[None, None]
        if state.key_mask is not None:
            allowed = allowed & state.key_mask[:, None, None, lo:hi]
        q = rearrange(queries, "n t h e -> n h t e")
        temp = self.softmax_temp or 1.0 / sqrt(queries.shape[-1])
        scores = torch.einsum("nhte,nhse->nhts", q * temp, state.keys[:, :, lo:hi])
        A = self.dropout(masked_softmax(scores, allowed))
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(AttentionEvent(self, A))
        return torch.einsum("nhts,nhsd->nthd", A, state.values[:, :, lo:hi])


RecurrentCrossAttentionRegistry.register(
    "local", RecurrentCrossLocalAttention, AttentionRegistry.parameter_tuples("local")
)
