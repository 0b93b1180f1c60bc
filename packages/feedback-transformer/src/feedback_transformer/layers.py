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

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from attention_core.nn import FeedForward, attend

from .attention import MemorySlice, attend_window, attention_backward, attention_forward
from .linear import StepLinear

LinearFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]

__all__ = ["CrossAttention", "FeedbackLayer", "LayerStep"]


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

    While gradients are recorded, a layer without cross attention runs as one
    :class:`LayerStep` node (``use_layer_step``; ``False``: the composed ops, the same
    gradients within rounding).

    Arguments:
        dim: model width.
        heads: number of attention heads.
        dim_head: width of each head.
        attn_dropout: dropout on the attention weights.
        ff_dropout: dropout inside the feed-forward block.
        ff_mult: feed-forward hidden width multiplier.
        cross_attend: add a cross attention block.
    """

    use_layer_step: bool = True

    def ff_parts(self) -> tuple[nn.Linear, nn.Dropout, nn.Linear]:
        """The feed-forward block's input product (``dim`` to ``2 hidden``: the value half,
        then the gate half), its dropout and its output product (``hidden`` to ``dim``)."""
        first, _, dropout, last = self.ff.net  # Linear, GEGLU, Dropout, Linear
        return first, dropout, last

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
        w = bias.shape[1]
        b = x.shape[0] // w
        dropout = self.attn_dropout if self.training else 0.0
        if (
            self.use_layer_step
            and self.cross is None
            and isinstance(linear, StepLinear)
            and torch.is_grad_enabled()
        ):
            return self._step(x, norm, weight, memory, bias, first_empty, linear, proj, dropout)
        if proj is None:
            a = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            proj = linear(a, weight, None)
        q, kw, vw = _split_projection(proj, b, w, h, d)
        out = _merge_heads(attend_window(q, kw, vw, bias, memory, first_empty, dropout), b, w, h, d)
        x = x + linear(out, self.to_out.weight, self.to_out.bias)
        if self.cross is not None:
            x = x + self.cross(x.view(b, w, -1), *cross).view(b * w, -1)
        return x + self._feedforward(x, linear)

    def _step(self, x, norm, weight, memory, bias, first_empty, linear, proj, dropout) -> Tensor:
        """The training path of :meth:`forward` (no cross attention): one :class:`LayerStep`
        node."""
        first, ff_dropout, last = self.ff_parts()
        entries = [
            None if proj is not None else linear.entry(weight),
            linear.entry(self.to_out.weight, self.to_out.bias),
            linear.entry(first.weight, first.bias),
            linear.entry(last.weight, last.bias),
        ]
        tokens = [None if e is None else e[0] for e in entries]
        records = tuple(None if e is None else e[1] for e in entries)
        ff_p = ff_dropout.p if self.training else 0.0
        w = bias.shape[1]
        return LayerStep.apply(
            x, proj, norm.weight, norm.bias, weight, self.to_out.weight, self.to_out.bias,
            self.ff_norm.weight, self.ff_norm.bias, first.weight, first.bias, last.weight,
            last.bias, bias, memory.link, *tokens, records, memory, first_empty,
            (norm.eps, self.ff_norm.eps), (x.shape[0] // w, w, self.heads, self.dim_head),
            (dropout, ff_p),
        )  # fmt: skip

    def _feedforward(self, x: Tensor, linear: LinearFn) -> Tensor:
        """``self.ff(self.ff_norm(x))`` for ``x`` ``(b w, dim)``: the GEGLU block of
        ``attention_core.nn`` (its linear maps through ``linear``, its gate module as is)."""
        norm = self.ff_norm
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        first, dropout, last = self.ff_parts()
        x, gate = linear(x, first.weight, first.bias).chunk(2, dim=-1)
        x = x * F.gelu(gate)  # the GEGLU module's product, without its per-call checks
        if self.training and dropout.p:
            x = F.dropout(x, dropout.p, training=True)
        return linear(x, last.weight, last.bias)


class LayerStep(Function):
    """:meth:`FeedbackLayer.forward` without cross attention as one autograd node, for
    training: the backward pass is written out (layer norms, GEGLU, the products, the
    window attention of ``attention.attention_backward``), so that a window step records
    one node per layer instead of some twenty, each with its own bookkeeping. The weight
    gradients are deferred like :class:`~feedback_transformer.linear.StepLinear`'s: the
    backward appends ``(X, dY)`` to each weight's record, and the record's ``Gather``
    forms the weight gradient once per call.

    ``apply(x, proj, norm_weight, norm_bias, weight, out_weight, out_bias, ff_norm_weight,
    ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, bias, link, tokens,
    records, memory, first_empty, eps, sizes, dropout)`` with ``tokens``/``records`` the
    StepLinear entries of (weight, out, ff in, ff out) spread as four tokens then one tuple
    of four records (``None`` for a weight without gradient); ``proj`` is ``None`` or the
    layer's projection (then ``norm_*`` and ``weight`` are unused); ``sizes`` is
    ``(b, w, heads, dim_head)``, ``eps`` the two norms' epsilons and ``dropout`` the
    attention's and the feed-forward's probabilities in effect.
    """

    @staticmethod
    def forward(
        ctx, x, proj, norm_w, norm_b, weight, out_w, out_b, ffn_w, ffn_b, ff1_w, ff1_b,
        ff2_w, ff2_b, bias, link, tok_qkv, tok_out, tok_ff1, tok_ff2, records, memory,
        first_empty, eps, sizes, dropout,
    ):  # fmt: skip
        b, w, h, d = sizes
        dim = x.shape[1]
        attn_p, ff_p = dropout
        a = mean = rstd = None
        if proj is None:
            a, mean, rstd = torch.native_layer_norm(x, (dim,), norm_w, norm_b, eps[0])
            proj = F.linear(a, weight)
        q, kw, vw = _split_projection(proj, b, w, h, d)
        att, p, keep = attention_forward(q, kw, vw, bias, memory, first_empty, attn_p)
        o = _merge_heads(att, b, w, h, d)
        x1 = torch.addmm(x, o, out_w.t()).add_(out_b)
        a2, mean2, rstd2 = torch.native_layer_norm(x1, (dim,), ffn_w, ffn_b, eps[1])
        hx, gate = F.linear(a2, ff1_w, ff1_b).chunk(2, dim=-1)
        g = F.gelu(gate)
        u = hx * g
        keep_ff = None
        if ff_p:
            keep_ff = torch.empty_like(u, dtype=torch.bool).bernoulli_(1.0 - ff_p)
            u = u * keep_ff / (1.0 - ff_p)
        y = torch.addmm(x1, u, ff2_w.t()).add_(ff2_b)
        ctx.memory, ctx.first_empty, ctx.sizes, ctx.dropout = memory, first_empty, sizes, dropout
        ctx.records, ctx.bias_shape, ctx.has_proj = records, bias.shape, a is None
        ctx.token_like = [t is not None for t in (tok_qkv, tok_out, tok_ff1, tok_ff2)]
        ctx.save_for_backward(
            x, a, mean, rstd, q, kw, vw, p, keep, att, o, x1, a2, mean2, rstd2, hx, gate, g,
            u, keep_ff, norm_w, norm_b, weight, out_w, ffn_w, ffn_b, ff1_w, ff2_w,
        )  # fmt: skip
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        (
            x, a, mean, rstd, q, kw, vw, p, keep, att, o, x1, a2, mean2, rstd2, hx, gate, g,
            u, keep_ff, norm_w, norm_b, weight, out_w, ffn_w, ffn_b, ff1_w, ff2_w,
        ) = ctx.saved_tensors  # fmt: skip
        b, w, h, d = ctx.sizes
        attn_p, ff_p = ctx.dropout
        rec_qkv, rec_out, rec_ff1, rec_ff2 = ctx.records
        dim = x.shape[1]
        needs = ctx.needs_input_grad

        # feed-forward: y = x1 + GEGLU(LN'(x1)) W2^T + b2
        if rec_ff2 is not None:
            rec_ff2.pairs.append((u, dy))
        du = dy @ ff2_w
        if keep_ff is not None:
            du = du * keep_ff / (1.0 - ff_p)
        dhx = du * g
        dgate = torch.ops.aten.gelu_backward(du * hx, gate)
        dhg = torch.cat((dhx, dgate), dim=-1)
        if rec_ff1 is not None:
            rec_ff1.pairs.append((a2, dhg))
        dx1, dffn_w, dffn_b = torch.ops.aten.native_layer_norm_backward(
            dhg @ ff1_w, x1, (dim,), mean2, rstd2, ffn_w, ffn_b, [True, needs[7], needs[8]]
        )
        dx1 = dx1.add_(dy)

        # attention: x1 = x + attend(q, [k; kw], [v; vw]) Wout^T + bout
        if rec_out is not None:
            rec_out.pairs.append((o, dx1))
        datt = _split_heads(dx1 @ out_w, b, w, h, d)
        dq, dkw, dvw, dbias = attention_backward(
            datt, q, kw, vw, p, keep, att, ctx.memory, ctx.first_empty, attn_p,
            ctx.bias_shape if needs[13] else None,
        )  # fmt: skip
        dproj = None if dq is None else _join_projection(dq, dkw, dvw, b, w, h, d)

        dx, dnorm_w, dnorm_b = dx1, None, None
        dproj_in = dproj if ctx.has_proj else None
        if dproj is not None and not ctx.has_proj:  # proj = LN(x) W^T was computed here
            if rec_qkv is not None:
                rec_qkv.pairs.append((a, dproj))
            dxn, dnorm_w, dnorm_b = torch.ops.aten.native_layer_norm_backward(
                dproj @ weight, x, (dim,), mean, rstd, norm_w, norm_b, [True, needs[2], needs[3]]
            )
            dx = dx + dxn
        link = ctx.memory.link
        dlink = None if link is None else link.new_zeros(())
        tokens = [dy.new_zeros(()) if present else None for present in ctx.token_like]
        return (
            dx, dproj_in, dnorm_w, dnorm_b, None, None, None, dffn_w, dffn_b, None, None,
            None, None, dbias, dlink, *tokens, None, None, None, None, None, None,
        )  # fmt: skip


def _split_projection(proj: Tensor, b: int, w: int, h: int, d: int):
    """Queries ``(b h, w, d)`` and the window's keys and values ``(b, h, w, d)`` (``None``
    for one step) of a projection ``(b w, o)``."""
    inner = h * d
    if w == 1:
        return proj.reshape(b * h, 1, d), None, None  # "b (h d) -> (b h) 1 d"
    q = proj[:, :inner].view(b, w, h, d).transpose(1, 2).reshape(b * h, w, d)
    kw = proj[:, inner : 2 * inner].view(b, w, h, d).transpose(1, 2)
    vw = proj[:, 2 * inner :].view(b, w, h, d).transpose(1, 2)
    return q, kw, vw


def _join_projection(dq: Tensor, dkw, dvw, b: int, w: int, h: int, d: int) -> Tensor:
    """The inverse of :func:`_split_projection`, for gradients: ``(b w, o)``."""
    if w == 1:
        return dq.reshape(b, h * d)
    parts = (dq.view(b, h, w, d), dkw, dvw)
    return torch.cat([t.transpose(1, 2).reshape(b * w, h * d) for t in parts], dim=1)


def _merge_heads(att: Tensor, b: int, w: int, h: int, d: int) -> Tensor:
    """``(b h, w, d) -> (b w, h d)``."""
    if w == 1:
        return att.view(b, h * d)
    return att.view(b, h, w, d).transpose(1, 2).reshape(b * w, h * d)


def _split_heads(x: Tensor, b: int, w: int, h: int, d: int) -> Tensor:
    """``(b w, h d) -> (b h, w, d)``."""
    if w == 1:
        return x.reshape(b * h, 1, d)
    return x.view(b, w, h, d).transpose(1, 2).reshape(b * h, w, d)
