"""fast-transformers' ``clustered_sparse_product_cpu`` module over `attention_core.sparse_product`.

Stands in for ``fast_transformers.sparse_product.clustered_sparse_product_cpu``.

Same function names, argument order and caller-allocated outputs as fast-transformers'
compiled module: the products overwrite the rows of queries whose group lies in ``[0, C)``
(the other rows keep their content), the weighted average and every gradient are added to
their buffers. Gradients come from autograd through the differentiable ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._buffers import fill_buffer
from . import clustered_sparse_dot_product as _clustered_sparse_dot_product
from . import clustered_sparse_weighted_average as _clustered_sparse_weighted_average
from .sparse_product_cpu import gradients

__all__ = [
    "clustered_sparse_dot_backward",
    "clustered_sparse_dot_product",
    "clustered_sparse_weighted_average",
    "clustered_sparse_weighted_average_backward",
]


def _dot(Q: Tensor, K: Tensor, groups: Tensor, topk: Tensor) -> Tensor:
    """The functional op for every query (all positions valid)."""
    N, H, L = groups.shape
    C = topk.shape[2]
    in_range = (groups >= 0) & (groups < C)
    counts = torch.zeros(N, H, C + 1, dtype=torch.int64, device=groups.device)
    counts.scatter_add_(2, groups.long().where(in_range, C), torch.ones_like(groups).long())
    lengths = torch.full((N,), L, dtype=torch.int64, device=groups.device)
    return _clustered_sparse_dot_product(Q, K, topk, groups, counts[..., :C], lengths)


def _rows_in_range(groups: Tensor, topk: Tensor) -> Tensor:
    return ((groups >= 0) & (groups < topk.shape[2])).unsqueeze(-1)


def clustered_sparse_dot_product(
    Q: Tensor, K: Tensor, groups: Tensor, topk: Tensor, product: Tensor
) -> None:
    """Write ``Q[n, h, l] . K[n, h, topk[n, h, groups[n, h, l], i]]`` into ``product``.

    Arguments:
        Q: ``(N, H, L, E)``.
        K: ``(N, H, S, E)``.
        groups: ``(N, H, L)`` integer cluster of every query.
        topk: ``(N, H, C, k)`` int64 key indices, one list per cluster.
        product: ``(N, H, L, k)`` output buffer.
    """
    with torch.no_grad():
        result = _dot(Q, K, groups, topk)
    fill_buffer("product", product, result, where=_rows_in_range(groups, topk))


def clustered_sparse_dot_backward(
    Q: Tensor,
    K: Tensor,
    groups: Tensor,
    topk: Tensor,
    grad_out: Tensor,
    grad_Q: Tensor,
    grad_K: Tensor,
) -> None:
    """Add the gradients of `clustered_sparse_dot_product` to the buffers.

    Arguments:
        Q: ``(N, H, L, E)``.
        K: ``(N, H, S, E)``.
        groups: ``(N, H, L)``.
        topk: ``(N, H, C, k)``.
        grad_out: ``(N, H, L, k)``.
        grad_Q: ``(N, H, L, E)`` output buffer, added to.
        grad_K: ``(N, H, S, E)`` output buffer, added to.
    """
    grads = gradients(_dot, (Q, K), (groups, topk), grad_out)
    fill_buffer("grad_Q", grad_Q, grads[0], accumulate=True)
    fill_buffer("grad_K", grad_K, grads[1], accumulate=True)


def clustered_sparse_weighted_average(
    weights: Tensor, values: Tensor, groups: Tensor, topk: Tensor, output: Tensor
) -> None:
    """Add ``sum_i weights[n, h, l, i] * values[n, h, topk[n, h, g, i]]`` to ``output``.

    Arguments:
        weights: ``(N, H, L, k)``.
        values: ``(N, H, S, D)``.
        groups: ``(N, H, L)``; queries of groups outside ``[0, C)`` add nothing.
        topk: ``(N, H, C, k)``.
        output: ``(N, H, L, D)`` output buffer, added to.
    """
    with torch.no_grad():
        result = _clustered_sparse_weighted_average(weights, values, topk, groups)
    fill_buffer("output", output, result, accumulate=True)


def clustered_sparse_weighted_average_backward(
    weights: Tensor,
    values: Tensor,
    groups: Tensor,
    topk: Tensor,
    grad_out: Tensor,
    grad_weights: Tensor,
    grad_values: Tensor,
) -> None:
    """Add the gradients of `clustered_sparse_weighted_average` to the buffers.

    Arguments:
        weights: ``(N, H, L, k)``.
        values: ``(N, H, S, D)``.
        groups: ``(N, H, L)``.
        topk: ``(N, H, C, k)``.
        grad_out: ``(N, H, L, D)``.
        grad_weights: ``(N, H, L, k)`` output buffer, added to.
        grad_values: ``(N, H, S, D)`` output buffer, added to.
    """

    def average(w: Tensor, v: Tensor, groups: Tensor, topk: Tensor) -> Tensor:
        return _clustered_sparse_weighted_average(w, v, topk, groups)

    grads = gradients(average, (weights, values), (groups, topk), grad_out)
    fill_buffer("grad_weights", grad_weights, grads[0], accumulate=True)
    fill_buffer("grad_values", grad_values, grads[1], accumulate=True)
