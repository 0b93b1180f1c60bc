"""This module holds the blocks of one Feedback Transformer layer.

A layer of the Feedback Transformer (Fan et al. 2021, arXiv 2002.09402) has attention over
the feedback memory, optional cross attention over an encoded context, and a GEGLU
feed-forward (Shazeer 2020, arXiv 2002.05202), each pre-normalised and residual.

How a layer runs is written in `reference.feedback_layer`.

Einstein notation: ``b`` batch, ``n`` steps of the window, ``s`` context positions, ``h``
heads, ``d`` head feature.
"""

from __future__ import annotations

from typing import cast

from einops import rearrange
from torch import Tensor, nn

from attention_core.nn import FeedForward, attend

__all__ = ["CrossAttention", "FeedbackLayer"]


class CrossAttention(nn.Module):
    """Attend from the window's states to an encoded context, pre-normalised.

    There is no self-attention over the window: the queries see the context only.

    Arguments:
        dim: model width.
        heads: number of attention heads.
        dim_head: width of each head.
        dropout: dropout on the attention weights.

    Shapes: `project` maps the context ``(b, s, dim)`` to keys and values
    ``(b, h, s, d)`` (once per call); ``forward(x (b, n, dim), keys, values, mask)`` returns
    ``(b, n, dim)``.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def project(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``(b, h, s, d)`` of ``context`` ``(b, s, dim)``."""
        kv = self.to_kv(context)
        k, v = rearrange(kv, "b s (two h d) -> two b h s d", two=2, h=self.heads)
        return k, v

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
        """Attend from ``x`` to the context's keys and values.

        Arguments:
            x: ``(b, n, dim)`` the window's states.
            keys: ``(b, h, s, d)`` the context's keys.
            values: ``(b, h, s, d)`` the context's values.
            mask: ``(b, 1, 1, s)`` boolean (``True`` = visible), or ``None``.

        Returns:
            ``(b, n, dim)``.
        """
        q = rearrange(self.to_q(self.norm(x)), "b n (h d) -> b h n d", h=self.heads)
        dropout = self.dropout if self.training else 0.0
        out = attend(q, keys, values, mask=mask, dropout_p=dropout, training=self.training)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedbackLayer(nn.Module):
    """The parameters of one layer: memory attention, [cross attention,] GEGLU feed-forward.

    The attention's pre-norm and key/value projection are shared by all layers and belong
    to the model (they also make the memory), so a layer holds its query and output
    projections, its cross attention, and its feed-forward with its pre-norm.
    [feedback_layer][feedback_transformer.reference.feedback_layer] applies it.

    Arguments:
        dim: model width.
        heads: number of attention heads.
        dim_head: width of each head.
        attn_dropout: dropout on the attention weights.
        ff_dropout: dropout inside the feed-forward block.
        ff_mult: feed-forward hidden width multiplier.
        cross_attend: add a cross attention block.
    """

    def ff_parts(self) -> tuple[nn.Linear, nn.Dropout, nn.Linear]:
        """Return the feed-forward block's input product, its dropout and its output product.

        The input product maps ``dim`` to ``2 hidden`` (the value half, then the gate half);
        the output product maps ``hidden`` to ``dim``.
        """
        first, _, dropout, last = self.ff.net  # Linear, GEGLU, Dropout, Linear
        return cast(nn.Linear, first), cast(nn.Dropout, dropout), cast(nn.Linear, last)

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        attn_dropout: float,
        ff_dropout: float,
        ff_mult: float,
        cross_attend: bool,
    ):
        super().__init__()
        self.heads, self.dim_head, self.attn_dropout = heads, dim_head, attn_dropout
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self.cross = CrossAttention(dim, heads, dim_head, attn_dropout) if cross_attend else None
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, dropout=ff_dropout, glu=True)
