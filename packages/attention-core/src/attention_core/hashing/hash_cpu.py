"""``fast_transformers.hashing.hash_cpu`` over `attention_core.hashing.compute_hashes`.

Same function names, argument order and caller-allocated ``H`` as fast-transformers' compiled
module; bit ``b`` is set when ``X @ A[b, :D] > A[b, D]``, the convention of
`attention_core.hashing.compute_hashes` too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._buffers import fill_buffer
from . import compute_hashes as _compute_hashes

__all__ = ["compute_hashes", "compute_hashes_from_projections"]


def compute_hashes(X: Tensor, A: Tensor, H: Tensor) -> None:
    """Write into ``H[m]`` the code whose bit ``b`` is ``X[m] @ A[b, :D] > A[b, D]``.

    Arguments:
        X: ``(M, D)`` vectors.
        A: ``(B, D + 1)`` hyperplanes, the last column the threshold; ``1 <= B <= 63``.
        H: ``(M,)`` int64 output buffer, overwritten.
    """
    fill_buffer("H", H, _compute_hashes(X, A))


def compute_hashes_from_projections(P: Tensor, H: Tensor) -> None:
    """Write into ``H[m]`` the code whose bit ``b`` is ``P[m, b] > 0``.

    Arguments:
        P: ``(M, B)`` projections of the vectors on ``B`` hyperplanes, ``1 <= B <= 63``.
        H: ``(M,)`` int64 output buffer, overwritten.
    """
    if not isinstance(P, Tensor) or P.dim() != 2:
        shape = tuple(P.shape) if isinstance(P, Tensor) else type(P).__name__
        raise ValueError(f"P must be a (M, B) tensor of projections; got {shape}")
    B = P.shape[1]
    planes = torch.cat([torch.eye(B, dtype=P.dtype), torch.zeros(B, 1, dtype=P.dtype)], dim=1)
    fill_buffer("H", H, _compute_hashes(P, planes.to(P.device)))
