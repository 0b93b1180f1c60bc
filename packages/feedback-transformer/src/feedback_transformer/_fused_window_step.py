"""Training speed-up: one layer of one window as a single autograd node.

`reference.feedback_layer` records some twenty autograd nodes per layer and window, each
with its own bookkeeping, and the model's steps run one after another on a few rows, so that
bookkeeping is most of a training step's cost at the widths the model is used with.
`LayerStep` computes the same layer (without cross attention) in one node whose backward
pass is written out: layer norms, GEGLU, the products, and the window attention of
`_window_attention.attention_backward`. Its weight gradients are deferred like
`_step_linear.StepLinear`'s: the backward appends ``(X, dY)`` to each weight's record and the
record's ``Gather`` forms the weight gradient once per call.

Einstein notation: ``b`` batch, ``w`` steps of the window, ``h`` heads, ``d`` head feature.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ._step_linear import _Record
from ._window_attention import MemorySlice, attention_backward, attention_forward

__all__ = ["LayerStep", "StepInputs", "StepPlan", "join_heads", "split_heads", "split_projection"]


@dataclass
class StepInputs:
    """The tensors of one layer step, in the order `LayerStep.apply` takes them.

    ``proj`` is the layer's projection ``LN(x) W^T`` when the caller has it (then
    ``norm_*`` and ``weight`` are unused), else ``None``; ``weight`` is the scaled query
    weight, stacked on the shared key/value weight for windows of more than one step.
    ``bias`` is the window's position bias, ``link`` the memory buffer's last write (it
    orders the backward pass), and the four ``token_*`` are the `StepLinear` tokens of
    (weight, out, ff in, ff out), ``None`` for a weight without gradient.
    """

    x: Tensor
    proj: Tensor | None
    norm_weight: Tensor
    norm_bias: Tensor
    weight: Tensor
    out_weight: Tensor
    out_bias: Tensor
    ff_norm_weight: Tensor
    ff_norm_bias: Tensor
    ff_in_weight: Tensor
    ff_in_bias: Tensor
    ff_out_weight: Tensor
    ff_out_bias: Tensor
    bias: Tensor
    link: Tensor | None
    token_qkv: Tensor | None
    token_out: Tensor | None
    token_ff_in: Tensor | None
    token_ff_out: Tensor | None

    def as_args(self) -> tuple[Tensor | None, ...]:
        """The fields in order, for `LayerStep.apply`."""
        return tuple([getattr(self, name) for name in _NAMES])


@dataclass
class StepPlan:
    """What a layer step needs besides its tensors: the memory it reads, the sizes, the
    norms' epsilons, the dropout probabilities in effect and the `StepLinear` records of
    (weight, out, ff in, ff out) (``None`` for a weight without gradient)."""

    memory: MemorySlice
    first_empty: bool
    batch: int
    window: int
    heads: int
    dim_head: int
    norm_eps: float
    ff_norm_eps: float
    attn_dropout: float
    ff_dropout: float
    records: tuple[_Record | None, ...]


_NAMES = tuple(f.name for f in fields(StepInputs))
_INDEX = {name: i for i, name in enumerate(_NAMES)}
_TOKENS = ("token_qkv", "token_out", "token_ff_in", "token_ff_out")


class LayerStep(Function):
    """``apply(plan, *inputs.as_args()) -> (b w, dim)``: `reference.feedback_layer` without
    cross attention for a window of ``w`` steps, rows in ``(b, w)`` order, as one node."""

    @staticmethod
    def forward(ctx: Any, plan: StepPlan, *args: Any) -> Tensor:
        t = StepInputs(*args)
        b, w, h, d = plan.batch, plan.window, plan.heads, plan.dim_head
        x, dim = t.x, t.x.shape[1]
        a = mean = rstd = None
        proj = t.proj
        if proj is None:
            a, mean, rstd = torch.native_layer_norm(
                x, (dim,), t.norm_weight, t.norm_bias, plan.norm_eps
            )
            proj = F.linear(a, t.weight)
        q, kw, vw = split_projection(proj, b, w, h, d)
        att, p, keep = attention_forward(
            q, kw, vw, t.bias, plan.memory, plan.first_empty, plan.attn_dropout
        )
        o = join_heads(att, b, w, h, d)
        x1 = torch.addmm(x, o, t.out_weight.t()).add_(t.out_bias)
        a2, mean2, rstd2 = torch.native_layer_norm(
            x1, (dim,), t.ff_norm_weight, t.ff_norm_bias, plan.ff_norm_eps
        )
        hx, gate = F.linear(a2, t.ff_in_weight, t.ff_in_bias).chunk(2, dim=-1)
        g = F.gelu(gate)
        u = hx * g
        keep_ff = None
        if plan.ff_dropout:
            keep_ff = torch.empty_like(u, dtype=torch.bool).bernoulli_(1.0 - plan.ff_dropout)
            u = u * keep_ff / (1.0 - plan.ff_dropout)
        y = torch.addmm(x1, u, t.ff_out_weight.t()).add_(t.ff_out_bias)
        ctx.plan, ctx.bias_shape, ctx.has_proj = plan, t.bias.shape, a is None
        ctx.has_token = {name: getattr(t, name) is not None for name in _TOKENS}
        ctx.has_link = t.link is not None
        ctx.save_for_backward(
            x, a, mean, rstd, q, kw, vw, p, keep, att, o, x1, a2, mean2, rstd2, hx, gate, g,
            u, keep_ff, t.norm_weight, t.norm_bias, t.weight, t.out_weight, t.ff_norm_weight,
            t.ff_norm_bias, t.ff_in_weight, t.ff_out_weight,
        )  # fmt: skip
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        (
            x, a, mean, rstd, q, kw, vw, p, keep, att, o, x1, a2, mean2, rstd2, hx, gate, g,
            u, keep_ff, norm_w, norm_b, weight, out_w, ffn_w, ffn_b, ff1_w, ff2_w,
        ) = ctx.saved_tensors  # fmt: skip
        plan: StepPlan = ctx.plan
        b, w, h, d = plan.batch, plan.window, plan.heads, plan.dim_head
        rec_qkv, rec_out, rec_ff1, rec_ff2 = plan.records
        dim = x.shape[1]
        needs = {name: ctx.needs_input_grad[1 + i] for name, i in _INDEX.items()}
        grads: dict[str, Tensor | None] = {}

        # feed-forward: y = x1 + GEGLU(LN'(x1)) W2^T + b2
        if rec_ff2 is not None:
            rec_ff2.pairs.append((u, dy))
        du = dy @ ff2_w
        if keep_ff is not None:
            du = du * keep_ff / (1.0 - plan.ff_dropout)
        dhx = du * g
        dgate = torch.ops.aten.gelu_backward(du * hx, gate)
        dhg = torch.cat((dhx, dgate), dim=-1)
        if rec_ff1 is not None:
            rec_ff1.pairs.append((a2, dhg))
        dx1, grads["ff_norm_weight"], grads["ff_norm_bias"] = (
            torch.ops.aten.native_layer_norm_backward(
                dhg @ ff1_w, x1, (dim,), mean2, rstd2, ffn_w, ffn_b,
                [True, needs["ff_norm_weight"], needs["ff_norm_bias"]],
            )
        )  # fmt: skip
        dx1 = dx1.add_(dy)

        # attention: x1 = x + attend(q, [k; kw], [v; vw]) Wout^T + bout
        if rec_out is not None:
            rec_out.pairs.append((o, dx1))
        datt = split_heads(dx1 @ out_w, b, w, h, d)
        dq, dkw, dvw, grads["bias"] = attention_backward(
            datt, q, kw, vw, p, keep, att, plan.memory, plan.first_empty, plan.attn_dropout,
            ctx.bias_shape if needs["bias"] else None,
        )  # fmt: skip
        dproj = None if dq is None else join_projection(dq, dkw, dvw, b, w, h, d)

        dx = dx1
        if ctx.has_proj:
            grads["proj"] = dproj
        elif dproj is not None:  # proj = LN(x) W^T was computed here
            if rec_qkv is not None:
                rec_qkv.pairs.append((a, dproj))
            dxn, grads["norm_weight"], grads["norm_bias"] = (
                torch.ops.aten.native_layer_norm_backward(
                    dproj @ weight, x, (dim,), mean, rstd, norm_w, norm_b,
                    [True, needs["norm_weight"], needs["norm_bias"]],
                )
            )  # fmt: skip
            dx = dx + dxn
        grads["x"] = dx
        if ctx.has_link:
            grads["link"] = dy.new_zeros(())
        for name, present in ctx.has_token.items():
            if present:
                grads[name] = dy.new_zeros(())
        return (None, *[grads.get(name) for name in _NAMES])


def split_projection(
    proj: Tensor, b: int, w: int, h: int, d: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Queries ``(b h, w, d)`` and the window's keys and values ``(b, h, w, d)`` (``None``
    for one step) of a projection ``(b w, o)``."""
    inner = h * d
    if w == 1:
        return proj.reshape(b * h, 1, d), None, None  # "b (h d) -> (b h) 1 d"
    q = proj[:, :inner].view(b, w, h, d).transpose(1, 2).reshape(b * h, w, d)
    kw = proj[:, inner : 2 * inner].view(b, w, h, d).transpose(1, 2)
    vw = proj[:, 2 * inner :].view(b, w, h, d).transpose(1, 2)
    return q, kw, vw


def join_projection(
    dq: Tensor, dkw: Tensor | None, dvw: Tensor | None, b: int, w: int, h: int, d: int
) -> Tensor:
    """The inverse of `split_projection`, for gradients: ``(b w, o)``."""
    if w == 1:
        return dq.reshape(b, h * d)
    if dkw is None or dvw is None:
        raise ValueError("a window of w > 1 steps needs the gradients of its keys and values")
    parts = (dq.view(b, h, w, d), dkw, dvw)
    return torch.cat([t.transpose(1, 2).reshape(b * w, h * d) for t in parts], dim=1)


def join_heads(att: Tensor, b: int, w: int, h: int, d: int) -> Tensor:
    """``(b h, w, d) -> (b w, h d)``."""
    if w == 1:
        return att.view(b, h * d)
    return att.view(b, h, w, d).transpose(1, 2).reshape(b * w, h * d)


def split_heads(x: Tensor, b: int, w: int, h: int, d: int) -> Tensor:
    """``(b w, h d) -> (b h, w, d)``."""
    if w == 1:
        return x.reshape(b * h, 1, d)
    return x.view(b, w, h, d).transpose(1, 2).reshape(b * h, w, d)
