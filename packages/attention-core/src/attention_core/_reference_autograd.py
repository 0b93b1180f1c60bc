"""Autograd for ops whose kernels serve inference: the backward differentiates the op's
plain-PyTorch reference, recomputed from the saved inputs.

Used by `attention_core.residual_step` and `attention_core.cache_attention` (their kernels
run without autograd; a call that records gradients gets the reference's gradients). This
module imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["register_reference_autograd"]


def register_reference_autograd(op: Any, reference: Callable[..., Tensor]) -> None:
    """Register on the custom op ``op`` a backward that differentiates ``reference`` (which
    takes the op's arguments in order and returns its single output)."""

    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.saved_inputs = inputs
        ctx.needs = [isinstance(t, Tensor) and t.requires_grad for t in inputs]

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        inputs = [
            t.detach().requires_grad_(needs) if isinstance(t, Tensor) else t
            for t, needs in zip(ctx.saved_inputs, ctx.needs, strict=True)
        ]
        with torch.enable_grad():
            out = reference(*inputs)
        wanted = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        return tuple(
            next(grads) if isinstance(t, Tensor) and t.requires_grad else None for t in inputs
        )

    op.register_autograd(backward, setup_context=setup_context)
