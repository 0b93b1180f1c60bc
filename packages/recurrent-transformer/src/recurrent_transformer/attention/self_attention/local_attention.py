"""Causal local (sliding window) attention as a recurrence over the last few keys.

Reference: Parmar et al. 2018, "Image Transformer", arXiv 1802.05751; Beltagy et al. 2020,
"Longformer", arXiv 2004.05150.

The batch ``local`` attention lets query ``i`` see keys ``i - w // 2 .. i - w // 2 + w - 1``
(``w = local_context``); with a causal mask that leaves ``i - w // 2 .. i``, the current key
and the ``w // 2`` before it. The recurrent form keeps exactly those ``w // 2 + 1`` keys and
values in a `WindowState`: a fixed-size state and a
constant cost per step.

Einstein notation: n batch, h heads, j window slots, e query features, d value features.
"""

from __future__ import annotations

from math import sqrt
from typing import Any

import torch
from torch import Tensor

from attention_core.attention.local_attention import LocalAttention
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
)

from ...state import WindowState, check_state_tensor, check_state_type
from .base import RecurrentAttention
from .full_attention import attend_cache

__all__ = ["RecurrentLocalAttention"]


# the batch attention gives the constructor, parameters and registry entry; the
# recurrent interface (first in the MRO) replaces its forward
class RecurrentLocalAttention(RecurrentAttention, LocalAttention):  # type: ignore[misc]
    """Recurrent causal local attention, the dual of ``local`` with a causal mask.

    Arguments:
        local_context: the window size ``w`` of the batch attention; each step attends to
            its own key and the ``w // 2`` previous ones.
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights in training mode (default: 0.1).
        event_dispatcher: dispatcher instance or key for `AttentionEvent`.

    Shapes: query and key ``(N, H, E)``, value ``(N, H, D)``; returns ``(N, H, D)``. The state
    is a `WindowState`.
    """

    @property
    def window(self) -> int:
        """How many keys a step sees: ``local_context // 2 + 1``."""
        return self.local_context // 2 + 1

    def step(self, query: Tensor, key: Tensor, value: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Slide the window by one element and attend over it."""
        key, value = key.unsqueeze(2), value.unsqueeze(2)
        if state is None:
            keys, values, length = key, value, 1
        else:
            state = check_state_type("state", state, WindowState, type(self).__name__)
            N, H, E = query.shape
            check_state_tensor("state.keys", state.keys, (N, H, -1, E), query)
            check_state_tensor("state.values", state.values, (N, H, -1, value.shape[-1]), query)
            start = max(0, state.keys.shape[2] - self.window + 1)
            keys = torch.cat([state.keys[:, :, start:], key], dim=2)
            values = torch.cat([state.values[:, :, start:], value], dim=2)
            length = state.length + 1
        temp = self.softmax_temp or 1.0 / sqrt(query.shape[-1])
        out = attend_cache(self, query.unsqueeze(2), keys, values, temp)
        return out.squeeze(2), WindowState(keys, values, length)


RecurrentAttentionRegistry.register(
    "local", RecurrentLocalAttention, AttentionRegistry.parameter_tuples("local")
)
