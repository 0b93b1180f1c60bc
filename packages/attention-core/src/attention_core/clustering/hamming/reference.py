"""The plain-PyTorch Hamming k-means: distances from bit vectors as ``|a| + |b| - 2 a . b``,
a batched matrix product per sequence and iteration; the reference of the tests and the
fallback on every device."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hamming_cluster_reference"]


def _bits_of(codes: Tensor, bits: int) -> Tensor:
    """``(...,)`` int64 codes -> ``(..., bits)`` int64 zeros and ones, least significant first."""
    shifts = torch.arange(bits, device=codes.device)
    return (codes.unsqueeze(-1) >> shifts) & 1


def _assign(hash_bits: Tensor, centroid_bits: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every hash and the Hamming distance to it.

    Arguments:
        hash_bits: ``(N, H, L, B)`` float zeros and ones.
        centroid_bits: ``(N, H, C, B)`` float zeros and ones.

    Returns:
        ``(groups, distances)``, both ``(N, H, L)`` int64.
    """
    overlap = torch.einsum("nhlb,nhcb->nhlc", hash_bits, centroid_bits)
    distances = hash_bits.sum(-1, keepdim=True) + centroid_bits.sum(-1).unsqueeze(-2) - 2 * overlap
    distances = distances.round().long()
    nearest = distances.argmin(dim=-1)  # the first minimum: ties go to the lowest index
    return nearest, distances.gather(-1, nearest.unsqueeze(-1)).squeeze(-1)


def _tally(groups: Tensor, hash_bits: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """Members and set bits per cluster; the padding group ``clusters`` is dropped.

    Returns:
        ``counts (N, H, C)`` and ``bitcounts (N, H, C, B)``, int64.
    """
    N, H, L, B = hash_bits.shape
    counts = groups.new_zeros(N, H, clusters + 1).scatter_add_(2, groups, torch.ones_like(groups))
    index = groups.unsqueeze(-1).expand(N, H, L, B)
    bitcounts = hash_bits.new_zeros(N, H, clusters + 1, B).scatter_add_(2, index, hash_bits)
    return counts[:, :, :clusters], bitcounts[:, :, :clusters]


def hamming_cluster_reference(
    hashes: Tensor, lengths: Tensor, clusters: int, iterations: int, bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`attention_core.clustering.hamming.cluster` of checked inputs
    (``hashes (N, H, L)`` int64, ``lengths (N,)``) in plain PyTorch.

    Returns:
        ``groups (N, H, L)`` (``clusters`` for padding), ``counts (N, H, C)``,
        ``centroids (N, H, C)``, ``distances (N, H, L)`` and ``bitcounts (N, H, C, bits)``,
        all int64.
    """
    N, H, L = hashes.shape
    C, device = clusters, hashes.device
    valid = torch.arange(L, device=device) < lengths.view(N, 1, 1)  # (N, 1, L)
    hash_bits = _bits_of(hashes, bits)  # (N, H, L, B)
    hash_bits_f = hash_bits.float()
    # centroid c starts at the hash in position floor(c * length / C)
    start = torch.arange(C, device=device) * lengths.view(N, 1) // C  # (N, C)
    start = start.clamp(max=max(L - 1, 0)).view(N, 1, C, 1).expand(N, H, C, bits)
    if L:
        centroid_bits = hash_bits.gather(2, start)
    else:
        centroid_bits = hash_bits.new_zeros(N, H, C, bits)

    def assign() -> tuple[Tensor, Tensor]:
        nearest, dist = _assign(hash_bits_f, centroid_bits.float())
        return nearest.masked_fill(~valid, C), dist.masked_fill(~valid, 0)

    nearest, dist = assign()
    for _ in range(iterations):
        member_counts, set_counts = _tally(nearest, hash_bits, C)
        majority = (2 * set_counts > member_counts.unsqueeze(-1)).long()
        centroid_bits = torch.where(member_counts.unsqueeze(-1) > 0, majority, centroid_bits)
        nearest, dist = assign()
    member_counts, set_counts = _tally(nearest, hash_bits, C)

    centroids = (centroid_bits << torch.arange(bits, device=device)).sum(-1)
    return nearest, member_counts, centroids, dist, set_counts
