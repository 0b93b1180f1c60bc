"""The plain-PyTorch local products: gathers of each query's window of keys or values.

The reference of the tests and the fallback on every device and dtype."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["local_dot_product_reference", "local_weighted_average_reference"]


def _window(L: int, S: int, local_context: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Key index of every window slot, clamped into ``[0, S)``, and whether it lies there.

    Returns:
        ``(index, inside)``, both ``(L, local_context)``.
    """
    rows = torch.arange(L, device=device).unsqueeze(1)
    slots = torch.arange(local_context, device=device).unsqueeze(0)
    index = rows - local_context // 2 + slots
    inside = (index >= 0) & (index < S)
    return index.clamp(0, max(S - 1, 0)), inside


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[n, h, index[l, k]]`` for ``x`` of shape ``(N, H, S, F)``; returns ``(N, H, L, K, F)``."""
    return x[:, :, index]


def local_dot_product_reference(
    queries: Tensor, keys: Tensor, attn_mask: Tensor, key_lengths: Tensor, local_context: int
) -> Tensor:
    """Local dot products of checked inputs in plain PyTorch, by gathering each window.

    Computes `attention_core.local_product.local_dot_product` of ``queries (N, H, L, E)``,
    ``keys (N, H, S, E)`` with ``S > 0``, ``attn_mask (L, S)`` and ``key_lengths (N,)``:
    ``(N, H, L, local_context)``."""
    N, _, L, _ = queries.shape
    S = keys.shape[2]
    index, inside = _window(L, S, local_context, queries.device)
    valid = inside & (index < key_lengths.view(N, 1, 1, 1))  # (N, 1, L, K)
    scores = torch.einsum("nhle,nhlke->nhlk", queries, _gather_rows(keys, index))
    rows = torch.arange(L, device=queries.device).unsqueeze(1)
    scores = scores + attn_mask[rows, index].to(scores.dtype)
    return scores.masked_fill(~valid, float("-inf"))


def local_weighted_average_reference(attention: Tensor, values: Tensor) -> Tensor:
    """Local weighted average of checked inputs in plain PyTorch, by gathering each window.

    Computes `attention_core.local_product.local_weighted_average` of ``attention (N, H, L, C)`` and
    ``values (N, H, S, D)`` with ``S > 0``: ``(N, H, L, D)``."""
    L, K = attention.shape[2], attention.shape[3]
    index, inside = _window(L, values.shape[2], K, attention.device)
    weights = attention.masked_fill(~inside, 0.0)
    return torch.einsum("nhlk,nhlkd->nhld", weights, _gather_rows(values, index))
