"""The plain-PyTorch sparse products: gathers of each query's selected keys or values.

The reference of the tests and the fallback on every device and dtype. Inputs are checked by the
public functions of `attention_core.sparse_product` (key indices in ``[0, S)``)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "clustered_sparse_dot_product_reference",
    "clustered_sparse_weighted_average_reference",
    "sparse_dot_product_reference",
    "sparse_weighted_average_reference",
]


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """``x[n, h, index[n, h, l, i]]`` for ``x (N, H, S, F)``; returns ``(N, H, L, k, F)``."""
    k, F = index.shape[-1], x.shape[-1]
    flat = rearrange(index, "n h l k -> n h (l k) 1").expand(-1, -1, -1, F)
    return rearrange(x.gather(2, flat), "n h (l k) f -> n h l k f", k=k)


def _per_query(
    topk: Tensor, groups: Tensor, valid_positions: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Each query's key list from its cluster's.

    Arguments:
        topk: ``(N, H, C, k)`` int64.
        groups: ``(N, H, L)`` integer cluster of every query.
        valid_positions: ``(N, 1, L)`` or ``(N, H, L)`` bool, or ``None``.

    Returns:
        ``(index (N, H, L, k), valid (N, H, L, 1))``; queries whose group lies outside
        ``[0, C)`` or whose position is not valid get ``valid == False``.
    """
    C, k = topk.shape[2], topk.shape[3]
    groups = groups.long()
    valid = (groups >= 0) & (groups < C)
    if valid_positions is not None:
        valid = valid & valid_positions
    rows = groups.clamp(0, C - 1).unsqueeze(-1).expand(-1, -1, -1, k)
    return topk.gather(2, rows), valid.unsqueeze(-1)


def sparse_dot_product_reference(Q: Tensor, K: Tensor, topk: Tensor) -> Tensor:
    """``Q (N, H, L, E)``, ``K (N, H, S, E)``, ``topk (N, H, L, k)`` -> ``(N, H, L, k)``."""
    return torch.einsum("nhle,nhlke->nhlk", Q, _gather(K, topk))


def sparse_weighted_average_reference(weights: Tensor, values: Tensor, topk: Tensor) -> Tensor:
    """Average the gathered values: ``(N, H, L, k)`` weights over ``(N, H, S, D)`` values.

    ``weights (N, H, L, k)``, ``values (N, H, S, D)``, ``topk (N, H, L, k)`` ->
    ``(N, H, L, D)``."""
    return torch.einsum("nhlk,nhlkd->nhld", weights, _gather(values, topk))


def clustered_sparse_dot_product_reference(
    Q: Tensor, K: Tensor, topk: Tensor, groups: Tensor, lengths: Tensor
) -> Tensor:
    """Dot products of each query with its cluster's selected keys, in plain PyTorch.

    ``Q (N, H, L, E)``, ``K (N, H, S, E)``, ``topk (N, H, C, k)``, ``groups (N, H, L)``,
    ``lengths (N,)`` -> ``(N, H, L, k)``, zero for queries without keys."""
    N, _, L, _ = Q.shape
    positions = torch.arange(L, device=Q.device) < lengths.view(N, 1, 1)
    index, valid = _per_query(topk, groups, positions)
    products = torch.einsum("nhle,nhlke->nhlk", Q, _gather(K, index))
    return products.masked_fill(~valid, 0.0)


def clustered_sparse_weighted_average_reference(
    weights: Tensor, values: Tensor, topk: Tensor, groups: Tensor, counts: Tensor | None
) -> Tensor:
    """Weighted average over each cluster's selected values, in plain PyTorch.

    ``weights (N, H, L, k)``, ``values (N, H, S, D)``, ``topk (N, H, C, k)``, ``groups (N, H, L)``,
    ``counts (N, H, C)`` or ``None`` -> ``(N, H, L, D)``, zero for queries without keys."""
    L = weights.shape[2]
    positions = None
    if counts is not None:
        positions = torch.arange(L, device=values.device) < counts.sum(-1, keepdim=True)
    index, valid = _per_query(topk, groups, positions)
    averaged = torch.einsum("nhlk,nhlkd->nhld", weights, _gather(values, index))
    return averaged.masked_fill(~valid, 0.0)
