"""Locality-sensitive hashing with random hyperplanes.

Reference: Charikar 2002. Clustered attention (Vyas et al. 2020, arXiv 2007.04825) uses them.

Each of ``B`` hyperplanes ``A[b] = (w_b, c_b)`` contributes one bit to a vector's hash: bit
``b`` of ``hash(x)`` is set when ``w_b . x > c_b`` (fast-transformers' convention: the last
column of the planes is a threshold). Nearby vectors fall on the same side
of most planes, so the Hamming distance between hashes approximates their distance.

On CPU in float32/float64 the compiled kernel of ``attention_core._C`` does the work (see
``csrc/hashing.h`` and the op of `attention_core.hashing._op`);
every other device or dtype uses
`compute_hashes_reference`.
"""

from __future__ import annotations

from torch import Tensor

from .._extension import use_kernels
from . import _op
from .reference import MAX_BITS, check_inputs, compute_hashes_reference

__all__ = ["MAX_BITS", "compute_hashes", "compute_hashes_reference"]


def compute_hashes(X: Tensor, A: Tensor, H: Tensor | None = None) -> Tensor:
    """Hash each row of ``X`` with the hyperplanes ``A``.

    Not differentiable (the result is an integer code).

    Arguments:
        X: ``(M, D)`` floating point vectors.
        A: ``(B, D + 1)`` hyperplanes of the dtype of ``X``; the last column is a threshold.
            ``1 <= B <= 63``.
        H: optional ``(M,)`` int64 output buffer, overwritten and returned.

    Returns:
        ``(M,)`` int64 where bit ``b`` is set when ``X @ A[b, :D] > A[b, D]``, as in
        fast-transformers.

    Example:
        >>> X = torch.tensor([[1.0, -1.0], [-1.0, 2.0]])
        >>> A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> compute_hashes(X, A)
        tensor([1, 2])
    """
    check_inputs(X, A, H)
    X, A = X.detach(), A.detach()
    if use_kernels(X, A):
        hashes = _op.compute_hashes_kernel(X, A)
    else:
        hashes = compute_hashes_reference(X, A)
    if H is None:
        return hashes
    return H.copy_(hashes)
