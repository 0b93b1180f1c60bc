"""Full softmax attention for short sequences and another attention for long ones.

For example ``"conditional-full:linear"``. Reference for softmax attention: Vaswani et al. 2017,
arXiv 1706.03762."""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import check_positive_int
from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Float, Int, Optional
from ..events import EventDispatcher
from ..masking import BaseMask
from ._inputs import check_attention_inputs
from .full_attention import FullAttention

__all__ = ["ConditionalFullAttention"]


class ConditionalFullAttention(nn.Module):
    """Delegate to `FullAttention` when the sequences are short.

    If both ``L`` and ``S`` are at most ``length_limit`` the exact softmax attention is used,
    otherwise the wrapped ``attention``. Builders create it from composite attention types
    such as ``"conditional-full:linear"`` and pass the inner attention as ``attention=``.
    The submodules are named ``full_attention`` and ``other_attention``, as in
    fast-transformers, so state dicts stay compatible.

    Arguments:
        attention: the attention module used for long sequences (fast-transformers calls
            this argument ``other_attention``; passing it positionally works with both).
        length_limit: the largest ``L`` and ``S`` handled by full attention (default: 512).
        softmax_temp: see `FullAttention`.
        attention_dropout: see `FullAttention`.
        event_dispatcher: dispatcher instance or key, given to the full attention.

    Shapes: queries ``(N, L, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``,
    masks ``(L, S)``, ``(N, L)``, ``(N, S)``; returns ``(N, L, H, D)``.
    """

    #: the class of ``full_attention``, built with ``(softmax_temp, attention_dropout,
    #: event_dispatcher)``; a subclass (e.g. a recurrent form) may name another one
    full_attention_class: type[nn.Module] = FullAttention

    def __init__(
        self,
        attention: nn.Module,
        length_limit: int = 512,
        softmax_temp: float | None = None,
        attention_dropout: float = 0.1,
        event_dispatcher: EventDispatcher | str = "",
    ):
        super().__init__()
        if not callable(attention):
            raise TypeError(
                "attention must be the attention module used beyond length_limit; "
                f"got {type(attention).__name__}"
            )
        self.length_limit = check_positive_int("length_limit", length_limit)
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)
        self.full_attention = self.full_attention_class(
            softmax_temp, attention_dropout, event_dispatcher
        )
        self.other_attention = attention

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        values: Tensor,
        attn_mask: BaseMask,
        query_lengths: BaseMask,
        key_lengths: BaseMask,
    ) -> Tensor:
        """Return ``FullAttention`` when ``L, S <= length_limit``, else the wrapped attention."""
        _, L, S, *_ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths
        )
        inner: nn.Module = self.full_attention
        if self.length_limit < L or self.length_limit < S:
            inner = self.other_attention
        return inner(queries, keys, values, attn_mask, query_lengths, key_lengths)


AttentionRegistry.register(
    "conditional-full",
    ConditionalFullAttention,
    [
        ("length_limit", Optional(Int, 512)),
        ("softmax_temp", Optional(Float)),
        ("attention_dropout", Optional(Float, 0.1)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
