"""The recurrent attention layer: project, run a recurrent inner attention, project back.

One element is projected to multi-head queries, keys and values; the inner attention runs with the
previous state."""

from __future__ import annotations

from typing import Any

from einops import rearrange
from torch import Tensor

from attention_core.attention.attention_layer import AttentionLayer
from attention_core.events import QKVEvent
from attention_core.utils import check_state

from ..._checks import check_element, check_prompt, layer_checks_enabled

__all__ = ["RecurrentAttentionLayer"]


class RecurrentAttentionLayer(AttentionLayer):
    """Multi-head attention around a recurrent inner attention.

    The constructor and parameters are those of `attention_core.attention.AttentionLayer`
    (``query_projection``, ``key_projection``, ``value_projection``, ``out_projection`` and the
    wrapped ``inner_attention``), so ``load_state_dict`` moves weights between the two.

    Arguments:
        attention: the inner recurrent attention, e.g. `RecurrentLinearAttention`.
        d_model: the input and output feature size.
        n_heads: the number of heads ``H``.
        d_keys: ``E``, the head dimension of queries and keys (default: ``d_model // n_heads``).
        d_values: ``D``, the head dimension of values (default: ``d_model // n_heads``).
        event_dispatcher: dispatcher instance or key for `QKVEvent` (default: ``""``).

    Example:
        >>> from recurrent_transformer.attention import RecurrentLinearAttention
        >>> layer = RecurrentAttentionLayer(RecurrentLinearAttention(16), 64, 4)
        >>> x = torch.rand(2, 64)
        >>> y, state = layer(x, x, x)
        >>> y.shape
        torch.Size([2, 64])
    """

    # any recurrent attention: a module with `forward` and `prefill` taking and returning a state
    inner_attention: Any

    # the recurrent layer shares the batch layer's constructor and parameters, not its call
    def forward(  # type: ignore[override]
        self, query: Tensor, key: Tensor, value: Tensor, state: Any = None, memory: Any = None
    ) -> tuple[Tensor, Any]:
        """Attend from one element to itself and every previous element.

        Arguments:
            query: ``(N, d_model)``.
            key: ``(N, d_model)``.
            value: ``(N, d_model)``.
            state: the inner attention's state from the previous step, or ``None``.
            memory: deprecated name of ``state``.

        Returns:
            ``(N, d_model)`` and the new state.
        """
        heads, state = self.heads(query, key, value, check_state(state, memory))
        return self.out_projection(heads), state

    def heads(
        self, query: Tensor, key: Tensor, value: Tensor, state: Any = None
    ) -> tuple[Tensor, Any]:
        """Attend from one element as `forward` does, but stop before the output projection.

        A layer that fuses the output projection with its residual and norm
        (`attention_core.residual_step.residual_linear`) calls this.

        Arguments:
            query: ``(N, d_model)``.
            key: ``(N, d_model)``.
            value: ``(N, d_model)``.
            state: the inner attention's state from the previous step, or ``None``.

        Returns:
            the heads joined, ``(N, H D)``, and the new state.
        """
        if layer_checks_enabled():  # else the model has checked its input
            name = type(self).__name__
            check_element("query", query, self.d_model, name)
            if key is not query or value is not query:  # self attention passes x three times
                check_element("key", key, self.d_model, name)
                check_element("value", value, self.d_model, name)
        # the per-step hot path splits heads with reshape/flatten: "n (h e) -> n h e" and back
        # (an einops recipe lookup, or Tensor.unflatten's Python wrapper, costs more than the
        # view itself at one element per call)
        N, H = query.shape[0], self.n_heads
        # explicit head widths: an empty batch (N = 0) has no -1 to infer
        q, k, v = (
            t.reshape(N, H, t.shape[1] // H)
            for t in (
                self.query_projection(query),
                self.key_projection(key),
                self.value_projection(value),
            )
        )
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(QKVEvent(self, q, k, v))
        out, state = self.inner_attention(q, k, v, state)
        return out.flatten(1), state

    def prefill(
        self, query: Tensor, key: Tensor, value: Tensor, state: Any = None
    ) -> tuple[Tensor, Any]:
        """Consume ``T`` elements at once, as ``T`` calls of `forward` would.

        Arguments:
            query: ``(N, T, d_model)``.
            key: ``(N, T, d_model)``.
            value: ``(N, T, d_model)``.
            state: the state to continue from, or ``None``.

        Returns:
            ``(N, T, d_model)`` and the state after the last element.
        """
        for arg, x in (("query", query), ("key", key), ("value", value)):
            check_prompt(arg, x, self.d_model)
        H = self.n_heads
        q = rearrange(self.query_projection(query), "n t (h e) -> n t h e", h=H)
        k = rearrange(self.key_projection(key), "n t (h e) -> n t h e", h=H)
        v = rearrange(self.value_projection(value), "n t (h d) -> n t h d", h=H)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(QKVEvent(self, q, k, v))
        out, state = self.inner_attention.prefill(q, k, v, state)
        return self.out_projection(rearrange(out, "n t h d -> n t (h d)")), state
