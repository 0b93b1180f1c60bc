"""Dot products and weighted averages over a few selected keys per query, the core of
top-k attention and of improved clustered attention (Vyas et al. 2020, arXiv 2007.04825).

``topk[n, h, l]`` lists the keys that query ``l`` looks at. The ``clustered_*`` variants
take one list per cluster, ``topk[n, h, c]``, shared by every query of cluster ``c``. Only
the selected keys or values are gathered, so memory is ``O(L * k * (E + D))`` per head;
gradients come from autograd through the gathers.

Float32/float64 CPU tensors go to the compiled kernels of ``attention_core._C`` (see
:mod:`attention_core._kernels`; half precision is computed in float32) unless
``ATTENTION_CORE_FORCE_REFERENCE=1``; CUDA tensors go to the Triton kernels of
:mod:`attention_core._triton.sparse_product` when triton is importable (float64 excepted);
the gathers below are the reference and the fallback.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .. import _kernels
from .._checks import check_tensor

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


def _check_index(name: str, index: Tensor, shape: tuple[int, ...], S: int, device) -> Tensor:
    """Check an integer index tensor of the given shape (``-1`` = any size) with entries
    in ``[0, S)``; return it as int64."""
    check_tensor(name, index, dim=len(shape), integer=True, device=device)
    if any(want not in (-1, got) for want, got in zip(shape, index.shape, strict=True)):
        expected = ", ".join("k" if s == -1 else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({expected}); got {tuple(index.shape)}")
    index = index.long()
    # the range check reads the data; under torch.compile it is left to the kernel's binding
    if torch.compiler.is_compiling():
        return index
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= S):
        raise ValueError(
            f"{name} must hold key indices in [0, S={S}); got values in "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    return index


_HALF = (torch.float16, torch.bfloat16)


def _kernel_inputs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(a, b)`` in the kernels' compute dtype (float32 for half precision) when the compiled
    kernels should handle them, else ``None``."""
    if a.device.type not in ("cpu", "cuda"):
        return None
    work = torch.float32 if a.dtype in _HALF else a.dtype
    a, b = a.to(work), b.to(work)
    return (a, b) if _kernels.use_kernels(a, b, triton=True) else None


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


def _check_clusters(topk: Tensor, groups: Tensor, N: int, H: int, L: int, S: int, device):
    topk = _check_index("topk", topk, (N, H, -1, -1), S, device)
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
        topk: ``(N, H, L, k)`` integer key indices in ``[0, S)``.

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
    topk = _check_index("topk", topk, (N, H, L, -1), K.shape[2], Q.device)
    kernel_inputs = _kernel_inputs(Q, K)
    if kernel_inputs is not None:
        out = _kernels.sparse_dot_product_forward(*kernel_inputs, topk, None, None)
        return out.to(Q.dtype)
    return torch.einsum("nhle,nhlke->nhlk", Q, _gather(K, topk))


def sparse_weighted_average(weights: Tensor, values: Tensor, topk: Tensor) -> Tensor:
    """Average every query's selected values with the given weights.

    ``out[n, h, l] = sum_i weights[n, h, l, i] * values[n, h, topk[n, h, l, i]]``.
    Differentiable in ``weights`` and ``values``.

    Arguments:
        weights: ``(N, H, L, k)``.
        values: ``(N, H, S, D)``.
        topk: ``(N, H, L, k)`` integer key indices in ``[0, S)``.

    Returns:
        ``(N, H, L, D)``.
    """
    _check_pair(("weights", "values"), weights, values)
    topk = _check_index("topk", topk, tuple(weights.shape), values.shape[2], values.device)
    kernel_inputs = _kernel_inputs(weights, values)
    if kernel_inputs is not None:
        out = _kernels.sparse_weighted_average_forward(*kernel_inputs, topk, None, None)
        return out.to(values.dtype)
    return torch.einsum("nhlk,nhlkd->nhld", weights, _gather(values, topk))


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
    topk = _check_clusters(topk, groups, N, H, L, K.shape[2], Q.device)
    _check_counts(counts, topk)
    check_tensor("lengths", lengths, dim=1, integer=True, device=Q.device)
    if lengths.shape[0] != N:
        raise ValueError(f"lengths must have shape (N,) = ({N},); got {tuple(lengths.shape)}")
    kernel_inputs = _kernel_inputs(Q, K)
    if kernel_inputs is not None:
        limits = lengths.long().view(N, 1).expand(N, H)
        out = _kernels.sparse_dot_product_forward(*kernel_inputs, topk, groups.long(), limits)
        return out.to(Q.dtype)
    positions = torch.arange(L, device=Q.device) < lengths.view(N, 1, 1)
    index, valid = _per_query(topk, groups, positions)
    products = torch.einsum("nhle,nhlke->nhlk", Q, _gather(K, index))
    return products.masked_fill(~valid, 0.0)


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
    topk = _check_clusters(topk, groups, N, H, L, values.shape[2], values.device)
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
        out = _kernels.sparse_weighted_average_forward(*kernel_inputs, topk, groups.long(), limits)
        return out.to(values.dtype)
    positions = None
    if counts is not None:
        positions = torch.arange(L, device=values.device) < counts.sum(-1, keepdim=True)
    index, valid = _per_query(topk, groups, positions)
    averaged = torch.einsum("nhlk,nhlkd->nhld", weights, _gather(values, index))
    return averaged.masked_fill(~valid, 0.0)
