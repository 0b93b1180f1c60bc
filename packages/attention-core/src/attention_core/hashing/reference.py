"""The plain-PyTorch hashes (reference and fallback) and the input checks of the public API."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_tensor

__all__ = ["MAX_BITS", "check_inputs", "compute_hashes_reference"]

MAX_BITS = 63
"""The most hyperplanes one int64 hash can hold without touching the sign bit."""


def check_inputs(X: Tensor, A: Tensor, H: Tensor | None) -> None:
    """Check the inputs of the hashing functions.

    ``X (M, D)`` and ``A (B, D + 1)`` floating tensors of one dtype and device with
    ``1 <= B <= MAX_BITS``, and the optional ``(M,)`` int64 output buffer ``H``."""
    check_tensor("X", X, dim=2, floating=True)
    check_tensor("A", A, dim=2, floating=True, device=X.device)
    if A.dtype != X.dtype:
        raise TypeError(f"A must have the dtype of X ({X.dtype}); got {A.dtype}")
    if A.shape[1] != X.shape[1] + 1:
        raise ValueError(
            f"A must have shape (B, D + 1) = (B, {X.shape[1] + 1}) (the last column is a "
            f"threshold); got {tuple(A.shape)}"
        )
    if not 1 <= A.shape[0] <= MAX_BITS:
        raise ValueError(f"A must hold between 1 and {MAX_BITS} hyperplanes; got {A.shape[0]}")
    if H is not None:
        check_tensor("H", H, dim=1, dtype=torch.int64, device=X.device)
        if H.shape[0] != X.shape[0]:
            raise ValueError(f"H must have shape ({X.shape[0]},); got {tuple(H.shape)}")


def compute_hashes_reference(X: Tensor, A: Tensor) -> Tensor:
    """Plain-PyTorch hashes: ``sum_b [X @ A[b, :D] > A[b, D]] << b``.

    Arguments:
        X: ``(M, D)`` vectors.
        A: ``(B, D + 1)`` hyperplanes, the last column a threshold.

    Returns:
        ``(M,)`` int64.
    """
    check_inputs(X, A, None)
    above = torch.gt(X @ A[:, :-1].T, A[:, -1])
    powers = torch.ones((), dtype=torch.int64, device=X.device) << torch.arange(
        A.shape[0], device=X.device
    )
    return (above.long() * powers).sum(dim=-1)
