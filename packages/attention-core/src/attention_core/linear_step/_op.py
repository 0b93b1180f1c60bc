"""The ``torch.library`` op ``attention_core::linear_attention_step``: its checks, its CPU
kernel (``csrc/linear_step.h``) with the plain-PyTorch fallback, its fake (meta)
registration and its autograd.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import PLAIN_TENSORS, plain_eps
from .._extension import binding, use_kernels
from .reference import (
    accumulation_dtype,
    linear_attention_step_backward_reference,
    linear_attention_step_reference,
)

__all__ = ["check_step", "compute_step", "linear_attention_step_op"]


def _shape_error(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"{name} must be a {dtype} tensor of shape {shape}; got {t.dtype} {tuple(t.shape)}"


def _step_accepted(
    query: Tensor, key: Tensor, value: Tensor, S: Tensor | None, Z: Tensor | None, eps: float
) -> bool:
    """``True`` only for arguments that the full checks of `check_step` accept, in one pass
    of comparisons (a recurrent step calls the op with a few rows, where the checks' function
    calls cost as much as the kernel); anything else takes the full checks."""
    plain = PLAIN_TENSORS
    if type(query) not in plain or type(key) not in plain or type(value) not in plain:
        return False
    if not plain_eps(eps) or not query.is_floating_point():
        return False
    dtype, device, shape = query.dtype, query.device, query.shape
    if len(shape) != 3 or key.shape != shape or key.dtype != dtype or key.device != device:
        return False
    if value.dim() != 3 or value.shape[:2] != shape[:2]:
        return False
    if value.dtype != dtype or value.device != device:
        return False
    state_dtype = accumulation_dtype(dtype)
    if S is not None and (
        type(S) not in plain
        or S.shape != (*shape, value.shape[2])
        or S.dtype != state_dtype
        or S.device != device
    ):
        return False
    return Z is None or (
        type(Z) in plain and Z.shape == shape and Z.dtype == state_dtype and Z.device == device
    )


def check_step(
    query: Tensor, key: Tensor, value: Tensor, S: Tensor | None, Z: Tensor | None, eps: float
) -> None:
    """Check every argument of the step before a kernel runs.

    ``query``, ``key`` `(N, H, E)` and ``value`` `(N, H, M)` must be floating tensors of one
    dtype and device; ``S`` `(N, H, E, M)` and ``Z`` `(N, H, E)` (each optional) in the
    accumulation dtype (float32 for half precision, else the input dtype) on the same device;
    ``eps`` a finite non-negative number."""
    if _step_accepted(query, key, value, S, Z, eps):
        return
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not query.is_floating_point():
        raise TypeError(f"query must be a floating point tensor; got {query.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            "query, key and value must have one dtype; got "
            f"{query.dtype}, {key.dtype} and {value.dtype}"
        )
    if query.dim() != 3 or key.shape != query.shape or value.dim() != 3:
        raise ValueError(
            "query and key must be (N, H, E) and value (N, H, M); got "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if value.shape[:2] != query.shape[:2]:
        raise ValueError(
            f"value must have shape ({query.shape[0]}, {query.shape[1]}, M), the (N, H) of "
            f"query; got {tuple(value.shape)}"
        )
    device = query.device
    if key.device != device or value.device != device:
        raise ValueError(
            f"query, key and value must be on one device; got {device}, {key.device} and "
            f"{value.device}"
        )
    N, H, E = query.shape
    M = value.shape[2]
    dtype = accumulation_dtype(query.dtype)
    state: tuple[tuple[str, Tensor | None, tuple[int, ...]], ...] = (
        ("S", S, (N, H, E, M)),
        ("Z", Z, (N, H, E)),
    )
    for name, tensor, shape in state:
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None; got {type(tensor).__name__}")
        if tensor.dtype != dtype or tensor.shape != shape:
            raise ValueError(_shape_error(name, tensor, shape, dtype))
        if tensor.device != device:
            raise ValueError(f"{name} must be on device {device}; got {tensor.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite non-negative number; got {eps!r}")
    if eps < 0:
        raise ValueError(f"eps must be a finite non-negative number; got {eps!r}")


def _strides(t: Tensor) -> tuple[int, ...]:
    return t.stride()[:2]


def _features_last(t: Tensor) -> Tensor:
    """``t`` with a contiguous feature (last) dimension, copied only when it is not."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def compute_step(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    S: Tensor | None,
    Z: Tensor | None,
    eps: float,
    elu_feature_map: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Compute the step on arguments that `check_step` has accepted.

    The compiled kernel runs for float32 and float64 CPU tensors, the plain-PyTorch reference
    elsewhere. Returns new contiguous tensors
    ``out`` `(N, H, M)`, ``S`` `(N, H, E, M)` and ``Z`` `(N, H, E)`; never writes its inputs."""
    if not use_kernels(query):
        return linear_attention_step_reference(query, key, value, S, Z, eps, elu_feature_map)
    N, H, E = query.shape
    M = value.shape[2]
    query, key, value = _features_last(query), _features_last(key), _features_last(value)
    S = None if S is None else S.contiguous()
    Z = None if Z is None else Z.contiguous()
    out = value.new_empty(N, H, M)
    S_new = value.new_empty(N, H, E, M)
    Z_new = value.new_empty(N, H, E)
    binding("linear_attention_step", query.dtype)(
        query.data_ptr(), _strides(query), key.data_ptr(), _strides(key),
        value.data_ptr(), _strides(value), 0 if S is None else S.data_ptr(),
        0 if Z is None else Z.data_ptr(), out.data_ptr(), S_new.data_ptr(), Z_new.data_ptr(),
        N, H, E, M, float(eps), bool(elu_feature_map), torch.get_num_threads(),
    )  # fmt: skip
    return out, S_new, Z_new


@torch.library.custom_op("attention_core::linear_attention_step", mutates_args=())
def linear_attention_step_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    S: Tensor | None,
    Z: Tensor | None,
    eps: float,
    elu_feature_map: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One recurrent linear-attention step (see `attention_core.linear_step.linear_attention_step`).

    Arguments:
        query: `(N, H, E)`.
        key: `(N, H, E)`.
        value: `(N, H, M)`.
        S: `(N, H, E, M)` or ``None`` (the first step).
        Z: `(N, H, E)` or ``None``.
        eps: added to the normaliser.
        elu_feature_map: apply ``elu(x) + 1`` to query and key.

    Returns:
        ``out`` `(N, H, M)`, the new ``S`` `(N, H, E, M)` and ``Z`` `(N, H, E)`.
    """
    check_step(query, key, value, S, Z, eps)
    return compute_step(query, key, value, S, Z, eps, elu_feature_map)


@linear_attention_step_op.register_fake
def _(query, key, value, S, Z, eps, elu_feature_map):
    check_step(query, key, value, S, Z, eps)
    N, H, E = query.shape
    M = value.shape[2]
    dtype = accumulation_dtype(value.dtype)
    return (
        value.new_empty(N, H, M),
        value.new_empty(N, H, E, M, dtype=dtype),
        value.new_empty(N, H, E, dtype=dtype),
    )


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    query, key, value, S, Z, eps, elu_feature_map = inputs
    _, S_new, Z_new = output
    ctx.save_for_backward(query, key, value, S_new, Z_new)
    ctx.options = (S is not None, Z is not None, eps, elu_feature_map)


def _backward(ctx, grad_out, grad_S, grad_Z):
    query, key, value, S_new, Z_new = ctx.saved_tensors
    has_S, has_Z, eps, elu_feature_map = ctx.options
    dq, dk, dv, dS, dZ = linear_attention_step_backward_reference(
        grad_out, grad_S, grad_Z, query, key, value, S_new, Z_new, eps, elu_feature_map
    )
    return dq, dk, dv, dS if has_S else None, dZ if has_Z else None, None, None


linear_attention_step_op.register_autograd(_backward, setup_context=_setup_context)
