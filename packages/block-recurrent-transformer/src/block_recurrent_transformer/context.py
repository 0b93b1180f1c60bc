"""Per-call tables shared by every layer of the Block-Recurrent Transformer.

The static window masks, the position biases and the rotary angles of the token self-attention.
Reference: Hutchins et al. 2022, arXiv 2203.07852.

They depend only on the block width, the look-back and the compressed slots, never on the
tokens, so they are built once for a whole block and sliced for calls that cover only some
rows of one block (generation). During generation the same `CallContext` tables are
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
        query_angles: ``(i, 2, r)`` rotation table (see
            `angles`) of the query rows or ``None``.
        key_angles: ``(j, 2, r)`` rotation table of the key slots or ``None``.
        additive: ``(1, 1 or H, i, j)`` float: the bias (or zeros) with ``-inf`` where the mask
            forbids, the ready-made ``attn_mask`` of ``scaled_dot_product_attention`` (a call
            with invalid slots adds ``-inf`` at them); ``None`` when ``has_empty_rows``.
        has_empty_rows: some row may attend to no slot (then the general masked path, which
            returns zeros for such rows, must be used); always ``True`` under
            ``torch.compile``, where the tables are not inspected.
    """

    mask: Tensor
    bias: Tensor | None
    query_angles: Tensor | None
    key_angles: Tensor | None
    additive: Tensor | None = None
    has_empty_rows: bool = True

    def rows(
        self, start: int, stop: int, slots: int, *, skip: int = 0, keep: int = 0
    ) -> WindowTables:
        """The tables of query rows ``[start, stop)`` over the first ``slots`` key slots.

        They leave out the ``skip`` slots that follow the first ``keep`` (compressed) slots."""

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
            None if self.additive is None else keys(self.additive[:, :, start:stop], 3),
            self.has_empty_rows,  # a subset of the rows, without slots they cannot see
        )


@dataclass
class CallContext:
    """Builds and caches `WindowTables` for one model.

    Attributes:
        positions: the model's position encoding.
        width: block width ``W``.
        sliding: the sliding-window mask (see `token_mask`).
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
    _rows: dict = field(default_factory=dict)

    def tables(self, geom: BlockGeometry, lookback: int) -> WindowTables:
        """Tables for the token attention of ``geom`` with ``lookback``.

        ``W`` for layers that see the previous block and the compressed memory, ``0`` otherwise."""
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
            bias = self.positions.bias(q_pos, k_pos, self.dtype)
            tables = WindowTables(
                mask[None, None],
                bias,
                self.positions.angles(q_pos, self.dtype),
                self.positions.angles(k_pos, self.dtype),
            )
            if not torch.compiler.is_compiling() and bool(mask.any(dim=-1).all()):
                base = (
                    bias
                    if bias is not None
                    else mask.new_zeros((1, 1, *mask.shape), dtype=self.dtype)
                )
                tables.additive = base.masked_fill(~mask, float("-inf"))
                tables.has_empty_rows = False
            self._full[key] = tables
        tables = self._full[key]
        if not geom.single:
            return tables
        start, stop = geom.rows
        skip = unseen_slots(geom, lookback, self.sliding)
        args = (start, stop, compressed + lookback + stop)
        if torch.is_grad_enabled():  # a position bias may need gradients: slice afresh
            return tables.rows(*args, skip=skip, keep=compressed)
        # decoding: the same few row ranges come back every block, keep their slices
        row_key = (key, *args, skip)
        if row_key not in self._rows:
            self._rows[row_key] = tables.rows(*args, skip=skip, keep=compressed)
        return self._rows[row_key]
