"""``fast_transformers.sparse_product.sparse_product_cpu`` over `attention_core.sparse_product`.

Same function names, argument order and caller-allocated outputs as fast-transformers'
compiled module: the products overwrite their buffer, the weighted average and every
gradient are added to theirs (fast-transformers' callers zero them first). Gradients come
from autograd through the differentiable ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._buffers import fill_buffer
from . import sparse_dot_product as _sparse_dot_product
from . import sparse_weighted_average as _sparse_weighted_average

__all__ = [
    "sparse_dot_backward",
    "sparse_dot_product",
    "sparse_weighted_average",
    "sparse_weighted_average_backward",
]


def gradients(op, inputs: tuple[Tensor, ...], index_args: tuple, grad_out: Tensor):
    """Gradients of ``op(*inputs, *index_args)`` with respect to ``inputs`` for ``grad_out``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        out = op(*leaves, *index_args)
    return torch.autograd.grad(out, leaves, grad_out)


def sparse_dot_product(Q: Tensor, K: Tensor, topk: Tensor, product: Tensor) -> None:
    """Write ``Q[n, h, l] . K[n, h, topk[n, h, l, i]]`` into ``product[n, h, l, i]``.

    Arguments:
        Q: ``(N, H, L, E)``.
        K: ``(N, H, S, E)``.
        topk: ``(N, H, L, k)`` int64 key indices.
        product: ``(N, H, L, k)`` output buffer, overwritten.
    """
    with torch.no_grad():
        fill_buffer("product", product, _sparse_dot_product(Q, K, topk))


def sparse_dot_backward(
    Q: Tensor, K: Tensor, topk: Tensor, grad_out: Tensor, grad_Q: Tensor, grad_K: Tensor
) -> None:
    """Add the gradients of `sparse_dot_product` for ``grad_out`` to the buffers.

    Arguments:
        Q: ``(N, H, L, E)``.
        K: ``(N, H, S, E)``.
        topk: ``(N, H, L, k)``.
        grad_out: ``(N, H, L, k)``.
        grad_Q: ``(N, H, L, E)`` output buffer, added to.
        grad_K: ``(N, H, S, E)`` output buffer, added to.
    """
    grads = gradients(_sparse_dot_product, (Q, K), (topk,), grad_out)
    fill_buffer("grad_Q", grad_Q, grads[0], accumulate=True)
    fill_buffer("grad_K", grad_K, grads[1], accumulate=True)


def sparse_weighted_average(weights: Tensor, values: Tensor, topk: Tensor, output: Tensor) -> None:
    """Add ``sum_i weights[n, h, l, i] * values[n, h, topk[n, h, l, i]]`` to ``output``.

    Arguments:
        weights: ``(N, H, L, k)``.
        values: ``(N, H, S, D)``.
        topk: ``(N, H, L, k)``.
        output: ``(N, H, L, D)`` output buffer, added to.
    """
    with torch.no_grad():
        result = _sparse_weighted_average(weights, values, topk)
    fill_buffer("output", output, result, accumulate=True)


def sparse_weighted_average_backward(
    weights: Tensor,
    values: Tensor,
    topk: Tensor,
    grad_out: Tensor,
    grad_weights: Tensor,
    grad_values: Tensor,
) -> None:
    """Add the gradients of `sparse_weighted_average` for ``grad_out`` to the buffers.

    Arguments:
        weights: ``(N, H, L, k)``.
        values: ``(N, H, S, D)``.
        topk: ``(N, H, L, k)``.
        grad_out: ``(N, H, L, D)``.
        grad_weights: ``(N, H, L, k)`` output buffer, added to.
        grad_values: ``(N, H, S, D)`` output buffer, added to.
    """
    grads = gradients(_sparse_weighted_average, (weights, values), (topk,), grad_out)
    fill_buffer("grad_weights", grad_weights, grads[0], accumulate=True)
    fill_buffer("grad_values", grad_values, grads[1], accumulate=True)
