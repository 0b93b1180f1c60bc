"""The ``torch.library`` ops of aggregate and broadcast.

``attention_core::aggregate_*`` and ``broadcast_*`` (CPU kernel in ``csrc/aggregate.h``, CUDA
kernels in `._triton`), their fake (meta) registrations and their autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import kernel_dtypes
from .._extension import (
    address,
    binding,
    nhl,
    require_extension,
    row_major,
    triton_installed,
)
from ._validation import check_groups

# ``G (N, H, L)`` int64 groups, ``F (N, H, C)`` factors of the rows' dtype and optional
# ``limits (N, H)`` int64 (positions ``l >= limits`` are padding). A position whose group is
# outside ``[0, C)`` or that is padding takes no part. The backward passes are the same two
# kernels plus a reduction over the features for the factors' gradient.


def _group_rows(
    rows: Tensor, G: Tensor, F: Tensor | None, limits: Tensor | None, C: int, broadcast: bool
) -> Tensor:
    """Aggregate or broadcast rows with the compiled kernel.

    The kernel: aggregate ``rows (N, H, L, E)`` into ``(N, H, C, E)``, or broadcast
    ``rows (N, H, C, E)`` to ``(N, H, L, E)``; ``F=None`` means factors of one."""
    N, H, _, E = rows.shape
    L = G.shape[2]
    rows = row_major(rows)
    G = G.contiguous()
    F = None if F is None else F.contiguous()
    limits = None if limits is None else limits.contiguous()
    out = rows.new_empty(N, H, L if broadcast else C, E)
    binding("group_rows", rows.dtype)(
        rows.data_ptr(), nhl(rows), out.data_ptr(), nhl(out), G.data_ptr(), address(F),
        address(limits), N, H, L, C, E, broadcast, torch.get_num_threads(),
    )  # fmt: skip
    return out


@torch.library.custom_op("attention_core::aggregate_forward", mutates_args=(), device_types="cpu")
def aggregate_forward(X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Group sums scaled by the group factors, with the compiled kernel.

    Arguments:
        X: ``(N, H, L, E)`` float32 or float64 CPU tensor (any strides).
        G: ``(N, H, L)`` int64 group of every row.
        F: ``(N, H, C)`` factors, the dtype of ``X``.
        limits: ``(N, H)`` int64 number of non-padding positions, or ``None``.

    Returns:
        ``(N, H, C, E)``: ``F_c * sum_{l valid, G_l = c} X_l``.
    """
    require_extension()
    check_groups(X, G, F, limits, False)
    return _group_rows(X, G, F, limits, F.shape[2], False)


@aggregate_forward.register_fake
def _(X, G, F, limits):
    check_groups(X, G, F, limits, False, dtypes=kernel_dtypes(X))
    N, H, _, E = X.shape
    return X.new_empty(N, H, F.shape[2], E)


@torch.library.custom_op("attention_core::aggregate_backward", mutates_args=(), device_types="cpu")
def aggregate_backward(
    grad: Tensor, X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Gradients of `aggregate_forward`: ``dX (N, H, L, E)`` and ``dF (N, H, C)``.

    Arguments:
        grad: ``(N, H, C, E)`` gradient of the output.
        X, G, F, limits: as in the forward.
    """
    require_extension()
    check_groups(X, G, F, limits, False, grad)
    grad = grad.to(X.dtype)
    dX = _group_rows(grad, G, F, limits, F.shape[2], True)
    sums = _group_rows(X, G, None, limits, F.shape[2], False)
    return dX, torch.einsum("nhce,nhce->nhc", grad, sums).contiguous()


@aggregate_backward.register_fake
def _(grad, X, G, F, limits):
    check_groups(X, G, F, limits, False, grad, kernel_dtypes(X))
    return X.new_empty(X.shape), F.new_empty(F.shape)


def _aggregate_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _aggregate_backward(ctx, grad):
    X, G, F, limits = ctx.saved_tensors
    dX, dF = aggregate_backward(grad, X, G, F, limits)
    return dX, None, dF, None


aggregate_forward.register_autograd(_aggregate_backward, setup_context=_aggregate_setup_context)


@torch.library.custom_op("attention_core::broadcast_forward", mutates_args=(), device_types="cpu")
def broadcast_forward(Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Give every valid position its group's row scaled by the group's factor.

    Runs the compiled kernel.

    Arguments:
        Y: ``(N, H, C, E)`` float32 or float64 CPU tensor (any strides).
        G: ``(N, H, L)`` int64 group of every position.
        F: ``(N, H, C)`` factors, the dtype of ``Y``.
        limits: ``(N, H)`` int64 number of non-padding positions, or ``None``.

    Returns:
        ``(N, H, L, E)``: ``F_g Y_g`` with ``g = G_l`` for valid positions, zero elsewhere.
    """
    require_extension()
    check_groups(Y, G, F, limits, True)
    return _group_rows(Y, G, F, limits, Y.shape[2], True)


@broadcast_forward.register_fake
def _(Y, G, F, limits):
    check_groups(Y, G, F, limits, True, dtypes=kernel_dtypes(Y))
    N, H, _, E = Y.shape
    return Y.new_empty(N, H, G.shape[2], E)


@torch.library.custom_op("attention_core::broadcast_backward", mutates_args=(), device_types="cpu")
def broadcast_backward(
    grad: Tensor, Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Gradients of `broadcast_forward`: ``dY (N, H, C, E)`` and ``dF (N, H, C)``.

    Arguments:
        grad: ``(N, H, L, E)`` gradient of the output.
        Y, G, F, limits: as in the forward.
    """
    require_extension()
    check_groups(Y, G, F, limits, True, grad)
    sums = _group_rows(grad.to(Y.dtype), G, None, limits, Y.shape[2], False)
    return sums * F.unsqueeze(-1), torch.einsum("nhce,nhce->nhc", Y, sums).contiguous()


@broadcast_backward.register_fake
def _(grad, Y, G, F, limits):
    check_groups(Y, G, F, limits, True, grad, kernel_dtypes(Y))
    return Y.new_empty(Y.shape), F.new_empty(F.shape)


def _broadcast_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _broadcast_backward(ctx, grad):
    Y, G, F, limits = ctx.saved_tensors
    dY, dF = broadcast_backward(grad, Y, G, F, limits)
    return dY, None, dF, None


broadcast_forward.register_autograd(_broadcast_backward, setup_context=_broadcast_setup_context)


# the CUDA kernels: the Triton launch functions of ._triton, imported on the first call


def aggregate_forward_cuda(X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """CUDA kernel of ``attention_core::aggregate_forward``.

    ``X (N, H, L, E)``, ``G (N, H, L)``, ``F (N, H, C)``, ``limits (N, H)`` -> ``(N, H, C, E)``."""
    from . import _triton

    return _triton.aggregate_forward(X, G, F, limits)


def aggregate_backward_cuda(
    grad: Tensor, X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::aggregate_backward``.

    ``grad (N, H, C, E)`` -> ``dX (N, H, L, E)``, ``dF (N, H, C)``."""
    from . import _triton

    return _triton.aggregate_backward(grad, X, G, F, limits)


def broadcast_forward_cuda(Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """CUDA kernel of ``attention_core::broadcast_forward``.

    ``Y (N, H, C, E)``, ``G (N, H, L)``, ``F (N, H, C)``, ``limits (N, H)`` -> ``(N, H, L, E)``."""
    from . import _triton

    return _triton.broadcast_forward(Y, G, F, limits)


def broadcast_backward_cuda(
    grad: Tensor, Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::broadcast_backward``.

    ``grad (N, H, L, E)`` -> ``dY (N, H, C, E)``, ``dF (N, H, C)``."""
    from . import _triton

    return _triton.broadcast_backward(grad, Y, G, F, limits)


CUDA_KERNELS = {
    "aggregate_forward": aggregate_forward_cuda,
    "aggregate_backward": aggregate_backward_cuda,
    "broadcast_forward": broadcast_forward_cuda,
    "broadcast_backward": broadcast_backward_cuda,
}

if triton_installed():
    aggregate_forward.register_kernel("cuda")(aggregate_forward_cuda)
    aggregate_backward.register_kernel("cuda")(aggregate_backward_cuda)
    broadcast_forward.register_kernel("cuda")(broadcast_forward_cuda)
    broadcast_backward.register_kernel("cuda")(broadcast_backward_cuda)
