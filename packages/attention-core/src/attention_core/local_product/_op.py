"""The ``torch.library`` ops of the local product.

``attention_core::local_dot_product_*`` and ``local_weighted_average_*`` (CPU kernels in
``csrc/local_product.h``, CUDA kernels in `._triton`), their fake (meta) registrations and their
autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import kernel_dtypes
from .._extension import (
    binding,
    nhl,
    require_extension,
    row_major,
    triton_installed,
)
from ._validation import check_local_average, check_local_dot

# Operands reach the kernels as pointers plus the strides of their first three dimensions,
# like the causal product; outputs are contiguous (N, H, L, .) tensors.


@torch.library.custom_op(
    "attention_core::local_dot_product_forward", mutates_args=(), device_types="cpu"
)
def local_dot_product_forward(
    Q: Tensor, K: Tensor, attn_mask: Tensor, key_lengths: Tensor, local_context: int
) -> Tensor:
    """Banded dot products with the compiled kernel.

    Arguments:
        Q: ``(N, H, L, E)`` float32 or float64 CPU tensor (any strides).
        K: ``(N, H, S, E)``.
        attn_mask: ``(L, S)`` additive mask of the same dtype (any strides).
        key_lengths: ``(N,)`` int64 number of valid keys of each sequence.
        local_context: the window size ``C``.

    Returns:
        ``(N, H, L, C)``: ``Q_l . K_j + attn_mask[l, j]`` for ``j = l - C // 2 + k`` in
        ``[0, min(S, key_lengths[n]))`` and ``-inf`` elsewhere.
    """
    require_extension()
    check_local_dot(Q, K, attn_mask, key_lengths, local_context)
    N, H, L, E = Q.shape
    S = K.shape[2]
    Q, K = row_major(Q), row_major(K)
    lengths = key_lengths.contiguous()
    out = Q.new_empty(N, H, L, local_context)
    binding("local_dot_product_forward", Q.dtype)(
        Q.data_ptr(), nhl(Q), K.data_ptr(), nhl(K), attn_mask.data_ptr(),
        (attn_mask.stride(0), attn_mask.stride(1)), lengths.data_ptr(), out.data_ptr(),
        nhl(out), N, H, L, S, E, local_context, torch.get_num_threads(),
    )  # fmt: skip
    return out


@local_dot_product_forward.register_fake
def _(Q, K, attn_mask, key_lengths, local_context):
    check_local_dot(Q, K, attn_mask, key_lengths, local_context, dtypes=kernel_dtypes(Q))
    N, H, L, _ = Q.shape
    return Q.new_empty(N, H, L, local_context)


@torch.library.custom_op(
    "attention_core::local_dot_product_backward", mutates_args=(), device_types="cpu"
)
def local_dot_product_backward(
    grad: Tensor, Q: Tensor, K: Tensor, key_lengths: Tensor, local_context: int
) -> tuple[Tensor, Tensor]:
    """Gradients of `local_dot_product_forward` with respect to ``Q`` and ``K``.

    Arguments:
        grad: ``(N, H, L, C)`` gradient of the output.
        Q, K, key_lengths, local_context: as in the forward.

    Returns:
        ``dQ (N, H, L, E)`` and ``dK (N, H, S, E)``; slots outside the window or the key
        lengths pass no gradient.
    """
    require_extension()
    check_local_dot(Q, K, None, key_lengths, local_context, grad)
    N, H, L, E = Q.shape
    S = K.shape[2]
    grad, Q, K = row_major(grad.to(Q.dtype)), row_major(Q), row_major(K)
    lengths = key_lengths.contiguous()
    dQ = Q.new_empty(N, H, L, E)
    dK = Q.new_empty(N, H, S, E)
    binding("local_dot_product_backward", Q.dtype)(
        grad.data_ptr(), nhl(grad), Q.data_ptr(), nhl(Q), K.data_ptr(), nhl(K),
        lengths.data_ptr(), dQ.data_ptr(), nhl(dQ), dK.data_ptr(), nhl(dK),
        N, H, L, S, E, local_context, torch.get_num_threads(),
    )  # fmt: skip
    return dQ, dK


@local_dot_product_backward.register_fake
def _(grad, Q, K, key_lengths, local_context):
    check_local_dot(Q, K, None, key_lengths, local_context, grad, kernel_dtypes(Q))
    return Q.new_empty(Q.shape), Q.new_empty(K.shape)


def _local_dot_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    Q, K, _, key_lengths, local_context = inputs
    ctx.save_for_backward(Q, K, key_lengths)
    ctx.local_context = local_context


def _local_dot_backward(ctx, grad):
    Q, K, key_lengths = ctx.saved_tensors
    dQ, dK = local_dot_product_backward(grad, Q, K, key_lengths, ctx.local_context)
    return dQ, dK, None, None, None


local_dot_product_forward.register_autograd(
    _local_dot_backward, setup_context=_local_dot_setup_context
)


@torch.library.custom_op(
    "attention_core::local_weighted_average_forward", mutates_args=(), device_types="cpu"
)
def local_weighted_average_forward(attention: Tensor, V: Tensor) -> Tensor:
    """Banded weighted average with the compiled kernel.

    Arguments:
        attention: ``(N, H, L, C)`` float32 or float64 CPU tensor (any strides).
        V: ``(N, H, S, D)`` of the same dtype.

    Returns:
        ``(N, H, L, D)``: ``sum_k attention[l, k] V_j`` over ``j = l - C // 2 + k`` in
        ``[0, S)``.
    """
    require_extension()
    check_local_average(attention, V)
    N, H, L, C = attention.shape
    S, D = V.shape[2], V.shape[3]
    attention, V = row_major(attention), row_major(V)
    out = V.new_empty(N, H, L, D)
    binding("local_weighted_average_forward", V.dtype)(
        attention.data_ptr(), nhl(attention), V.data_ptr(), nhl(V), out.data_ptr(), nhl(out),
        N, H, L, S, D, C, torch.get_num_threads(),
    )  # fmt: skip
    return out


@local_weighted_average_forward.register_fake
def _(attention, V):
    check_local_average(attention, V, dtypes=kernel_dtypes(V))
    N, H, L, _ = attention.shape
    return V.new_empty(N, H, L, V.shape[3])


@torch.library.custom_op(
    "attention_core::local_weighted_average_backward", mutates_args=(), device_types="cpu"
)
def local_weighted_average_backward(
    grad: Tensor, attention: Tensor, V: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of `local_weighted_average_forward`.

    Arguments:
        grad: ``(N, H, L, D)`` gradient of the output.
        attention, V: as in the forward.

    Returns:
        ``dattention (N, H, L, C)`` (zero for slots outside ``[0, S)``) and ``dV (N, H, S, D)``.
    """
    require_extension()
    check_local_average(attention, V, grad)
    N, H, L, C = attention.shape
    S, D = V.shape[2], V.shape[3]
    grad, attention, V = row_major(grad.to(V.dtype)), row_major(attention), row_major(V)
    dA = V.new_empty(N, H, L, C)
    dV = V.new_empty(N, H, S, D)
    binding("local_weighted_average_backward", V.dtype)(
        grad.data_ptr(), nhl(grad), attention.data_ptr(), nhl(attention), V.data_ptr(),
        nhl(V), dA.data_ptr(), nhl(dA), dV.data_ptr(), nhl(dV),
        N, H, L, S, D, C, torch.get_num_threads(),
    )  # fmt: skip
    return dA, dV


@local_weighted_average_backward.register_fake
def _(grad, attention, V):
    check_local_average(attention, V, grad, kernel_dtypes(V))
    return V.new_empty(attention.shape), V.new_empty(V.shape)


def _local_average_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _local_average_backward(ctx, grad):
    attention, V = ctx.saved_tensors
    return local_weighted_average_backward(grad, attention, V)


local_weighted_average_forward.register_autograd(
    _local_average_backward, setup_context=_local_average_setup_context
)


# the CUDA kernels: the Triton launch functions of ._triton, imported on the first call


def local_dot_product_forward_cuda(
    Q: Tensor, K: Tensor, attn_mask: Tensor, key_lengths: Tensor, local_context: int
) -> Tensor:
    """CUDA kernel of ``attention_core::local_dot_product_forward``.

    ``Q (N, H, L, E)``, ``K (N, H, S, E)``, ``attn_mask (L, S)``, ``key_lengths (N,)`` ->
    ``(N, H, L, C)``."""
    from . import _triton

    return _triton.local_dot_product_forward(Q, K, attn_mask, key_lengths, local_context)


def local_dot_product_backward_cuda(
    grad: Tensor, Q: Tensor, K: Tensor, key_lengths: Tensor, local_context: int
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::local_dot_product_backward``.

    ``grad (N, H, L, C)`` -> ``dQ (N, H, L, E)``, ``dK (N, H, S, E)``."""
    from . import _triton

    return _triton.local_dot_product_backward(grad, Q, K, key_lengths, local_context)


def local_weighted_average_forward_cuda(attention: Tensor, V: Tensor) -> Tensor:
    """CUDA kernel of ``attention_core::local_weighted_average_forward``.

    ``attention (N, H, L, C)``, ``V (N, H, S, D)`` -> ``(N, H, L, D)``."""
    from . import _triton

    return _triton.local_weighted_average_forward(attention, V)


def local_weighted_average_backward_cuda(
    grad: Tensor, attention: Tensor, V: Tensor
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::local_weighted_average_backward``.

    ``grad (N, H, L, D)`` -> ``dattention (N, H, L, C)``, ``dV (N, H, S, D)``."""
    from . import _triton

    return _triton.local_weighted_average_backward(grad, attention, V)


CUDA_KERNELS = {
    "local_dot_product_forward": local_dot_product_forward_cuda,
    "local_dot_product_backward": local_dot_product_backward_cuda,
    "local_weighted_average_forward": local_weighted_average_forward_cuda,
    "local_weighted_average_backward": local_weighted_average_backward_cuda,
}

if triton_installed():
    local_dot_product_forward.register_kernel("cuda")(local_dot_product_forward_cuda)
    local_dot_product_backward.register_kernel("cuda")(local_dot_product_backward_cuda)
    local_weighted_average_forward.register_kernel("cuda")(local_weighted_average_forward_cuda)
    local_weighted_average_backward.register_kernel("cuda")(local_weighted_average_backward_cuda)
