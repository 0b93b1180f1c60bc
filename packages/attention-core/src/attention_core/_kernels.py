"""The Python side of the compiled CPU kernels in ``attention_core._C``.

Each kernel is wrapped in a ``torch.library.custom_op`` so that ``torch.compile``,
``torch.export`` and FX treat it as one opaque operator, with a ``register_fake`` that
allocates its output exactly like the real op. The public functions (for example
:func:`attention_core.hashing.compute_hashes`) decide between these ops and their
plain-PyTorch references with :func:`use_kernels`.

Set the environment variable ``ATTENTION_CORE_FORCE_REFERENCE=1`` to force the
plain-PyTorch path everywhere (useful to tell a kernel bug from a model bug).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # torch is imported first so that the extension finds its shared libraries
    from . import _C
except ImportError:  # a source checkout that was never compiled
    _C = None

__all__ = [
    "FORCE_REFERENCE_ENV",
    "compute_hashes_kernel",
    "kernels_available",
    "use_kernels",
]

FORCE_REFERENCE_ENV = "ATTENTION_CORE_FORCE_REFERENCE"

_KERNEL_DTYPES = (torch.float32, torch.float64)


def kernels_available() -> bool:
    """``True`` when the compiled extension ``attention_core._C`` could be imported."""
    return _C is not None


def use_kernels(*tensors: Tensor) -> bool:
    """``True`` when the compiled kernels should handle ``tensors``: the extension is
    available, ``ATTENTION_CORE_FORCE_REFERENCE`` is unset (or ``"0"``), and every tensor is
    a float32/float64 CPU tensor."""
    if _C is None or os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0"):
        return False
    return all(t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES for t in tensors)


# ---------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("attention_core::compute_hashes", mutates_args=(), device_types="cpu")
def compute_hashes_kernel(X: Tensor, A: Tensor) -> Tensor:
    """Random-hyperplane hashes with the compiled kernel.

    Arguments:
        X: ``(M, D)`` float32 or float64 CPU tensor.
        A: ``(B, D + 1)`` hyperplanes of the same dtype, the last column a bias.

    Returns:
        ``(M,)`` int64; bit ``b`` is set when ``X @ A[b, :D] + A[b, D] > 0``.
    """
    if _C is None:
        raise RuntimeError("attention_core._C is not compiled; use the reference path")
    if X.dtype not in _KERNEL_DTYPES or A.dtype != X.dtype:
        raise TypeError(f"X and A must both be float32 or float64; got {X.dtype} and {A.dtype}")
    if X.dim() != 2 or A.dim() != 2 or A.shape[1] != X.shape[1] + 1:
        raise ValueError(
            f"X must be (M, D) and A (B, D + 1); got {tuple(X.shape)} and {tuple(A.shape)}"
        )
    X = X.contiguous()
    A = A.contiguous()
    H = X.new_empty(X.shape[0], dtype=torch.int64)
    kernel = _C.compute_hashes_f32 if X.dtype == torch.float32 else _C.compute_hashes_f64
    kernel(X.data_ptr(), A.data_ptr(), H.data_ptr(), X.shape[0], X.shape[1], A.shape[0])
    return H


@compute_hashes_kernel.register_fake
def _(X: Tensor, A: Tensor) -> Tensor:
    return X.new_empty(X.shape[0], dtype=torch.int64)
