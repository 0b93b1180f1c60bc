"""What the clustered attentions share: hashing, Hamming K-means and centroids.

Hash the queries with random hyperplanes, group the hashes with K-means in Hamming space, and
average each group's queries into a centroid. Reference: Vyas et al. 2020, "Fast Transformers with
Clustered Attention", arXiv 2007.04825.

Einstein notation: n batch, h heads, l queries, s keys, c clusters, e/d features.
"""

from __future__ import annotations

from math import sqrt

import torch
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_positive_int
from ..aggregate import aggregate
from ..clustering.hamming import cluster
from ..events import EventDispatcher
from ..hashing import MAX_BITS, compute_hashes
from ..masking import BaseMask

__all__ = ["ClusteredAttentionBase", "cluster_rows", "keys_allowed"]


def keys_allowed(key_lengths: BaseMask) -> Tensor | None:
    """``(N, 1, 1, S)`` boolean mask of the valid keys, or ``None`` when all are valid."""
    if key_lengths.all_ones:
        return None
    return key_lengths.bool_matrix[:, None, None, :]


def cluster_rows(x: Tensor, groups: Tensor) -> Tensor:
    """Give every query the row of its cluster: ``x[n, h, groups[n, h, l]]``.

    Arguments:
        x: ``(N, H, C, F)`` one row per cluster.
        groups: ``(N, H, L)`` int64 clusters in ``[0, C]``; the padding group ``C`` reads
            row ``C - 1`` (callers mask padding queries out).

    Returns:
        ``(N, H, L, F)``.
    """
    C, F = x.shape[2], x.shape[3]
    index = groups.clamp(max=C - 1).unsqueeze(-1).expand(-1, -1, -1, F)
    return x.gather(2, index)


class ClusteredAttentionBase(nn.Module):
    """Holds the clustering parameters and turns queries into clusters and centroids.

    Arguments:
        clusters: the number of clusters ``C`` per sequence and head.
        iterations: Lloyd iterations of the Hamming K-means.
        bits: hyperplanes per hash, in ``[1, 63]``.
        hash_bias: if ``False`` the hyperplanes pass through the origin (the Hamming
            distance then tracks the angle between queries rather than their distance).
        softmax_temp: multiplier of the dot products (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights.
        event_dispatcher: dispatcher instance or key for `AttentionEvent`.
    """

    def __init__(
        self,
        clusters,
        iterations=10,
        bits=32,
        hash_bias=True,
        softmax_temp=None,
        attention_dropout=0.1,
        event_dispatcher="",
    ):
        super().__init__()
        self.clusters = check_positive_int("clusters", clusters)
        self.iterations = check_positive_int("iterations", iterations, allow_zero=True)
        self.bits = check_positive_int("bits", bits)
        if bits > MAX_BITS:
            raise ValueError(f"bits must be in [1, {MAX_BITS}]; got {bits}")
        self.hash_bias = bool(hash_bias)
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def temperature(self, E: int) -> float:
        """The softmax temperature for head dimension ``E``."""
        return self.softmax_temp or 1.0 / sqrt(E)

    def cluster_queries(self, queries: Tensor, query_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Hash the queries with fresh random hyperplanes and cluster the hashes.

        Draws the hyperplanes from the global torch RNG, so seeding torch makes the
        clustering reproducible. Tests may replace this method to impose groups.

        Arguments:
            queries: ``(N, H, L, E)``.
            query_lengths: ``(N,)`` int64 number of valid queries per sequence.

        Returns:
            ``(groups, counts)``: ``(N, H, L)`` int64 in ``[0, C]`` (``C`` marks padding)
            and ``(N, H, C)`` int64 members per cluster.
        """
        N, H, _, E = queries.shape
        with torch.no_grad():
            x = queries.detach()
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            planes = torch.randn(self.bits, E + 1, dtype=x.dtype, device=x.device)
            if not self.hash_bias:
                planes[:, -1] = 0
            hashes = compute_hashes(rearrange(x, "n h l e -> (n h l) e"), planes)
            groups, counts = cluster(
                rearrange(hashes, "(n h l) -> n h l", n=N, h=H),
                query_lengths,
                clusters=self.clusters,
                iterations=self.iterations,
                bits=self.bits,
            )
        return groups.long(), counts.long()

    @staticmethod
    def centroids(queries: Tensor, groups: Tensor, counts: Tensor) -> Tensor:
        """The mean query of every cluster (zero for an empty cluster).

        Arguments:
            queries: ``(N, H, L, E)``.
            groups: ``(N, H, L)`` clusters in ``[0, C]`` (``C`` = padding, ignored).
            counts: ``(N, H, C)`` members per cluster.

        Returns:
            ``(N, H, C, E)``, differentiable in ``queries``.
        """
        return aggregate(queries, groups, 1.0 / counts.clamp(min=1).to(queries.dtype))
