"""The plain-PyTorch Hamming K-means.

Distances from bit vectors as ``|a| + |b| - 2 a . b``, a batched matrix product per sequence and
iteration; the reference of the tests and the fallback on every device."""

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


def _reseed_empty(
    centroid_bits: Tensor, member_counts: Tensor, hash_bits: Tensor, dist: Tensor, valid: Tensor
) -> Tensor:
    """Give each empty cluster the hash of the position farthest from its centroid.

    Each empty cluster, in index order, takes the hash of the valid position farthest from its
    centroid (the largest of ``dist``, ties: the lowest position); the distances then drop to the
    one to that new centroid where it is closer. An empty cluster keeps its centroid when every
    position sits on a centroid (distance 0).

    Arguments:
        centroid_bits: ``(N, H, C, B)`` int64 zeros and ones.
        member_counts: ``(N, H, C)`` members per cluster.
        hash_bits: ``(N, H, L, B)`` int64 zeros and ones.
        dist: ``(N, H, L)`` distances of the last assignment.
        valid: ``(N, 1, L)`` bool, the positions before each sequence's length.

    Returns:
        The ``(N, H, C, B)`` centroid bits with the empty clusters re-seeded.
    """
    empty = member_counts == 0
    if not bool(empty.any()):
        return centroid_bits
    centroid_bits = centroid_bits.clone()
    far = dist.masked_fill(~valid, -1)
    B = hash_bits.shape[-1]
    for c in range(centroid_bits.shape[2]):
        farthest_dist, farthest = far.max(dim=-1)  # the first maximum: the lowest position
        take = empty[:, :, c] & (farthest_dist > 0)  # (N, H)
        if not bool(take.any()):
            continue
        index = farthest.view(*farthest.shape, 1, 1).expand(-1, -1, 1, B)
        taken = hash_bits.gather(2, index).squeeze(2)  # (N, H, B)
        centroid_bits[:, :, c] = torch.where(take.unsqueeze(-1), taken, centroid_bits[:, :, c])
        to_taken = (hash_bits != taken.unsqueeze(2)).sum(-1)  # (N, H, L)
        far = torch.where(take.unsqueeze(-1) & valid, torch.minimum(far, to_taken), far)
    return centroid_bits


def hamming_cluster_reference(
    hashes: Tensor, lengths: Tensor, clusters: int, iterations: int, bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Hamming K-means of checked inputs in plain PyTorch.

    Computes `attention_core.clustering.hamming.cluster` of ``hashes (N, H, L)`` int64 and
    ``lengths (N,)``.

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
        centroid_bits = _reseed_empty(centroid_bits, member_counts, hash_bits, dist, valid)
        majority = (2 * set_counts > member_counts.unsqueeze(-1)).long()
        centroid_bits = torch.where(member_counts.unsqueeze(-1) > 0, majority, centroid_bits)
        nearest, dist = assign()
    member_counts, set_counts = _tally(nearest, hash_bits, C)

    centroids = (centroid_bits << torch.arange(bits, device=device)).sum(-1)
    return nearest, member_counts, centroids, dist, set_counts
