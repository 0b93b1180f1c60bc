"""The paper path: the Feedback Transformer written as Fan et al. 2021 describe it.

"Addressing Some Limitations of Transformers with Feedback Memory", arXiv 2002.09402,
section 3: at time step ``t`` every layer ``l`` attends to the memory
``[m_{t-τ}, ..., m_{t-1}]`` of the steps before it, and after the last layer the step's own
memory vector merges the states of all layers,

    m_t = sum_{l=0}^{L} softmax(w)_l x_t^l

(or, with ``keep_last_hidden``, the last layer's output ``x_t^L``). The memory is projected
once to a key and a value with the projection that every layer shares, so all layers of all
later steps read the same keys and values.

Processing a window of ``w = seq_len`` steps at once is this package's speed-up (as in
feedback-transformer-pytorch): the memory of the window's own earlier steps does not exist
yet, so step ``t`` of a window also attends to the window's steps ``u < t`` at the same
layer (their keys and values from that layer's input). With ``seq_len = 1`` this is exactly
the paper's model.

Each layer is pre-normalised and residual: attention over the memory with a T5 relative
position bias (Raffel et al. 2020, arXiv 1910.10683) that counts the real distance of every
memory slot, optional cross attention over an encoded context, and a GEGLU feed-forward
(Shazeer 2020, arXiv 2002.05202).

This module is the documented model and the oracle of the tests: the model's `forward`
computes the same function on its fast paths (a preallocated memory buffer, fused autograd
nodes, fewer ops per step), which the tests prove equal to these functions in float64.
It is plain PyTorch, differentiable by autograd, and slow.

Einstein notation: ``b`` batch, ``w`` steps of a window (``i`` queries), ``j`` keys (memory
slots, then the window), ``h`` heads, ``d`` head feature, ``s`` context positions,
``l`` layer states.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor

from attention_core.nn import attend

if TYPE_CHECKING:
    from .layers import FeedbackLayer
    from .model import FeedbackTransformer

__all__ = ["feedback_forward", "feedback_layer", "memory_key_value"]


def memory_key_value(model: FeedbackTransformer, state: Tensor) -> tuple[Tensor, Tensor]:
    """Project states ``(b, w, dim)`` to keys and values ``(b, h, w, d)``.

    With the pre-norm and the key/value projection that all layers share: this makes the
    memory's keys and values and those of a window's own steps.
    """
    kv = model.to_kv(model.attn_norm(state))
    return rearrange(kv, "b w (two h d) -> two b h w d", two=2, h=model.heads)


def feedback_layer(
    model: FeedbackTransformer,
    layer: FeedbackLayer,
    x: Tensor,
    memory: tuple[Tensor, Tensor],
    times: Tensor,
    key_times: Tensor,
    context: tuple[Tensor, Tensor, Tensor | None] | None = None,
) -> Tensor:
    """Advance a window of steps by one layer.

    Attention over the memory and the window's earlier steps, [cross attention,] and the
    feed-forward, each pre-normalised and residual.

    Arguments:
        model: the `FeedbackTransformer` (its shared pre-norm, key/value projection and
            position bias).
        layer: one of ``model.layers``.
        x: ``(b, w, dim)`` the layer's input at the window's steps.
        memory: keys and values ``(b, h, m, d)`` of the memory.
        times: ``(w,)`` the window's time steps.
        key_times: ``(m,)`` the time steps of the memory slots.
        context: context keys and values ``(b, h, s, d)`` (from ``layer.cross.project``) and
            a ``(b, 1, 1, s)`` boolean mask (or ``None``); ``None`` without cross attention.

    Returns:
        ``(b, w, dim)``.
    """
    q = rearrange(layer.to_q(model.attn_norm(x)), "b w (h d) -> b h w d", h=model.heads)
    window_keys, window_values = memory_key_value(model, x)
    keys = torch.cat((memory[0], window_keys), dim=2)
    values = torch.cat((memory[1], window_values), dim=2)
    key_times = torch.cat((key_times, times))
    # step t sees the memory and the window's steps u < t, never itself
    visible = key_times[None, :] < times[:, None]  # (i, j)
    bias = model.rel_pos(times, key_times)  # (h, i, j)
    out = attend(
        q, keys, values, mask=visible, bias=bias, dropout_p=layer.attn_dropout,
        training=model.training,
    )  # fmt: skip
    x = x + layer.to_out(rearrange(out, "b h w d -> b w (h d)"))
    if layer.cross is not None:
        if context is None:
            raise ValueError("context is required: the layer has cross attention")
        x = x + layer.cross(x, *context)
    return x + layer.ff(layer.ff_norm(x))


def feedback_forward(
    model: FeedbackTransformer,
    h: Tensor,
    memory: tuple[Tensor, Tensor] | None = None,
    context: list[tuple[Tensor, Tensor]] | None = None,
    context_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the embedded tokens through the model, window after window, after a memory.

    Arguments:
        model: the `FeedbackTransformer` whose parameters are used.
        h: ``(b, n, dim)`` token embeddings.
        memory: keys and values ``(b, h, m, d)`` of the ``m`` steps before ``h`` (at most
            ``mem_len``), or ``None``.
        context: per layer, the context keys and values ``(b, h, s, d)`` (cross attention
            only).
        context_mask: ``(b, 1, 1, s)`` boolean, ``True`` = visible, or ``None``.

    Returns:
        the outputs ``(b, n, dim)`` and the keys and values ``(b, h, m', d)`` of the last
        ``m' = min(mem_len, m + n)`` steps.
    """
    b, n, _ = h.shape
    M, W = model.mem_len, model.seq_len
    empty = h.new_zeros(b, model.heads, 0, model.dim_head)
    keys, values = (empty, empty) if memory is None else memory
    key_times = torch.arange(-keys.shape[2], 0, device=h.device)
    mix = None if model.layer_weight is None else model.layer_weight.softmax(dim=-1)
    outputs = []
    for start in range(0, n, W):
        x = h[:, start : start + W]
        times = torch.arange(start, start + x.shape[1], device=h.device)
        states = [x]  # x_t^0 .. x_t^L
        for index, layer in enumerate(model.layers):
            cross = None if context is None else (*context[index], context_mask)
            x = feedback_layer(model, layer, x, (keys, values), times, key_times, cross)
            states.append(x)
        outputs.append(x)
        if not M:
            continue
        # the memory vector of each step (the softmax-weighted sum of its layer states),
        # projected once for all layers
        merged = (
            x if mix is None else torch.einsum("b w e l, l -> b w e", torch.stack(states, -1), mix)
        )
        new_keys, new_values = memory_key_value(model, merged)
        keys = torch.cat((keys, new_keys), dim=2)[:, :, -M:]
        values = torch.cat((values, new_values), dim=2)[:, :, -M:]
        key_times = torch.cat((key_times, times))[-M:]
    return torch.cat(outputs, dim=1), keys, values
