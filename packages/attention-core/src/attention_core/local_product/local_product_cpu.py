"""``fast_transformers.local_product.local_product_cpu`` over `attention_core.local_product`.

Same function names, argument order and return values as fast-transformers' compiled module:
the products return new tensors, the backward functions return the gradients (computed by
autograd through the differentiable ops). As in fast-transformers, the slots of a window that
hold no key (before the start, past the end or past ``key_lengths``) are ``-1e24`` here,
where `attention_core.local_product.local_dot_product` gives ``-inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import local_dot_product as _local_dot_product
from . import local_weighted_average as _local_weighted_average

__all__ = [
    "local_dot_backward",
    "local_dot_product",
    "local_weighted_average",
    "local_weighted_average_backward",
]

EMPTY_SLOT = -1e24  # fast-transformers' value for a window slot without a key


def _slots_with_keys(L: int, S: int, key_lengths: Tensor, local_context: int) -> Tensor:
    """``(N, 1, L, local_context)`` bool: slot ``k`` of query ``l`` holds a key."""
    keys = torch.arange(L, device=key_lengths.device).view(L, 1) - local_context // 2
    keys = keys + torch.arange(local_context, device=key_lengths.device)
    limit = key_lengths.view(-1, 1, 1, 1).clamp(max=S)
    return (keys >= 0) & (keys < limit)


def local_dot_product(
    queries: Tensor, keys: Tensor, attn_mask: Tensor, key_lengths: Tensor, local_context: int
) -> Tensor:
    """Dot products of each query with the keys of its window, plus ``attn_mask``.

    Arguments:
        queries: ``(N, H, L, E)``.
        keys: ``(N, H, S, E)``.
        attn_mask: ``(L, S)`` additive float mask.
        key_lengths: ``(N,)`` integer number of valid keys of each sequence.
        local_context: the window size.

    Returns:
        ``(N, H, L, local_context)``: slot ``k`` of query ``l`` is
        ``queries[l] . keys[j] + attn_mask[l, j]`` with ``j = l - local_context // 2 + k``,
        or ``-1e24`` where there is no such key.
    """
    products = _local_dot_product(queries, keys, attn_mask, key_lengths, local_context)
    L, S = queries.shape[2], keys.shape[2]
    has_key = _slots_with_keys(L, S, key_lengths, local_context)
    return products.masked_fill(~has_key, EMPTY_SLOT)


def local_dot_backward(
    queries: Tensor, keys: Tensor, key_lengths: Tensor, grad: Tensor, local_context: int
) -> tuple[Tensor, Tensor]:
    """Gradients of `local_dot_product` (without a mask) for the output gradient ``grad``.

    Arguments:
        queries: ``(N, H, L, E)``.
        keys: ``(N, H, S, E)``.
        key_lengths: ``(N,)``.
        grad: ``(N, H, L, local_context)``.
        local_context: the window size.

    Returns:
        ``(grad_queries (N, H, L, E), grad_keys (N, H, S, E))``.
    """
    q, k = queries.detach().requires_grad_(), keys.detach().requires_grad_()
    mask = queries.new_zeros(queries.shape[2], keys.shape[2])
    with torch.enable_grad():
        products = _local_dot_product(q, k, mask, key_lengths, local_context)
        has_key = _slots_with_keys(q.shape[2], k.shape[2], key_lengths, local_context)
        products = products.masked_fill(~has_key, 0.0)
    grad_q, grad_k = torch.autograd.grad(products, (q, k), grad)
    return grad_q, grad_k


def local_weighted_average(attention: Tensor, values: Tensor) -> Tensor:
    """Average the values of each query's window with the weights ``attention``.

    Arguments:
        attention: ``(N, H, L, local_context)``.
        values: ``(N, H, S, D)``.

    Returns:
        ``(N, H, L, D)``.
    """
    return _local_weighted_average(attention, values)


def local_weighted_average_backward(
    attention: Tensor, values: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of `local_weighted_average` for the output gradient ``grad``.

    Arguments:
        attention: ``(N, H, L, local_context)``.
        values: ``(N, H, S, D)``.
        grad: ``(N, H, L, D)``.

    Returns:
        ``(grad_attention (N, H, L, local_context), grad_values (N, H, S, D))``.
    """
    a, v = attention.detach().requires_grad_(), values.detach().requires_grad_()
    with torch.enable_grad():
        averaged = _local_weighted_average(a, v)
    grad_a, grad_v = torch.autograd.grad(averaged, (a, v), grad)
    return grad_a, grad_v
