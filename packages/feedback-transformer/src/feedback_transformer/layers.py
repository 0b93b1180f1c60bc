"""The blocks of one Feedback Transformer layer: attention over the feedback memory, optional
cross attention over an encoded context, and a GEGLU feed-forward, each pre-normalised and
residual (Fan et al. 2021, arXiv 2002.09402; GEGLU: Shazeer 2020, arXiv 2002.05202).

The attention's pre-norm and key/value projection are shared by all layers and live in the
model (they also produce the memory), so a layer receives the normalisation and its
projection weight as arguments.

Einstein notation: ``b`` batch, ``n`` steps of the window, ``s`` context positions, ``h``
heads, ``d`` head feature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attention_core.nn import FeedForward, attend

from .attention import MemorySlice, attend_window

LinearFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]

__all__ = ["CrossAttention", "FeedbackLayer"]


class CrossAttention(nn.Module):
    """Pre-normalised attention of the window's states to an encoded context (no
    self-attention over the window: the queries see the context only).

    Arguments:
        dim: model width.
        heads: number of attention heads.
        dim_head: width of each head.
        dropout: dropout on the attention weights.

    Shapes: :meth:`project` maps the context ``(b, s, dim)`` to keys and values
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
        """``x`` ``(b, n, dim)`` attends to ``keys``/``values`` ``(b, h, s, d)``; ``mask``
        ``(b, 1, 1, s)`` boolean (``True`` = visible) or ``None``. Returns ``(b, n, dim)``."""
        q = rearrange(self.to_q(self.norm(x)), "b n (h d) -> b h n d", h=self.heads)
        dropout = self.dropout if self.training else 0.0
        out = attend(q, keys, values, mask=mask, dropout_p=dropout, training=self.training)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedbackLayer(nn.Module):
    """One layer: memory attention, [cross attention,] GEGLU feed-forward.

    The per-step path calls the functional ops on the blocks' parameters directly (no module
    dispatch, no einops parsing): the step loop is sequential, so per-op overhead is what
    the model costs at small widths.

    Arguments:
        dim: model width.
        heads: number of attention heads.
        dim_head: width of each head.
        attn_dropout: dropout on the attention weights.
        ff_dropout: dropout inside the feed-forward block.
        ff_mult: feed-forward hidden width multiplier.
        cross_attend: add a cross attention block.
    """

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

    def forward(
        self,
        x: Tensor,
        norm: nn.LayerNorm,
        weight: Tensor,
        memory: MemorySlice,
        bias: Tensor,
        first_empty: bool = False,
        cross: tuple[Tensor, Tensor, Tensor | None] | None = None,
        linear: LinearFn = F.linear,
        proj: Tensor | None = None,
    ) -> Tensor:
        """Advance a window of ``w`` steps by one layer.

        Arguments:
            x: ``(b w, dim)`` the layer's input, rows in ``(b, w)`` order.
            norm: the shared attention pre-norm.
            weight: ``(h d, dim)``: the query weight times ``dim_head ** -0.5``; or
                ``(3 h d, dim)``: that stacked on the shared key/value weight, for a window
                part (``w > 1``).
            memory: the memory slots the window sees (and the buffer they live in).
            bias: relative position bias ``(h, w, j)`` from ``attention.window_bias``.
            first_empty: the first query sees no key (zero output).
            cross: context keys, values ``(b, h, s, d)`` and mask, or ``None``.
            linear: ``F.linear`` or a ``linear.StepLinear`` of the call (one weight
                gradient per call instead of one per step).
            proj: ``(b w, o)``, the projection ``linear(norm(x), weight)`` when the caller
                has it already (the first layer's input does not depend on the steps, so
                the model projects all windows at once); ``None``: computed here.

        Returns:
            ``(b w, dim)``.
        """
        h, d = self.heads, self.dim_head
        inner = h * d
        w = bias.shape[1]
        b = x.shape[0] // w
        if proj is None:
            a = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            proj = linear(a, weight, None)
        if w == 1:
            q, kw, vw = proj.reshape(b * h, 1, d), None, None  # "b (h d) -> (b h) 1 d"
        else:
            # "(b w) (h d) -> (b h) w d" for the queries, "-> b h w d" for keys and values
            q = proj[:, :inner].view(b, w, h, d).transpose(1, 2).reshape(b * h, w, d)
            kw = proj[:, inner : 2 * inner].view(b, w, h, d).transpose(1, 2)
            vw = proj[:, 2 * inner :].view(b, w, h, d).transpose(1, 2)
        dropout = self.attn_dropout if self.training else 0.0
        out = attend_window(q, kw, vw, bias, memory, first_empty, dropout)
        if w == 1:
            out = out.view(b, inner)  # "(b h) 1 d -> b (h d)"
        else:
            out = out.view(b, h, w, d).transpose(1, 2).reshape(b * w, inner)
        x = x + linear(out, self.to_out.weight, self.to_out.bias)
        if self.cross is not None:
            x = x + self.cross(x.view(b, w, -1), *cross).view(b * w, -1)
        return x + self._feedforward(x, linear)

    def _feedforward(self, x: Tensor, linear: LinearFn) -> Tensor:
        """``self.ff(self.ff_norm(x))`` for ``x`` ``(b w, dim)``: the GEGLU block of
        ``attention_core.nn`` (its linear maps through ``linear``, its gate module as is)."""
        norm = self.ff_norm
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        first, _, dropout, last = self.ff.net  # Linear, GEGLU, Dropout, Linear
        x, gate = linear(x, first.weight, first.bias).chunk(2, dim=-1)
        x = x * F.gelu(gate)  # the GEGLU module's product, without its per-call checks
        if self.training and dropout.p:
            x = F.dropout(x, dropout.p, training=True)
        return linear(x, last.weight, last.bias)
