"""The ``torch.library`` ops of the sparse and clustered sparse products.

``attention_core::sparse_dot_product_*`` and ``sparse_weighted_average_*`` (CPU kernels in
``csrc/sparse_product.h``, CUDA kernels in `._triton`), their fake (meta) registrations and their
autograd.
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
from ._validation import check_sparse_average, check_sparse_dot, contiguous_indices

# One pair of ops serves both: ``topk`` is ``(N, H, L, k)`` (a key list per query) when
# ``groups`` is None, else ``(N, H, C, k)`` (a list per cluster) and ``groups (N, H, L)``
# picks each query's cluster. ``limits (N, H)``, when given, marks queries ``l >= limits``
# (padding) as having no keys. Queries without keys (also those whose group is outside
# ``[0, C)``) get zero outputs and pass no gradient.


def _sparse_tail(topk: Tensor, groups: Tensor | None, limits: Tensor | None) -> tuple:
    """The index arguments of the bindings, from checked contiguous int64 tensors.

    The index arguments of the bindings (``topk``, its row count, ``groups``, ``limits``), from
    checked contiguous int64 tensors."""
    return (topk.data_ptr(), topk.shape[2], address(groups), address(limits))


@torch.library.custom_op(
    "attention_core::sparse_dot_product_forward", mutates_args=(), device_types="cpu"
)
def sparse_dot_product_forward(
    Q: Tensor, K: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """Dot products of every query with its selected keys, with the compiled kernel.

    Arguments:
        Q: ``(N, H, L, E)`` float32 or float64 CPU tensor (any strides).
        K: ``(N, H, S, E)``.
        topk: ``(N, H, L, k)`` int64 key indices in ``[0, S)``, or ``(N, H, C, k)`` with
            ``groups``. Not scanned before the kernel: the kernel checks each row as it reads
            it, never reads outside ``K``, and an index outside ``[0, S)`` raises
            ``ValueError`` after it.
        groups: ``(N, H, L)`` int64 cluster of every query, or ``None``.
        limits: ``(N, H)`` int64 number of valid queries, or ``None``.

    Returns:
        ``(N, H, L, k)``: ``Q_l . K_{topk[l, t]}``, zero for queries without keys.
    """
    require_extension()
    check_sparse_dot(Q, K, topk, groups, limits)
    N, H, L, E = Q.shape
    S, k = K.shape[2], topk.shape[3]
    topk, groups, limits = contiguous_indices(topk, groups, limits)
    Q, K = row_major(Q), row_major(K)
    out = Q.new_empty(N, H, L, k)
    binding("sparse_dot_product_forward", Q.dtype)(
        Q.data_ptr(), nhl(Q), K.data_ptr(), nhl(K), out.data_ptr(), nhl(out),
        *_sparse_tail(topk, groups, limits), N, H, L, S, E, k, torch.get_num_threads(),
    )  # fmt: skip
    return out


@sparse_dot_product_forward.register_fake
def _(Q, K, topk, groups, limits):
    check_sparse_dot(Q, K, topk, groups, limits, dtypes=kernel_dtypes(Q))
    N, H, L, _ = Q.shape
    return Q.new_empty(N, H, L, topk.shape[3])


@torch.library.custom_op(
    "attention_core::sparse_dot_product_backward", mutates_args=(), device_types="cpu"
)
def sparse_dot_product_backward(
    grad: Tensor,
    Q: Tensor,
    K: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Gradients of `sparse_dot_product_forward`.

    Arguments:
        grad: ``(N, H, L, k)`` gradient of the output.
        Q, K, topk, groups, limits: as in the forward.

    Returns:
        ``dQ (N, H, L, E)`` and ``dK (N, H, S, E)``.
    """
    require_extension()
    check_sparse_dot(Q, K, topk, groups, limits, grad)
    N, H, L, E = Q.shape
    S, k = K.shape[2], topk.shape[3]
    topk, groups, limits = contiguous_indices(topk, groups, limits)
    grad, Q, K = row_major(grad.to(Q.dtype)), row_major(Q), row_major(K)
    dQ = Q.new_empty(N, H, L, E)
    dK = Q.new_empty(N, H, S, E)
    binding("sparse_dot_product_backward", Q.dtype)(
        grad.data_ptr(), nhl(grad), Q.data_ptr(), nhl(Q), K.data_ptr(), nhl(K),
        dQ.data_ptr(), nhl(dQ), dK.data_ptr(), nhl(dK),
        *_sparse_tail(topk, groups, limits), N, H, L, S, E, k, torch.get_num_threads(),
    )  # fmt: skip
    return dQ, dK


@sparse_dot_product_backward.register_fake
def _(grad, Q, K, topk, groups, limits):
    check_sparse_dot(Q, K, topk, groups, limits, grad, kernel_dtypes(Q))
    return Q.new_empty(Q.shape), Q.new_empty(K.shape)


def _sparse_dot_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _sparse_dot_backward(ctx, grad):
    Q, K, topk, groups, limits = ctx.saved_tensors
    dQ, dK = sparse_dot_product_backward(grad, Q, K, topk, groups, limits)
    return dQ, dK, None, None, None


sparse_dot_product_forward.register_autograd(
    _sparse_dot_backward, setup_context=_sparse_dot_setup_context
)


@torch.library.custom_op(
    "attention_core::sparse_weighted_average_forward", mutates_args=(), device_types="cpu"
)
def sparse_weighted_average_forward(
    weights: Tensor, values: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """Weighted average of every query's selected values, with the compiled kernel.

    Arguments:
        weights: ``(N, H, L, k)`` float32 or float64 CPU tensor (any strides).
        values: ``(N, H, S, D)``.
        topk, groups, limits: as in `sparse_dot_product_forward` (an index outside
            ``[0, S)`` raises ``ValueError`` after the kernel, which skips its row).

    Returns:
        ``(N, H, L, D)``: ``sum_t weights[l, t] values_{topk[l, t]}``, zero for queries
        without keys.
    """
    require_extension()
    check_sparse_average(weights, values, topk, groups, limits)
    N, H, L, k = weights.shape
    S, D = values.shape[2], values.shape[3]
    topk, groups, limits = contiguous_indices(topk, groups, limits)
    weights, values = row_major(weights), row_major(values)
    out = values.new_empty(N, H, L, D)
    binding("sparse_weighted_average_forward", values.dtype)(
        weights.data_ptr(), nhl(weights), values.data_ptr(), nhl(values), out.data_ptr(),
        nhl(out), *_sparse_tail(topk, groups, limits), N, H, L, S, D, k,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


@sparse_weighted_average_forward.register_fake
def _(weights, values, topk, groups, limits):
    check_sparse_average(weights, values, topk, groups, limits, dtypes=kernel_dtypes(values))
    N, H, L, _ = weights.shape
    return values.new_empty(N, H, L, values.shape[3])


@torch.library.custom_op(
    "attention_core::sparse_weighted_average_backward", mutates_args=(), device_types="cpu"
)
def sparse_weighted_average_backward(
    grad: Tensor,
    weights: Tensor,
    values: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Gradients of `sparse_weighted_average_forward`.

    Arguments:
        grad: ``(N, H, L, D)`` gradient of the output.
        weights, values, topk, groups, limits: as in the forward.

    Returns:
        ``dweights (N, H, L, k)`` and ``dvalues (N, H, S, D)``.
    """
    require_extension()
    check_sparse_average(weights, values, topk, groups, limits, grad)
    N, H, L, k = weights.shape
    S, D = values.shape[2], values.shape[3]
    topk, groups, limits = contiguous_indices(topk, groups, limits)
    grad, weights, values = row_major(grad.to(values.dtype)), row_major(weights), row_major(values)
    dW = values.new_empty(N, H, L, k)
    dV = values.new_empty(N, H, S, D)
    binding("sparse_weighted_average_backward", values.dtype)(
        grad.data_ptr(), nhl(grad), weights.data_ptr(), nhl(weights), values.data_ptr(),
        nhl(values), dW.data_ptr(), nhl(dW), dV.data_ptr(), nhl(dV),
        *_sparse_tail(topk, groups, limits), N, H, L, S, D, k, torch.get_num_threads(),
    )  # fmt: skip
    return dW, dV


@sparse_weighted_average_backward.register_fake
def _(grad, weights, values, topk, groups, limits):
    check_sparse_average(weights, values, topk, groups, limits, grad, kernel_dtypes(values))
    return values.new_empty(weights.shape), values.new_empty(values.shape)


def _sparse_average_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _sparse_average_backward(ctx, grad):
    weights, values, topk, groups, limits = ctx.saved_tensors
    dW, dV = sparse_weighted_average_backward(grad, weights, values, topk, groups, limits)
    return dW, dV, None, None, None


sparse_weighted_average_forward.register_autograd(
    _sparse_average_backward, setup_context=_sparse_average_setup_context
)


# the CUDA kernels: the Triton launch functions of ._triton, imported on the first call


def sparse_dot_product_forward_cuda(
    Q: Tensor, K: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """CUDA kernel of ``attention_core::sparse_dot_product_forward``.

    ``Q (N, H, L, E)``, ``K (N, H, S, E)``, ``topk (N, H, L or C, k)``, ``groups (N, H, L)``,
    ``limits (N, H)`` -> ``(N, H, L, k)``."""
    from . import _triton

    return _triton.sparse_dot_product_forward(Q, K, topk, groups, limits)


def sparse_dot_product_backward_cuda(
    grad: Tensor,
    Q: Tensor,
    K: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::sparse_dot_product_backward``.

    ``grad (N, H, L, k)`` -> ``dQ (N, H, L, E)``, ``dK (N, H, S, E)``."""
    from . import _triton

    return _triton.sparse_dot_product_backward(grad, Q, K, topk, groups, limits)


def sparse_weighted_average_forward_cuda(
    weights: Tensor, values: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """CUDA kernel of ``attention_core::sparse_weighted_average_forward``.

    ``weights (N, H, L, k)``, ``values (N, H, S, D)`` -> ``(N, H, L, D)``."""
    from . import _triton

    return _triton.sparse_weighted_average_forward(weights, values, topk, groups, limits)


def sparse_weighted_average_backward_cuda(
    grad: Tensor,
    weights: Tensor,
    values: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::sparse_weighted_average_backward``.

    ``grad (N, H, L, D)`` -> ``dweights (N, H, L, k)``, ``dvalues (N, H, S, D)``."""
    from . import _triton

    return _triton.sparse_weighted_average_backward(grad, weights, values, topk, groups, limits)


CUDA_KERNELS = {
    "sparse_dot_product_forward": sparse_dot_product_forward_cuda,
    "sparse_dot_product_backward": sparse_dot_product_backward_cuda,
    "sparse_weighted_average_forward": sparse_weighted_average_forward_cuda,
    "sparse_weighted_average_backward": sparse_weighted_average_backward_cuda,
}

if triton_installed():
    sparse_dot_product_forward.register_kernel("cuda")(sparse_dot_product_forward_cuda)
    sparse_dot_product_backward.register_kernel("cuda")(sparse_dot_product_backward_cuda)
    sparse_weighted_average_forward.register_kernel("cuda")(sparse_weighted_average_forward_cuda)
    sparse_weighted_average_backward.register_kernel("cuda")(sparse_weighted_average_backward_cuda)
