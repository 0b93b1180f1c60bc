"""Banded (local) dot products and weighted averages, the core of local attention.

As in Image Transformer, Parmar et al. 2018, arXiv 1802.05751, and Longformer's sliding
window, Beltagy et al. 2020, arXiv 2004.05150.

Query ``l`` sees the ``local_context`` keys ``j = l - local_context // 2 + k`` for
``k = 0 .. local_context - 1``. Both functions gather only those keys or values, so memory is
``O(L * local_context * (E + D))`` per head and never ``O(L * S)``. Gradients come from
autograd through the gathers.

Float32/float64 CPU tensors go to the compiled kernels of ``attention_core._C`` (see
``csrc/local_product.h`` and the ops of `attention_core.local_product._op`; half
precision is computed in float32) unless
``ATTENTION_CORE_FORCE_REFERENCE=1``; CUDA tensors go to the Triton kernels of
`attention_core.local_product._triton` when triton is importable (float64 excepted); the
gathers of `attention_core.local_product.reference` are the reference and the fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_positive_int, check_tensor
from .._extension import use_kernels
from . import _op
from .reference import local_dot_product_reference, local_weighted_average_reference

__all__ = ["local_dot_product", "local_weighted_average"]

_HALF = (torch.float16, torch.bfloat16)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32 by the kernels."""
    return torch.float32 if dtype in _HALF else dtype


def local_dot_product(
    queries: Tensor, keys: Tensor, attn_mask: Tensor, key_lengths: Tensor, local_context: int
) -> Tensor:
    """Dot products of each query with the keys in its local window.

    ``out[n, h, l, k] = queries[n, h, l] . keys[n, h, j] + attn_mask[l, j]`` with
    ``j = l - local_context // 2 + k`` when ``0 <= j < S`` and ``j < key_lengths[n]``, and
    ``-inf`` otherwise. Differentiable with respect to ``queries`` and ``keys``.

    Arguments:
        queries: ``(N, H, L, E)``.
        keys: ``(N, H, S, E)``.
        attn_mask: ``(L, S)`` additive float mask: ``0`` where attention is allowed,
            ``-inf`` (or a large negative number) where it is not.
        key_lengths: ``(N,)`` integer number of valid keys of each sequence.
        local_context: the window size, a positive int.

    Returns:
        ``(N, H, L, local_context)``.

    Example:
        >>> Q, K = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)
        >>> mask, lengths = torch.zeros(10, 10), torch.tensor([10, 7])
        >>> local_dot_product(Q, K, mask, lengths, 5).shape
        torch.Size([2, 4, 10, 5])
    """
    check_tensor("queries", queries, dim=4, floating=True)
    check_tensor("keys", keys, dim=4, floating=True, device=queries.device)
    check_tensor("attn_mask", attn_mask, dim=2, floating=True, device=queries.device)
    check_tensor("key_lengths", key_lengths, dim=1, integer=True, device=queries.device)
    check_positive_int("local_context", local_context)
    N, H, L, E = queries.shape
    S = keys.shape[2]
    if keys.dtype != queries.dtype:
        raise TypeError(f"keys must have the dtype of queries ({queries.dtype}); got {keys.dtype}")
    if (keys.shape[0], keys.shape[1], keys.shape[3]) != (N, H, E):
        raise ValueError(
            f"keys must have shape (N, H, S, E) = ({N}, {H}, S, {E}); got {tuple(keys.shape)}"
        )
    if tuple(attn_mask.shape) != (L, S):
        raise ValueError(
            f"attn_mask must have shape (L, S) = ({L}, {S}); got {tuple(attn_mask.shape)}"
        )
    if key_lengths.shape[0] != N:
        raise ValueError(
            f"key_lengths must have shape (N,) = ({N},); got {tuple(key_lengths.shape)}"
        )

    if S == 0:
        return queries.new_full((N, H, L, local_context), float("-inf"))
    work = _work_dtype(queries.dtype)
    if queries.device.type in ("cpu", "cuda") and not attn_mask.requires_grad:
        q, k, mask = queries.to(work), keys.to(work), attn_mask.to(work)
        if use_kernels(q, k, mask, triton=True):
            lengths = key_lengths.to(torch.int64)
            out = _op.local_dot_product_forward(q, k, mask, lengths, local_context)
            return out.to(queries.dtype)
    return local_dot_product_reference(queries, keys, attn_mask, key_lengths, local_context)


def local_weighted_average(attention: Tensor, values: Tensor) -> Tensor:
    """Average the values in each query's local window with the given weights.

    ``out[n, h, l] = sum_k attention[n, h, l, k] * values[n, h, j]`` over the slots whose
    key ``j = l - local_context // 2 + k`` satisfies ``0 <= j < S`` (``local_context`` is
    ``attention.shape[-1]``). Differentiable with respect to both inputs.

    Arguments:
        attention: ``(N, H, L, local_context)`` weights, e.g. a softmax over
            `local_dot_product`.
        values: ``(N, H, S, D)``.

    Returns:
        ``(N, H, L, D)``.

    Example:
        >>> A, V = torch.rand(2, 4, 10, 5), torch.randn(2, 4, 10, 8)
        >>> local_weighted_average(A, V).shape
        torch.Size([2, 4, 10, 8])
    """
    check_tensor("attention", attention, dim=4, floating=True)
    check_tensor("values", values, dim=4, floating=True, device=attention.device)
    N, H, L, K = attention.shape
    if values.dtype != attention.dtype:
        raise TypeError(
            f"values must have the dtype of attention ({attention.dtype}); got {values.dtype}"
        )
    if values.shape[:2] != attention.shape[:2]:
        raise ValueError(
            f"values must have shape (N, H, S, D) = ({N}, {H}, S, D); got {tuple(values.shape)}"
        )
    if K == 0:
        raise ValueError("attention must have a positive local_context (last dimension); got 0")
    S, D = values.shape[2], values.shape[3]
    if S == 0:
        return values.new_zeros(N, H, L, D)
    work = _work_dtype(values.dtype)
    if values.device.type in ("cpu", "cuda"):
        a, v = attention.to(work), values.to(work)
        if use_kernels(a, v, triton=True):
            return _op.local_weighted_average_forward(a, v).to(values.dtype)
    return local_weighted_average_reference(attention, values)
