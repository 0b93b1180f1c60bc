"""The causal dot product is the core of causal linear attention.

Causal linear attention is from Katharopoulos et al. 2020, "Transformers are RNNs" (arXiv
2006.16236).

``causal_dot_product(Q, K, V)[n, h, i] = sum_{j <= i} (Q[n, h, i] . K[n, h, j]) V[n, h, j]``

Four implementations sit behind the public functions:

- `causal_dot_product_reference`, the quadratic masked product: obviously right, the
  test oracle;
- `causal_dot_product_chunked`, plain PyTorch that never materialises an ``L x L``
  matrix (intra-chunk masked products plus inter-chunk state passing): the fallback on every
  device and dtype;
- the compiled CPU kernel of ``attention_core._C`` (``csrc/causal_product.h``, registered as
  the ``torch.library`` ops of `attention_core.causal_product._op`): a
  fused per-token recurrence over a state that stays in cache, threaded over batch x heads
  with ``torch.get_num_threads()`` threads, whose backward recomputes the states instead of
  storing them. Used for float32/float64 CPU tensors (half precision is computed in float32)
  unless ``ATTENTION_CORE_FORCE_REFERENCE=1``. When autograd records nothing (no input
  requires grad, or grad mode is off) and nothing is being compiled, the public functions,
  having checked every argument, call the kernel without going through the dispatcher;
  otherwise they call the registered op;
- a chunked Triton kernel for float32 (and half-precision, computed in float32) CUDA tensors
  when triton is importable (`attention_core.causal_product._triton`, registered as the
  ops' ``"cuda"`` kernels); float64 CUDA tensors take the chunked plain-PyTorch form.

`normalized_causal_dot_product` adds the normaliser of causal linear attention in the
same pass, and `elu_normalized_causal_dot_product` also the default feature map
``elu(x) + 1`` (inside the CPU kernel; the whole ``CausalLinearAttention`` layer with its
default feature map is this one call).
Both take and return the running state (``S = sum_j K_j V_j^T`` and
``z = sum_j K_j``), so a prompt can be processed in one parallel call and then continued
token by token, or chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, overload

import torch
from torch import Tensor

from .._extension import needs_graph, use_kernels
from . import _fused, _op
from .reference import (
    causal_dot_product_chunked,
    causal_dot_product_reference,
    check_inputs,
    check_state,
    chunked_product,
    compute_dtype,
    normalized_chunked_product,
)

__all__ = [
    "causal_dot_product",
    "causal_dot_product_chunked",
    "causal_dot_product_reference",
    "elu_normalized_causal_dot_product",
    "normalized_causal_dot_product",
]


def _direct(
    kernel: Callable[..., Any], Q: Tensor, *tensors: Tensor | None
) -> Callable[..., Any] | None:
    """``kernel`` when a checked call on CPU tensors may skip the registered op (no autograd
    recording, no ``torch.compile``: see `needs_graph`), else ``None``."""
    if Q.device.type != "cpu" or needs_graph(Q, *tensors):
        return None
    return kernel


def _check_eps(eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite non-negative number; got {eps!r}")


@overload
def causal_dot_product(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    *,
    state: Tensor | None = ...,
    return_state: Literal[False] = ...,
) -> Tensor: ...
@overload
def causal_dot_product(
    Q: Tensor, K: Tensor, V: Tensor, *, state: Tensor | None = ..., return_state: Literal[True]
) -> tuple[Tensor, Tensor]: ...
@overload
def causal_dot_product(
    Q: Tensor, K: Tensor, V: Tensor, *, state: Tensor | None = ..., return_state: bool
) -> Tensor | tuple[Tensor, Tensor]: ...


def causal_dot_product(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    *,
    state: Tensor | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Compute ``out[n, h, i] = sum_{j <= i} (Q[n, h, i] . K[n, h, j]) V[n, h, j]``.

    Same name and argument order as ``fast_transformers.causal_product``. Differentiable
    with respect to all inputs (the state included); any floating dtype (float16/bfloat16
    are computed in float32 and the result cast back). Float32/float64 CPU tensors use the
    compiled kernel.

    Arguments:
        Q: ``(N, H, L, E)`` queries.
        K: ``(N, H, L, E)`` keys.
        V: ``(N, H, L, M)`` values.
        state: ``(N, H, E, M)`` ``sum_j K_j V_j^T`` over earlier positions, added to every
            position's state (default: none).
        return_state: also return the final state (float32 for half-precision inputs).

    Returns:
        ``(N, H, L, M)`` contiguous, and the ``(N, H, E, M)`` final state if
        ``return_state``.

    Example:
        >>> Q, K, V = (torch.rand(2, 4, 10, 8) for _ in range(3))
        >>> causal_dot_product(Q, K, V).shape
        torch.Size([2, 4, 10, 8])
        >>> first, S = causal_dot_product(
        ...     Q[:, :, :6], K[:, :, :6], V[:, :, :6], return_state=True)
        >>> rest = causal_dot_product(Q[:, :, 6:], K[:, :, 6:], V[:, :, 6:], state=S)
        >>> torch.allclose(
        ...     torch.cat([first, rest], 2), causal_dot_product(Q, K, V), atol=1e-5)
        True
    """
    check_inputs(Q, K, V)
    N, H, _, E = Q.shape
    S0 = check_state("state", state, (N, H, E, V.shape[-1]), Q)
    dtype, work = Q.dtype, compute_dtype(Q.dtype)
    Q, K, V = Q.to(work), K.to(work), V.to(work)
    if use_kernels(Q, K, V, triton=True):
        op = _direct(_op.forward_kernel, Q, K, V, S0) or _op.causal_product_forward
        out, S, _ = op(Q, K, V, S0, None, False, 0.0, False)
    else:
        out, S = chunked_product(Q, K, V, 64, S0)
    out = out.to(dtype)
    return (out, S) if return_state else out


@overload
def normalized_causal_dot_product(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    eps: float = ...,
    *,
    state: tuple[Tensor, Tensor] | None = ...,
    return_state: Literal[False] = ...,
) -> Tensor: ...
@overload
def normalized_causal_dot_product(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    eps: float = ...,
    *,
    state: tuple[Tensor, Tensor] | None = ...,
    return_state: Literal[True],
) -> tuple[Tensor, tuple[Tensor, Tensor]]: ...
@overload
def normalized_causal_dot_product(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    eps: float = ...,
    *,
    state: tuple[Tensor, Tensor] | None = ...,
    return_state: bool,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]: ...


def normalized_causal_dot_product(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    eps: float = 1e-6,
    *,
    state: tuple[Tensor, Tensor] | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
    """Compute causal linear attention of already feature-mapped queries and keys in one pass.

    ``out[n, h, i] = causal_dot_product(Q, K, V)[n, h, i] / (Q[n, h, i] . z_i + eps)`` with
    ``z_i = sum_{j <= i} K[n, h, j]``.

    The result is stored like ``Q``: when ``Q`` is the ``(N, H, L, E)`` transpose of an
    ``(N, L, H, E)`` tensor (the attention layout), the result is the transpose of an
    ``(N, L, H, M)`` tensor, so transposing it back costs no copy. Differentiable with respect
    to all inputs (the state included); half precision is computed in float32.

    Arguments:
        Q: ``(N, H, L, E)`` feature-mapped queries.
        K: ``(N, H, L, E)`` feature-mapped keys.
        V: ``(N, H, L, M)`` values.
        eps: added to the normaliser.
        state: ``(S, z)`` of earlier positions: ``S = sum_j K_j V_j^T`` ``(N, H, E, M)`` and
            ``z = sum_j K_j`` ``(N, H, E)`` (default: none).
        return_state: also return the final ``(S, z)`` (float32 for half-precision inputs).

    Returns:
        ``(N, H, L, M)``, and the final ``(S, z)`` if ``return_state``.

    Example:
        >>> Q, K, V = (torch.rand(1, 2, 7, 4) for _ in range(3))
        >>> normalized_causal_dot_product(Q, K, V).shape
        torch.Size([1, 2, 7, 4])
    """
    check_inputs(Q, K, V)
    _check_eps(eps)
    N, H, _, E = Q.shape
    M = V.shape[-1]
    S0 = z0 = None
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"state must be a pair (S, z); got {type(state).__name__}")
        S0 = check_state("state[0] (S)", state[0], (N, H, E, M), Q)
        z0 = check_state("state[1] (z)", state[1], (N, H, E), Q)
    dtype, work = Q.dtype, compute_dtype(Q.dtype)
    Q, K, V = Q.to(work), K.to(work), V.to(work)
    if use_kernels(Q, K, V, triton=True):
        sequence_first = Q.stride(1) < Q.stride(2)
        op = _direct(_op.forward_kernel, Q, K, V, S0, z0) or _op.causal_product_forward
        out, S, z = op(Q, K, V, S0, z0, True, float(eps), sequence_first)
    else:
        out, S, z = normalized_chunked_product(Q, K, V, eps, S0, z0)
    out = out.to(dtype)
    return (out, (S, z)) if return_state else out


def elu_normalized_causal_dot_product(Q: Tensor, K: Tensor, V: Tensor, eps: float = 1e-6) -> Tensor:
    """Compute causal linear attention with the default feature map ``phi(x) = elu(x) + 1``.

    The result is ``normalized_causal_dot_product(phi(Q), phi(K), V, eps)``, computed in one
    pass.

    For float32/float64 CPU tensors the compiled kernel applies ``phi`` while it reads each
    chunk of rows (op ``attention_core::elu_causal_linear_attention``), so neither feature-
    mapped copy is made nor stored for the backward pass; elsewhere ``phi`` is applied first
    and `normalized_causal_dot_product` runs. The result is stored like ``Q`` (see
    there). Differentiable with respect to ``Q``, ``K`` and ``V``.

    Arguments:
        Q: ``(N, H, L, E)`` queries, before the feature map.
        K: ``(N, H, L, E)`` keys, before the feature map.
        V: ``(N, H, L, M)`` values.
        eps: added to the normaliser.

    Returns:
        ``(N, H, L, M)``.

    Example:
        >>> Q, K, V = (torch.randn(1, 2, 7, 4) for _ in range(3))
        >>> phi = lambda x: torch.nn.functional.elu(x) + 1
        >>> out = elu_normalized_causal_dot_product(Q, K, V)
        >>> torch.allclose(
        ...     out, normalized_causal_dot_product(phi(Q), phi(K), V), atol=1e-5)
        True
    """
    check_inputs(Q, K, V)
    _check_eps(eps)
    if use_kernels(Q, K, V):
        sequence_first = Q.stride(1) < Q.stride(2)
        op = _direct(_fused.elu_forward_kernel, Q, K, V) or _fused.elu_causal_linear_attention
        return op(Q, K, V, float(eps), sequence_first)
    phi = torch.nn.functional.elu
    return normalized_causal_dot_product(phi(Q) + 1, phi(K) + 1, V, eps)
