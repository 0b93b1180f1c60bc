"""Causal dot product, the core of causal linear attention.

``causal_dot_product(Q, K, V)[n, h, i] = sum_{j <= i} (Q[n, h, i] . K[n, h, j]) V[n, h, j]``

Two plain-PyTorch forms live here: :func:`causal_dot_product_reference`, the quadratic
masked product that is obviously right and serves as the test oracle, and
:func:`causal_dot_product_chunked`, which never materialises an ``L x L`` matrix (intra-chunk
masked products plus inter-chunk state passing) and is the default path.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .._checks import check_tensor

__all__ = ["causal_dot_product", "causal_dot_product_chunked", "causal_dot_product_reference"]


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


def causal_dot_product_chunked(Q: Tensor, K: Tensor, V: Tensor, chunk_size: int = 64) -> Tensor:
    """Chunked causal dot product in plain PyTorch.

    Within a chunk of ``chunk_size`` positions the masked product is computed directly;
    across chunks a running state ``sum_j K_j^T V_j`` of shape ``(E, M)`` is carried. Memory
    is ``O(L (E + M) + L / C * E * M)`` per head instead of ``O(L^2)``.

    Arguments:
        Q: ``(N, H, L, E)``.
        K: ``(N, H, L, E)``.
        V: ``(N, H, L, M)``.
        chunk_size: positions per chunk.

    Returns:
        ``(N, H, L, M)``.
    """
    _check(Q, K, V)
    L = Q.shape[2]
    C = max(1, min(chunk_size, L))
    pad = (-L) % C
    if pad:
        Q, K, V = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (Q, K, V))
    q, k, v = (rearrange(t, "n h (c i) d -> n h c i d", i=C) for t in (Q, K, V))
    causal = torch.ones(C, C, dtype=torch.bool, device=Q.device).tril()
    scores = torch.einsum("nhcie,nhcje->nhcij", q, k).masked_fill(~causal, 0)
    intra = torch.einsum("nhcij,nhcjm->nhcim", scores, v)
    chunk_states = torch.einsum("nhcje,nhcjm->nhcem", k, v)
    # state before chunk c: sum of the chunk states of chunks < c
    states = chunk_states.cumsum(dim=2) - chunk_states
    inter = torch.einsum("nhcie,nhcem->nhcim", q, states)
    out = rearrange(intra + inter, "n h c i m -> n h (c i) m")
    return out[:, :, :L]


def causal_dot_product(Q: Tensor, K: Tensor, V: Tensor) -> Tensor:
    """Compute ``out[n, h, i] = sum_{j <= i} (Q[n, h, i] . K[n, h, j]) V[n, h, j]``.

    Same name and argument order as ``fast_transformers.causal_product``. Differentiable
    with respect to all three inputs; any floating dtype.

    Arguments:
        Q: ``(N, H, L, E)`` queries.
        K: ``(N, H, L, E)`` keys.
        V: ``(N, H, L, M)`` values.

    Returns:
        ``(N, H, L, M)``.

    Example:
        >>> Q, K, V = (torch.rand(2, 4, 10, 8) for _ in range(3))
        >>> causal_dot_product(Q, K, V).shape
        torch.Size([2, 4, 10, 8])
    """
    return causal_dot_product_chunked(Q, K, V)
