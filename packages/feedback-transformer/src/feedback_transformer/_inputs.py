"""Validation of what `FeedbackTransformer.forward`, `prefill` and `step` receive: token ids,
a memory, a context and its mask. Each function raises a clear error naming the argument,
the expected and the actual shape, dtype or value."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor

from attention_core.checks import check_tensor, check_token_ids

from .memory import FeedbackMemory, memory_source

if TYPE_CHECKING:
    from ._window_loop import Cross
    from .model import FeedbackTransformer

__all__ = ["check_memory", "check_tokens", "prepare_context"]


def check_tokens(model: FeedbackTransformer, name: str, x: object, dim: int) -> None:
    """Token ids of ``dim`` dimensions (``(b, n)`` with ``n >= 1``, or ``(b,)``) in
    ``[0, num_tokens)``."""
    x = check_tensor(name, x, dim=dim, integer=True)
    if dim == 2 and x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (b, n) with n >= 1; got {tuple(x.shape)}")
    check_token_ids(name, x, model.num_tokens)


def check_memory(
    model: FeedbackTransformer, memory: object, batch: int, like: Tensor
) -> FeedbackMemory | None:
    """The newest ``mem_len`` steps of ``memory`` (a `FeedbackMemory` or ``(keys, values)``
    of shape ``(batch, heads, m, dim_head)``, dtype and device of ``like``), or ``None`` when
    there is nothing to keep."""
    if memory is None:
        return None
    if not isinstance(memory, (tuple, list)) or len(memory) != 2:
        raise TypeError(
            "memory must be a FeedbackMemory or a (keys, values) tuple; "
            f"got {type(memory).__name__}"
            + (f" of length {len(memory)}" if isinstance(memory, (tuple, list)) else "")
        )
    keys, values = memory
    source = memory_source(memory)
    if source is not None and source != model.signature:
        raise ValueError(
            "memory comes from a model with (dim, depth, heads, dim_head) = "
            f"{tuple(source)}; this model has {model.signature}"
        )
    for name, t in (("memory.keys", keys), ("memory.values", values)):
        t = check_tensor(name, t, dim=4, dtype=like.dtype, device=like.device)
        if t.shape[:2] != (batch, model.heads) or t.shape[3] != model.dim_head:
            raise ValueError(
                f"{name} must have shape (b, heads, m, dim_head) = "
                f"({batch}, {model.heads}, m, {model.dim_head}); got {tuple(t.shape)}"
            )
    if keys.shape != values.shape:
        raise ValueError(
            "memory.keys and memory.values must have the same shape; got "
            f"{tuple(keys.shape)} and {tuple(values.shape)}"
        )
    keep = min(model.mem_len, keys.shape[2])  # a longer memory keeps its newest steps
    if not keep:
        return None
    return FeedbackMemory(keys[:, :, -keep:], values[:, :, -keep:], model.signature)


def prepare_context(
    model: FeedbackTransformer,
    context: object,
    context_mask: object,
    batch: int,
    like: Tensor,
) -> Cross | None:
    """Per layer the context's keys and values ``(b, h, s, d)`` (projected once per call,
    masked positions zeroed first), and the mask ``(b, 1, 1, s)`` (or ``None``); ``None``
    for a model without cross attention."""
    if not model.cross_attend:
        if context is not None or context_mask is not None:
            raise ValueError("context and context_mask need a model built with cross_attend=True")
        return None
    if context is None:
        raise ValueError("context is required: the model was built with cross_attend=True")
    context = check_tensor("context", context, dim=3, dtype=like.dtype, device=like.device)
    if context.shape[0] != batch or context.shape[2] != model.dim or context.shape[1] < 1:
        raise ValueError(
            f"context must have shape (b, s, dim) = ({batch}, s >= 1, {model.dim}); "
            f"got {tuple(context.shape)}"
        )
    mask = None
    if context_mask is not None:
        context_mask = check_tensor("context_mask", context_mask, dim=2, dtype=torch.bool)
        if context_mask.shape != context.shape[:2]:
            raise ValueError(
                f"context_mask must have shape (b, s) = {tuple(context.shape[:2])}; "
                f"got {tuple(context_mask.shape)}"
            )
        context_mask = context_mask.to(like.device)
        # masked positions become zero keys and values (a select, not a product: 0 * nan is
        # nan), so whatever they held reaches no output nor gradient
        context = torch.where(context_mask[..., None], context, 0.0)
        mask = rearrange(context_mask, "b s -> b 1 1 s")
    # cross_attend: every layer has a cross attention block
    kv = [layer.cross.project(context) for layer in model.layers if layer.cross is not None]
    return kv, mask
