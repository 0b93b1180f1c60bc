"""Recurrent cross attentions whose row ``t`` depends only on query ``t``, its position, the memory.

Exact top-k (Vyas et al. 2020, "Fast Transformers with Clustered Attention", arXiv 2007.04825),
AFT-simple and AFT-full (Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103).

With a full mask over a fixed memory, row ``t`` of these batch attentions does not depend on
the other queries. Their recurrent form keeps the projected memory in a
`MemoryState` and runs the batch attention's own computation
on the queries of each step, so the two cannot drift apart (AFT-full also counts the position,
for its bias row ``w_t = u_t v^T``). They subclass the batch attention: same constructor,
parameters and buffers.

``local`` has its own module (it reads only the window of each step). Cross attentions without
a recurrent form: ``clustered`` and ``improved-clustered`` (the queries are clustered over the
whole sequence, so a row depends on later queries) and ``reformer`` (a self attention only).

Einstein notation: n batch, t queries, s memory positions, h heads, e query features, d value
features.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from attention_core.attention.aft_attention import AFTFullAttention, AFTSimpleAttention
from attention_core.attention.exact_topk_attention import ExactTopKAttention
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentCrossAttentionRegistry,
)
from attention_core.masking import BaseMask, FullMask, LengthMask

from ...state import MemoryState, check_state_tensor, check_state_type
from .base import RecurrentCrossAttention, check_memory_heads

__all__ = [
    "RecurrentCrossAFTFullAttention",
    "RecurrentCrossAFTSimpleAttention",
    "RecurrentCrossExactTopKAttention",
]


class _RowwiseCrossAttention(RecurrentCrossAttention):
    """Keep the memory, then run the batch attention (the next class in the MRO) per step."""

    #: the batch attention whose ``forward`` computes the rows
    batch_class: Any  # the batch attention class whose forward this one reuses

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
        to_heads = lambda t: rearrange(t, "n s h e -> n h s e")  # noqa: E731
        return MemoryState(to_heads(keys), to_heads(values), key_mask)

    def check_state(self, state: Any, queries: Tensor) -> Any:
        state = check_state_type("state", state, MemoryState, type(self).__name__)
        N, _, H, E = queries.shape
        check_state_tensor("state.keys", state.keys, (N, H, -1, E), queries)
        check_state_tensor("state.values", state.values, (N, H, state.keys.shape[2], -1), queries)
        return state

    def attend(self, queries: Tensor, state: Any) -> Tensor:
        """The batch attention's rows for ``(N, T, H, E)`` queries over the memory."""
        N, T = queries.shape[:2]
        S = state.keys.shape[2]
        device = queries.device
        if state.key_mask is None:
            key_lengths = LengthMask(torch.full((N,), S, device=device), max_len=S)
        else:
            key_lengths = LengthMask(state.key_mask.sum(dim=1), max_len=S)
        keys = rearrange(state.keys, "n h s e -> n s h e")
        values = rearrange(state.values, "n h s d -> n s h d")
        query_lengths = LengthMask(torch.full((N,), T, device=device), max_len=T)
        return self.batch_class.forward(
            self, queries, keys, values, FullMask(T, S, device=device), query_lengths, key_lengths
        )


# the recurrent forward replaces the batch one (the batch class gives parameters and registry)
class RecurrentCrossExactTopKAttention(_RowwiseCrossAttention, ExactTopKAttention):  # type: ignore[misc]
    """Recurrent exact top-k cross attention, the dual of ``exact-topk`` with a full mask.

    Arguments: those of `attention_core.attention.exact_topk_attention.ExactTopKAttention`
    (``topk=32``, ``softmax_temp=None``, ``attention_dropout=0.1``, ``event_dispatcher=""``).

    Shapes: query ``(N, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``; returns
    ``(N, H, D)``. The state is a `MemoryState`.
    """

    batch_class = ExactTopKAttention


# the recurrent forward replaces the batch one, as above
class RecurrentCrossAFTSimpleAttention(_RowwiseCrossAttention, AFTSimpleAttention):  # type: ignore[misc]
    """Recurrent AFT-simple cross attention, the dual of ``aft-simple`` with a full mask.

    ``Y_t = sigmoid(Q_t) * sum_s softmax_s(K)_s V_s`` over the real memory positions.

    Arguments: those of `attention_core.attention.aft_attention.AFTSimpleAttention`
    (``event_dispatcher=""``).

    Shapes: query, keys and values with one head dimension ``D``: query ``(N, H, D)``, keys and
    values ``(N, S, H, D)``; returns ``(N, H, D)``. The state is a `MemoryState`.
    """

    batch_class = AFTSimpleAttention


# the recurrent forward replaces the batch one, as above
class RecurrentCrossAFTFullAttention(_RowwiseCrossAttention, AFTFullAttention):  # type: ignore[misc]
    """Recurrent AFT-full cross attention, the dual of ``aft-full`` with a full mask.

    Step ``t`` (counting from 0) mixes the memory with the bias row ``w_t = u_t v_{0..S-1}^T``.

    Arguments: those of `attention_core.attention.aft_attention.AFTFullAttention`
    (``max_sequence_length=1024``, ``aft_parameterization=64``, ``event_dispatcher=""``);
    both the number of steps and the memory length ``S`` are limited to
    ``max_sequence_length``.

    Shapes: query ``(N, H, D)``, keys and values ``(N, S, H, D)``; returns ``(N, H, D)``. The
    state is a `MemoryState` whose ``position`` counts the steps.
    """

    batch_class = AFTFullAttention
    _offset = 0  # the position of the first query that attend() computes

    def position_bias(self, L: int, S: int) -> Tensor:
        """The bias rows of positions ``offset .. offset + L - 1``: ``(L, S)``."""
        return self.u[self._offset : self._offset + L] @ self.v[:S].T

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
        """AFT-full rows of positions ``state.position ..`` for ``(N, T, H, D)`` queries."""
        end = state.position + queries.shape[1]
        if end > self.max_sequence_length:
            raise ValueError(
                f"RecurrentCrossAFTFullAttention supports up to max_sequence_length="
                f"{self.max_sequence_length} steps; this would be step {end}"
            )
        self._offset = state.position
        try:
            return super().attend(queries, state)
        finally:
            self._offset = 0


RecurrentCrossAttentionRegistry.register(
    "aft-full", RecurrentCrossAFTFullAttention, AttentionRegistry.parameter_tuples("aft-full")
)
RecurrentCrossAttentionRegistry.register(
    "exact-topk", RecurrentCrossExactTopKAttention, AttentionRegistry.parameter_tuples("exact-topk")
)
RecurrentCrossAttentionRegistry.register(
    "aft-simple", RecurrentCrossAFTSimpleAttention, AttentionRegistry.parameter_tuples("aft-simple")
)
