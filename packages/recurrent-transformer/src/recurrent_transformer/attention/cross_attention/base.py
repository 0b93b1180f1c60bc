"""The interface of recurrent cross attentions.

The memory is read once into a state, then each step (or a whole prompt at once) attends to it with
a full mask."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from attention_core.checks import check_tensor
from attention_core.masking import BaseMask

__all__ = ["RecurrentCrossAttention"]


class RecurrentCrossAttention(nn.Module):
    """Base class of the inner recurrent cross attentions.

    Subclasses implement `make_state` (read the memory) and `attend` (queries
    against a state); queries never change the state.

    Shapes: query ``(N, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``, key_lengths a
    mask of shape ``(N, S)``; returns ``(N, H, D)``.
    """

    def forward(
        self,
        query: Tensor,
        keys: Tensor | None,
        values: Tensor | None,
        key_lengths: BaseMask | None,
        state: Any = None,
    ) -> tuple[Tensor, Any]:
        """Attend from ``query`` to the memory.

        Arguments:
            query: ``(N, H, E)``.
            keys: ``(N, S, H, E)``, used only when ``state`` is ``None``.
            values: ``(N, S, H, D)``, used only when ``state`` is ``None``.
            key_lengths: ``(N, S)`` mask of the real memory positions, used only when
                ``state`` is ``None``.
            state: what the previous call returned, or ``None`` at the first step.

        Returns:
            ``(N, H, D)`` and the state (the memory, read once).
        """
        check_tensor("query", query, dim=3, floating=True)
        out, state = self.prefill(query.unsqueeze(1), keys, values, key_lengths, state)
        return out.squeeze(1), state

    def prefill(
        self,
        queries: Tensor,
        keys: Tensor | None,
        values: Tensor | None,
        key_lengths: BaseMask | None,
        state: Any = None,
    ) -> tuple[Tensor, Any]:
        """Attend from ``T`` queries at once; arguments as `forward` with queries ``(N, T, H, E)``.

        Returns:
            ``(N, T, H, D)`` and the state.
        """
        check_tensor("queries", queries, dim=4, floating=True)
        if state is None:
            state = self.make_state(queries, keys, values, key_lengths)
        else:
            state = self.check_state(state, queries)
        return self.attend(queries, state), state

    def make_state(
        self, queries: Tensor, keys: Tensor, values: Tensor, key_lengths: BaseMask
    ) -> Any:
        """Read the memory: keys ``(N, S, H, E)``, values ``(N, S, H, D)``, key_lengths ``(N, S)``.

        ``queries`` ``(N, T, H, E)`` give the expected batch, heads and dtype."""
        raise NotImplementedError

    def check_state(self, state: Any, queries: Tensor) -> Any:
        """Return ``state`` (converted from fast-transformers' list form if needed).

        Raise if it does not fit ``queries`` ``(N, T, H, E)``."""
        raise NotImplementedError

    def attend(self, queries: Tensor, state: Any) -> Tensor:
        """``(N, T, H, E)`` queries against the state; returns ``(N, T, H, D)``."""
        raise NotImplementedError


def check_memory_heads(queries: Tensor, keys, values, key_lengths) -> tuple[int, int]:
    """Validate the projected memory against ``queries`` ``(N, T, H, E)``.

    Returns:
        ``(S, D)``.
    """
    N, _, H, E = queries.shape
    check_tensor("keys", keys, dim=4, floating=True, dtype=queries.dtype, device=queries.device)
    check_tensor("values", values, dim=4, floating=True, dtype=queries.dtype, device=queries.device)
    S = keys.shape[1]
    if (keys.shape[0], keys.shape[2], keys.shape[3]) != (N, H, E):
        raise ValueError(f"keys must have shape ({N}, S, {H}, {E}); got {tuple(keys.shape)}")
    if values.shape[:3] != (N, S, H):
        raise ValueError(f"values must have shape ({N}, {S}, {H}, D); got {tuple(values.shape)}")
    if not isinstance(key_lengths, BaseMask):
        raise TypeError(
            f"key_lengths must be a BaseMask (e.g. LengthMask); got {type(key_lengths).__name__}"
        )
    if tuple(key_lengths.shape) != (N, S):
        raise ValueError(f"key_lengths must have shape ({N}, {S}); got {tuple(key_lengths.shape)}")
    return S, values.shape[3]
