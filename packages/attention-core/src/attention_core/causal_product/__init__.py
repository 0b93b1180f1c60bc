"""Causal dot product, the core of causal linear attention (Katharopoulos et al. 2020,
"Transformers are RNNs", arXiv 2006.16236).

``causal_dot_product(Q, K, V)[n, h, i] = sum_{j <= i} (Q[n, h, i] . K[n, h, j]) V[n, h, j]``

Four implementations sit behind the public functions:

- :func:`causal_dot_product_reference`, the quadratic masked product: obviously right, the
  test oracle;
- :func:`causal_dot_product_chunked`, plain PyTorch that never materialises an ``L x L``
  matrix (intra-chunk masked products plus inter-chunk state passing): the fallback on every
  device and dtype;
- the compiled CPU kernel of ``attention_core._C`` (see :mod:`attention_core._kernels`): a
  fused per-token recurrence over a state that stays in cache, threaded over batch x heads
  with ``torch.get_num_threads()`` threads, whose backward recomputes the states instead of
  storing them. Used for float32/float64 CPU tensors (half precision is computed in float32)
  unless ``ATTENTION_CORE_FORCE_REFERENCE=1``;
- a chunked Triton kernel for float32 (and half-precision, computed in float32) CUDA tensors
  when triton is importable (:mod:`attention_core._triton.causal_product`, registered as the
  ops' ``"cuda"`` kernels); float64 CUDA tensors take the chunked plain-PyTorch form.

:func:`normalized_causal_dot_product` adds the normaliser of causal linear attention in the
same pass. Both take and return the running state (``S = sum_j K_j V_j^T`` and
``z = sum_j K_j``), so a prompt can be processed in one parallel call and then continued
token by token, or chunk by chunk.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .. import _kernels
from .._checks import check_positive_int, check_tensor

__all__ = [
    "causal_dot_product",
    "causal_dot_product_chunked",
    "causal_dot_product_reference",
    "normalized_causal_dot_product",
]

_HALF = (torch.float16, torch.bfloat16)


def _check(Q: Tensor, K: Tensor, V: Tensor) -> None:
    check_tensor("Q", Q, dim=4, floating=True)
    check_tensor("K", K, dim=4, floating=True)
    check_tensor("V", V, dim=4, floating=True)
    if Q.shape != K.shape:
        raise ValueError(
            f"Q and K must have the same shape (N, H, L, E); got {tuple(Q.shape)} and "
            f"{tuple(K.shape)}"
        )
    if V.shape[:3] != Q.shape[:3]:
        raise ValueError(
            f"V must have shape (N, H, L, M) with (N, H, L) = {tuple(Q.shape[:3])}; "
            f"got {tuple(V.shape)}"
        )
    if not (Q.dtype == K.dtype == V.dtype):
        raise TypeError(f"Q, K and V must share a dtype; got {Q.dtype}, {K.dtype}, {V.dtype}")
    if not (Q.device == K.device == V.device):
        raise ValueError(
            f"Q, K and V must be on one device; got {Q.device}, {K.device}, {V.device}"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed (and their states kept) in float32."""
    return torch.float32 if dtype in _HALF else dtype


def _check_state(name: str, state, shape: tuple[int, ...], Q: Tensor) -> Tensor | None:
    """``state`` validated and cast to the compute dtype, or ``None``."""
    if state is None:
        return None
    check_tensor(name, state, floating=True, device=Q.device)
    if tuple(state.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(state.shape)}")
    allowed = (Q.dtype, _compute_dtype(Q.dtype))
    if state.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {allowed[-1]}; got {state.dtype}")
    return state.to(allowed[-1])


# ---------------------------------------------------------------------------------------
# plain-PyTorch forms
# ---------------------------------------------------------------------------------------


def causal_dot_product_reference(Q: Tensor, K: Tensor, V: Tensor) -> Tensor:
    """Quadratic reference: ``tril(Q K^T) V``.

    Arguments:
        Q: ``(N, H, L, E)`` queries (already mapped by the feature map).
        K: ``(N, H, L, E)`` keys.
        V: ``(N, H, L, M)`` values.

    Returns:
        ``(N, H, L, M)``.
    """
    _check(Q, K, V)
    scores = torch.einsum("nhle,nhse->nhls", Q, K).tril()
    return torch.einsum("nhls,nhsm->nhlm", scores, V)


def _chunked(Q: Tensor, K: Tensor, V: Tensor, chunk_size: int, S0: Tensor | None):
    """The chunked numerator and the final state ``S0 + sum_j K_j V_j^T``."""
    N, H, L, E = Q.shape
    M = V.shape[-1]
    if L == 0:
        S = Q.new_zeros(N, H, E, M) if S0 is None else S0.clone()
        return Q.new_zeros(N, H, 0, M), S
    C = max(1, min(chunk_size, L))
    pad = (-L) % C
    if pad:
        Q, K, V = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (Q, K, V))
    q, k, v = (rearrange(t, "n h (c i) d -> n h c i d", i=C) for t in (Q, K, V))
    causal = torch.ones(C, C, dtype=torch.bool, device=Q.device).tril()
    scores = torch.einsum("nhcie,nhcje->nhcij", q, k).masked_fill(~causal, 0)
    intra = torch.einsum("nhcij,nhcjm->nhcim", scores, v)
    chunk_states = torch.einsum("nhcje,nhcjm->nhcem", k, v)
    # state before chunk c: S0 plus the chunk states of chunks < c
    totals = chunk_states.cumsum(dim=2)
    states = totals - chunk_states
    final = totals[:, :, -1]
    if S0 is not None:
        states = states + S0[:, :, None]
        final = final + S0
    inter = torch.einsum("nhcie,nhcem->nhcim", q, states)
    out = rearrange(intra + inter, "n h c i m -> n h (c i) m")
    return out[:, :, :L], final


def causal_dot_product_chunked(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    chunk_size: int = 64,
    *,
    state: Tensor | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked causal dot product in plain PyTorch.

    Within a chunk of ``chunk_size`` positions the masked product is computed directly;
    across chunks a running state ``sum_j K_j^T V_j`` of shape ``(E, M)`` is carried. Memory
    is ``O(L (E + M) + L / C * E * M)`` per head instead of ``O(L^2)``.

    Arguments:
        Q: ``(N, H, L, E)``.
        K: ``(N, H, L, E)``.
        V: ``(N, H, L, M)``.
        chunk_size: positions per chunk.
        state: ``(N, H, E, M)`` state of the positions before these (default: none).
        return_state: also return the final state.

    Returns:
        ``(N, H, L, M)``, and the ``(N, H, E, M)`` final state if ``return_state``.
    """
    _check(Q, K, V)
    check_positive_int("chunk_size", chunk_size)
    N, H, _, E = Q.shape
    S0 = _check_state("state", state, (N, H, E, V.shape[-1]), Q)
    out, S = _chunked(Q, K, V, chunk_size, None if S0 is None else S0.to(Q.dtype))
    return (out, S) if return_state else out


# ---------------------------------------------------------------------------------------
# public functions: kernel or chunked form
# ---------------------------------------------------------------------------------------


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
        >>> first, S = causal_dot_product(Q[:, :, :6], K[:, :, :6], V[:, :, :6], return_state=True)
        >>> rest = causal_dot_product(Q[:, :, 6:], K[:, :, 6:], V[:, :, 6:], state=S)
        >>> torch.allclose(torch.cat([first, rest], 2), causal_dot_product(Q, K, V), atol=1e-5)
        True
    """
    _check(Q, K, V)
    N, H, _, E = Q.shape
    S0 = _check_state("state", state, (N, H, E, V.shape[-1]), Q)
    dtype, work = Q.dtype, _compute_dtype(Q.dtype)
    Q, K, V = Q.to(work), K.to(work), V.to(work)
    if _kernels.use_kernels(Q, K, V, triton=True):
        out, S, _ = _kernels.causal_product_forward(Q, K, V, S0, None, False, 0.0, False)
    else:
        out, S = _chunked(Q, K, V, 64, S0)
    out = out.to(dtype)
    return (out, S) if return_state else out


def normalized_causal_dot_product(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    eps: float = 1e-6,
    *,
    state: tuple[Tensor, Tensor] | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
    """Causal linear attention of already feature-mapped queries and keys, in one pass:

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
    _check(Q, K, V)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number; got {eps!r}")
    N, H, L, E = Q.shape
    M = V.shape[-1]
    S0 = z0 = None
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"state must be a pair (S, z); got {type(state).__name__}")
        S0 = _check_state("state[0] (S)", state[0], (N, H, E, M), Q)
        z0 = _check_state("state[1] (z)", state[1], (N, H, E), Q)
    dtype, work = Q.dtype, _compute_dtype(Q.dtype)
    Q, K, V = Q.to(work), K.to(work), V.to(work)
    if _kernels.use_kernels(Q, K, V, triton=True):
        sequence_first = Q.stride(1) < Q.stride(2)
        out, S, z = _kernels.causal_product_forward(
            Q, K, V, S0, z0, True, float(eps), sequence_first
        )
    else:
        numerator, S = _chunked(Q, K, V, 64, S0)
        prefix = K.cumsum(dim=2)
        if z0 is not None:
            prefix = prefix + z0[:, :, None]
        z = prefix[:, :, -1] if L else (Q.new_zeros(N, H, E) if z0 is None else z0.clone())
        denominator = torch.einsum("nhle,nhle->nhl", Q, prefix) + eps
        out = numerator / denominator[..., None]
    out = out.to(dtype)
    return (out, (S, z)) if return_state else out
