"""Aggregate rows by group and broadcast group rows back, in Triton.

The bookkeeping of clustered attention (Vyas et al. 2020, arXiv 2007.04825), with
``G (N, H, L)`` int64 groups, ``F (N, H, C)`` factors and optional ``limits (N, H)`` (positions
``l >= limits`` are padding); a position whose group lies outside ``[0, C)`` or that is
padding takes no part:

- aggregate: ``Y_c = F_c * sum_{l valid, G_l = c} X_l``, by float32 ``tl.atomic_add`` of each
  row into its group's row of a float32 buffer (the summation order is not deterministic);
- broadcast: ``X_l = F_{G_l} * Y_{G_l}`` for valid positions, zero elsewhere (a gather).

The gradients are the same two kernels plus a reduction over the features for ``dF``. Rows
are float32, float16 or bfloat16 with any strides, ``F`` of the same dtype; sums accumulate
in float32 and outputs take the rows' dtype.

The tests run these kernels under Triton's interpreter (``TRITON_INTERPRET=1``, on CPU
tensors: ``nox -s slow``); no GPU timings are published yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import TRITON_DTYPES
from ._validation import check_groups

__all__ = [
    "aggregate_backward",
    "aggregate_forward",
    "broadcast_backward",
    "broadcast_forward",
]

BLOCK_L = 32


@triton.jit
def _group_rows_kernel(
    IN, G, F, LIMITS, OUT,
    si_n, si_h, si_r, si_e,
    so_n, so_h, so_r, so_e,
    H, L, C, E,
    HAS_F: tl.constexpr, HAS_LIMITS: tl.constexpr, BROADCAST: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Aggregate: OUT[g] += F_g IN[l] (OUT a contiguous float32 (N, H, C, E) buffer).

    Broadcast: OUT[l] = F_g IN[g], zero for positions that take no part."""
    bh = tl.program_id(0)
    block_l = tl.program_id(1)
    block_e = tl.program_id(2)
    bh64 = bh.to(tl.int64)
    n = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = block_l * BLOCK_L + tl.arange(0, BLOCK_L)
    valid = rows < L
    if HAS_LIMITS:
        valid = valid & (rows < tl.load(LIMITS + bh64))
    groups = tl.load(G + bh64 * L + rows, mask=valid, other=-1)
    valid = valid & (groups >= 0) & (groups < C)
    groups = tl.where(valid, groups, 0)
    offs_e = block_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    tile = valid[:, None] & e_ok[None, :]
    if HAS_F:
        factors = tl.load(F + bh64 * C + groups, mask=valid, other=0.0).to(tl.float32)
    if BROADCAST:
        y = tl.load(
            IN + n * si_n + h * si_h + groups[:, None] * si_r + offs_e[None, :] * si_e,
            mask=tile,
            other=0.0,
        ).to(tl.float32)
        if HAS_F:
            y = y * factors[:, None]
        tl.store(
            OUT + n * so_n + h * so_h + rows[:, None] * so_r + offs_e[None, :] * so_e,
            y.to(OUT.dtype.element_ty),
            mask=(rows < L)[:, None] & e_ok[None, :],
        )
    else:
        x = tl.load(
            IN + n * si_n + h * si_h + rows[:, None] * si_r + offs_e[None, :] * si_e,
            mask=tile,
            other=0.0,
        ).to(tl.float32)
        if HAS_F:
            x = x * factors[:, None]
        target = OUT + bh64 * C * E + groups[:, None] * E + offs_e[None, :]
        tl.atomic_add(target, x, mask=tile)


# ---------------------------------------------------------------------------------------
# launch functions
# ---------------------------------------------------------------------------------------


def _group_rows(
    rows: Tensor, G: Tensor, F: Tensor | None, limits: Tensor | None, C: int, broadcast: bool
) -> Tensor:
    """Aggregate or broadcast rows with the Triton kernel.

    Aggregate ``rows (N, H, L, E)`` into float32 ``(N, H, C, E)``, or broadcast
    ``rows (N, H, C, E)`` to ``(N, H, L, E)`` in the rows' dtype; ``F=None``: factors of one."""
    N, H, _, E = rows.shape
    L = G.shape[2]
    if broadcast:
        out = rows.new_empty(N, H, L, E)
    else:
        out = torch.zeros(N, H, C, E, dtype=torch.float32, device=rows.device)
    if N * H * L * E == 0:
        return out.zero_()
    G = G.contiguous()
    F = None if F is None else F.contiguous()
    limits = None if limits is None else limits.contiguous()
    BLOCK_E = min(128, max(16, triton.next_power_of_2(E)))
    grid = (N * H, triton.cdiv(L, BLOCK_L), triton.cdiv(E, BLOCK_E))
    _group_rows_kernel[grid](
        rows, G, G if F is None else F, G if limits is None else limits, out,
        *rows.stride(), *out.stride(), H, L, C, E,
        HAS_F=F is not None, HAS_LIMITS=limits is not None, BROADCAST=broadcast,
        BLOCK_L=BLOCK_L, BLOCK_E=BLOCK_E,
    )  # fmt: skip
    return out


def aggregate_forward(X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Group sums scaled by the group factors.

    Arguments:
        X: ``(N, H, L, E)`` float32/float16/bfloat16, any strides.
        G: ``(N, H, L)`` int64 group of every row.
        F: ``(N, H, C)`` factors, the dtype of ``X``.
        limits: ``(N, H)`` int64 number of non-padding positions, or ``None``.

    Returns:
        ``(N, H, C, E)``: ``F_c * sum_{l valid, G_l = c} X_l``.
    """
    check_groups(X, G, F, limits, False, dtypes=TRITON_DTYPES)
    return _group_rows(X, G, F, limits, F.shape[2], False).to(X.dtype)


def aggregate_backward(
    grad: Tensor, X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Gradients of `aggregate_forward`.

    Arguments:
        grad: ``(N, H, C, E)`` gradient of the output.
        X, G, F, limits: as in the forward.

    Returns:
        ``dX (N, H, L, E)`` and ``dF (N, H, C)``.
    """
    check_groups(X, G, F, limits, False, grad, TRITON_DTYPES)
    grad = grad.to(X.dtype)
    dX = _group_rows(grad, G, F, limits, F.shape[2], True)
    sums = _group_rows(X, G, None, limits, F.shape[2], False)
    dF = torch.einsum("nhce,nhce->nhc", grad.float(), sums)
    return dX, dF.to(F.dtype).contiguous()


def broadcast_forward(Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Every valid position gets its group's row scaled by the group's factor.

    Arguments:
        Y: ``(N, H, C, E)`` float32/float16/bfloat16, any strides.
        G: ``(N, H, L)`` int64 group of every position.
        F: ``(N, H, C)`` factors, the dtype of ``Y``.
        limits: ``(N, H)`` int64 number of non-padding positions, or ``None``.

    Returns:
        ``(N, H, L, E)``: ``F_g Y_g`` with ``g = G_l`` for valid positions, zero elsewhere.
    """
    check_groups(Y, G, F, limits, True, dtypes=TRITON_DTYPES)
    return _group_rows(Y, G, F, limits, Y.shape[2], True)


def broadcast_backward(
    grad: Tensor, Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Gradients of `broadcast_forward`.

    Arguments:
        grad: ``(N, H, L, E)`` gradient of the output.
        Y, G, F, limits: as in the forward.

    Returns:
        ``dY (N, H, C, E)`` and ``dF (N, H, C)``.
    """
    check_groups(Y, G, F, limits, True, grad, TRITON_DTYPES)
    sums = _group_rows(grad.to(Y.dtype), G, None, limits, Y.shape[2], False)
    dY = sums * F.float().unsqueeze(-1)
    dF = torch.einsum("nhce,nhce->nhc", Y.float(), sums)
    return dY.to(Y.dtype), dF.to(F.dtype).contiguous()
