"""The compiled inference path of :class:`~feedback_transformer.FeedbackTransformer`.

Without gradients, a float32 CPU forward runs its whole window loop in one call of
``attention_core._C.feedback_forward_f32`` (``csrc/feedback.h``): the module path's
computation (with ``exp`` and ``erf`` approximated to about float32 rounding), without a
Python dispatch per op. The model's steps are sequential and each op acts on a few rows, so
at the widths the model is used with that dispatch is most of the cost.

The kernel reads the weights as they are at each call (its threads copy them into panels of
32 output columns at the start of the call, a small part of it), so nothing
is cached: optimizer steps, in-place writes and loaded state dicts are always seen. The
call also holds transposed copies of the memory's keys and of the context's keys (cross
attention) while it runs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

try:
    from attention_core import _C
except ImportError:  # a build without the extension: the module path only
    _C = None

__all__ = ["available", "run"]

# an attention-core without this kernel (an older build) leaves the module path
_forward = getattr(_C, "feedback_forward_f32", None)

# threads of the kernel's team: 0 lets the kernel choose (one per 2^20 multiply-adds of a
# window, at most torch.get_num_threads()); tests set it to run small models on several
TEAM = 0


def _has_hooks(model: nn.Module) -> bool:
    """Forward hooks anywhere in the layers (the module path would call them), or global
    ones."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.layers.modules())


def _norms_fit(model) -> bool:
    """The kernel takes one epsilon per kind of norm and needs their affine parameters: true
    for the norms a ``FeedbackTransformer`` builds, not for edited ones."""
    kinds = [[model.attn_norm], [layer.ff_norm for layer in model.layers]]
    if model.cross_attend:
        kinds.append([layer.cross.norm for layer in model.layers])
    return all(
        isinstance(norm, nn.LayerNorm)
        and norm.weight is not None
        and norm.bias is not None
        and norm.eps == norms[0].eps
        for norms in kinds
        for norm in norms
    )


def available(model, h: Tensor) -> bool:
    """Whether ``model``'s forward over the embedded tokens ``h`` ``(b, n, dim)`` can take the
    compiled path: an attention-core built with the kernel, ``model.use_kernel``, no
    gradients recorded, not inside ``torch.compile`` or ``torch.jit.trace`` (they record the
    module path), ``h`` and every parameter float32 on the CPU, a non-empty batch, no dropout
    in effect, no forward hooks in the layers or their blocks (they would not fire), and the
    layer norms the model was built with."""
    if _forward is None or not model.use_kernel or torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if h.dtype != torch.float32 or h.device.type != "cpu" or not h.numel():
        return False
    if model.training and any(
        layer.attn_dropout or layer.ff_parts()[1].p for layer in model.layers
    ):
        return False
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return False
    return _norms_fit(model) and not _has_hooks(model)


def run(
    model,
    h: Tensor,
    proj0: Tensor,
    bias: Tensor,
    store,
    m0: int,
    window: int,
    weights: list[Tensor],
    cross=None,
) -> Tensor:
    """The last layer's outputs ``(b, n, dim)`` of the embedded tokens ``h`` ``(b, n, dim)``;
    writes their memory to ``store`` (a ``memory.KVStore`` holding ``m0`` earlier steps).

    Arguments:
        proj0: ``(b, n, o)`` the first layer's projection of ``h`` with ``weights[0]``.
        bias: ``(heads, window, mem_len + window)`` relative position bias of the window's
            queries over keys at ``-mem_len .. window - 1``.
        window: steps per window.
        weights: per layer, the ``(o, dim)`` projection weight of
            ``FeedbackTransformer._query_weights`` (``o``: ``heads * dim_head``, or three
            times that with the shared key/value weight stacked below, for windows of more
            than one step).
        cross: for cross attention, the per-layer context keys and values ``(b, h, s, d)``
            and the mask ``(b, 1, 1, s)`` (or ``None``), as ``FeedbackTransformer`` prepares
            them; ``None`` without.
    """
    with torch.no_grad():
        b, n, dim = h.shape
        h, proj0, bias = h.contiguous(), proj0.contiguous(), bias.contiguous()
        keep = []  # contiguous copies (if any) must outlive the call

        def address(t: Tensor | None) -> int:
            if t is None:
                return 0
            t = t.contiguous()
            keep.append(t)
            return t.data_ptr()

        context_len, mask, cross_eps = 0, None, 0.0
        if cross is not None:
            context_len = cross[0][0][0].shape[2]
            if cross[1] is not None:  # "b 1 1 s -> b s"
                mask = cross[1].reshape(b, context_len).to(torch.uint8)
        layers = []
        for i, layer in enumerate(model.layers):
            first, _, last = layer.ff_parts()
            entry = [
                address(weights[i]) if i else 0,  # layer 0's projection is proj0
                *map(address, (layer.to_out.weight, layer.to_out.bias)),
                *map(address, (layer.ff_norm.weight, layer.ff_norm.bias)),
                *map(address, (first.weight, first.bias, last.weight, last.bias)),
            ]
            if cross is None:
                entry += [0] * 7
            else:
                c = layer.cross
                cross_eps = c.norm.eps  # the same in every layer (available)
                entry += [
                    *map(address, (c.norm.weight, c.norm.bias)),
                    address(c.to_q.weight * model.dim_head**-0.5),
                    *map(address, (c.to_out.weight, c.to_out.bias, *cross[0][i])),
                ]
            layers.append(entry)
        norm, mix = model.attn_norm, model._mix()
        ff_norm = model.layers[0].ff_norm
        hidden = model.layers[0].ff_parts()[0].weight.shape[0] // 2
        sizes = (
            b, n, dim, model.heads, model.dim_head, hidden, model.depth, window,
            model.mem_len, m0, store.keys.shape[1], proj0.shape[2], context_len,
        )  # fmt: skip
        out = torch.empty_like(h)
        _forward(
            sizes,
            (norm.eps, ff_norm.eps, cross_eps),
            h.data_ptr(),
            proj0.data_ptr(),
            address(norm.weight),
            address(norm.bias),
            layers,
            address(mix),
            address(model.to_kv.weight) if model.mem_len else 0,
            address(mask),
            bias.data_ptr(),
            store.keys.data_ptr(),
            store.values.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
            TEAM,
        )
    return out
