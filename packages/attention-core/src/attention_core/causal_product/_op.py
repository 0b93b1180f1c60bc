"""The ``torch.library`` ops of the causal product: ``attention_core::causal_product_forward``
and ``causal_product_backward`` (CPU kernel in ``csrc/causal_product.h``, CUDA kernel in
:mod:`._triton`), their fake (meta) registrations and their autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._extension import (
    address,
    binding,
    new_nhl,
    nhl,
    require_extension,
    row_major,
    triton_installed,
)
from ._validation import check_causal

# Every (N, H, L, features) operand reaches the kernel as a pointer plus the element strides
# of its n, h and l dimensions, so transposed views (for example (N, L, H, E) storage seen as
# (N, H, L, E)) need no copy; only the feature dimension must be contiguous. Outputs are
# allocated heads-first, or sequence-first (an (N, L, H, .) tensor seen through a transpose)
# when ``sequence_first`` is set, which is what CausalLinearAttention wants.


@torch.library.custom_op(
    "attention_core::causal_product_forward", mutates_args=(), device_types="cpu"
)
def causal_product_forward(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    S0: Tensor | None,
    z0: Tensor | None,
    normalize: bool,
    eps: float,
    sequence_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal dot product with the compiled kernel, optionally normalised.

    Arguments:
        Q: ``(N, H, L, E)`` float32 or float64 CPU tensor (any strides).
        K: ``(N, H, L, E)``.
        V: ``(N, H, L, M)``.
        S0: ``(N, H, E, M)`` initial state ``sum_j K_j V_j^T``, or ``None`` for zeros.
        z0: ``(N, H, E)`` initial normaliser state ``sum_j K_j``, or ``None`` for zeros
            (ignored unless ``normalize``).
        normalize: divide by ``Q_i . z_i + eps`` (causal linear attention).
        eps: added to the normaliser.
        sequence_first: store the output as ``(N, L, H, M)`` (returned as its
            ``(N, H, L, M)`` transpose).

    Returns:
        ``out (N, H, L, M)``, the final state ``S (N, H, E, M)`` and, when normalising, the
        final normaliser state ``z (N, H, E)`` (``(N, H, 0)`` otherwise).
    """
    z0 = z0 if normalize else None
    require_extension()
    check_causal(Q, K, V, {"S0": S0, "z0": z0}, eps)
    return forward_kernel(Q, K, V, S0, z0, normalize, eps, sequence_first)


def forward_kernel(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    S0: Tensor | None,
    z0: Tensor | None,
    normalize: bool,
    eps: float,
    sequence_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The CPU kernel of `causal_product_forward` on arguments that the op's checks (or a
    public function's equal ones) have accepted, without the dispatcher: float32/float64 CPU
    tensors, ``z0`` ``None`` unless ``normalize``. Arguments and returns as there."""
    N, H, L, E = Q.shape
    M = V.shape[-1]
    Q, K, V = row_major(Q), row_major(K), row_major(V)
    S0 = None if S0 is None else S0.contiguous()
    z0 = None if z0 is None else z0.contiguous()
    out = new_nhl(Q, N, H, L, M, sequence_first)
    S = Q.new_empty(N, H, E, M)
    z = Q.new_empty(N, H, E if normalize else 0)
    binding("causal_product_forward", Q.dtype)(
        Q.data_ptr(), nhl(Q), K.data_ptr(), nhl(K), V.data_ptr(), nhl(V),
        out.data_ptr(), nhl(out), address(S0), address(z0), S.data_ptr(), z.data_ptr(),
        N, H, L, E, M, normalize, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out, S, z


@causal_product_forward.register_fake
def _(Q, K, V, S0, z0, normalize, eps, sequence_first):
    check_causal(Q, K, V, {"S0": S0, "z0": z0 if normalize else None}, eps)
    N, H, L, E = Q.shape
    M = V.shape[-1]
    out = new_nhl(Q, N, H, L, M, sequence_first)
    return out, Q.new_empty(N, H, E, M), Q.new_empty(N, H, E if normalize else 0)


@torch.library.custom_op(
    "attention_core::causal_product_backward", mutates_args=(), device_types="cpu"
)
def causal_product_backward(
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
    """Gradients of :func:`causal_product_forward`, recomputing the states (no per-position
    state is stored).

    Arguments:
        grad: ``(N, H, L, M)`` gradient of ``out``.
        Q, K, V, S0, z0, normalize, eps, sequence_first: as in the forward.
        out: ``(N, H, L, M)`` the forward output (needed when normalising, else ``None``).
        grad_S: ``(N, H, E, M)`` gradient of the final state, or ``None``.
        grad_z: ``(N, H, E)`` gradient of the final normaliser state, or ``None`` (ignored
            unless ``normalize``).

    Returns:
        ``dQ (N, H, L, E)``, ``dK (N, H, L, E)``, ``dV (N, H, L, M)`` (sequence-first storage
        if ``sequence_first``), ``dS0 (N, H, E, M)`` and ``dz0 (N, H, E)`` (``(N, H, 0)`` when
        not normalising).
    """
    if not normalize:  # the plain product has no normaliser state
        z0 = grad_z = None
    if normalize and out is None:
        raise ValueError("out must be the forward output when normalize is set; got None")
    require_extension()
    tensors = {"S0": S0, "z0": z0, "grad_S": grad_S, "grad_z": grad_z, "grad": grad}
    check_causal(Q, K, V, {**tensors, "out": out if normalize else None}, eps)
    N, H, L, E = Q.shape
    M = V.shape[-1]
    grad, Q, K, V = row_major(grad.to(Q.dtype)), row_major(Q), row_major(K), row_major(V)
    out = row_major(out) if normalize and out is not None else None
    S0, z0, grad_S, grad_z = (
        None if t is None else t.to(Q.dtype).contiguous() for t in (S0, z0, grad_S, grad_z)
    )
    dQ = new_nhl(Q, N, H, L, E, sequence_first)
    dK = new_nhl(Q, N, H, L, E, sequence_first)
    dV = new_nhl(Q, N, H, L, M, sequence_first)
    dS0 = Q.new_empty(N, H, E, M)
    dz0 = Q.new_empty(N, H, E if normalize else 0)
    binding("causal_product_backward", Q.dtype)(
        grad.data_ptr(), nhl(grad), Q.data_ptr(), nhl(Q), K.data_ptr(), nhl(K),
        V.data_ptr(), nhl(V), address(out), (0, 0, 0) if out is None else nhl(out),
        address(S0), address(z0), address(grad_S), address(grad_z),
        dQ.data_ptr(), nhl(dQ), dK.data_ptr(), nhl(dK), dV.data_ptr(), nhl(dV),
        dS0.data_ptr(), dz0.data_ptr(), N, H, L, E, M, normalize, eps, torch.get_num_threads(),
    )  # fmt: skip
    return dQ, dK, dV, dS0, dz0


@causal_product_backward.register_fake
def _(grad, Q, K, V, out, S0, z0, grad_S, grad_z, normalize, eps, sequence_first):
    if not normalize:
        z0 = grad_z = None
    tensors = {"S0": S0, "z0": z0, "grad_S": grad_S, "grad_z": grad_z, "grad": grad}
    check_causal(Q, K, V, {**tensors, "out": out if normalize else None}, eps)
    N, H, L, E = Q.shape
    M = V.shape[-1]
    return (
        new_nhl(Q, N, H, L, E, sequence_first),
        new_nhl(Q, N, H, L, E, sequence_first),
        new_nhl(Q, N, H, L, M, sequence_first),
        Q.new_empty(N, H, E, M),
        Q.new_empty(N, H, E if normalize else 0),
    )


def _causal_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    Q, K, V, S0, z0, normalize, eps, sequence_first = inputs
    out = output[0] if normalize else None
    ctx.save_for_backward(Q, K, V, out, S0, z0)
    ctx.options = (normalize, eps, sequence_first)


def _causal_backward(ctx, grad_out, grad_S, grad_z):
    Q, K, V, out, S0, z0 = ctx.saved_tensors
    normalize, eps, sequence_first = ctx.options
    if grad_out is None:
        grad_out = torch.zeros_like(out if out is not None else V)
    dQ, dK, dV, dS0, dz0 = causal_product_backward(
        grad_out, Q, K, V, out, S0, z0, grad_S, grad_z, normalize, eps, sequence_first
    )
    return (
        dQ,
        dK,
        dV,
        None if S0 is None else dS0,
        None if z0 is None else dz0,
        None,
        None,
        None,
    )


causal_product_forward.register_autograd(_causal_backward, setup_context=_causal_setup_context)


# the CUDA kernels: the Triton launch functions of ._triton, imported on the first call


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
    from . import _triton

    return _triton.causal_product_forward(
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
    from . import _triton

    return _triton.causal_product_backward(
        grad, Q, K, V, out, S0, z0, grad_S, grad_z, normalize=normalize, eps=eps,
        sequence_first=sequence_first, state_dtype=Q.dtype,
    )  # fmt: skip


CUDA_KERNELS = {
    "causal_product_forward": causal_product_forward_cuda,
    "causal_product_backward": causal_product_backward_cuda,
}

if triton_installed():
    causal_product_forward.register_kernel("cuda")(causal_product_forward_cuda)
    causal_product_backward.register_kernel("cuda")(causal_product_backward_cuda)
