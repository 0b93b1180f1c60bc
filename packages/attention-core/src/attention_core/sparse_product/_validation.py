"""Argument checks of the sparse product ops.

Shared by the ``torch.library`` ops in ``._op`` and the Triton launch functions in
``._triton``; a leaf that imports neither, so the two never import each other both ways.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import CPU_DTYPES, DtypeRule, check_grad, check_index, check_rows


def check_sparse(
    names: str,
    A: Tensor,
    B: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
    grad: tuple[Tensor, tuple[int, ...]] | None = None,
    dtypes: DtypeRule = CPU_DTYPES,
) -> None:
    """Check every argument of the sparse product ops.

    Every argument of the sparse product ops. ``A (N, H, L, .)`` (the queries or the weights) and
    ``B (N, H, S, .)`` (the keys or the values) of one allowed dtype and device;
    ``topk (N, H, L, k)``, or ``(N, H, R, k)`` with ``groups (N, H, L)``, and ``limits (N, H)``, all
    int64 on that device; ``grad`` a pair (gradient, expected shape). Metadata only: the key
    indices' values are bounds-checked by the CPU kernel in its loop (a row with an index outside
    ``[0, S)`` is skipped and the op raises ``ValueError`` after the kernel), or by
    `check_topk_values` (Triton kernels and the references)."""
    check_rows(names, A, B, dtypes=dtypes)
    N, H, L, _ = A.shape
    device = A.device
    if not isinstance(topk, Tensor):
        raise TypeError(f"topk must be a torch.Tensor; got {type(topk).__name__}")
    if topk.dtype != torch.int64 or topk.dim() != 4 or tuple(topk.shape[:2]) != (N, H):
        raise ValueError(
            f"topk must be an int64 tensor of shape ({N}, {H}, R, k); got {topk.dtype} "
            f"{tuple(topk.shape)}"
        )
    if topk.device != device:
        raise ValueError(f"topk must be on device {device}; got {topk.device}")
    if groups is None and topk.shape[2] != L:
        raise ValueError(f"topk must have {L} rows (one per query); got {tuple(topk.shape)}")
    check_index("groups", groups, (N, H, L), device)
    check_index("limits", limits, (N, H), device)
    if grad is not None:
        check_grad("grad", grad[0], grad[1], A)


def check_sparse_dot(
    Q: Tensor,
    K: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
    grad: Tensor | None = None,
    dtypes: DtypeRule = CPU_DTYPES,
) -> None:
    """Check the arguments of the sparse dot product ops.

    The sparse dot product ops' arguments: `check_sparse` with ``Q (N, H, L, E)``,
    ``K (N, H, S, E)`` and ``grad (N, H, L, k)``."""
    pair = None
    if grad is not None:
        pair = (grad, (*Q.shape[:3], topk.shape[-1] if topk.dim() else 0))
    check_sparse("Q and K", Q, K, topk, groups, limits, pair, dtypes)
    if K.shape[3] != Q.shape[3]:
        raise ValueError(
            f"Q and K must have the same feature size; got {Q.shape[3]} and {K.shape[3]}"
        )


def check_sparse_average(
    weights: Tensor,
    values: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
    grad: Tensor | None = None,
    dtypes: DtypeRule = CPU_DTYPES,
) -> None:
    """Check the arguments of the sparse weighted average ops.

    The sparse weighted average ops' arguments: `check_sparse` with ``weights (N, H, L, k)``,
    ``values (N, H, S, D)``, ``topk (N, H, ., k)`` and ``grad (N, H, L, D)``."""
    pair = None
    if grad is not None:
        pair = (grad, (*weights.shape[:3], values.shape[-1]))
    check_sparse("weights and values", weights, values, topk, groups, limits, pair, dtypes)
    if topk.shape[3] != weights.shape[3]:
        raise ValueError(
            f"topk must have k = {weights.shape[3]} columns (from weights); got {tuple(topk.shape)}"
        )


def check_topk_values(topk: Tensor, S: int) -> None:
    """Every key index of ``topk`` in ``[0, S)`` (reads the data: eager calls only)."""
    if topk.numel() and (int(topk.min()) < 0 or int(topk.max()) >= S):
        raise ValueError(
            f"topk must hold key indices in [0, S={S}); got values in "
            f"[{int(topk.min())}, {int(topk.max())}]"
        )


def contiguous_indices(
    topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    return (
        topk.contiguous(),
        None if groups is None else groups.contiguous(),
        None if limits is None else limits.contiguous(),
    )
