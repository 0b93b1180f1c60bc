"""Speed-up of the window loop: the memory in one preallocated buffer, few ops per step.

Computes what `reference.feedback_forward` computes, with these differences in how:

* every step's keys and values are written once into a preallocated `_kv_store.KVStore`
  (decoding: a `_kv_store.RingBuffer`) and read as views: nothing is concatenated or
  re-stacked per step, and the backward pass saves no copy of the memory;
* a window's own keys go to the buffer's scratch slots after the memory, so one product
  covers memory and window (`_window_attention`);
* the query weight is pre-scaled and, for windows of more than one step, stacked on the
  shared key/value weight: one projection per layer and window; the first layer's
  projection, which does not depend on the steps, is one product over all tokens;
* functional ops on the parameters (no module dispatch, no einops parsing per step);
* while gradients are recorded, weight gradients are formed once per call
  (`_step_linear.StepLinear`) and a layer without cross attention is one autograd node
  (`_fused_window_step.LayerStep`, unless ``FUSED`` is false);
* a call that records no gradients (and applies no dropout) runs `_inference_window.run`,
  the same loop in fewer ops per window.

Einstein notation: ``b`` batch, ``n`` tokens, ``w`` steps of a window, ``h`` heads, ``d``
head feature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _inference_window
from ._fused_window_step import LayerStep, StepInputs, StepPlan, join_heads, split_projection
from ._inference_weights import layer_norm, query_weights
from ._kv_store import KVStore
from ._step_linear import StepLinear
from ._window_attention import MemorySlice, attend_window, window_bias

if TYPE_CHECKING:
    from torch import nn

    from .layers import FeedbackLayer
    from .model import FeedbackTransformer

__all__ = ["FUSED", "Cross", "layer_window", "memory_mix", "query_weights", "run", "window"]

LinearFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
# per layer the context keys and values (b, h, s, d), and the mask (b, 1, 1, s) or None
Cross = tuple[list[tuple[Tensor, Tensor]], Tensor | None]

# a training layer without cross attention runs as one LayerStep node (False: composed ops)
FUSED = True


def memory_mix(model: FeedbackTransformer) -> Tensor | None:
    """``softmax(layer_weight)`` ``(depth + 1,)``, or ``None`` (the last layer only)."""
    return None if model.layer_weight is None else model.layer_weight.softmax(dim=-1)


def dropout_active(model: FeedbackTransformer) -> bool:
    """Whether a forward of ``model`` applies dropout (training mode, a probability > 0)."""
    return model.training and any(
        layer.attn_dropout or layer.ff_parts()[1].p for layer in model.layers
    )


def _feedforward(layer: FeedbackLayer, x: Tensor, linear: LinearFn) -> Tensor:
    """``layer.ff(layer.ff_norm(x))`` for ``x`` ``(b w, dim)``, its products through
    ``linear``."""
    first, dropout, last = layer.ff_parts()
    x, gate = linear(layer_norm(x, layer.ff_norm), first.weight, first.bias).chunk(2, dim=-1)
    x = x * F.gelu(gate)
    if layer.training and dropout.p:
        x = F.dropout(x, dropout.p, training=True)
    return linear(x, last.weight, last.bias)


def _fused_layer(
    layer: FeedbackLayer,
    norm: nn.LayerNorm,
    x: Tensor,
    weight: Tensor,
    memory: MemorySlice,
    bias: Tensor,
    first_empty: bool,
    linear: StepLinear,
    proj: Tensor | None,
) -> Tensor:
    """`layer_window` while training, without cross attention: one `LayerStep` node."""
    first, ff_dropout, last = layer.ff_parts()
    entries = [
        None if proj is not None else linear.entry(weight),
        linear.entry(layer.to_out.weight, layer.to_out.bias),
        linear.entry(first.weight, first.bias),
        linear.entry(last.weight, last.bias),
    ]
    tokens = [None if e is None else e[0] for e in entries]
    w = bias.shape[1]
    plan = StepPlan(
        memory=memory, first_empty=first_empty, batch=x.shape[0] // w, window=w,
        heads=layer.heads, dim_head=layer.dim_head, norm_eps=norm.eps,
        ff_norm_eps=layer.ff_norm.eps,
        attn_dropout=layer.attn_dropout if layer.training else 0.0,
        ff_dropout=ff_dropout.p if layer.training else 0.0,
        records=tuple(None if e is None else e[1] for e in entries),
    )  # fmt: skip
    inputs = StepInputs(
        x=x, proj=proj, norm_weight=norm.weight, norm_bias=norm.bias, weight=weight,
        out_weight=layer.to_out.weight, out_bias=layer.to_out.bias,
        ff_norm_weight=layer.ff_norm.weight, ff_norm_bias=layer.ff_norm.bias,
        ff_in_weight=first.weight, ff_in_bias=first.bias, ff_out_weight=last.weight,
        ff_out_bias=last.bias, bias=bias, link=memory.link, token_qkv=tokens[0],
        token_out=tokens[1], token_ff_in=tokens[2], token_ff_out=tokens[3],
    )  # fmt: skip
    return LayerStep.apply(plan, *inputs.as_args())


def layer_window(
    layer: FeedbackLayer,
    norm: nn.LayerNorm,
    x: Tensor,
    weight: Tensor,
    memory: MemorySlice,
    bias: Tensor,
    first_empty: bool = False,
    cross: tuple[Tensor, Tensor, Tensor | None] | None = None,
    linear: LinearFn = F.linear,
    proj: Tensor | None = None,
) -> Tensor:
    """Advance a window of ``w`` steps by one layer (`reference.feedback_layer`).

    Arguments:
        layer: a `FeedbackLayer`.
        norm: the shared attention pre-norm.
        x: ``(b w, dim)`` the layer's input, rows in ``(b, w)`` order.
        weight: ``(h d, dim)``, the query weight times ``dim_head ** -0.5``; or
            ``(3 h d, dim)``: that stacked on the shared key/value weight (``w > 1``).
        memory: the memory slots the window sees (and the buffer they live in).
        bias: relative position bias ``(h, w, j)`` from `window_bias`.
        first_empty: the first query sees no key (zero output).
        cross: context keys, values ``(b, h, s, d)`` and mask, or ``None``.
        linear: ``F.linear`` or the call's `StepLinear`.
        proj: ``(b w, o)``, the projection ``linear(norm(x), weight)`` if already computed.

    Returns:
        ``(b w, dim)``.
    """
    h, d = layer.heads, layer.dim_head
    w = bias.shape[1]
    b = x.shape[0] // w
    fused = FUSED and layer.cross is None
    if fused and isinstance(linear, StepLinear) and torch.is_grad_enabled():
        return _fused_layer(layer, norm, x, weight, memory, bias, first_empty, linear, proj)
    if proj is None:
        proj = linear(layer_norm(x, norm), weight, None)
    q, kw, vw = split_projection(proj, b, w, h, d)
    dropout = layer.attn_dropout if layer.training else 0.0
    out = join_heads(attend_window(q, kw, vw, bias, memory, first_empty, dropout), b, w, h, d)
    x = x + linear(out, layer.to_out.weight, layer.to_out.bias)
    if layer.cross is not None:
        if cross is None:
            raise ValueError("a layer with cross attention needs the context's keys and values")
        x = x + layer.cross(x.view(b, w, -1), *cross).view(b * w, -1)
    return x + _feedforward(layer, x, linear)


def window(
    model: FeedbackTransformer,
    x: Tensor,
    memory: MemorySlice,
    bias: Tensor,
    first_empty: bool,
    weights: list[Tensor],
    cross: Cross | None,
    mix: Tensor | None,
    linear: LinearFn = F.linear,
    proj0: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Run a window of ``w`` steps, ``x`` ``(b w, dim)``, through every layer (``proj0``:
    the first layer's projection of ``x`` if already computed).

    Returns the last layer's output ``(b w, dim)`` and the window's memory keys and values
    ``(b, h, w, d)`` (``None`` when ``mem_len == 0``).
    """
    states = [x]
    for i, layer in enumerate(model.layers):
        layer_cross = None if cross is None else (*cross[0][i], cross[1])
        proj = proj0 if i == 0 else None
        x = layer_window(
            layer, model.attn_norm, x, weights[i], memory, bias, first_empty, layer_cross,
            linear, proj,
        )  # fmt: skip
        states.append(x)
    if not model.mem_len:
        return x, None, None
    merged = x if mix is None else torch.stack(states, dim=-1) @ mix  # (b w) dim l, l
    kv = linear(layer_norm(merged, model.attn_norm), model.to_kv.weight, None)
    w = bias.shape[1]
    # "(b w) (two h d) -> two b h w d"
    kv = kv.view(-1, w, 2, model.heads, model.dim_head).permute(2, 0, 3, 1, 4)
    return x, kv[0], kv[1]


def run(
    model: FeedbackTransformer,
    h: Tensor,
    prefix: tuple[Tensor, Tensor] | None,
    cross: Cross | None,
    detach: bool,
    seq_len: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The last layer's outputs ``(b, n, dim)`` of the embedded tokens ``h`` ``(b, n, dim)``
    after the memory ``prefix`` (keys, values ``(b, h, m, d)`` with ``m <= mem_len``, or
    ``None``), in windows of ``seq_len`` steps (default ``model.seq_len``), and the keys and
    values ``(b, h, m', d)`` of the last ``m' = min(mem_len, m + n)`` steps (differentiable
    unless ``detach``)."""
    W = seq_len or model.seq_len
    if not torch.is_grad_enabled() and not dropout_active(model):
        return _inference_window.run(model, h, prefix, cross, W)
    b, n, dim = h.shape
    M = model.mem_len
    m0 = 0 if prefix is None else prefix[0].shape[2]
    # every step's keys and values, written once; with mem_len == 0 just the scratch slots
    # of the window's own keys
    store = KVStore(h, b, model.heads, m0 + n if M else W, model.dim_head)
    link = store.write(*prefix) if prefix is not None and m0 else None
    # bias of queries 0 .. W-1 over memory slots -M .. -1 and window keys 0 .. W-1
    positions = torch.arange(-M, W, device=h.device)
    bias_full = model.rel_pos(positions[M:], positions)
    weights = query_weights(model, stacked=W > 1 and n > 1)
    q_weights = [wt[: model.heads * model.dim_head] for wt in weights]
    linear = StepLinear() if torch.is_grad_enabled() else F.linear
    mix = memory_mix(model)
    # the first layer's input is the embedding, known for every step: its pre-norm and
    # projection are one product over all b * n rows instead of one per window
    a = layer_norm(h, model.attn_norm)
    proj_all = linear(a.reshape(b * n, dim), weights[0], None).view(b, n, weights[0].shape[0])
    biases: dict[tuple[int, int], tuple[Tensor, bool]] = {}  # one view per shape
    # split once: one backward node for all windows (slicing per window would zero-fill a
    # gradient of the whole input per window in the backward pass)
    h_windows, proj_windows = h.split(W, dim=1), proj_all.split(W, dim=1)
    outputs = []
    for index, start in enumerate(range(0, n, W)):
        w = min(W, n - start)
        x = h_windows[index].reshape(b * w, dim)
        hi = m0 + start if M else 0
        lo = max(0, hi - M)
        if (w, hi - lo) not in biases:
            biases[w, hi - lo] = window_bias(bias_full, hi - lo, w, W)
        bias, first_empty = biases[w, hi - lo]
        layer_weights = weights if w > 1 else q_weights
        o = layer_weights[0].shape[0]  # "b w o -> (b w) o" (a copy when b > 1)
        proj0 = proj_windows[index][:, :, :o].reshape(b * w, o)
        memory = MemorySlice(store, lo, hi, link)
        x, k, v = window(
            model, x, memory, bias, first_empty, layer_weights, cross, mix, linear, proj0
        )
        outputs.append(x.view(b, w, dim))
        if k is not None and v is not None:  # the window's memory (mem_len > 0)
            link = store.write(k, v)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if not M:
        empty = h.new_zeros(b, model.heads, 0, model.dim_head)
        return out, empty, empty.clone()
    keys, values = store.read(max(0, m0 + n - M), m0 + n, link, detach)
    return out, keys, values
