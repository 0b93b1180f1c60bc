"""Checks of the compiled and Triton kernels' operands, shared by the op packages.

The validators of arguments in general (tensors, ints, probabilities, token ids) are public in
`attention_core.checks`; they are re-exported here for the modules of the package. This
module imports only `attention_core.checks`, which imports nothing of the package, so every
module (the op packages included) can import it without an import cycle."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import check_model_dtype, check_positive_int, check_tensor, check_token_ids

__all__ = [
    "CPU_DTYPES",
    "PLAIN_TENSORS",
    "TRITON_DTYPES",
    "DtypeRule",
    "check_floats",
    "check_grad",
    "check_index",
    "check_like",
    "check_model_dtype",
    "check_positive_int",
    "check_rows",
    "check_tensor",
    "check_token_ids",
    "kernel_dtypes",
    "layouts",
    "plain_eps",
    "storages",
]


# ---------------------------------------------------------------------------------------
# the compiled and Triton kernels' operands
# ---------------------------------------------------------------------------------------

# exact types for the fast paths (a call that skips the dispatcher, a check in one pass of
# comparisons): a subclass (a FakeTensor, a tensor subclass with its own semantics) takes the
# registered op and the full checks
PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def plain_eps(eps: object) -> bool:
    """``eps`` is a finite non-negative ``float`` (the fast checks' form of the eps check)."""
    return type(eps) is float and 0.0 <= eps < math.inf


def layouts(tensors: tuple[Tensor | None, ...]) -> tuple:
    """Where and how each of ``tensors`` stores its values: ``(data address, dtype, device,
    shape, strides)``, ``None`` for ``None``. The prepared ops compare it at every call with
    what they checked: a tensor given other storage, dtype, shape or strides since
    (``.data = ...``, ``set_``, ``resize_``, ``as_strided_``) is checked again before a
    kernel reads it."""
    return tuple(
        [
            None if t is None else (t.data_ptr(), t.dtype, t.device, t.shape, t.stride())
            for t in tensors
        ]
    )


def storage_holds(t: Tensor) -> bool:
    """Whether ``t``'s storage holds every element its shape and strides address (a storage
    resized or freed behind the tensor's back does not): checked where a held tensor changed
    its layout, before a kernel reads it by address."""
    if t.numel() == 0:
        return True
    if t.data_ptr() == 0:
        return False
    extent = t.storage_offset() + 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes() >= extent * t.element_size()


def storages(tensors: tuple[Tensor | None, ...]) -> tuple:
    """The storages of ``tensors`` (``None`` kept): a prepared op holds them with what it
    checked, so that no other tensor can be given their addresses while it may read them."""
    return tuple([None if t is None else t.untyped_storage() for t in tensors])


# the dtypes a kernel family accepts and how an error message names them
DtypeRule = tuple[tuple[torch.dtype, ...], str]
CPU_DTYPES: DtypeRule = ((torch.float32, torch.float64), "all be float32 or float64 (one dtype)")
TRITON_DTYPES: DtypeRule = (
    (torch.float32, torch.float16, torch.bfloat16),
    "share one dtype among float32, float16 and bfloat16",
)


def kernel_dtypes(t: Tensor) -> DtypeRule:
    """The dtype rule of the kernels that serve ``t``'s device (Triton's for CUDA)."""
    return TRITON_DTYPES if t.device.type == "cuda" else CPU_DTYPES


def check_floats(names: str, *tensors: Tensor, dtypes: DtypeRule = CPU_DTYPES) -> None:
    """Four-dimensional tensors of one allowed dtype on one device."""
    allowed, phrase = dtypes
    got = [t.dtype for t in tensors]
    if got[0] not in allowed or any(d != got[0] for d in got):
        raise TypeError(f"{names} must {phrase}; got {', '.join(str(d) for d in got)}")
    for t in tensors:
        if t.dim() != 4:
            raise ValueError(f"{names} must be 4-dimensional; got {tuple(t.shape)}")
        if t.device != tensors[0].device:
            raise ValueError(
                f"{names} must be on one device; got {tensors[0].device} and {t.device}"
            )


def check_rows(names: str, A: Tensor, B: Tensor, dtypes: DtypeRule = CPU_DTYPES) -> None:
    """``A (N, H, L, .)`` and ``B (N, H, S, .)`` float tensors of one dtype and device."""
    check_floats(names, A, B, dtypes=dtypes)
    if A.shape[:2] != B.shape[:2]:
        first, second = names.split(" and ")
        raise ValueError(
            f"{first} and {second} must have the same (N, H); got {tuple(A.shape)} and "
            f"{tuple(B.shape)}"
        )


def check_index(name: str, t: Tensor | None, shape: tuple[int, ...], device: torch.device) -> None:
    """An optional int64 tensor of exactly ``shape`` on ``device``."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype != torch.int64 or tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} must be an int64 tensor of shape {tuple(shape)}; got {t.dtype} "
            f"{tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"{name} must be on device {device}; got {t.device}")


def check_like(
    name: str, t: object, like: Tensor, like_name: str, shape: tuple[int, ...] | None = None
) -> Tensor:
    """A tensor of ``shape`` (any when ``None``) with the dtype and device of ``like``, the
    argument called ``like_name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name}, {like.dtype}; got {t.dtype}")
    if t.device != like.device:
        raise ValueError(
            f"{name} must be on the device of {like_name}, {like.device}; got {t.device}"
        )
    return t


def check_grad(name: str, grad: Tensor, shape: tuple[int, ...], like: Tensor) -> None:
    """A floating gradient of exactly ``shape`` on the device of ``like``."""
    if not isinstance(grad, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(grad).__name__}")
    if tuple(grad.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(grad.shape)}")
    if not grad.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor; got {grad.dtype}")
    if grad.device != like.device:
        raise ValueError(f"{name} must be on device {like.device}; got {grad.device}")
