"""Sparse and clustered-sparse dot products and weighted averages in Triton.

Top-k and improved clustered attention (Vyas et al. 2020, arXiv 2007.04825) look at a few
selected keys per query: ``topk (N, H, R, k)`` lists them per query (``R = L``) or per cluster
(``R = C``, with ``groups (N, H, L)`` giving each query's cluster); ``limits (N, H)`` marks
the queries ``l >= limits`` as padding. Queries without keys (padding, or a group outside
``[0, C)``) get zero outputs and pass no gradient.

One kernel serves the two ops and their gradients. A program takes a block of queries and
walks the ``k`` selected keys, gathering one key row per query at a time, and does any of:

- ``DOT``: ``out[l, t] = X_l . Y_{topk[r, t]}`` (the dot product; the gradient of the weights);
- ``SUM``: ``out_l = sum_t W[l, t] Y_{topk[r, t]}`` (the average; the gradient of the queries);
- ``SCATTER``: ``out_j += W[l, t] X_l`` for ``j = topk[r, t]`` (the gradient of the keys and
  of the values), with float32 ``tl.atomic_add`` into a float32 buffer: the summation order
  of these gradients is not deterministic.

Inputs are float32, float16 or bfloat16 with any strides; products accumulate in float32 and
outputs take the input dtype.

Einstein notation: n batch, h heads, l queries, t selected slots, j keys, f features.

The tests run these kernels under Triton's interpreter (``TRITON_INTERPRET=1``, on CPU
tensors: ``nox -s slow``); no GPU timings are published yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import TRITON_DTYPES
from ._validation import (
    check_sparse_average,
    check_sparse_dot,
    check_topk_values,
    contiguous_indices,
)

__all__ = [
    "sparse_dot_product_backward",
    "sparse_dot_product_forward",
    "sparse_weighted_average_backward",
    "sparse_weighted_average_forward",
]

BLOCK_L = 16


@triton.jit
def _sparse_kernel(
    X, Y, W, TOPK, GROUPS, LIMITS, OUT_DOT, OUT_SUM, OUT_SCATTER,
    sx_n, sx_h, sx_l, sx_f,
    sy_n, sy_h, sy_l, sy_f,
    sw_n, sw_h, sw_l, sw_t,
    sd_n, sd_h, sd_l, sd_t,
    ss_n, ss_h, ss_l, ss_f,
    H, L, S, F, R, k,
    HAS_GROUPS: tl.constexpr, HAS_LIMITS: tl.constexpr,
    DOT: tl.constexpr, SUM: tl.constexpr, SCATTER: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    block_l = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    n = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = block_l * BLOCK_L + tl.arange(0, BLOCK_L)
    valid = rows < L
    if HAS_LIMITS:
        valid = valid & (rows < tl.load(LIMITS + bh64))
    if HAS_GROUPS:
        lists = tl.load(GROUPS + bh64 * L + rows, mask=valid, other=-1)
        valid = valid & (lists >= 0) & (lists < R)
    else:
        lists = rows.to(tl.int64)
    lists = tl.where(valid, lists, 0)
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    tile = valid[:, None] & f_ok[None, :]
    if DOT or SCATTER:
        x = tl.load(
            X + n * sx_n + h * sx_h + rows[:, None] * sx_l + offs_f[None, :] * sx_f,
            mask=tile,
            other=0.0,
        ).to(tl.float32)
    acc = tl.full((BLOCK_L, BLOCK_F), 0.0, dtype=tl.float32)
    for t in range(0, k):
        keys = tl.load(TOPK + (bh64 * R + lists) * k + t, mask=valid, other=0)
        ok = valid & (keys >= 0) & (keys < S)
        keys = tl.where(ok, keys, 0)
        ok_tile = ok[:, None] & f_ok[None, :]
        if DOT or SUM:
            y = tl.load(
                Y + n * sy_n + h * sy_h + keys[:, None] * sy_l + offs_f[None, :] * sy_f,
                mask=ok_tile,
                other=0.0,
            ).to(tl.float32)
        if DOT:
            tl.store(
                OUT_DOT + n * sd_n + h * sd_h + rows * sd_l + t * sd_t,
                tl.sum(x * y, axis=1).to(OUT_DOT.dtype.element_ty),
                mask=rows < L,
            )
        if SUM or SCATTER:
            w = tl.load(W + n * sw_n + h * sw_h + rows * sw_l + t * sw_t, mask=ok, other=0.0)
            w = w.to(tl.float32)
        if SUM:
            acc += w[:, None] * y
        if SCATTER:
            target = OUT_SCATTER + bh64 * S * F + keys[:, None] * F + offs_f[None, :]
            tl.atomic_add(target, w[:, None] * x, mask=ok_tile)
    if SUM:
        tl.store(
            OUT_SUM + n * ss_n + h * ss_h + rows[:, None] * ss_l + offs_f[None, :] * ss_f,
            acc.to(OUT_SUM.dtype.element_ty),
            mask=(rows < L)[:, None] & f_ok[None, :],
        )


# ---------------------------------------------------------------------------------------
# launch functions
# ---------------------------------------------------------------------------------------


def _launch(X, Y, W, topk, groups, limits, out_dot, out_sum, out_scatter, L, S, F):
    N, H = topk.shape[:2]
    R, k = topk.shape[2], topk.shape[3]
    if N * H * L == 0 or k == 0:
        return
    dummy = topk  # stands in for absent pointers; never read
    strides = [(0, 0, 0, 0) if t is None else t.stride() for t in (X, Y, W, out_dot, out_sum)]
    _sparse_kernel[(N * H, triton.cdiv(L, BLOCK_L))](
        dummy if X is None else X, dummy if Y is None else Y, dummy if W is None else W,
        topk, dummy if groups is None else groups, dummy if limits is None else limits,
        dummy if out_dot is None else out_dot, dummy if out_sum is None else out_sum,
        dummy if out_scatter is None else out_scatter,
        *(s for stride in strides for s in stride), H, L, S, F, R, k,
        HAS_GROUPS=groups is not None, HAS_LIMITS=limits is not None,
        DOT=out_dot is not None, SUM=out_sum is not None, SCATTER=out_scatter is not None,
        BLOCK_L=BLOCK_L, BLOCK_F=max(16, triton.next_power_of_2(max(F, 1))),
    )  # fmt: skip


def sparse_dot_product_forward(
    Q: Tensor, K: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """Dot products of every query with its selected keys.

    Arguments:
        Q: ``(N, H, L, E)`` float32/float16/bfloat16, any strides.
        K: ``(N, H, S, E)`` same dtype and device.
        topk: ``(N, H, L, k)`` int64 key indices in ``[0, S)``, or ``(N, H, C, k)`` with
            ``groups``.
        groups: ``(N, H, L)`` int64 cluster of every query, or ``None``.
        limits: ``(N, H)`` int64 number of valid queries, or ``None``.

    Returns:
        ``(N, H, L, k)``: ``Q_l . K_{topk[l, t]}``, zero for queries without keys.
    """
    check_sparse_dot(Q, K, topk, groups, limits, dtypes=TRITON_DTYPES)
    check_topk_values(topk, K.shape[2])
    N, H, L, E = Q.shape
    topk, groups, limits = contiguous_indices(topk, groups, limits)
    out = Q.new_zeros(N, H, L, topk.shape[3])
    _launch(Q, K, None, topk, groups, limits, out, None, None, L, K.shape[2], E)
    return out


def sparse_dot_product_backward(
    grad: Tensor,
    Q: Tensor,
    K: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Gradients of `sparse_dot_product_forward`.

    Arguments:
        grad: ``(N, H, L, k)`` gradient of the output.
        Q, K, topk, groups, limits: as in the forward.

    Returns:
        ``dQ (N, H, L, E)`` and ``dK (N, H, S, E)``.
    """
    check_sparse_dot(Q, K, topk, groups, limits, grad, TRITON_DTYPES)
    check_topk_values(topk, K.shape[2])
    N, H, L, E = Q.shape
    S = K.shape[2]
    topk, groups, limits = contiguous_indices(topk, groups, limits)
    dQ = Q.new_zeros(N, H, L, E)
    dK = torch.zeros(N, H, S, E, dtype=torch.float32, device=Q.device)
    _launch(Q, K, grad.to(Q.dtype), topk, groups, limits, None, dQ, dK, L, S, E)
    return dQ, dK.to(Q.dtype)


def sparse_weighted_average_forward(
    weights: Tensor, values: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """Weighted average of every query's selected values.

    Arguments:
        weights: ``(N, H, L, k)`` float32/float16/bfloat16, any strides.
        values: ``(N, H, S, D)`` same dtype and device.
        topk, groups, limits: as in `sparse_dot_product_forward`.

    Returns:
        ``(N, H, L, D)``: ``sum_t weights[l, t] values_{topk[l, t]}``, zero for queries
        without keys.
    """
    check_sparse_average(weights, values, topk, groups, limits, dtypes=TRITON_DTYPES)
    check_topk_values(topk, values.shape[2])
    N, H, L, _ = weights.shape
    S, D = values.shape[2], values.shape[3]
    topk, groups, limits = contiguous_indices(topk, groups, limits)
    out = values.new_zeros(N, H, L, D)
    _launch(None, values, weights, topk, groups, limits, None, out, None, L, S, D)
    return out


def sparse_weighted_average_backward(
    grad: Tensor,
    weights: Tensor,
    values: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Gradients of `sparse_weighted_average_forward`.

    Arguments:
        grad: ``(N, H, L, D)`` gradient of the output.
        weights, values, topk, groups, limits: as in the forward.

    Returns:
        ``dweights (N, H, L, k)`` and ``dvalues (N, H, S, D)``.
    """
    check_sparse_average(weights, values, topk, groups, limits, grad, TRITON_DTYPES)
    check_topk_values(topk, values.shape[2])
    N, H, L, k = weights.shape
    S, D = values.shape[2], values.shape[3]
    topk, groups, limits = contiguous_indices(topk, groups, limits)
    dW = values.new_zeros(N, H, L, k)
    dV = torch.zeros(N, H, S, D, dtype=torch.float32, device=values.device)
    _launch(grad.to(values.dtype), values, weights, topk, groups, limits, dW, None, dV, L, S, D)
    return dW, dV.to(values.dtype)
