"""``fast_transformers.aggregate.aggregate_cpu``'s functions over `attention_core.aggregate`.

fast-transformers' compiled module fills caller-allocated outputs; these functions keep its
names, argument order and buffer conventions (any device and floating dtype is accepted).
New code should call `attention_core.aggregate.aggregate` and
`broadcast`, which return their results.
"""

from __future__ import annotations

from torch import Tensor

from .._buffers import fill_buffer

__all__ = ["aggregate", "broadcast"]


def aggregate(X: Tensor, G: Tensor, F: Tensor, Y: Tensor) -> None:
    """Add ``F[n, h, c] * sum_{l : G[n, h, l] = c} X[n, h, l]`` to ``Y[n, h, c]``.

    Like fast-transformers' kernel, it accumulates: zero ``Y`` first for the plain sum.

    Arguments:
        X: ``(N, H, L, E)`` rows.
        G: ``(N, H, L)`` integer group of every row (rows outside ``[0, C)`` are ignored).
        F: ``(N, H, C)`` factor of every group.
        Y: ``(N, H, C, E)`` output buffer, added to.
    """
    from . import aggregate as _aggregate  # here: the package imports this module (no cycle)

    fill_buffer("Y", Y, _aggregate(X, G, F), accumulate=True)


def broadcast(Y: Tensor, G: Tensor, F: Tensor, X: Tensor) -> None:
    """Write ``F[n, h, g] * Y[n, h, g]`` with ``g = G[n, h, l]`` into ``X[n, h, l]``.

    Positions whose group lies outside ``[0, C)`` keep their content, as in
    fast-transformers' kernel.

    Arguments:
        Y: ``(N, H, C, E)`` one row per group.
        G: ``(N, H, L)`` integer group of every position.
        F: ``(N, H, C)`` factor of every group.
        X: ``(N, H, L, E)`` output buffer.
    """
    from . import broadcast as _broadcast  # here: the package imports this module (no cycle)

    result = _broadcast(Y, G, F)
    valid = ((G >= 0) & (Y.shape[2] > G)).unsqueeze(-1)
    fill_buffer("X", X, result, where=valid)
