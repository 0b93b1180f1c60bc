"""Dot products and weighted averages over a few selected keys per query.

The core of top-k attention and of improved clustered attention (Vyas et al. 2020, arXiv
2007.04825).

``topk[n, h, l]`` lists the keys that query ``l`` looks at. The ``clustered_*`` variants
take one list per cluster, ``topk[n, h, c]``, shared by every query of cluster ``c``. Only
the selected keys or values are gathered, so memory is ``O(L * k * (E + D))`` per head;
gradients come from autograd through the gathers.

Float32/float64 CPU tensors go to the compiled kernels of ``attention_core._C`` (see
``csrc/sparse_product.h`` and the ops of `attention_core.sparse_product._op`; half
precision is computed in float32) unless
``ATTENTION_CORE_FORCE_REFERENCE=1``; CUDA tensors go to the Triton kernels of
`attention_core.sparse_product._triton` when triton is importable (float64 excepted);
the gathers of `attention_core.sparse_product.reference` are the reference and the fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_tensor
from .._extension import use_kernels
from . import _op
from ._validation import check_topk_values
from .reference import (
    clustered_sparse_dot_product_reference,
    clustered_sparse_weighted_average_reference,
    sparse_dot_product_reference,
    sparse_weighted_average_reference,
)

__all__ = [
    "clustered_sparse_dot_product",
    "clustered_sparse_weighted_average",
    "sparse_dot_product",
    "sparse_weighted_average",
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _check_pair(names: tuple[str, str], a: Tensor, b: Tensor) -> None:
    """Both ``(N, H, *, *)`` floating tensors with the same batch, heads, dtype, device."""
    check_tensor(names[0], a, dim=4, floating=True)
    check_tensor(names[1], b, dim=4, floating=True, device=a.device)
    if b.dtype != a.dtype:
        raise TypeError(f"{names[1]} must have the dtype of {names[0]} ({a.dtype}); got {b.dtype}")
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same (N, H); got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def _check_index(name: str, index: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Check an integer index tensor of the given shape (``-1`` = any size); return it as int64.

    Its values are checked by the op (kernel path) or `_check_keys` (reference path), once."""
    check_tensor(name, index, dim=len(shape), integer=True, device=device)
    if any(want not in (-1, got) for want, got in zip(shape, index.shape, strict=True)):
        expected = ", ".join("k" if s == -1 else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({expected}); got {tuple(index.shape)}")
    return index.long()


def _check_keys(topk: Tensor, S: int) -> None:
    """The reference path's range check of the key indices.

    It reads the data: under torch.compile it is left out."""
    if not torch.compiler.is_compiling():
        check_topk_values(topk, S)


_HALF = (torch.float16, torch.bfloat16)


def _kernel_inputs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor] | None:
    """Return ``(a, b)`` in the kernels' compute dtype, or ``None`` for the reference path.

    The compute dtype is float32 for half precision; ``None`` when the compiled kernels should not
    handle them."""
    if a.device.type not in ("cpu", "cuda"):
        return None
    work = torch.float32 if a.dtype in _HALF else a.dtype
    a, b = a.to(work), b.to(work)
    return (a, b) if use_kernels(a, b, triton=True) else None


def _check_clusters(
    topk: Tensor, groups: Tensor, N: int, H: int, L: int, device: torch.device
) -> Tensor:
    topk = _check_index("topk", topk, (N, H, -1, -1), device)
    if topk.shape[2] == 0:
        raise ValueError(f"topk must have at least one cluster; got shape {tuple(topk.shape)}")
    check_tensor("groups", groups, dim=3, integer=True, device=device)
    if tuple(groups.shape) != (N, H, L):
        raise ValueError(f"groups must have shape ({N}, {H}, {L}); got {tuple(groups.shape)}")
    return topk


def _check_counts(counts: Tensor, topk: Tensor) -> None:
    check_tensor("counts", counts, dim=3, integer=True, device=topk.device)
    if counts.shape != topk.shape[:3]:
        raise ValueError(
            f"counts must have shape (N, H, C) = {tuple(topk.shape[:3])}; got {tuple(counts.shape)}"
        )


# ---------------------------------------------------------------------------------------
# per-query key lists
# ---------------------------------------------------------------------------------------


def sparse_dot_product(Q: Tensor, K: Tensor, topk: Tensor) -> Tensor:
    """Dot products of every query with its selected keys.

    ``out[n, h, l, i] = Q[n, h, l] . K[n, h, topk[n, h, l, i]]``. Differentiable in ``Q``
    and ``K``.

    Arguments:
        Q: ``(N, H, L, E)`` queries.
        K: ``(N, H, S, E)`` keys.
        topk: ``(N, H, L, k)`` integer key indices in ``[0, S)`` (any other value raises
            ``ValueError``; the compiled kernel checks them in its loop, the reference first).

    Returns:
        ``(N, H, L, k)``.

    Example:
        >>> Q, K = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8)
        >>> sparse_dot_product(Q, K, torch.randint(0, 12, (2, 4, 10, 3))).shape
        torch.Size([2, 4, 10, 3])
    """
    _check_pair(("Q", "K"), Q, K)
    N, H, L, E = Q.shape
    if K.shape[3] != E:
        raise ValueError(f"Q and K must have the same feature size; got {E} and {K.shape[3]}")
    topk = _check_index("topk", topk, (N, H, L, -1), Q.device)
    kernel_inputs = _kernel_inputs(Q, K)
    if kernel_inputs is not None:
        out = _op.sparse_dot_product_forward(*kernel_inputs, topk, None, None)
        return out.to(Q.dtype)
    _check_keys(topk, K.shape[2])
    return sparse_dot_product_reference(Q, K, topk)


def sparse_weighted_average(weights: Tensor, values: Tensor, topk: Tensor) -> Tensor:
    """Average every query's selected values with the given weights.

    ``out[n, h, l] = sum_i weights[n, h, l, i] * values[n, h, topk[n, h, l, i]]``.
    Differentiable in ``weights`` and ``values``.

    Arguments:
        weights: ``(N, H, L, k)``.
        values: ``(N, H, S, D)``.
        topk: ``(N, H, L, k)`` integer key indices in ``[0, S)`` (any other value raises
            ``ValueError``; the compiled kernel checks them in its loop, the reference first).

    Returns:
        ``(N, H, L, D)``.
    """
    _check_pair(("weights", "values"), weights, values)
    topk = _check_index("topk", topk, tuple(weights.shape), values.device)
    kernel_inputs = _kernel_inputs(weights, values)
    if kernel_inputs is not None:
        out = _op.sparse_weighted_average_forward(*kernel_inputs, topk, None, None)
        return out.to(values.dtype)
    _check_keys(topk, values.shape[2])
    return sparse_weighted_average_reference(weights, values, topk)


# ---------------------------------------------------------------------------------------
# per-cluster key lists
# ---------------------------------------------------------------------------------------


def clustered_sparse_dot_product(
    Q: Tensor, K: Tensor, topk: Tensor, groups: Tensor, counts: Tensor, lengths: Tensor
) -> Tensor:
    """Dot products of every query with the keys selected for its cluster.

    ``out[n, h, l, i] = Q[n, h, l] . K[n, h, topk[n, h, groups[n, h, l], i]]`` for
    ``l < lengths[n]`` with ``groups[n, h, l]`` in ``[0, C)``; zero for the other queries.
    Differentiable in ``Q`` and ``K``.

    Arguments:
        Q: ``(N, H, L, E)`` queries.
        K: ``(N, H, S, E)`` keys.
        topk: ``(N, H, C, k)`` integer key indices in ``[0, S)``, one list per cluster.
        groups: ``(N, H, L)`` integer cluster of every query.
        counts: ``(N, H, C)`` integer members per cluster (checked, kept for API
            compatibility with ``fast_transformers``).
        lengths: ``(N,)`` integer number of valid queries of each sequence.

    Returns:
        ``(N, H, L, k)``.
    """
    _check_pair(("Q", "K"), Q, K)
    N, H, L, E = Q.shape
    if K.shape[3] != E:
        raise ValueError(f"Q and K must have the same feature size; got {E} and {K.shape[3]}")
    topk = _check_clusters(topk, groups, N, H, L, Q.device)
    _check_counts(counts, topk)
    check_tensor("lengths", lengths, dim=1, integer=True, device=Q.device)
    if lengths.shape[0] != N:
        raise ValueError(f"lengths must have shape (N,) = ({N},); got {tuple(lengths.shape)}")
    kernel_inputs = _kernel_inputs(Q, K)
    if kernel_inputs is not None:
        limits = lengths.long().view(N, 1).expand(N, H)
        out = _op.sparse_dot_product_forward(*kernel_inputs, topk, groups.long(), limits)
        return out.to(Q.dtype)
    _check_keys(topk, K.shape[2])
    return clustered_sparse_dot_product_reference(Q, K, topk, groups, lengths)


def clustered_sparse_weighted_average(
    weights: Tensor, values: Tensor, topk: Tensor, groups: Tensor, counts: Tensor | None = None
) -> Tensor:
    """Average the values selected for each query's cluster with the query's weights.

    ``out[n, h, l] = sum_i weights[n, h, l, i] * values[n, h, topk[n, h, g, i]]`` with
    ``g = groups[n, h, l]`` in ``[0, C)``; zero for queries of other groups and, when
    ``counts`` is given, for positions ``l >= sum_c counts[n, h, c]`` (padding sorted last).
    Differentiable in ``weights`` and ``values``.

    Arguments:
        weights: ``(N, H, L, k)`` per-query weights.
        values: ``(N, H, S, D)``.
        topk: ``(N, H, C, k)`` integer key indices in ``[0, S)``, one list per cluster.
        groups: ``(N, H, L)`` integer cluster of every query.
        counts: optional ``(N, H, C)`` integer members per cluster.

    Returns:
        ``(N, H, L, D)``.
    """
    _check_pair(("weights", "values"), weights, values)
    N, H, L, k = weights.shape
    topk = _check_clusters(topk, groups, N, H, L, values.device)
    if topk.shape[3] != k:
        raise ValueError(
            f"topk must have shape (N, H, C, k) with k = {k} (from weights); "
            f"got {tuple(topk.shape)}"
        )
    if counts is not None:
        _check_counts(counts, topk)
    kernel_inputs = _kernel_inputs(weights, values)
    if kernel_inputs is not None:
        limits = None if counts is None else counts.long().sum(-1)
        out = _op.sparse_weighted_average_forward(*kernel_inputs, topk, groups.long(), limits)
        return out.to(values.dtype)
    _check_keys(topk, values.shape[2])
    return clustered_sparse_weighted_average_reference(weights, values, topk, groups, counts)
