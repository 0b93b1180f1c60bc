"""K-means in Hamming space, used to group queries by their hashes in clustered attention.

Reference: Vyas et al. 2020, "Fast Transformers with Clustered Attention", arXiv 2007.04825.

Each sequence ``(n, h)`` is clustered on its own with Lloyd's algorithm:

1. Initialise centroid ``c`` with the hash at position ``floor(c * length / clusters)``.
2. ``iterations`` times: assign every valid position to its nearest centroid by
   ``popcount(hash ^ centroid)`` (ties go to the lowest cluster index), then set each bit of
   a centroid when strictly more than half of its members have that bit. Each cluster left
   without members takes, in index order, the hash of the valid position farthest from its
   centroid (the largest distance of that assignment, ties go to the lowest position; the
   distances then drop to the one to the new centroid where it is closer), so two starting
   positions in one group do not leave a cluster empty for good. An empty cluster keeps its
   centroid only when every position already sits on a centroid.
3. Assign once more with the final centroids; these groups and their counts are returned.

Positions at or beyond ``lengths[n]`` are padding: they get the group index ``clusters``,
which sorts after every real cluster, and are never counted.

The plain-PyTorch form (the reference and the fallback) gets distances from bit vectors as
``|a| + |b| - 2 a . b``, a batched matrix product of ``(L, bits)`` by ``(bits, clusters)`` per
sequence and iteration. CPU tensors go to the compiled kernel of ``attention_core._C`` (popcounts
of XORs, threaded over sequences; ``csrc/hamming.h`` and the op of
`attention_core.clustering.hamming._op`) unless
``ATTENTION_CORE_FORCE_REFERENCE=1``; both give identical results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._checks import check_positive_int, check_tensor
from ..._extension import use_kernels
from . import _op
from .reference import hamming_cluster_reference

__all__ = ["cluster"]

_MAX_BITS = 63


def _check_buffer(name: str, buffer, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
    if buffer is None:
        return
    check_tensor(name, buffer, dtype=dtype, device=device)
    if tuple(buffer.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(buffer.shape)}")


def cluster(
    hashes: Tensor,
    lengths: Tensor,
    groups: Tensor | None = None,
    counts: Tensor | None = None,
    centroids: Tensor | None = None,
    distances: Tensor | None = None,
    bitcounts: Tensor | None = None,
    clusters: int = 30,
    iterations: int = 10,
    bits: int = 32,
) -> tuple[Tensor, Tensor]:
    """Cluster the hashes of every sequence with K-means under the Hamming distance.

    The optional buffers exist for compatibility with ``fast_transformers``; when given
    they are filled with the results (and ``centroids`` sets the number of clusters).
    Not differentiable (integer inputs and outputs).

    Arguments:
        hashes: ``(N, H, L)`` int64 hash codes, e.g. from
            `attention_core.hashing.compute_hashes`.
        lengths: ``(N,)`` integer number of valid positions of each sequence, in ``[0, L]``.
        groups: optional ``(N, H, L)`` int32 buffer for the cluster of every position.
        counts: optional ``(N, H, C)`` int32 buffer for the members of every cluster.
        centroids: optional ``(N, H, C)`` int64 buffer for the final centroids.
        distances: optional ``(N, H, L)`` int32 buffer for the distance of every position
            to its centroid (0 for padding).
        bitcounts: optional ``(N, H, C, bits)`` int32 buffer for how many members of each
            cluster have each bit set.
        clusters: ``C``, the number of clusters (ignored when ``centroids`` is given).
        iterations: the number of Lloyd rounds (assignment + update), ``>= 0``.
        bits: how many least significant bits of the hashes to use, in ``[1, 63]``.

    Returns:
        ``(groups, counts)``: ``(N, H, L)`` int32 cluster indices in ``[0, C)`` and ``C``
        for padding; ``(N, H, C)`` int32 member counts.

    Example:
        >>> hashes = torch.tensor([[[0b0000, 0b0001, 0b1110, 0b1111]]])
        >>> groups, counts = cluster(hashes, torch.tensor([4]), clusters=2, bits=4)
        >>> groups
        tensor([[[0, 0, 1, 1]]], dtype=torch.int32)
        >>> counts
        tensor([[[2, 2]]], dtype=torch.int32)
    """
    check_tensor("hashes", hashes, dim=3, dtype=torch.int64)
    check_tensor("lengths", lengths, dim=1, integer=True, device=hashes.device)
    N, H, L = hashes.shape
    if lengths.shape[0] != N:
        raise ValueError(f"lengths must have shape (N,) = ({N},); got {tuple(lengths.shape)}")
    if centroids is not None:
        check_tensor("centroids", centroids, dim=3)
        clusters = centroids.shape[2]
    check_positive_int("clusters", clusters)
    check_positive_int("iterations", iterations, allow_zero=True)
    check_positive_int("bits", bits)
    if bits > _MAX_BITS:
        raise ValueError(f"bits must be in [1, {_MAX_BITS}]; got {bits}")
    lengths = lengths.long()
    # the range check reads the data: skipped under torch.compile (the kernel clamps lengths)
    if (
        N
        and not torch.compiler.is_compiling()
        and (int(lengths.min()) < 0 or int(lengths.max()) > L)
    ):
        raise ValueError(
            f"lengths must lie in [0, L={L}]; got values in "
            f"[{int(lengths.min())}, {int(lengths.max())}]"
        )
    C, device = clusters, hashes.device
    for name, buffer, shape, dtype in (
        ("groups", groups, (N, H, L), torch.int32),
        ("counts", counts, (N, H, C), torch.int32),
        ("centroids", centroids, (N, H, C), torch.int64),
        ("distances", distances, (N, H, L), torch.int32),
        ("bitcounts", bitcounts, (N, H, C, bits), torch.int32),
    ):
        _check_buffer(name, buffer, shape, dtype, device)

    if hashes.device.type == "cpu" and use_kernels():
        nearest, member_counts, final, dist, set_counts = _op.hamming_cluster(
            hashes, lengths, C, iterations, bits
        )
        results = {
            "groups": (groups, nearest),
            "counts": (counts, member_counts),
            "centroids": (centroids, final),
            "distances": (distances, dist),
            "bitcounts": (bitcounts, set_counts),
        }
        for buffer, value in results.values():
            if buffer is not None:
                buffer.copy_(value)
        return (
            nearest if groups is None else groups,
            member_counts if counts is None else counts,
        )

    nearest, member_counts, final, dist, set_counts = hamming_cluster_reference(
        hashes, lengths, C, iterations, bits
    )
    results = {
        "groups": (groups, nearest),
        "counts": (counts, member_counts),
        "centroids": (centroids, final),
        "distances": (distances, dist),
        "bitcounts": (bitcounts, set_counts),
    }
    for buffer, value in results.values():
        if buffer is not None:
            buffer.copy_(value)
    groups_out = groups if groups is not None else nearest.int()
    counts_out = counts if counts is not None else member_counts.int()
    return groups_out, counts_out


from .cluster_cpu import cluster as cluster_cpu  # noqa: E402, F401  fast_transformers name
