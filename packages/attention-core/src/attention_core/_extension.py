"""The compiled extension ``attention_core._C`` and the choice between kernels and references.

Every op package (``causal_product``, ``local_product``, ``sparse_product``, ``aggregate``,
``hashing``, ``clustering.hamming``) registers its own ``torch.library`` ops; this module only
loads the extension (after torch, so that the extension's OpenMP symbols resolve to torch's
own ``libgomp.so.1``), says whether the kernels should run, and turns tensors into the
addresses and strides the raw-pointer bindings take.

Set the environment variable ``ATTENTION_CORE_FORCE_REFERENCE=1`` to force the
plain-PyTorch path everywhere (useful to tell a kernel bug from a model bug).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

try:  # torch is imported first: the extension links to the libgomp.so.1 torch has loaded
    from . import _C
except ImportError:  # a source checkout that was never compiled
    _C = None

__all__ = [
    "FORCE_REFERENCE_ENV",
    "address",
    "binding",
    "kernels_available",
    "new_nhl",
    "nhl",
    "require_extension",
    "row_major",
    "triton_available",
    "triton_installed",
    "use_kernels",
]

FORCE_REFERENCE_ENV = "ATTENTION_CORE_FORCE_REFERENCE"

_CPU_DTYPES = (torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernels_available() -> bool:
    """``True`` when the compiled extension ``attention_core._C`` could be imported."""
    return _C is not None


def triton_installed() -> bool:
    """``True`` when a ``triton`` package is installed.

    Found without importing it, so that importing attention_core does not pay for importing triton.
    """
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_available() -> bool:
    """``True`` when ``triton`` (and ``triton.language``) can be imported."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


def use_kernels(*tensors: Tensor, triton: bool = False) -> bool:
    """``True`` when the compiled kernels should handle ``tensors``.

    That is when the extension is available, ``ATTENTION_CORE_FORCE_REFERENCE`` is unset (or
    ``"0"``), and every tensor is a float32/float64 CPU tensor. With ``triton=True`` (ops with a
    Triton kernel registered for ``"cuda"``), float32/float16/bfloat16 CUDA tensors also qualify
    when triton is importable; float64 CUDA tensors do not (they take the plain-PyTorch path)."""
    if os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0"):
        return False
    if triton and tensors and all(t.device.type == "cuda" for t in tensors):
        return triton_available() and all(t.dtype in _TRITON_DTYPES for t in tensors)
    if _C is None:
        return False
    return all(t.device.type == "cpu" and t.dtype in _CPU_DTYPES for t in tensors)


def require_extension() -> None:
    """Raise when the compiled extension is missing (a CPU op was called without it)."""
    if _C is None:
        raise RuntimeError("attention_core._C is not compiled; use the reference path")


def binding(name: str, dtype: torch.dtype):
    """The ``_C`` function ``name`` for ``dtype`` (``name_f32`` or ``name_f64``)."""
    require_extension()
    return getattr(_C, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def row_major(t: Tensor) -> Tensor:
    """``t`` with a contiguous last dimension (a copy only when it is not)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def address(t: Tensor | None) -> int:
    """The data address of ``t``, ``0`` for ``None``."""
    return 0 if t is None else t.data_ptr()


def nhl(t: Tensor) -> tuple[int, int, int]:
    """The element strides of the first three dimensions of ``t``."""
    return (t.stride(0), t.stride(1), t.stride(2))


def new_nhl(like: Tensor, N: int, H: int, L: int, D: int, sequence_first: bool) -> Tensor:
    """An uninitialised ``(N, H, L, D)`` tensor, stored as ``(N, L, H, D)`` if sequence_first."""
    if sequence_first:
        return like.new_empty(N, L, H, D).transpose(1, 2)
    return like.new_empty(N, H, L, D)
