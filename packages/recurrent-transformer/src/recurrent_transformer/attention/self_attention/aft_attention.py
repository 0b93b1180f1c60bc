"""The Attention Free Transformer's causal token mixing as recurrences.

Reference: Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103.

``Y_t = sigmoid(Q_t) * sum_{s<=t} exp(K_s + w_ts) V_s / sum_{s<=t} exp(K_s + w_ts)``, feature
by feature (so ``E == D``).

- AFT-simple (``w = 0``) needs only running sums: a fixed-size
  `AFTSimpleState` holding ``sum exp(K_s - m) V_s`` and
  ``sum exp(K_s - m)`` shifted by their running maximum ``m``, so nothing overflows.
- AFT-full's learned bias ``w_ts = u_t . v_s`` ties every past position to the current one, so
  it keeps every key and value (a `KVCache`) and step ``t``
  costs ``O(t)``, like softmax attention; ``t`` may not exceed ``max_sequence_length``.

Einstein notation: n batch, h heads, s past positions, d features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attention_core.attention.aft_attention import AFTFullAttention, AFTSimpleAttention
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
)

from ...state import AFTSimpleState, KVCache, check_state_tensor, check_state_type
from .base import RecurrentAttention
from .full_attention import check_cache

__all__ = ["RecurrentAFTFullAttention", "RecurrentAFTSimpleAttention"]


# AFT-simple


# the batch attention gives the constructor, parameters and registry entry; the
# recurrent interface (first in the MRO) replaces its forward
class RecurrentAFTSimpleAttention(RecurrentAttention, AFTSimpleAttention):  # type: ignore[misc]
    """Recurrent causal AFT-simple, the dual of ``aft-simple`` with a causal mask.

    Arguments:
        event_dispatcher: dispatcher instance or key.

    Shapes: query, key and value ``(N, H, D)``; returns ``(N, H, D)``. The state is an
    `AFTSimpleState` of three ``(N, H, D)`` tensors.
    """

    same_dims = True

    def step(self, query: Tensor, key: Tensor, value: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Fold ``exp(K) V`` and ``exp(K)`` into the running sums and read them."""
        if state is None:
            maximum, numerator, denominator = key.detach(), value, torch.ones_like(key)
        else:
            state = check_state_type("state", state, AFTSimpleState, type(self).__name__)
            for name in ("maximum", "numerator", "denominator"):
                check_state_tensor(f"state.{name}", getattr(state, name), tuple(key.shape), key)
            maximum = torch.maximum(state.maximum, key.detach())
            old = torch.exp(state.maximum - maximum)
            new = torch.exp(key - maximum)
            numerator = state.numerator * old + new * value
            denominator = state.denominator * old + new
        out = torch.sigmoid(query) * numerator / denominator
        return out, AFTSimpleState(maximum, numerator, denominator)


# AFT-full


# the batch attention gives the constructor, parameters and registry entry; the
# recurrent interface (first in the MRO) replaces its forward
class RecurrentAFTFullAttention(RecurrentAttention, AFTFullAttention):  # type: ignore[misc]
    """Recurrent causal AFT-full, the dual of ``aft-full`` with a causal mask.

    Step ``t`` (counting from 0) uses the bias row ``w_t = u_t v_{0..t}^T``. The parameters
    ``u`` and ``v`` have the names and shapes of the batch attention's.

    Arguments:
        max_sequence_length: the most steps a sequence may take; sizes ``u`` and ``v``
            (default: 1024).
        aft_parameterization: the rank of the position bias (default: 64).
        event_dispatcher: dispatcher instance or key.

    Shapes: query, key and value ``(N, H, D)``; returns ``(N, H, D)``. The state is a
    `KVCache`.
    """

    same_dims = True

    def step(self, query: Tensor, key: Tensor, value: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Append ``key``/``value`` and mix every cached value with the bias row of step t."""
        N, H, D = query.shape
        if state is None:
            state = KVCache.empty(N, H, D, D, dtype=query.dtype, device=query.device)
        else:
            state = check_cache(state, query, value, type(self).__name__)
        t = state.length
        if t >= self.max_sequence_length:
            raise ValueError(
                f"RecurrentAFTFullAttention supports up to max_sequence_length="
                f"{self.max_sequence_length} steps; this would be step {t + 1}"
            )
        cache = state.append(key.unsqueeze(2), value.unsqueeze(2))
        w = (self.v[: t + 1] @ self.u[t]).to(query.dtype)
        weights = torch.softmax(cache.keys + w[:, None], dim=2)
        mixed = torch.einsum("nhsd,nhsd->nhd", weights, cache.values)
        return torch.sigmoid(query) * mixed, cache


RecurrentAttentionRegistry.register(
    "aft-full", RecurrentAFTFullAttention, AttentionRegistry.parameter_tuples("aft-full")
)
RecurrentAttentionRegistry.register(
    "aft-simple", RecurrentAFTSimpleAttention, AttentionRegistry.parameter_tuples("aft-simple")
)
