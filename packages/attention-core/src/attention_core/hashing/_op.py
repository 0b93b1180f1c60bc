"""The ``torch.library`` op ``attention_core::compute_hashes`` and its fake (meta) registration.

Its CPU kernel is in ``csrc/hashing.h``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import CPU_DTYPES
from .._extension import binding, require_extension


def check_hash_inputs(X: Tensor, A: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """``X (M, D)`` and ``A (B, D + 1)`` with ``1 <= B <= 63``, one of ``dtypes``, one device."""
    for name, t in (("X", X), ("A", A)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if X.dtype not in dtypes or A.dtype != X.dtype:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"X and A must both be {allowed}; got {X.dtype} and {A.dtype}")
    if X.dim() != 2 or A.dim() != 2 or A.shape[1] != X.shape[1] + 1:
        raise ValueError(
            f"X must be (M, D) and A (B, D + 1); got {tuple(X.shape)} and {tuple(A.shape)}"
        )
    if not 1 <= A.shape[0] <= 63:
        raise ValueError(f"A must hold between 1 and 63 hyperplanes (rows); got {A.shape[0]}")
    if A.device != X.device:
        raise ValueError(f"A must be on the device of X ({X.device}); got {A.device}")


@torch.library.custom_op("attention_core::compute_hashes", mutates_args=(), device_types="cpu")
def compute_hashes_kernel(X: Tensor, A: Tensor) -> Tensor:
    """Random-hyperplane hashes with the compiled kernel.

    Arguments:
        X: ``(M, D)`` float32 or float64 CPU tensor.
        A: ``(B, D + 1)`` hyperplanes of the same dtype, the last column a threshold;
            ``1 <= B <= 63``.

    Returns:
        ``(M,)`` int64; bit ``b`` is set when ``X @ A[b, :D] > A[b, D]``.
    """
    require_extension()
    check_hash_inputs(X, A, CPU_DTYPES[0])
    X = X.contiguous()
    A = A.contiguous()
    H = X.new_empty(X.shape[0], dtype=torch.int64)
    binding("compute_hashes", X.dtype)(
        X.data_ptr(), A.data_ptr(), H.data_ptr(), X.shape[0], X.shape[1], A.shape[0]
    )
    return H


@compute_hashes_kernel.register_fake
def _(X: Tensor, A: Tensor) -> Tensor:
    check_hash_inputs(X, A, CPU_DTYPES[0])
    return X.new_empty(X.shape[0], dtype=torch.int64)
