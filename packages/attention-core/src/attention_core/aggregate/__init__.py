"""Aggregate rows by group and broadcast group rows back, the bookkeeping of clustered attention.

Reference: Vyas et al. 2020, arXiv 2007.04825.

* `aggregate` sums the rows of each group, scaled by a per-group factor (with factor
  ``1 / count`` this is the centroid of the group).
* `broadcast` copies each group's row, scaled by its factor, to every member.

The ``clustered_*`` variants take groups sorted along the sequence (as produced by sorting
the output of `attention_core.clustering.hamming.cluster`) with padding at the end,
and ignore the padding positions. The references (`attention_core.aggregate.reference`)
are built from ``scatter_add`` and ``gather``, so gradients flow to the rows and the factors
through autograd.

Float32/float64 CPU tensors go to the compiled kernels of ``attention_core._C`` (see
``csrc/aggregate.h`` and the ops of `attention_core.aggregate._op`; half precision is
computed in float32) unless
``ATTENTION_CORE_FORCE_REFERENCE=1``; CUDA tensors go to the Triton kernels of
`attention_core.aggregate._triton` when triton is importable (float64 excepted); the
plain-PyTorch forms are the reference and fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_tensor
from .._extension import use_kernels
from . import _op
from .reference import aggregate_reference, broadcast_reference

__all__ = ["aggregate", "broadcast", "clustered_aggregate", "clustered_broadcast"]


def _check_groups(G: Tensor, shape: tuple[int, int, int], device: torch.device) -> None:
    check_tensor("G", G, dim=3, integer=True, device=device)
    if tuple(G.shape) != shape:
        raise ValueError(f"G must have shape (N, H, L) = {shape}; got {tuple(G.shape)}")


def _check_factors(F: Tensor, N: int, H: int, device: torch.device) -> int:
    check_tensor("F", F, dim=3, floating=True, device=device)
    if tuple(F.shape[:2]) != (N, H):
        raise ValueError(f"F must have shape (N, H, C) = ({N}, {H}, C); got {tuple(F.shape)}")
    return F.shape[2]


def _check_lengths(lengths: Tensor, N: int, device: torch.device) -> None:
    check_tensor("lengths", lengths, dim=1, integer=True, device=device)
    if lengths.shape[0] != N:
        raise ValueError(f"lengths must have shape (N,) = ({N},); got {tuple(lengths.shape)}")


def _write(name: str, out: Tensor | None, result: Tensor) -> Tensor:
    """Copy ``result`` into the optional output buffer ``out`` and return it."""
    if out is None:
        return result
    check_tensor(name, out, dtype=result.dtype, device=result.device)
    if out.shape != result.shape:
        raise ValueError(f"{name} must have shape {tuple(result.shape)}; got {tuple(out.shape)}")
    return out.copy_(result)


def _kernel_rows(rows: Tensor, F: Tensor) -> tuple[Tensor, Tensor] | None:
    """Return ``rows`` and ``F`` in the kernels' compute dtype, or ``None`` for the reference path.

    The compute dtype is float32 for half precision; ``None`` when the compiled kernels should not
    handle them."""
    if rows.device.type not in ("cpu", "cuda"):
        return None
    work = torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype
    rows, F = rows.to(work), F.to(work)
    return (rows, F) if use_kernels(rows, F, triton=True) else None


def _aggregate(X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Kernel or reference aggregate of checked inputs; ``limits (N, H)`` or ``None``."""
    kernel = _kernel_rows(X, F)
    if kernel is not None:
        return _op.aggregate_forward(kernel[0], G.long(), kernel[1], limits).to(X.dtype)
    return aggregate_reference(X, G, F, limits)


def _broadcast(Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Kernel or reference broadcast of checked inputs; ``limits (N, H)`` or ``None``."""
    kernel = _kernel_rows(Y, F)
    if kernel is not None:
        return _op.broadcast_forward(kernel[0], G.long(), kernel[1], limits).to(Y.dtype)
    return broadcast_reference(Y, G, F, limits)


def aggregate(X: Tensor, G: Tensor, F: Tensor, Y: Tensor | None = None) -> Tensor:
    """Sum the rows of ``X`` by group and scale each sum by its group's factor.

    ``Y[n, h, c] = F[n, h, c] * sum_{l : G[n, h, l] = c} X[n, h, l]``; positions whose
    group lies outside ``[0, C)`` are ignored. Differentiable in ``X`` and ``F``.

    Arguments:
        X: ``(N, H, L, E)`` rows.
        G: ``(N, H, L)`` integer group of every row.
        F: ``(N, H, C)`` float factor of every group (cast to the dtype of ``X``).
        Y: optional ``(N, H, C, E)`` output buffer, overwritten and returned.

    Returns:
        ``(N, H, C, E)``.

    Example:
        >>> X = torch.ones(1, 1, 3, 2)
        >>> aggregate(X, torch.tensor([[[0, 1, 1]]]), torch.tensor([[[1.0, 0.5]]]))
        tensor([[[[1., 1.],
                  [1., 1.]]]])
    """
    check_tensor("X", X, dim=4, floating=True)
    N, H, L, _ = X.shape
    _check_groups(G, (N, H, L), X.device)
    _check_factors(F, N, H, X.device)
    return _write("Y", Y, _aggregate(X, G, F, None))


def broadcast(Y: Tensor, G: Tensor, F: Tensor, X: Tensor | None = None) -> Tensor:
    """Give every position its group's row scaled by the group's factor.

    ``X[n, h, l] = F[n, h, G[n, h, l]] * Y[n, h, G[n, h, l]]``, and zero where
    ``G[n, h, l]`` lies outside ``[0, C)``. Differentiable in ``Y`` and ``F``.

    Arguments:
        Y: ``(N, H, C, E)`` one row per group.
        G: ``(N, H, L)`` integer group of every position.
        F: ``(N, H, C)`` float factor of every group (cast to the dtype of ``Y``).
        X: optional ``(N, H, L, E)`` output buffer, overwritten and returned.

    Returns:
        ``(N, H, L, E)``.

    Example:
        >>> Y = torch.tensor([[[[1.0], [2.0]]]])
        >>> broadcast(Y, torch.tensor([[[1, 0, 5]]]), torch.ones(1, 1, 2)).flatten()
        tensor([2., 1., 0.])
    """
    check_tensor("Y", Y, dim=4, floating=True)
    N, H, C, _ = Y.shape
    check_tensor("G", G, dim=3, integer=True, device=Y.device)
    if tuple(G.shape[:2]) != (N, H):
        raise ValueError(f"G must have shape (N, H, L) = ({N}, {H}, L); got {tuple(G.shape)}")
    if _check_factors(F, N, H, Y.device) != C:
        raise ValueError(f"F must have shape (N, H, C) = ({N}, {H}, {C}); got {tuple(F.shape)}")
    return _write("X", X, _broadcast(Y, G, F, None))


def clustered_aggregate(
    X: Tensor, G: Tensor, F: Tensor, lengths: Tensor, Y: Tensor | None = None
) -> Tensor:
    """`aggregate` over the first ``lengths[n]`` positions of each sequence.

    Meant for positions sorted by group with the padding last, as clustered attention
    arranges them; the result does not depend on the order. Same argument order as
    ``fast_transformers.aggregate.clustered_aggregate``.

    Arguments:
        X: ``(N, H, L, E)`` rows.
        G: ``(N, H, L)`` integer group of every row.
        F: ``(N, H, C)`` float factor of every group.
        lengths: ``(N,)`` integer number of valid positions of each sequence.
        Y: optional ``(N, H, C, E)`` output buffer.

    Returns:
        ``(N, H, C, E)``: ``F[n, h, c] * sum_{l < lengths[n], G[n, h, l] = c} X[n, h, l]``.
    """
    check_tensor("X", X, dim=4, floating=True)
    N, H, L, _ = X.shape
    _check_groups(G, (N, H, L), X.device)
    _check_factors(F, N, H, X.device)
    _check_lengths(lengths, N, X.device)
    return _write("Y", Y, _aggregate(X, G, F, lengths.long().view(N, 1).expand(N, H)))


def clustered_broadcast(
    Y: Tensor, groups: Tensor, counts: Tensor, factors: Tensor, X: Tensor | None = None
) -> Tensor:
    """`broadcast` for positions sorted by group, with the padding last.

    Position ``l`` of sequence ``(n, h)`` is valid when ``l < sum_c counts[n, h, c]``
    (the members of all clusters come first); the others are zero. Same argument order as
    ``fast_transformers.aggregate.clustered_broadcast``.

    Arguments:
        Y: ``(N, H, C, E)`` one row per group.
        groups: ``(N, H, L)`` integer group of every position.
        counts: ``(N, H, C)`` integer number of members of every group.
        factors: ``(N, H, C)`` float factor of every group.
        X: optional ``(N, H, L, E)`` output buffer.

    Returns:
        ``(N, H, L, E)``: ``factors[n, h, g] * Y[n, h, g]`` with ``g = groups[n, h, l]`` for
        valid positions, zero elsewhere.
    """
    check_tensor("Y", Y, dim=4, floating=True)
    N, H, C, _ = Y.shape
    check_tensor("groups", groups, dim=3, integer=True, device=Y.device)
    check_tensor("counts", counts, dim=3, integer=True, device=Y.device)
    if tuple(counts.shape) != (N, H, C):
        raise ValueError(
            f"counts must have shape (N, H, C) = ({N}, {H}, {C}); got {tuple(counts.shape)}"
        )
    if tuple(groups.shape[:2]) != (N, H):
        raise ValueError(
            f"groups must have shape (N, H, L) = ({N}, {H}, L); got {tuple(groups.shape)}"
        )
    if _check_factors(factors, N, H, Y.device) != C:
        raise ValueError(
            f"factors must have shape (N, H, C) = ({N}, {H}, {C}); got {tuple(factors.shape)}"
        )
    return _write("X", X, _broadcast(Y, groups, factors, counts.long().sum(-1)))


from .aggregate_cpu import aggregate as aggregate_cpu  # noqa: E402, F401  fast_transformers name
from .aggregate_cpu import broadcast as broadcast_cpu  # noqa: E402, F401  fast_transformers name
