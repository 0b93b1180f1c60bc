"""The compiled inference path of :class:`~feedback_transformer.FeedbackTransformer`.

Without gradients, a float32 CPU forward runs its whole window loop in one call of
``attention_core._C.feedback_forward_f32`` (``csrc/feedback.h``): the same arithmetic as the
module path, without a Python dispatch per op. The model's steps are sequential and each op
acts on a few rows, so at the widths the model is used with that dispatch is most of the cost.

The kernel reads every weight as panels of 32 output columns (``pack``); the packed copies
are cached per model and rebuilt when a parameter changes (its version counter or storage),
so an optimizer step or ``model.to(...)`` is seen. They take as much memory as the weights.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

try:
    from attention_core import _C
except ImportError:  # a build without the extension: the module path only
    _C = None

__all__ = ["PANEL", "available", "pack", "run"]

PANEL = 32  # output columns per panel (csrc/feedback.h, kPanel)

# model -> (parameter key, fused flag, packed tensors); dropped with the model
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pack(weight: Tensor) -> Tensor:
    """Panels ``(ceil(N / 32), K, 32)`` of a weight ``(N, K)``: panel ``p`` holds output
    columns ``32 p .. 32 p + 31`` (zeros past ``N``), contiguous."""
    n, k = weight.shape
    padded = -n % PANEL
    if padded:
        weight = F.pad(weight, (0, 0, 0, padded))
    return weight.reshape(-1, PANEL, k).transpose(1, 2).contiguous()


def _has_hooks(model: nn.Module) -> bool:
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.layers)


def available(model, h: Tensor, cross) -> bool:
    """Whether ``model``'s forward over the embedded tokens ``h`` ``(b, n, dim)`` can take the
    compiled path: no gradients recorded, float32 on the CPU, a non-empty batch, no cross
    attention, no dropout in effect, no forward hooks on the layers (they would not fire),
    not inside a ``torch.compile`` trace, and ``model.use_kernel``."""
    if _C is None or not model.use_kernel or torch.is_grad_enabled() or cross is not None:
        return False
    if torch.compiler.is_compiling():  # torch.compile traces the module path
        return False
    if h.dtype != torch.float32 or h.device.type != "cpu" or not h.numel():
        return False
    if model.training and any(layer.attn_dropout or layer.ff.net[2].p for layer in model.layers):
        return False
    return not _has_hooks(model)


def _packed(model, fused: bool) -> dict[str, object]:
    """The model's weights as panels: per layer the list of ``_C.feedback_forward_f32``, and
    the shared key/value projection; rebuilt when a parameter changed."""
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    entry = _cache.get(model)
    if entry is None or entry[0] != key:
        entry = (key, {})
        _cache[model] = entry
    if fused in entry[1]:
        return entry[1][fused]
    weights = model._query_weights(fused)
    layers = []
    for i, layer in enumerate(model.layers):
        first, _, _, last = layer.ff.net  # Linear, GEGLU, Dropout, Linear
        value_w, gate_w = first.weight.chunk(2, dim=0)
        value_b, gate_b = first.bias.chunk(2, dim=0)
        layers.append(
            [
                pack(weights[i]) if i else None,  # layer 0's projection is the caller's
                pack(layer.to_out.weight),
                layer.to_out.bias.contiguous(),
                layer.ff_norm.weight.contiguous(),
                layer.ff_norm.bias.contiguous(),
                pack(value_w),
                value_b.contiguous(),
                pack(gate_w),
                gate_b.contiguous(),
                pack(last.weight),
                last.bias.contiguous(),
            ]
        )
    packed = {"layers": layers, "kv": pack(model.to_kv.weight) if model.mem_len else None}
    entry[1][fused] = packed
    return packed


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def run(model, h: Tensor, proj0: Tensor, bias: Tensor, store, m0: int, window: int) -> Tensor:
    """The last layer's outputs ``(b, n, dim)`` of the embedded tokens ``h`` ``(b, n, dim)``;
    writes their memory to ``store`` (a ``memory.KVStore`` holding ``m0`` earlier steps).

    Arguments:
        proj0: ``(b, n, o)`` the first layer's projection of ``h`` (``o``: ``heads *
            dim_head``; three times that when the layers' projections include the shared
            key/value weight, for windows of more than one step).
        bias: ``(heads, window, mem_len + window)`` relative position bias of the window's
            queries over keys at ``-mem_len .. window - 1``.
        window: steps per window.
    """
    with torch.no_grad():
        b, n, dim = h.shape
        fused = proj0.shape[2] != model.heads * model.dim_head
        packed = _packed(model, fused)
        h, proj0, bias = h.contiguous(), proj0.contiguous(), bias.contiguous()
        norm, mix = model.attn_norm, model._mix()
        ff_norm = model.layers[0].ff_norm
        hidden = model.layers[0].ff.net[0].weight.shape[0] // 2
        sizes = (
            b, n, dim, model.heads, model.dim_head, hidden, model.depth, window,
            model.mem_len, m0, store.keys.shape[1], proj0.shape[2],
        )  # fmt: skip
        out = torch.empty_like(h)
        _C.feedback_forward_f32(
            sizes,
            (norm.eps, ff_norm.eps),
            h.data_ptr(),
            proj0.data_ptr(),
            norm.weight.data_ptr(),
            norm.bias.data_ptr(),
            [[_address(t) for t in layer] for layer in packed["layers"]],
            _address(mix),
            _address(packed["kv"]),
            bias.data_ptr(),
            store.keys.data_ptr(),
            store.values.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
    return out
