"""The ``torch.library`` ops of causal linear attention with the default feature map
``elu(x) + 1`` applied inside the CPU kernel: ``attention_core::elu_causal_linear_attention``
and ``attention_core::elu_causal_linear_attention_backward`` (``csrc/causal_packed.h`` and
``csrc/causal_chunked.h`` apply the map while they copy each chunk of rows, and its gradient
when they write dQ and dK), their fake registrations and their autograd.

One pass over the inputs instead of four (two feature maps, their copies, the product), and
no feature-mapped copy of Q and K is stored for the backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._extension import binding, new_nhl, nhl, require_extension, row_major
from ._validation import check_causal


@torch.library.custom_op(
    "attention_core::elu_causal_linear_attention", mutates_args=(), device_types="cpu"
)
def elu_causal_linear_attention(
    Q: Tensor, K: Tensor, V: Tensor, eps: float, sequence_first: bool
) -> Tensor:
    """``normalized_causal_dot_product(elu(Q) + 1, elu(K) + 1, V, eps)`` with the compiled
    kernel, the feature map applied in the kernel.

    Arguments:
        Q: ``(N, H, L, E)`` float32 or float64 CPU tensor (any strides): the queries before
            the feature map.
        K: ``(N, H, L, E)``: the keys before the feature map.
        V: ``(N, H, L, M)``.
        eps: added to the normaliser.
        sequence_first: store the output as ``(N, L, H, M)`` (returned as its
            ``(N, H, L, M)`` transpose).

    Returns:
        ``(N, H, L, M)``.
    """
    require_extension()
    check_causal(Q, K, V, {}, eps)
    return elu_forward_kernel(Q, K, V, eps, sequence_first)


def elu_forward_kernel(Q: Tensor, K: Tensor, V: Tensor, eps: float, sequence_first: bool) -> Tensor:
    """The CPU kernel of `elu_causal_linear_attention` on arguments that the op's checks (or
    a public function's equal ones) have accepted, without the dispatcher: float32/float64
    CPU tensors ``Q, K (N, H, L, E)``, ``V (N, H, L, M)``; returns ``(N, H, L, M)``."""
    N, H, L, E = Q.shape
    M = V.shape[-1]
    Q, K, V = row_major(Q), row_major(K), row_major(V)
    out = new_nhl(Q, N, H, L, M, sequence_first)
    S, z = Q.new_empty(N, H, E, M), Q.new_empty(N, H, E)  # final states, not returned
    binding("causal_product_forward", Q.dtype)(
        Q.data_ptr(), nhl(Q), K.data_ptr(), nhl(K), V.data_ptr(), nhl(V),
        out.data_ptr(), nhl(out), 0, 0, S.data_ptr(), z.data_ptr(),
        N, H, L, E, M, True, eps, torch.get_num_threads(), True,
    )  # fmt: skip
    return out


@elu_causal_linear_attention.register_fake
def _(Q, K, V, eps, sequence_first):
    check_causal(Q, K, V, {}, eps)
    N, H, L, _ = Q.shape
    return new_nhl(Q, N, H, L, V.shape[-1], sequence_first)


@torch.library.custom_op(
    "attention_core::elu_causal_linear_attention_backward", mutates_args=(), device_types="cpu"
)
def elu_causal_linear_attention_backward(
    grad: Tensor, Q: Tensor, K: Tensor, V: Tensor, out: Tensor, eps: float, sequence_first: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`elu_causal_linear_attention` with respect to ``Q``, ``K``
    (the inputs of the feature map) and ``V``, recomputing the states.

    Arguments:
        grad: ``(N, H, L, M)`` gradient of the output.
        Q, K, V, eps, sequence_first: as in the forward.
        out: ``(N, H, L, M)`` the forward output.

    Returns:
        ``dQ (N, H, L, E)``, ``dK (N, H, L, E)``, ``dV (N, H, L, M)`` (sequence-first storage
        if ``sequence_first``).
    """
    require_extension()
    check_causal(Q, K, V, {"grad": grad, "out": out}, eps)
    N, H, L, E = Q.shape
    M = V.shape[-1]
    grad, Q, K, V = row_major(grad.to(Q.dtype)), row_major(Q), row_major(K), row_major(V)
    out = row_major(out)
    dQ = new_nhl(Q, N, H, L, E, sequence_first)
    dK = new_nhl(Q, N, H, L, E, sequence_first)
    dV = new_nhl(Q, N, H, L, M, sequence_first)
    dS0, dz0 = Q.new_empty(N, H, E, M), Q.new_empty(N, H, E)  # not returned
    binding("causal_product_backward", Q.dtype)(
        grad.data_ptr(), nhl(grad), Q.data_ptr(), nhl(Q), K.data_ptr(), nhl(K),
        V.data_ptr(), nhl(V), out.data_ptr(), nhl(out), 0, 0, 0, 0,
        dQ.data_ptr(), nhl(dQ), dK.data_ptr(), nhl(dK), dV.data_ptr(), nhl(dV),
        dS0.data_ptr(), dz0.data_ptr(), N, H, L, E, M, True, eps, torch.get_num_threads(), True,
    )  # fmt: skip
    return dQ, dK, dV


@elu_causal_linear_attention_backward.register_fake
def _(grad, Q, K, V, out, eps, sequence_first):
    check_causal(Q, K, V, {"grad": grad, "out": out}, eps)
    N, H, L, E = Q.shape
    M = V.shape[-1]
    return (
        new_nhl(Q, N, H, L, E, sequence_first),
        new_nhl(Q, N, H, L, E, sequence_first),
        new_nhl(Q, N, H, L, M, sequence_first),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    Q, K, V, eps, sequence_first = inputs
    ctx.save_for_backward(Q, K, V, output)
    ctx.options = (eps, sequence_first)


def _backward(ctx, grad):
    Q, K, V, out = ctx.saved_tensors
    eps, sequence_first = ctx.options
    dQ, dK, dV = elu_causal_linear_attention_backward(grad, Q, K, V, out, eps, sequence_first)
    return dQ, dK, dV, None, None


elu_causal_linear_attention.register_autograd(_backward, setup_context=_setup_context)
