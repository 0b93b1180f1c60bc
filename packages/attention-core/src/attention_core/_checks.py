"""Input validation shared by every module: clear errors that name the argument, the
expected and the actual shape, dtype or device, raised before any computation.

A leaf module: it imports nothing of attention_core, so every module (the op packages
included) can import it without an import cycle."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "CPU_DTYPES",
    "TRITON_DTYPES",
    "DtypeRule",
    "check_floats",
    "check_grad",
    "check_index",
    "check_model_dtype",
    "check_positive_int",
    "check_rows",
    "check_tensor",
    "check_token_ids",
    "kernel_dtypes",
]


def check_tensor(
    name: str,
    x: object,
    *,
    dim: int | None = None,
    floating: bool = False,
    integer: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Check that ``x`` is a tensor with the given rank, dtype kind and device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions; got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor; got dtype {x.dtype}")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor; got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}; got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on device {device}; got {x.device}")
    return x


def check_model_dtype(name: str, x: Tensor, model_dtype: torch.dtype) -> Tensor:
    """Check that the floating point input ``x`` has the dtype of the model's parameters.

    A model never converts its input silently (a float16 input would be computed in float32
    and come back float32, or lose precision the other way round). Under ``torch.autocast``
    the dtypes legitimately differ, and nothing is checked.
    """
    if x.dtype != model_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} must have the dtype of the model's parameters ({model_dtype}); got "
            f"{x.dtype} (convert the input with {name}.to({model_dtype}) or the model with "
            f"model.to({x.dtype}))"
        )
    return x


def check_token_ids(name: str, tokens: Tensor, num_tokens: int) -> Tensor:
    """Check that the integer tensor ``tokens`` holds ids in ``[0, num_tokens)``.

    Reads the values (one device synchronisation on CUDA); skipped under ``torch.compile``
    and for empty tensors.
    """
    if tokens.numel() and not torch.compiler.is_compiling():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= num_tokens:
            raise ValueError(
                f"{name} must hold token ids in [0, {num_tokens}); got values in [{low}, {high}]"
            )
    return tokens


def check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Check that ``value`` is an int > 0 (or >= 0 with ``allow_zero``)."""
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} int; got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# the compiled and Triton kernels' operands
# ---------------------------------------------------------------------------------------

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
