"""Register the Triton launch functions as the ``"cuda"`` kernels of the custom ops of
:mod:`attention_core._kernels` (imported at the end of that module; registers nothing when triton
is not installed).

The ops' autograd and fake registrations are device-independent, so CUDA tensors get the
same autograd, ``torch.compile`` and ``opcheck`` behaviour as the CPU kernels. The op
modules (which import triton) are imported on the first call, not when attention_core is.

GPU timings have not been measured (no GPU in the session that wrote these kernels).
"""

from __future__ import annotations

from torch import Tensor

from .. import _kernels
from . import installed

__all__ = [
    "aggregate_backward_cuda",
    "aggregate_forward_cuda",
    "broadcast_backward_cuda",
    "broadcast_forward_cuda",
    "causal_product_backward_cuda",
    "causal_product_forward_cuda",
    "local_dot_product_backward_cuda",
    "local_dot_product_forward_cuda",
    "local_weighted_average_backward_cuda",
    "local_weighted_average_forward_cuda",
    "sparse_dot_product_backward_cuda",
    "sparse_dot_product_forward_cuda",
    "sparse_weighted_average_backward_cuda",
    "sparse_weighted_average_forward_cuda",
]


def causal_product_forward_cuda(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    S0: Tensor | None,
    z0: Tensor | None,
    normalize: bool,
    eps: float,
    sequence_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """CUDA kernel of ``attention_core::causal_product_forward`` (shapes as there:
    ``Q, K (N, H, L, E)``, ``V (N, H, L, M)``, ``S0 (N, H, E, M)``, ``z0 (N, H, E)``; returns
    ``out (N, H, L, M)``, ``S (N, H, E, M)``, ``z (N, H, E)`` or ``(N, H, 0)``); states in the
    input dtype, as the op's fake allocates them."""
    from . import causal_product

    return causal_product.causal_product_forward(
        Q, K, V, S0, z0, normalize=normalize, eps=eps, sequence_first=sequence_first,
        state_dtype=Q.dtype,
    )  # fmt: skip


def causal_product_backward_cuda(
    grad: Tensor,
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    out: Tensor | None,
    S0: Tensor | None,
    z0: Tensor | None,
    grad_S: Tensor | None,
    grad_z: Tensor | None,
    normalize: bool,
    eps: float,
    sequence_first: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CUDA kernel of ``attention_core::causal_product_backward``: ``dQ, dK (N, H, L, E)``,
    ``dV (N, H, L, M)``, ``dS0 (N, H, E, M)``, ``dz0 (N, H, E)`` or ``(N, H, 0)``."""
    from . import causal_product

    return causal_product.causal_product_backward(
        grad, Q, K, V, out, S0, z0, grad_S, grad_z, normalize=normalize, eps=eps,
        sequence_first=sequence_first, state_dtype=Q.dtype,
    )  # fmt: skip


def local_dot_product_forward_cuda(
    Q: Tensor, K: Tensor, attn_mask: Tensor, key_lengths: Tensor, local_context: int
) -> Tensor:
    """CUDA kernel of ``attention_core::local_dot_product_forward``: ``Q (N, H, L, E)``,
    ``K (N, H, S, E)``, ``attn_mask (L, S)``, ``key_lengths (N,)`` -> ``(N, H, L, C)``."""
    from . import local_product

    return local_product.local_dot_product_forward(Q, K, attn_mask, key_lengths, local_context)


def local_dot_product_backward_cuda(
    grad: Tensor, Q: Tensor, K: Tensor, key_lengths: Tensor, local_context: int
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::local_dot_product_backward``: ``grad (N, H, L, C)``
    -> ``dQ (N, H, L, E)``, ``dK (N, H, S, E)``."""
    from . import local_product

    return local_product.local_dot_product_backward(grad, Q, K, key_lengths, local_context)


def local_weighted_average_forward_cuda(attention: Tensor, V: Tensor) -> Tensor:
    """CUDA kernel of ``attention_core::local_weighted_average_forward``:
    ``attention (N, H, L, C)``, ``V (N, H, S, D)`` -> ``(N, H, L, D)``."""
    from . import local_product

    return local_product.local_weighted_average_forward(attention, V)


def local_weighted_average_backward_cuda(
    grad: Tensor, attention: Tensor, V: Tensor
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::local_weighted_average_backward``:
    ``grad (N, H, L, D)`` -> ``dattention (N, H, L, C)``, ``dV (N, H, S, D)``."""
    from . import local_product

    return local_product.local_weighted_average_backward(grad, attention, V)


def sparse_dot_product_forward_cuda(
    Q: Tensor, K: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """CUDA kernel of ``attention_core::sparse_dot_product_forward``: ``Q (N, H, L, E)``,
    ``K (N, H, S, E)``, ``topk (N, H, L or C, k)``, ``groups (N, H, L)``, ``limits (N, H)``
    -> ``(N, H, L, k)``."""
    from . import sparse_product

    return sparse_product.sparse_dot_product_forward(Q, K, topk, groups, limits)


def sparse_dot_product_backward_cuda(
    grad: Tensor,
    Q: Tensor,
    K: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::sparse_dot_product_backward``: ``grad (N, H, L, k)``
    -> ``dQ (N, H, L, E)``, ``dK (N, H, S, E)``."""
    from . import sparse_product

    return sparse_product.sparse_dot_product_backward(grad, Q, K, topk, groups, limits)


def sparse_weighted_average_forward_cuda(
    weights: Tensor, values: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """CUDA kernel of ``attention_core::sparse_weighted_average_forward``:
    ``weights (N, H, L, k)``, ``values (N, H, S, D)`` -> ``(N, H, L, D)``."""
    from . import sparse_product

    return sparse_product.sparse_weighted_average_forward(weights, values, topk, groups, limits)


def sparse_weighted_average_backward_cuda(
    grad: Tensor,
    weights: Tensor,
    values: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::sparse_weighted_average_backward``:
    ``grad (N, H, L, D)`` -> ``dweights (N, H, L, k)``, ``dvalues (N, H, S, D)``."""
    from . import sparse_product

    return sparse_product.sparse_weighted_average_backward(
        grad, weights, values, topk, groups, limits
    )


def aggregate_forward_cuda(X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """CUDA kernel of ``attention_core::aggregate_forward``: ``X (N, H, L, E)``,
    ``G (N, H, L)``, ``F (N, H, C)``, ``limits (N, H)`` -> ``(N, H, C, E)``."""
    from . import aggregate

    return aggregate.aggregate_forward(X, G, F, limits)


def aggregate_backward_cuda(
    grad: Tensor, X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::aggregate_backward``: ``grad (N, H, C, E)`` ->
    ``dX (N, H, L, E)``, ``dF (N, H, C)``."""
    from . import aggregate

    return aggregate.aggregate_backward(grad, X, G, F, limits)


def broadcast_forward_cuda(Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """CUDA kernel of ``attention_core::broadcast_forward``: ``Y (N, H, C, E)``,
    ``G (N, H, L)``, ``F (N, H, C)``, ``limits (N, H)`` -> ``(N, H, L, E)``."""
    from . import aggregate

    return aggregate.broadcast_forward(Y, G, F, limits)


def broadcast_backward_cuda(
    grad: Tensor, Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ``attention_core::broadcast_backward``: ``grad (N, H, L, E)`` ->
    ``dY (N, H, C, E)``, ``dF (N, H, C)``."""
    from . import aggregate

    return aggregate.broadcast_backward(grad, Y, G, F, limits)


_CUDA_KERNELS = {
    "causal_product_forward": causal_product_forward_cuda,
    "causal_product_backward": causal_product_backward_cuda,
    "local_dot_product_forward": local_dot_product_forward_cuda,
    "local_dot_product_backward": local_dot_product_backward_cuda,
    "local_weighted_average_forward": local_weighted_average_forward_cuda,
    "local_weighted_average_backward": local_weighted_average_backward_cuda,
    "sparse_dot_product_forward": sparse_dot_product_forward_cuda,
    "sparse_dot_product_backward": sparse_dot_product_backward_cuda,
    "sparse_weighted_average_forward": sparse_weighted_average_forward_cuda,
    "sparse_weighted_average_backward": sparse_weighted_average_backward_cuda,
    "aggregate_forward": aggregate_forward_cuda,
    "aggregate_backward": aggregate_backward_cuda,
    "broadcast_forward": broadcast_forward_cuda,
    "broadcast_backward": broadcast_backward_cuda,
}

if installed():
    for _name, _kernel in _CUDA_KERNELS.items():
        getattr(_kernels, _name).register_kernel("cuda")(_kernel)
