"""The ``torch.library`` op ``attention_core::hamming_cluster`` and its fake (meta) registration.

Its CPU kernel is in ``csrc/hamming.h``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _extension
from ..._checks import check_index
from ..._extension import require_extension


def check_cluster_inputs(
    hashes: Tensor, lengths: Tensor, clusters: int, iterations: int, bits: int
) -> None:
    """Check the arguments of the Hamming clustering op.

    ``hashes (N, H, L)`` and ``lengths (N,)`` int64 on one device, ``clusters >= 1``,
    ``iterations >= 0`` and ``1 <= bits <= 63``."""
    if not isinstance(hashes, Tensor):
        raise TypeError(f"hashes must be a torch.Tensor; got {type(hashes).__name__}")
    if hashes.dtype != torch.int64 or hashes.dim() != 3:
        raise TypeError(
            f"hashes must be an (N, H, L) int64 tensor; got {hashes.dtype} {tuple(hashes.shape)}"
        )
    check_index("lengths", lengths, (hashes.shape[0],), hashes.device)
    for name, value, low, high in (
        ("clusters", clusters, 1, 2**31 - 1),
        ("iterations", iterations, 0, 2**31 - 1),
        ("bits", bits, 1, 63),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an int in [{low}, {high}]; got {value!r}")


def _hamming_outputs(hashes: Tensor, C: int, bits: int) -> tuple[Tensor, ...]:
    N, H, L = hashes.shape
    i32 = torch.int32
    return (
        hashes.new_empty(N, H, L, dtype=i32),
        hashes.new_empty(N, H, C, dtype=i32),
        hashes.new_empty(N, H, C, dtype=torch.int64),
        hashes.new_empty(N, H, L, dtype=i32),
        hashes.new_empty(N, H, C, bits, dtype=i32),
    )


@torch.library.custom_op("attention_core::hamming_cluster", mutates_args=(), device_types="cpu")
def hamming_cluster(
    hashes: Tensor, lengths: Tensor, clusters: int, iterations: int, bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """K-means of every sequence's hashes under the Hamming distance, with the compiled kernel.

    Lloyd iterations from deterministic initial centroids; see
    `attention_core.clustering.hamming.cluster`.

    Arguments:
        hashes: ``(N, H, L)`` int64 CPU tensor.
        lengths: ``(N,)`` int64 number of valid positions.
        clusters: ``C``.
        iterations: Lloyd rounds, ``>= 0``.
        bits: how many least significant bits count, in ``[1, 63]``.

    Returns:
        ``groups (N, H, L)`` int32 (``C`` for padding), ``counts (N, H, C)`` int32,
        ``centroids (N, H, C)`` int64, ``distances (N, H, L)`` int32 and
        ``bitcounts (N, H, C, bits)`` int32.
    """
    require_extension()
    check_cluster_inputs(hashes, lengths, clusters, iterations, bits)
    N, H, L = hashes.shape
    hashes, lengths = hashes.contiguous(), lengths.contiguous()
    outputs = _hamming_outputs(hashes, clusters, bits)
    _extension._C.hamming_cluster(
        hashes.data_ptr(), lengths.data_ptr(), *(t.data_ptr() for t in outputs),
        N, H, L, clusters, bits, iterations, torch.get_num_threads(),
    )  # fmt: skip
    return outputs


@hamming_cluster.register_fake
def _(hashes, lengths, clusters, iterations, bits):
    check_cluster_inputs(hashes, lengths, clusters, iterations, bits)
    return _hamming_outputs(hashes, clusters, bits)
