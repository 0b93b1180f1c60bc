"""Per-call tables shared by every layer: the static window masks, the position biases and
the rotary angles of the token self-attention (Block-Recurrent Transformer, Hutchins et al.
2022, arXiv 2203.07852).

They depend only on the block width, the look-back and the compressed slots, never on the
tokens, so they are built once for a whole block and sliced for calls that cover only some
rows of one block (generation). During generation the same :class:`CallContext` tables are
reused from step to step.

Einstein notation: ``h`` heads, ``i`` query rows, ``j`` key slots, ``r`` rotated features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import PositionEncoding
from .blocks import BlockGeometry, token_mask, unseen_slots

__all__ = ["CallContext", "WindowTables"]


@dataclass
class WindowTables:
    """What the token self-attention of a block needs besides the tokens.

    Attributes:
        mask: ``(1, 1, i, j)`` bool, ``True`` = may attend (static part only).
        bias: ``(1, H, i, j)`` position bias or ``None``.
        query_angles: ``(i, r)`` rotary angles of the query rows or ``None``.
        key_angles: ``(j, r)`` rotary angles of the key slots or ``None``.
    """

    mask: Tensor
    bias: Tensor | None
    query_angles: Tensor | None
    key_angles: Tensor | None

    def rows(
        self, start: int, stop: int, slots: int, *, skip: int = 0, keep: int = 0
    ) -> WindowTables:
        """The tables of query rows ``[start, stop)`` over the first ``slots`` key slots,
        leaving out the ``skip`` slots that follow the first ``keep`` (compressed) slots."""

        def keys(t: Tensor | None, dim: int) -> Tensor | None:
            if t is None:
                return None
            if not skip:
                return t.narrow(dim, 0, slots)
            tail = t.narrow(dim, keep + skip, slots - keep - skip)
            return torch.cat((t.narrow(dim, 0, keep), tail), dim=dim) if keep else tail

        return WindowTables(
            keys(self.mask[:, :, start:stop], 3),
            None if self.bias is None else keys(self.bias[:, :, start:stop], 3),
            None if self.query_angles is None else self.query_angles[start:stop],
            keys(self.key_angles, 0),
        )


@dataclass
class CallContext:
    """Builds and caches :class:`WindowTables` for one model.

    Attributes:
        positions: the model's position encoding.
        width: block width ``W``.
        sliding: the sliding-window mask (see :func:`~.blocks.token_mask`).
        compressed_slots: compressed memory slots seen by XL layers (0 without).
        compressed_per_block: compressed slots per block.
        dtype: floating dtype of the model.
        device: device of the model.
    """

    positions: PositionEncoding
    width: int
    sliding: bool
    compressed_slots: int
    compressed_per_block: int
    dtype: torch.dtype
    device: torch.device
    _full: dict = field(default_factory=dict)

    def tables(self, geom: BlockGeometry, lookback: int) -> WindowTables:
        """Tables for the token attention of ``geom`` with ``lookback`` (``W`` for layers
        that see the previous block and the compressed memory, ``0`` otherwise)."""
        compressed = self.compressed_slots if lookback else 0
        key = (lookback, compressed)
        if key not in self._full:
            full = BlockGeometry(0, self.width, self.width)
            mask, q_pos, k_pos = token_mask(
                full,
                lookback,
                self.sliding,
                self.device,
                compressed=compressed,
                per_block=self.compressed_per_block,
            )
            self._full[key] = WindowTables(
                mask[None, None],
                self.positions.bias(q_pos, k_pos, self.dtype),
                self.positions.angles(q_pos, self.dtype),
                self.positions.angles(k_pos, self.dtype),
            )
        tables = self._full[key]
        if not geom.single:
            return tables
        start, stop = geom.rows
        skip = unseen_slots(geom, lookback, self.sliding)
        return tables.rows(start, stop, compressed + lookback + stop, skip=skip, keep=compressed)
