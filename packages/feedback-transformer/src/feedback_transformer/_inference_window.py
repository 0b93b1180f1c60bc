"""Inference speed-up: a window through every layer in fewer torch ops, without autograd.

The model's steps run one after another on a few rows each (``b * w``), so the number of
ops dispatched per step is part of the cost. This is `_window_loop.window` for calls that
record no gradients (and apply no dropout), in fewer ops per layer:

* the attention over the memory and the window is one call of
  `attention_core.cache_attention.cache_attention` (scores, position bias, softmax and
  weighted sum in one pass per batch element and head, output with the heads joined);
* the output projection with its residual is one call of
  `attention_core.residual_step.residual_linear`, the pre-norm GEGLU feed-forward block with
  its residual one call of `attention_core.residual_step.residual_feed_forward`;
* windows of fewer than ``FUSED_MIN_ROWS`` rows (``b * w``) run the same formulas in torch
  ops instead (the position bias expanded once per window and added by ``baddbmm``): at one
  or two rows those measured faster;
* no autograd bookkeeping, no `StepLinear` indirection, no custom autograd functions.

It reads the memory from a key/value buffer (`_kv_store.KVStore` of a forward call or
`_kv_store.RingBuffer` of decoding) and writes the window's own keys after the memory.

Einstein notation: ``b`` batch, ``w`` steps of the window, ``h`` heads, ``j`` keys (memory
slots, then the window), ``d`` head feature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_core.cache_attention import cache_attention
from attention_core.residual_step import MIN_ROWS, residual_feed_forward, residual_linear

from ._window_attention import MemorySlice

if TYPE_CHECKING:
    from torch import nn

    from ._window_loop import Cross
    from .layers import FeedbackLayer
    from .model import FeedbackTransformer

__all__ = ["FUSED_MIN_ROWS", "layer_norm", "window"]

# windows of fewer rows (batch times steps) run composed torch ops (measured faster there)
FUSED_MIN_ROWS = MIN_ROWS


def layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(x)`` for an ``nn.LayerNorm`` ``norm``, without module dispatch."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _attention(
    proj: Tensor,
    memory: MemorySlice,
    bias: Tensor,
    first_empty: bool,
    sizes: tuple[int, int, int, int],
) -> Tensor:
    """The attention output ``(b w, h d)`` of a projection ``(b w, o)`` (queries, then, for
    ``w > 1``, the window's keys and values) over the memory and the window; ``bias``
    ``(h, w, j)``, ``sizes`` ``(b, w, h, d)``."""
    b, w, h, d = sizes
    lo, hi = memory.lo, memory.hi
    # "(b h) c d -> b h c d"
    keys = memory.source.keys.unflatten(0, (b, h))
    values = memory.source.values.unflatten(0, (b, h))
    if w == 1:
        if lo == hi:  # a single step without memory sees nothing
            return proj.new_zeros(b, h * d)
        q = proj.view(b, 1, h, d)
    else:
        parts = proj.view(b, w, 3, h, d)
        q = parts[:, :, 0]
        # the window's keys and values go to the scratch slots after the memory
        keys[:, :, hi : hi + w].copy_(parts[:, :, 1].transpose(1, 2))
        values[:, :, hi : hi + w].copy_(parts[:, :, 2].transpose(1, 2))
        hi += w
    out = cache_attention(q, keys, values, lo, hi, bias, scale=1.0)  # b w h d
    if first_empty:
        out[:, 0] = 0.0
    return out.view(b * w, h * d)


def _composed_attention(
    proj: Tensor,
    memory: MemorySlice,
    bias: Tensor,
    first_empty: bool,
    sizes: tuple[int, int, int, int],
) -> Tensor:
    """`_attention` in torch ops (``bias`` expanded to ``(b h, w, j)``), for small windows."""
    b, w, h, d = sizes
    lo, hi = memory.lo, memory.hi
    keys, values = memory.source.keys, memory.source.values  # (b h, c, d)
    if w == 1:
        if lo == hi:  # a single step without memory sees nothing
            return proj.new_zeros(b, h * d)
        q = proj.reshape(b * h, 1, d)
    else:
        parts = proj.view(b, w, 3, h, d)
        q = parts[:, :, 0].transpose(1, 2).reshape(b * h, w, d)
        shape = (b, h, keys.shape[1], d)
        keys.view(shape)[:, :, hi : hi + w].copy_(parts[:, :, 1].transpose(1, 2))
        values.view(shape)[:, :, hi : hi + w].copy_(parts[:, :, 2].transpose(1, 2))
        hi += w
    scores = torch.baddbmm(bias, q, keys[:, lo:hi].mT)
    out = torch.bmm(scores.softmax(dim=-1), values[:, lo:hi])
    if first_empty:
        out[:, 0] = 0.0
    if w == 1:
        return out.view(b, h * d)
    return out.view(b, h, w, d).transpose(1, 2).reshape(b * w, h * d)


def _composed_sublayers(layer: FeedbackLayer, x: Tensor, out: Tensor, cross_out: Any) -> Tensor:
    """The output projection, cross attention and feed-forward block in torch ops."""
    x = F.linear(out, layer.to_out.weight, layer.to_out.bias).add_(x)
    if cross_out is not None:
        x += cross_out(x)
    first, _, last = layer.ff_parts()
    hidden, gate = F.linear(layer_norm(x, layer.ff_norm), first.weight, first.bias).chunk(2, -1)
    return F.linear(hidden * F.gelu(gate), last.weight, last.bias).add_(x)


def _layer(
    layer: FeedbackLayer,
    weight: Tensor,
    norm: nn.LayerNorm,
    x: Tensor,
    memory: MemorySlice,
    bias: Tensor,
    first_empty: bool,
    cross: tuple[Tensor, Tensor, Tensor | None] | None,
    proj: Tensor | None,
) -> Tensor:
    """One layer for ``x`` ``(b w, dim)`` (arguments as `_window_loop.layer_window`)."""
    w = bias.shape[-2]
    b = x.shape[0] // w
    if proj is None:
        proj = F.linear(layer_norm(x, norm), weight)
    cross_out = None
    if layer.cross is not None:
        if cross is None:
            raise ValueError("a layer with cross attention needs the context's keys and values")
        cross_layer = layer.cross

        def cross_out(x: Tensor) -> Tensor:
            return cross_layer(x.view(b, w, -1), *cross).view(b * w, -1)

    sizes = (b, w, layer.heads, layer.dim_head)
    if x.shape[0] < FUSED_MIN_ROWS:  # `window` expanded the bias for the composed ops
        out = _composed_attention(proj, memory, bias, first_empty, sizes)
        return _composed_sublayers(layer, x, out, cross_out)
    out = _attention(proj, memory, bias, first_empty, sizes)
    x = residual_linear(x, out, layer.to_out.weight, layer.to_out.bias)
    if cross_out is not None:
        x += cross_out(x)
    first, _, last = layer.ff_parts()
    norm = layer.ff_norm
    return residual_feed_forward(
        x, first.weight, first.bias, last.weight, last.bias, norm.weight, norm.bias,
        activation="geglu", norm_first=True, eps=norm.eps,
    )  # fmt: skip


def window(
    model: FeedbackTransformer,
    x: Tensor,
    memory: MemorySlice,
    bias: Tensor,
    first_empty: bool,
    weights: list[Tensor],
    cross: Cross | None,
    mix: Tensor | None,
    proj0: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`_window_loop.window` without autograd (the same arguments, without ``linear``):
    the last layer's output ``(b w, dim)`` and the window's memory keys and values
    ``(b, h, w, d)`` (``None`` when ``mem_len == 0``)."""
    h, (_, w, j) = model.heads, bias.shape
    b = x.shape[0] // w
    if b * w < FUSED_MIN_ROWS:  # the composed ops: the bias expanded once for all layers
        bias = bias.expand(b, h, w, j).reshape(b * h, w, j)
    states = [x]
    for i, layer in enumerate(model.layers):
        layer_cross = None if cross is None else (*cross[0][i], cross[1])
        proj = proj0 if i == 0 else None
        x = _layer(
            layer, weights[i], model.attn_norm, x, memory, bias, first_empty, layer_cross, proj
        )
        states.append(x)
    if not model.mem_len:
        return x, None, None
    merged = x if mix is None else torch.stack(states, dim=-1) @ mix  # (b w) dim l, l
    kv = F.linear(layer_norm(merged, model.attn_norm), model.to_kv.weight)
    # "(b w) (two h d) -> two b h w d"
    kv = kv.view(b, w, 2, h, model.dim_head).permute(2, 0, 3, 1, 4)
    return x, kv[0], kv[1]
