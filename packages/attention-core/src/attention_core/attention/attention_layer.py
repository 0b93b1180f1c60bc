"""The attention layer: project the inputs, run an inner attention, project the result back.

The inputs are projected to multi-head queries, keys and values."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from .._checks import check_positive_int, check_tensor
from ..events import EventDispatcher, QKVEvent
from ..masking import BaseMask

__all__ = ["AttentionLayer"]


class AttentionLayer(nn.Module):
    """Multi-head attention around any inner attention of `attention_core.attention`.

    Parameter names match fast-transformers: ``query_projection``, ``key_projection``,
    ``value_projection``, ``out_projection`` and the wrapped ``inner_attention``.

    Arguments:
        attention: the inner attention,
            ``(N, L, H, E), (N, S, H, E), (N, S, H, D) -> (N, L, H, D)``.
        d_model: the input and output feature size.
        n_heads: the number of heads ``H``.
        d_keys: ``E``, the head dimension of queries and keys (default: ``d_model // n_heads``).
        d_values: ``D``, the head dimension of values (default: ``d_model // n_heads``).
        d_model_keys: the feature size of keys and values (default: ``d_model``), e.g. the
            memory's width in a decoder's cross attention.
        event_dispatcher: dispatcher instance or key for `QKVEvent` (default: ``""``).

    Example:
        >>> from attention_core.attention import FullAttention
        >>> from attention_core.masking import FullMask, LengthMask
        >>> layer = AttentionLayer(FullAttention(), d_model=64, n_heads=4)
        >>> x = torch.rand(2, 10, 64)
        >>> layer(x, x, x, FullMask(10), LengthMask(torch.tensor([10, 7])),
        ...       LengthMask(torch.tensor([10, 7]))).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        attention: nn.Module,
        d_model: int,
        n_heads: int,
        d_keys: int | None = None,
        d_values: int | None = None,
        d_model_keys: int | None = None,
        event_dispatcher="",
    ):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        d_keys = d_keys or (d_model // n_heads)
        d_values = d_values or (d_model // n_heads)
        check_positive_int("d_keys", d_keys)
        check_positive_int("d_values", d_values)
        d_model_keys = check_positive_int("d_model_keys", d_model_keys or d_model)
        self.inner_attention = attention
        self.query_projection = nn.Linear(d_model, d_keys * n_heads)
        self.key_projection = nn.Linear(d_model_keys, d_keys * n_heads)
        self.value_projection = nn.Linear(d_model_keys, d_values * n_heads)
        self.out_projection = nn.Linear(d_values * n_heads, d_model)
        self.n_heads = n_heads
        self.d_model = d_model
        self.d_model_keys = d_model_keys
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        values: Tensor,
        attn_mask: BaseMask,
        query_lengths: BaseMask,
        key_lengths: BaseMask,
    ) -> Tensor:
        """Attend from ``queries`` to ``keys``/``values``.

        Arguments:
            queries: ``(N, L, d_model)``.
            keys: ``(N, S, d_model_keys)``.
            values: ``(N, S, d_model_keys)``.
            attn_mask: ``(L, S)`` mask of allowed query/key pairs.
            query_lengths: ``(N, L)`` length mask of the queries.
            key_lengths: ``(N, S)`` length mask of the keys.

        Returns:
            ``(N, L, d_model)``.
        """
        for name, t, width, setting in (
            ("queries", queries, self.d_model, "d_model"),
            ("keys", keys, self.d_model_keys, "d_model_keys"),
            ("values", values, self.d_model_keys, "d_model_keys"),
        ):
            check_tensor(name, t, dim=3, floating=True)
            if t.shape[-1] != width:
                raise ValueError(
                    f"{name} must have {setting}={width} features; got shape {tuple(t.shape)}"
                )
        H = self.n_heads
        q = rearrange(self.query_projection(queries), "n l (h e) -> n l h e", h=H)
        k = rearrange(self.key_projection(keys), "n s (h e) -> n s h e", h=H)
        v = rearrange(self.value_projection(values), "n s (h d) -> n s h d", h=H)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(QKVEvent(self, q, k, v))
        out = self.inner_attention(q, k, v, attn_mask, query_lengths, key_lengths)
        return self.out_projection(rearrange(out, "n l h d -> n l (h d)"))
