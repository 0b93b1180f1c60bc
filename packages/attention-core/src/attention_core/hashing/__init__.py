"""Locality-sensitive hashing with random hyperplanes (Charikar 2002; used by clustered
attention, Vyas et al. 2020, arXiv 2007.04825).

Each of ``B`` hyperplanes ``A[b] = (w_b, c_b)`` contributes one bit to a vector's hash: bit
``b`` of ``hash(x)`` is set when ``w_b . x + c_b > 0``. Nearby vectors fall on the same side
of most planes, so the Hamming distance between hashes approximates their distance.

On CPU in float32/float64 the compiled kernel of ``attention_core._C`` does the work (see
:mod:`attention_core._kernels`); every other device or dtype uses
:func:`compute_hashes_reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _kernels
from .._checks import check_tensor

__all__ = ["MAX_BITS", "compute_hashes", "compute_hashes_reference"]

MAX_BITS = 63
"""The most hyperplanes one int64 hash can hold without touching the sign bit."""


def _check(X: Tensor, A: Tensor, H: Tensor | None) -> None:
    check_tensor("X", X, dim=2, floating=True)
    check_tensor("A", A, dim=2, floating=True, device=X.device)
    if A.dtype != X.dtype:
        raise TypeError(f"A must have the dtype of X ({X.dtype}); got {A.dtype}")
    if A.shape[1] != X.shape[1] + 1:
        raise ValueError(
            f"A must have shape (B, D + 1) = (B, {X.shape[1] + 1}) (the last column is a "
            f"bias); got {tuple(A.shape)}"
        )
    if not 1 <= A.shape[0] <= MAX_BITS:
        raise ValueError(f"A must hold between 1 and {MAX_BITS} hyperplanes; got {A.shape[0]}")
    if H is not None:
        check_tensor("H", H, dim=1, dtype=torch.int64, device=X.device)
        if H.shape[0] != X.shape[0]:
            raise ValueError(f"H must have shape ({X.shape[0]},); got {tuple(H.shape)}")


def compute_hashes_reference(X: Tensor, A: Tensor) -> Tensor:
    """Plain-PyTorch hashes: ``sum_b [X @ A[b, :D] + A[b, D] > 0] << b``.

    Arguments:
        X: ``(M, D)`` vectors.
        A: ``(B, D + 1)`` hyperplanes, the last column a bias.

    Returns:
        ``(M,)`` int64.
    """
    _check(X, A, None)
    above = (X @ A[:, :-1].T + A[:, -1]) > 0
    powers = torch.ones((), dtype=torch.int64, device=X.device) << torch.arange(
        A.shape[0], device=X.device
    )
    return (above.long() * powers).sum(dim=-1)


def compute_hashes(X: Tensor, A: Tensor, H: Tensor | None = None) -> Tensor:
    """Hash each row of ``X`` with the hyperplanes ``A``.

    Not differentiable (the result is an integer code).

    Arguments:
        X: ``(M, D)`` floating point vectors.
        A: ``(B, D + 1)`` hyperplanes of the dtype of ``X``; the last column is a bias.
            ``1 <= B <= 63``.
        H: optional ``(M,)`` int64 output buffer, overwritten and returned.

    Returns:
        ``(M,)`` int64 where bit ``b`` is set when ``X @ A[b, :D] + A[b, D] > 0``.

    Example:
        >>> X = torch.tensor([[1.0, -1.0], [-1.0, 2.0]])
        >>> A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> compute_hashes(X, A)
        tensor([1, 2])
    """
    _check(X, A, H)
    X, A = X.detach(), A.detach()
    if _kernels.use_kernels(X, A):
        hashes = _kernels.compute_hashes_kernel(X, A)
    else:
        hashes = compute_hashes_reference(X, A)
    if H is None:
        return hashes
    return H.copy_(hashes)
