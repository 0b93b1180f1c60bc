"""This module provides fast-transformers' compiled ``causal_product_cpu`` functions.

It is ``fast_transformers.causal_product.causal_product_cpu`` over
`attention_core.causal_product.causal_dot_product`.

Same function names, argument order and caller-allocated outputs as fast-transformers'
compiled module; any floating dtype is accepted. The backward comes from autograd through
the differentiable op. New code should call ``causal_dot_product`` and let autograd work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._buffers import fill_buffer
from . import causal_dot_product as _causal_dot_product

__all__ = ["causal_dot_backward", "causal_dot_product"]


def causal_dot_product(queries: Tensor, keys: Tensor, values: Tensor, product: Tensor) -> None:
    """Write ``sum_{j <= i} (Q_i . K_j) V_j`` into ``product``.

    Arguments:
        queries: ``(N, H, L, E)``.
        keys: ``(N, H, L, E)``.
        values: ``(N, H, L, M)``.
        product: ``(N, H, L, M)`` output buffer, overwritten.
    """
    with torch.no_grad():
        fill_buffer("product", product, _causal_dot_product(queries, keys, values))


def causal_dot_backward(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    grad_out: Tensor,
    grad_queries: Tensor,
    grad_keys: Tensor,
    grad_values: Tensor,
) -> None:
    """Write the gradients of `causal_dot_product` for ``grad_out`` into the buffers.

    Arguments:
        queries: ``(N, H, L, E)``.
        keys: ``(N, H, L, E)``.
        values: ``(N, H, L, M)``.
        grad_out: ``(N, H, L, M)`` gradient of the product.
        grad_queries: ``(N, H, L, E)`` output buffer, overwritten.
        grad_keys: ``(N, H, L, E)`` output buffer, overwritten.
        grad_values: ``(N, H, L, M)`` output buffer, overwritten.
    """
    inputs = [t.detach().requires_grad_() for t in (queries, keys, values)]
    with torch.enable_grad():
        product = _causal_dot_product(*inputs)
    grads = torch.autograd.grad(product, inputs, grad_out)
    buffers = {"grad_queries": grad_queries, "grad_keys": grad_keys, "grad_values": grad_values}
    for (name, out), grad in zip(buffers.items(), grads):
        fill_buffer(name, out, grad)
