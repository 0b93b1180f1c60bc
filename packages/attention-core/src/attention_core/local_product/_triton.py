"""Banded (local) dot products and weighted averages in Triton.

Local attention (Parmar et al. 2018, arXiv 1802.05751; Beltagy et al. 2020, arXiv 2004.05150):
query ``l`` sees the ``C = local_context`` keys ``j = l - C // 2 + k``, ``k = 0 .. C - 1``,
that lie in ``[0, S)`` (and below the sequence's key length for the dot product). The band
is stored compactly as ``(N, H, L, C)``; the kernels work on dense tiles of
``BLOCK x BLOCK`` (query, key) pairs with ``tl.dot`` and move band entries in and out of the
tiles with masked loads and stores at ``slot = j - l + C // 2``. Three kernels cover the four
ops and their gradients, without atomics:

- ``_band_scores_kernel``: ``out[l, slot] = X_l . Y_j (+ mask[l, j])`` for the band entries
  (the dot product; the gradient of the averaging weights);
- ``_band_rows_kernel``: ``out_l = sum_slot band[l, slot] Y_j`` (the average; the gradient of
  the queries);
- ``_band_cols_kernel``: ``out_j = sum_l band[l, slot] X_l`` (the gradient of the keys and of
  the values), one program per block of keys.

Inputs are float32, float16 or bfloat16 with any strides; products accumulate in float32
(IEEE, not TF32) and outputs take the input dtype.

Einstein notation: n batch, h heads, l queries, j keys, f features.

The tests run these kernels under Triton's interpreter (``TRITON_INTERPRET=1``, on CPU
tensors: ``nox -s slow``); no GPU timings are published yet.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .._checks import TRITON_DTYPES
from ._validation import check_local_average, check_local_dot

__all__ = [
    "local_dot_product_backward",
    "local_dot_product_forward",
    "local_weighted_average_backward",
    "local_weighted_average_forward",
]

BLOCK = 32


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _band_scores_kernel(
    X, Y, MASK, LENGTHS, OUT,
    sx_n, sx_h, sx_l, sx_f,
    sy_n, sy_h, sy_l, sy_f,
    sm_l, sm_s,
    so_n, so_h, so_l, so_c,
    H, L, S, F, C,
    HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """Write the band of scores ``X_l . Y_j`` (plus the mask) of one block of queries.

    out[n, h, l, j - l + C // 2] = X_l . Y_j (+ MASK[l, j]) for j in the band and below
    the key limit; other entries are left as they are (the caller fills them)."""
    bh = tl.program_id(0)
    block_l = tl.program_id(1)
    n = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    half = C // 2
    limit = S
    if HAS_LENGTHS:
        limit = tl.minimum(tl.load(LENGTHS + n), S)
    rows = block_l * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < L
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    x = tl.load(
        X + n * sx_n + h * sx_h + rows[:, None] * sx_l + offs_f[None, :] * sx_f,
        mask=row_ok[:, None] & f_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    j_start = tl.maximum(block_l * BLOCK_L - half, 0)
    j_end = tl.minimum(block_l * BLOCK_L + BLOCK_L - 1 - half + C, limit)
    for j0 in range(j_start, j_end, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < j_end
        y = tl.load(
            Y + n * sy_n + h * sy_h + cols[:, None] * sy_l + offs_f[None, :] * sy_f,
            mask=col_ok[:, None] & f_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        scores = tl.dot(x, tl.trans(y), input_precision="ieee")
        slot = cols[None, :] - rows[:, None] + half
        ok = row_ok[:, None] & col_ok[None, :] & (slot >= 0) & (slot < C)
        if HAS_MASK:
            scores += tl.load(
                MASK + rows[:, None] * sm_l + cols[None, :] * sm_s, mask=ok, other=0.0
            ).to(tl.float32)
        tl.store(
            OUT + n * so_n + h * so_h + rows[:, None] * so_l + slot * so_c,
            scores.to(OUT.dtype.element_ty),
            mask=ok,
        )


@triton.jit
def _band_rows_kernel(
    BAND, Y, LENGTHS, OUT,
    sb_n, sb_h, sb_l, sb_c,
    sy_n, sy_h, sy_l, sy_f,
    so_n, so_h, so_l, so_f,
    H, L, S, F, C,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """out_l = sum_{j in band, j < limit} BAND[l, j - l + C // 2] Y_j."""
    bh = tl.program_id(0)
    block_l = tl.program_id(1)
    n = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    half = C // 2
    limit = S
    if HAS_LENGTHS:
        limit = tl.minimum(tl.load(LENGTHS + n), S)
    rows = block_l * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < L
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    acc = tl.full((BLOCK_L, BLOCK_F), 0.0, dtype=tl.float32)
    j_start = tl.maximum(block_l * BLOCK_L - half, 0)
    j_end = tl.minimum(block_l * BLOCK_L + BLOCK_L - 1 - half + C, limit)
    for j0 in range(j_start, j_end, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < j_end
        slot = cols[None, :] - rows[:, None] + half
        ok = row_ok[:, None] & col_ok[None, :] & (slot >= 0) & (slot < C)
        band = tl.load(
            BAND + n * sb_n + h * sb_h + rows[:, None] * sb_l + slot * sb_c, mask=ok, other=0.0
        ).to(tl.float32)
        y = tl.load(
            Y + n * sy_n + h * sy_h + cols[:, None] * sy_l + offs_f[None, :] * sy_f,
            mask=col_ok[:, None] & f_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(band, y, input_precision="ieee")
    tl.store(
        OUT + n * so_n + h * so_h + rows[:, None] * so_l + offs_f[None, :] * so_f,
        acc.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & f_ok[None, :],
    )


@triton.jit
def _band_cols_kernel(
    BAND, X, LENGTHS, OUT,
    sb_n, sb_h, sb_l, sb_c,
    sx_n, sx_h, sx_l, sx_f,
    so_n, so_h, so_l, so_f,
    H, L, S, F, C,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """Accumulate the band into key rows: the transposed product of the local weighted average.

    out_j = sum_{l : j in band of l} BAND[l, j - l + C // 2] X_l for j < limit, zero for limit <= j
    < S."""
    bh = tl.program_id(0)
    block_j = tl.program_id(1)
    n = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    half = C // 2
    limit = S
    if HAS_LENGTHS:
        limit = tl.minimum(tl.load(LENGTHS + n), S)
    cols = block_j * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < limit
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    acc = tl.full((BLOCK_J, BLOCK_F), 0.0, dtype=tl.float32)
    l_start = tl.maximum(block_j * BLOCK_J + half - C + 1, 0)
    l_end = tl.minimum(block_j * BLOCK_J + BLOCK_J + half, L)
    for l0 in range(l_start, l_end, BLOCK_L):
        rows = l0 + tl.arange(0, BLOCK_L)
        row_ok = rows < l_end
        slot = cols[:, None] - rows[None, :] + half
        ok = col_ok[:, None] & row_ok[None, :] & (slot >= 0) & (slot < C)
        band_t = tl.load(
            BAND + n * sb_n + h * sb_h + rows[None, :] * sb_l + slot * sb_c, mask=ok, other=0.0
        ).to(tl.float32)
        x = tl.load(
            X + n * sx_n + h * sx_h + rows[:, None] * sx_l + offs_f[None, :] * sx_f,
            mask=row_ok[:, None] & f_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(band_t, x, input_precision="ieee")
    tl.store(
        OUT + n * so_n + h * so_h + cols[:, None] * so_l + offs_f[None, :] * so_f,
        acc.to(OUT.dtype.element_ty),
        mask=(cols < S)[:, None] & f_ok[None, :],
    )


# ---------------------------------------------------------------------------------------
# launch functions
# ---------------------------------------------------------------------------------------


def _block_f(F: int) -> int:
    return max(16, triton.next_power_of_2(max(F, 1)))


def _scores(X, Y, mask, lengths, out, C):
    N, H, L, F = X.shape
    S = Y.shape[2]
    if N * H * L == 0 or S == 0:
        return out
    mask_strides = (0, 0) if mask is None else mask.stride()
    _band_scores_kernel[(N * H, triton.cdiv(L, BLOCK))](
        X, Y, out if mask is None else mask, out if lengths is None else lengths, out,
        *X.stride(), *Y.stride(), *mask_strides, *out.stride(), H, L, S, F, C,
        HAS_MASK=mask is not None, HAS_LENGTHS=lengths is not None,
        BLOCK_L=BLOCK, BLOCK_J=BLOCK, BLOCK_F=_block_f(F),
    )  # fmt: skip
    return out


def _rows(band, Y, lengths, out):
    N, H, L, C = band.shape
    S, F = Y.shape[2], Y.shape[3]
    if N * H * L * F == 0:
        return out
    if S == 0:
        return out.zero_()
    _band_rows_kernel[(N * H, triton.cdiv(L, BLOCK))](
        band, Y, out if lengths is None else lengths, out,
        *band.stride(), *Y.stride(), *out.stride(), H, L, S, F, C,
        HAS_LENGTHS=lengths is not None, BLOCK_L=BLOCK, BLOCK_J=BLOCK, BLOCK_F=_block_f(F),
    )  # fmt: skip
    return out


def _cols(band, X, lengths, out):
    N, H, L, C = band.shape
    S, F = out.shape[2], X.shape[3]
    if N * H * S * F == 0:
        return out
    _band_cols_kernel[(N * H, triton.cdiv(S, BLOCK))](
        band, X, out if lengths is None else lengths, out,
        *band.stride(), *X.stride(), *out.stride(), H, L, S, F, C,
        HAS_LENGTHS=lengths is not None, BLOCK_L=BLOCK, BLOCK_J=BLOCK, BLOCK_F=_block_f(F),
    )  # fmt: skip
    return out


def local_dot_product_forward(
    Q: Tensor, K: Tensor, attn_mask: Tensor, key_lengths: Tensor, local_context: int
) -> Tensor:
    """Banded dot products.

    Arguments:
        Q: ``(N, H, L, E)`` float32/float16/bfloat16, any strides.
        K: ``(N, H, S, E)`` same dtype and device.
        attn_mask: ``(L, S)`` additive mask of the same dtype (any strides).
        key_lengths: ``(N,)`` int64 number of valid keys of each sequence.
        local_context: the window size ``C``.

    Returns:
        ``(N, H, L, C)``: ``Q_l . K_j + attn_mask[l, j]`` for ``j = l - C // 2 + k`` in
        ``[0, min(S, key_lengths[n]))`` and ``-inf`` elsewhere.
    """
    check_local_dot(Q, K, attn_mask, key_lengths, local_context, dtypes=TRITON_DTYPES)
    N, H, L, _ = Q.shape
    out = Q.new_full((N, H, L, local_context), float("-inf"))
    return _scores(Q, K, attn_mask, key_lengths.contiguous(), out, local_context)


def local_dot_product_backward(
    grad: Tensor, Q: Tensor, K: Tensor, key_lengths: Tensor, local_context: int
) -> tuple[Tensor, Tensor]:
    """Gradients of `local_dot_product_forward` with respect to ``Q`` and ``K``.

    Arguments:
        grad: ``(N, H, L, C)`` gradient of the output.
        Q, K, key_lengths, local_context: as in the forward.

    Returns:
        ``dQ (N, H, L, E)`` and ``dK (N, H, S, E)``; slots outside the window or the key
        lengths pass no gradient.
    """
    check_local_dot(Q, K, None, key_lengths, local_context, grad, TRITON_DTYPES)
    lengths = key_lengths.contiguous()
    dQ = _rows(grad, K, lengths, Q.new_empty(Q.shape))
    dK = _cols(grad, Q, lengths, Q.new_empty(K.shape))
    return dQ, dK


def local_weighted_average_forward(attention: Tensor, V: Tensor) -> Tensor:
    """Banded weighted average.

    Arguments:
        attention: ``(N, H, L, C)`` float32/float16/bfloat16, any strides.
        V: ``(N, H, S, D)`` of the same dtype and device.

    Returns:
        ``(N, H, L, D)``: ``sum_k attention[l, k] V_j`` over ``j = l - C // 2 + k`` in
        ``[0, S)``.
    """
    check_local_average(attention, V, dtypes=TRITON_DTYPES)
    N, H, L, _ = attention.shape
    return _rows(attention, V, None, V.new_empty(N, H, L, V.shape[3]))


def local_weighted_average_backward(
    grad: Tensor, attention: Tensor, V: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of `local_weighted_average_forward`.

    Arguments:
        grad: ``(N, H, L, D)`` gradient of the output.
        attention, V: as in the forward.

    Returns:
        ``dattention (N, H, L, C)`` (zero for slots outside ``[0, S)``) and ``dV (N, H, S, D)``.
    """
    check_local_average(attention, V, grad, TRITON_DTYPES)
    N, H, L, C = attention.shape
    grad = grad.to(V.dtype)
    dA = _scores(grad, V, None, None, V.new_zeros(N, H, L, C), C)
    dV = _cols(attention, grad, None, V.new_empty(V.shape))
    return dA, dV
