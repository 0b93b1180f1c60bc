"""The interface of recurrent self attentions: one step per call, plus a prompt ``prefill``.

A recurrent self attention is the dual of a batch attention with a causal mask: stepping it
through ``T`` elements gives the ``T`` rows of the batch attention with a
`TriangularCausalMask`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attention_core.utils import check_state

from ..._checks import check_heads, check_sequence_heads

__all__ = ["RecurrentAttention"]


class RecurrentAttention(nn.Module):
    """Base class of the inner recurrent self attentions (they see projected heads).

    Subclasses implement `step`; they may override `prefill` with a parallel
    computation (the default steps through the prompt).

    Shapes: query and key ``(N, H, E)``, value ``(N, H, D)``; returns ``(N, H, D)`` and the new
    state.
    """

    #: whether the attention needs ``D == E`` (the AFT attentions)
    same_dims: bool = False

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, state: Any = None, memory: Any = None
    ) -> tuple[Tensor, Any]:
        """Attend from ``query`` to every key so far (the previous ones and ``key``).

        Arguments:
            query: ``(N, H, E)``.
            key: ``(N, H, E)``, the key of this step.
            value: ``(N, H, D)``, the value of this step.
            state: what the previous call returned, or ``None`` at the first step.
            memory: deprecated name of ``state``.

        Returns:
            ``(N, H, D)`` and the new state.
        """
        state = check_state(state, memory)
        check_heads(query, key, value, same_dims=self.same_dims)
        return self.step(query, key, value, state)

    def step(self, query: Tensor, key: Tensor, value: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One step on validated inputs (see `forward`)."""
        raise NotImplementedError

    def prefill(
        self, queries: Tensor, keys: Tensor, values: Tensor, state: Any = None
    ) -> tuple[Tensor, Any]:
        """Consume ``T`` elements at once, as ``T`` calls of `forward` would.

        Arguments:
            queries: ``(N, T, H, E)``.
            keys: ``(N, T, H, E)``.
            values: ``(N, T, H, D)``.
            state: the state to continue from, or ``None``.

        Returns:
            ``(N, T, H, D)`` and the state after the last element.
        """
        check_sequence_heads(queries, keys, values, same_dims=self.same_dims)
        outputs = []
        for i in range(queries.shape[1]):
            out, state = self.step(queries[:, i], keys[:, i], values[:, i], state)
            outputs.append(out)
        return torch.stack(outputs, dim=1), state
