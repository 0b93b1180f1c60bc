"""Softmax attention, ``softmax(Q K^T / sqrt(E)) V`` (Vaswani et al. 2017, arXiv 1706.03762).

Two paths compute it. The fused one calls ``torch.nn.functional.scaled_dot_product_attention``
(through `attention_core.nn.attend`): flash attention on CPU and CUDA, which never
stores the ``(N, H, L, S)`` weights. The explicit one builds the weights with ``einsum`` and
``softmax``; it runs only when a listener of the module's event dispatcher may want them as an
`AttentionEvent`.
"""

from __future__ import annotations

from math import sqrt

import torch
from torch import Tensor, nn

from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Float, Optional
from ..events import AttentionEvent, EventDispatcher
from ..masking import BaseMask, zero_padding
from ..nn.attend import attend
from ._inputs import check_attention_inputs

__all__ = ["FullAttention", "masked_softmax"]


def masked_softmax(scores: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over the last axis where ``allowed`` is ``True``.

    Rows with no allowed entry become zeros instead of NaN.

    Arguments:
        scores: ``(..., S)`` logits.
        allowed: boolean tensor broadcastable to ``scores``, or ``None`` for no mask.
    """
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(dim=-1, keepdim=True)
    # under torch.compile, always take the (equivalent) branch: no data-dependent control flow
    if torch.compiler.is_compiling() or bool(empty.any()):
        scores = scores.masked_fill(empty, 0.0)
        return torch.softmax(scores, dim=-1).masked_fill(empty | ~allowed, 0.0)
    return torch.softmax(scores, dim=-1)


def attention_allowed(attn_mask: BaseMask, key_lengths: BaseMask) -> Tensor | None:
    """Combine an attention mask and key lengths into one boolean mask, or ``None``.

    The ``(L, S)`` attention mask and ``(N, S)`` key lengths give a mask broadcastable to
    ``(N, 1, L, S)`` (``(1, 1, L, S)``, ``(N, 1, 1, S)`` or ``(N, 1, L, S)``), or ``None`` when
    nothing is masked."""
    allowed = None
    if not attn_mask.all_ones:
        allowed = attn_mask.bool_matrix[None, None]
    if not key_lengths.all_ones:
        keys = key_lengths.bool_matrix[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


class FullAttention(nn.Module):
    """Scaled dot-product (softmax) attention with arbitrary masks.

    Queries whose keys are all masked out get a zero output rather than NaN, and padded
    keys and values (outside ``key_lengths``) cannot reach a valid output whatever they
    hold (NaN, inf).

    Computed with PyTorch's fused ``scaled_dot_product_attention`` unless a listener is
    registered on ``event_dispatcher``: then the ``(N, H, L, S)`` attention matrix is built
    explicitly and dispatched as an `AttentionEvent` (slower, and it is stored for the
    backward pass). A `TriangularCausalMask` (or any lower triangular square mask)
    becomes SDPA's ``is_causal``, other masks and length masks a boolean mask, ``softmax_temp``
    its ``scale`` and ``attention_dropout`` its ``dropout_p`` in training mode.

    Arguments:
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights (default: 0.1).
        event_dispatcher: dispatcher instance or key for `AttentionEvent`.

    Shapes: queries ``(N, L, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``,
    masks ``(L, S)``, ``(N, L)``, ``(N, S)``; returns ``(N, L, H, D)``.
    """

    def __init__(self, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return ``softmax(softmax_temp * Q K^T + masks) V`` as ``(N, L, H, D)``."""
        _, L, S, _, E, _ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths
        )
        softmax_temp = self.softmax_temp or 1.0 / sqrt(E)
        keys = zero_padding(keys, key_lengths)
        values = zero_padding(values, key_lengths)
        if self.event_dispatcher.has_listeners:
            return self._explicit(queries, keys, values, attn_mask, key_lengths, softmax_temp)
        return self._fused(queries, keys, values, attn_mask, key_lengths, softmax_temp, L == S)

    def _fused(self, queries, keys, values, attn_mask, key_lengths, softmax_temp, square):
        """SDPA on ``(N, H, L, E)`` views.

        Its CPU kernel writes ``(N, L, H, D)`` memory, so the final transpose is free."""
        causal = (
            square
            and not attn_mask.all_ones
            and key_lengths.all_ones
            and attn_mask.lower_triangular
        )
        allowed = None if causal else attention_allowed(attn_mask, key_lengths)
        out = attend(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            mask=allowed,
            causal=causal,
            dropout_p=self.dropout.p,
            scale=softmax_temp,
            training=self.training,
        )
        return out.transpose(1, 2).contiguous()

    def _explicit(self, queries, keys, values, attn_mask, key_lengths, softmax_temp):
        """The ``(N, H, L, S)`` weights built, dispatched to the listeners, then applied."""
        scores = torch.einsum("nlhe,nshe->nhls", queries * softmax_temp, keys)
        A = masked_softmax(scores, attention_allowed(attn_mask, key_lengths))
        A = self.dropout(A)
        self.event_dispatcher.dispatch(AttentionEvent(self, A))
        return torch.einsum("nhls,nshd->nlhd", A, values).contiguous()


AttentionRegistry.register(
    "full",
    FullAttention,
    [
        ("softmax_temp", Optional(Float)),
        ("attention_dropout", Optional(Float, 0.1)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
