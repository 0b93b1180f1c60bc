"""The recurrent cross attention layer.

Projects the query of each step, projects the memory's keys and values only once (at the first
step), and runs a recurrent inner cross attention."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from attention_core.attention.attention_layer import AttentionLayer
from attention_core.checks import check_tensor
from attention_core.masking import BaseMask, LengthMask

from ..._checks import check_element, check_prompt

__all__ = ["RecurrentCrossAttentionLayer"]


class RecurrentCrossAttentionLayer(AttentionLayer):
    """Multi-head cross attention around a recurrent inner cross attention.

    The constructor and parameters are those of `attention_core.attention.AttentionLayer`, so
    ``load_state_dict`` moves weights between the batch and the recurrent layer. When a state is
    given the keys and values are not projected again (they may be ``None``).

    Arguments:
        attention: the inner recurrent cross attention.
        d_model: the feature size of the queries and the output.
        n_heads: the number of heads ``H``.
        d_keys: ``E``, the head dimension of queries and keys (default: ``d_model // n_heads``).
        d_values: ``D``, the head dimension of values (default: ``d_model // n_heads``).
        d_model_keys: the feature size of the memory (default: ``d_model``).
        event_dispatcher: dispatcher instance or key.
    """

    # any recurrent cross attention: a module with `forward` and `prefill` taking a state
    inner_attention: Any

    def _memory(
        self, N: int, keys: Tensor | None, values: Tensor | None, key_lengths: BaseMask | None
    ) -> tuple[Tensor, Tensor, BaseMask]:
        keys = check_tensor("keys", keys, dim=3, floating=True)
        values = check_tensor("values", values, dim=3, floating=True)
        for name, t in (("keys", keys), ("values", values)):
            if t.shape[0] != N or t.shape[2] != self.d_model_keys:
                raise ValueError(
                    f"{name} must have shape ({N}, S, {self.d_model_keys}); got {tuple(t.shape)}"
                )
        S = keys.shape[1]
        if values.shape[1] != S:
            raise ValueError(
                f"keys and values must have the same length; got {S} and {values.shape[1]}"
            )
        if key_lengths is None:
            key_lengths = LengthMask(
                torch.full((N,), S, dtype=torch.int64, device=keys.device), max_len=S
            )
        elif not isinstance(key_lengths, BaseMask):
            kind = type(key_lengths).__name__
            raise TypeError(f"key_lengths must be a BaseMask (e.g. LengthMask); got {kind}")
        H = self.n_heads
        k = rearrange(self.key_projection(keys), "n s (h e) -> n s h e", h=H)
        v = rearrange(self.value_projection(values), "n s (h d) -> n s h d", h=H)
        return k, v, key_lengths

    # the recurrent layer shares the batch layer's constructor and parameters, not its call
    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        keys: Tensor | None,
        values: Tensor | None,
        key_lengths: BaseMask | None = None,
        state: Any = None,
    ) -> tuple[Tensor, Any]:
        """Attend from one element to the memory.

        Arguments:
            query: ``(N, d_model)``.
            keys: ``(N, S, d_model_keys)``; ignored when ``state`` is given.
            values: ``(N, S, d_model_keys)``; ignored when ``state`` is given.
            key_lengths: ``(N, S)`` mask of the real memory positions (default: all).
            state: the state returned by the previous call, or ``None``.

        Returns:
            ``(N, d_model)`` and the state.
        """
        heads, state = self.heads(query, keys, values, key_lengths, state)
        return self.out_projection(heads), state

    def heads(
        self,
        query: Tensor,
        keys: Tensor | None,
        values: Tensor | None,
        key_lengths: BaseMask | None = None,
        state: Any = None,
    ) -> tuple[Tensor, Any]:
        """Attend from one element as `forward` does, but stop before the output projection.

        A layer that fuses the output projection with its residual and norm
        (`attention_core.residual_step.residual_linear`) calls this.

        Arguments:
            query: ``(N, d_model)``.
            keys: ``(N, S, d_model_keys)``; ignored when ``state`` is given.
            values: ``(N, S, d_model_keys)``; ignored when ``state`` is given.
            key_lengths: ``(N, S)`` mask of the real memory positions (default: all).
            state: the state returned by the previous call, or ``None``.

        Returns:
            the heads joined, ``(N, H D)``, and the state.
        """
        N = check_element("query", query, self.d_model, type(self).__name__)[0]
        q = self.query_projection(query)  # "n (h e) -> n h e" (explicit: N may be 0)
        q = q.unflatten(1, (self.n_heads, q.shape[1] // self.n_heads))
        k = v = None
        if state is None:
            k, v, key_lengths = self._memory(N, keys, values, key_lengths)
        out, state = self.inner_attention(q, k, v, key_lengths, state)
        return out.flatten(1), state

    def prefill(
        self,
        query: Tensor,
        keys: Tensor | None,
        values: Tensor | None,
        key_lengths: BaseMask | None = None,
        state: Any = None,
    ) -> tuple[Tensor, Any]:
        """Attend from ``T`` elements at once.

        Arguments as `forward` with query ``(N, T, d_model)``.

        Returns:
            ``(N, T, d_model)`` and the state.
        """
        N = check_prompt("query", query, self.d_model)[0]
        q = rearrange(self.query_projection(query), "n t (h e) -> n t h e", h=self.n_heads)
        k = v = None
        if state is None:
            k, v, key_lengths = self._memory(N, keys, values, key_lengths)
        out, state = self.inner_attention.prefill(q, k, v, key_lengths, state)
        return self.out_projection(rearrange(out, "n t h d -> n t (h d)")), state
