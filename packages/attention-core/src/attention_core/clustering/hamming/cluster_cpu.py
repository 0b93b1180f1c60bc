"""fast-transformers' ``cluster_cpu`` module over `attention_core.clustering.hamming.cluster`.

Stands in for ``fast_transformers.clustering.hamming.cluster_cpu``.

Same function name, argument order and caller-allocated outputs as fast-transformers'
compiled module. One difference: fast-transformers' kernel starts its iterations from the
content of ``centroids``; here ``centroids`` is an output only and the starting centroids are
chosen by `cluster`.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["cluster"]


def cluster(
    hashes: Tensor,
    lengths: Tensor,
    centroids: Tensor,
    clusters: Tensor,
    counts: Tensor,
    iterations: int,
    bits: int,
) -> None:
    """K-means under the Hamming distance, results written into the buffers.

    Arguments:
        hashes: ``(N, H, L)`` int64 hash codes.
        lengths: ``(N,)`` integer number of valid positions of each sequence.
        centroids: ``(N, H, C)`` int64 output buffer; its size sets the number of clusters.
        clusters: ``(N, H, L)`` int32 output buffer, the cluster of every position (``C``
            for padding).
        counts: ``(N, H, C)`` int32 output buffer, the members of every cluster.
        iterations: the number of Lloyd rounds.
        bits: how many least significant bits of the hashes to use, in ``[1, 63]``.
    """
    from . import cluster as _cluster  # here: the package imports this module (no cycle)

    _cluster(
        hashes,
        lengths,
        groups=clusters,
        counts=counts,
        centroids=centroids,
        iterations=iterations,
        bits=bits,
    )
