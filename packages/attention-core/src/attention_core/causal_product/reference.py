"""This module holds the plain-PyTorch forms of the causal product.

They are the quadratic reference (the tests' oracle), the chunked form (the fallback on every
device and dtype) and the normalised chunked form of causal linear attention; the module also
holds the input checks of the public functions.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .._checks import check_positive_int, check_tensor

__all__ = [
    "causal_dot_product_chunked",
    "causal_dot_product_reference",
    "check_inputs",
    "check_state",
    "chunked_product",
    "compute_dtype",
    "normalized_chunked_product",
]

_HALF = (torch.float16, torch.bfloat16)


def check_inputs(Q: Tensor, K: Tensor, V: Tensor) -> None:
    """``Q, K (N, H, L, E)`` and ``V (N, H, L, M)`` floating tensors of one dtype and device."""
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed (and their states kept) in float32."""
    return torch.float32 if dtype in _HALF else dtype


def check_state(
    name: str, state: Tensor | None, shape: tuple[int, ...], Q: Tensor
) -> Tensor | None:
    """``state`` validated and cast to the compute dtype, or ``None``."""
    if state is None:
        return None
    check_tensor(name, state, floating=True, device=Q.device)
    if tuple(state.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(state.shape)}")
    allowed = (Q.dtype, compute_dtype(Q.dtype))
    if state.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {allowed[-1]}; got {state.dtype}")
    return state.to(allowed[-1])


def causal_dot_product_reference(Q: Tensor, K: Tensor, V: Tensor) -> Tensor:
    """Quadratic reference: ``tril(Q K^T) V``.

    Arguments:
        Q: ``(N, H, L, E)`` queries (already mapped by the feature map).
        K: ``(N, H, L, E)`` keys.
        V: ``(N, H, L, M)`` values.

    Returns:
        ``(N, H, L, M)``.
    """
    check_inputs(Q, K, V)
    scores = torch.einsum("nhle,nhse->nhls", Q, K).tril()
    return torch.einsum("nhls,nhsm->nhlm", scores, V)


def chunked_product(
    Q: Tensor, K: Tensor, V: Tensor, chunk_size: int, S0: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Compute the chunked numerator of the causal product and its final state.

    Returns:
        The numerator ``(N, H, L, M)`` of checked ``Q, K (N, H, L, E)`` and
        ``V (N, H, L, M)``, and the final state ``S0 + sum_j K_j V_j^T`` ``(N, H, E, M)``.
    """
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
    check_inputs(Q, K, V)
    check_positive_int("chunk_size", chunk_size)
    N, H, _, E = Q.shape
    S0 = check_state("state", state, (N, H, E, V.shape[-1]), Q)
    out, S = chunked_product(Q, K, V, chunk_size, None if S0 is None else S0.to(Q.dtype))
    return (out, S) if return_state else out


def normalized_chunked_product(
    Q: Tensor, K: Tensor, V: Tensor, eps: float, S0: Tensor | None, z0: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Compute causal linear attention of checked, feature-mapped inputs in plain PyTorch.

    Returns:
        For ``Q, K (N, H, L, E)`` and ``V (N, H, L, M)``: the output ``(N, H, L, M)`` and the
        final states ``S (N, H, E, M)`` and ``z (N, H, E)``.
    """
    N, H, L, E = Q.shape
    numerator, S = chunked_product(Q, K, V, 64, S0)
    prefix = K.cumsum(dim=2)
    if z0 is not None:
        prefix = prefix + z0[:, :, None]
    z = prefix[:, :, -1] if L else (Q.new_zeros(N, H, E) if z0 is None else z0.clone())
    denominator = torch.einsum("nhle,nhle->nhl", Q, prefix) + eps
    return numerator / denominator[..., None], S, z
