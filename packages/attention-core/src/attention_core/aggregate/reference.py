"""The plain-PyTorch aggregate and broadcast (``scatter_add`` and ``gather``).

The reference of the tests and the fallback on every device and dtype."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["aggregate_reference", "broadcast_reference"]


def _sentinel_groups(G: Tensor, C: int) -> Tensor:
    """``G`` as int64 with every entry outside ``[0, C)`` replaced by ``C``."""
    G = G.long()
    return G.masked_fill((G < 0) | (G >= C), C)


def aggregate_reference(X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Sum the rows of each group, scaled by the group's factor, in plain PyTorch.

    ``X (N, H, L, E)``, ``G (N, H, L)``, ``F (N, H, C)``, ``limits (N, H)`` or ``None`` ->
    ``(N, H, C, E)``: ``F_c * sum_{l valid, G_l = c} X_l``."""
    N, H, L, E = X.shape
    C = F.shape[2]
    G = _sentinel_groups(G, C)
    if limits is not None:
        G = G.masked_fill(torch.arange(L, device=X.device) >= limits.unsqueeze(-1), C)
    index = G.unsqueeze(-1).expand(N, H, L, E)
    sums = X.new_zeros(N, H, C + 1, E).scatter_add(2, index, X)[:, :, :C]
    # a group without members sums to zero whatever its factor (1 / 0 = inf would give NaN)
    members = G.new_zeros(N, H, C + 1).scatter_add(2, G, torch.ones_like(G))[:, :, :C]
    return sums * F.to(X.dtype).where(members > 0, 0.0).unsqueeze(-1)


def broadcast_reference(Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Broadcast each group's row back to its positions, in plain PyTorch.

    ``Y (N, H, C, E)``, ``G (N, H, L)``, ``F (N, H, C)``, ``limits (N, H)`` or ``None`` ->
    ``(N, H, L, E)``: ``F_g Y_g`` with ``g = G_l`` for valid positions, zero elsewhere."""
    N, H, C, E = Y.shape
    L = G.shape[2]
    G = _sentinel_groups(G, C)
    if limits is not None:
        G = G.masked_fill(torch.arange(L, device=Y.device) >= limits.unsqueeze(-1), C)
    scaled = Y * F.to(Y.dtype).unsqueeze(-1)
    padded = torch.cat([scaled, scaled.new_zeros(N, H, 1, E)], dim=2)  # row C is zero
    return padded.gather(2, G.unsqueeze(-1).expand(N, H, L, E))
