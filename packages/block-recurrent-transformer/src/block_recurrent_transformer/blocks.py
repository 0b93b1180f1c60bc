"""Cutting one call's tokens into blocks and building the sliding attention windows.

The Block-Recurrent Transformer (Hutchins et al. 2022, arXiv 2203.07852) processes a stream
in blocks of ``W`` tokens aligned to absolute positions ``0, W, 2W, ...``. A call continues the
stream at position ``P0``: its first block may already hold ``r0 = P0 % W`` tokens from earlier
calls (their keys are in the memory) and its last block may be unfinished.

For one layer, the keys of a call are laid out on a *grid*: ``L`` slots of look-back (the
previous block, ``L = W``, or nothing, ``L = 0``), then the blocks of the call. The remembered
positions fill the slots before the first new token, padding (invalid) fills the rest. Block
``j`` of the call then sees the grid slice ``[j W, j W + L + W)``. When the whole call lies in
one block (``num_blocks == 1``, e.g. one token of generation), only the rows of the new tokens
and the keys up to the last new token are used, so a step costs ``O(W)``, not ``O(W^2)``.

Einstein notation: ``b`` batch, ``h`` heads, ``n`` blocks, ``w`` positions in a window,
``d`` head feature, ``i`` query rows, ``j`` key slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .memory import LayerMemory

__all__ = [
    "BlockGeometry",
    "all_valid",
    "build_grid",
    "next_memory",
    "token_mask",
    "unseen_slots",
    "windows",
]


def all_valid(valid: Tensor) -> bool:
    """Whether every slot of ``valid`` (bool, any shape) is valid.

    Then the validity mask can be skipped. Under ``torch.compile`` this answers ``False`` without
    reading the data (the mask is then always applied, which gives the same result without a graph
    break)."""
    if torch.compiler.is_compiling():
        return False
    return bool(valid.all())


@dataclass(frozen=True)
class BlockGeometry:
    """Where the ``length`` new tokens of a call fall among blocks of ``width`` tokens.

    The stream has consumed ``start`` tokens before the call."""

    start: int
    length: int
    width: int

    @property
    def offset(self) -> int:
        """Tokens ``r0`` of the first block that earlier calls already consumed."""
        return self.start % self.width

    @property
    def end(self) -> int:
        """Stream position after the call."""
        return self.start + self.length

    @property
    def num_blocks(self) -> int:
        """Blocks ``nb`` touched by the call."""
        return -(-(self.offset + self.length) // self.width)

    @property
    def complete(self) -> int:
        """Blocks of the call that end inside it (their state update happens in this call)."""
        return (self.offset + self.length) // self.width

    @property
    def single(self) -> bool:
        """Whether the call lies inside one block (then only its rows are computed)."""
        return self.num_blocks == 1

    @property
    def rows(self) -> tuple[int, int]:
        """Query rows computed per block: the new tokens' rows for a single block, else all."""
        if self.single:
            return self.offset, self.offset + self.length
        return 0, self.width

    @property
    def current_length(self) -> int:
        """Grid slots after the look-back: whole blocks, or up to the last new token."""
        if self.single:
            return self.offset + self.length
        return self.num_blocks * self.width

    def block_slices(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of the call's tokens that fall into each block."""
        out, first = [], 0
        for j in range(self.num_blocks):
            stop = min(self.length, (j + 1) * self.width - self.offset)
            out.append((first, stop))
            first = stop
        return out


def build_grid(
    memory: LayerMemory, keys: Tensor, values: Tensor, geom: BlockGeometry, lookback: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Lay the remembered and the new keys/values of one layer on the call's grid.

    Arguments:
        memory: the layer's memory (its last ``m <= lookback + r0`` positions).
        keys: ``(B, Hkv, n, Dh)`` keys of the call's ``n`` tokens; ``values`` likewise.
        geom: the call's geometry.
        lookback: ``W`` or ``0`` slots before the first block.

    Returns:
        keys and values ``(B, Hkv, lookback + current_length, Dh)`` and the validity
        ``(B, lookback + current_length)`` bool of each slot.
    """
    history = lookback + geom.offset
    mem_k, mem_v, mem_valid = memory.keys, memory.values, memory.valid
    if mem_k.shape[2] > history:
        mem_k, mem_v, mem_valid = (
            mem_k[:, :, -history:],
            mem_v[:, :, -history:],
            mem_valid[:, -history:],
        )
    left = history - mem_k.shape[2]
    right = geom.current_length - geom.offset - geom.length
    pad = (0, 0, left, right)
    grid_k = F.pad(torch.cat((mem_k, keys), dim=2), pad)
    grid_v = F.pad(torch.cat((mem_v, values), dim=2), pad)
    fresh = mem_valid.new_ones(mem_valid.shape[0], geom.length)
    valid = F.pad(torch.cat((mem_valid, fresh), dim=1), (left, right), value=False)
    return grid_k, grid_v, valid


def next_memory(
    grid_k: Tensor,
    grid_v: Tensor,
    valid: Tensor,
    geom: BlockGeometry,
    lookback: int,
    keep_previous: bool,
) -> LayerMemory:
    """The memory a layer hands to the next call.

    The last ``min(P, W + r)`` positions when ``keep_previous`` (previous block and current block),
    else the ``r`` positions of the current block, where ``P = geom.end`` and ``r = P % W``."""
    width, end = geom.width, geom.end
    r = end % width
    keep = min(end, width + r) if keep_previous else r
    stop = lookback + geom.offset + geom.length
    return LayerMemory(
        grid_k[:, :, stop - keep : stop],
        grid_v[:, :, stop - keep : stop],
        valid[:, stop - keep : stop],
    )


def windows(t: Tensor, geom: BlockGeometry, grid_lookback: int, lookback: int) -> Tensor:
    """Per-block windows of a grid tensor.

    Arguments:
        t: ``(B, H, grid_lookback + current_length, D)`` keys or values on the grid, or the
            validity ``(B, grid_lookback + current_length)``.
        geom: the call's geometry.
        grid_lookback: look-back slots of the grid (``>= lookback``).
        lookback: look-back slots each window starts with.

    Returns:
        ``(B * nb, H, lookback + W, D)`` (``(B * nb, lookback + W)`` for validity); for a
        single block, ``(B, H, lookback + current_length, D)``.
    """
    start = grid_lookback - lookback
    if t.dim() == 2:
        t = t[:, start:]
        if geom.single:
            return t
        return rearrange(t.unfold(1, lookback + geom.width, geom.width), "b n w -> (b n) w")
    t = t[:, :, start:]
    if geom.single:
        return t
    return rearrange(t.unfold(2, lookback + geom.width, geom.width), "b h n d w -> (b n) h w d")


def unseen_slots(geom: BlockGeometry, lookback: int, sliding: bool) -> int:
    """Leading slots of a single-block window that none of the call's rows can see.

    With the sliding window and ``lookback = W``, query row ``i`` sees the window slots
    ``[i, i + W)`` (the ``W`` tokens before it), so the first ``offset`` slots are never used:
    skipping them keeps a generation step at ``W + length`` key slots whatever its position
    in the block. Zero otherwise.
    """
    if geom.single and sliding and lookback:
        return geom.offset
    return 0


def token_mask(
    geom: BlockGeometry,
    lookback: int,
    sliding: bool,
    device,
    *,
    compressed: int = 0,
    per_block: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Static part of the token self-attention mask of a block.

    Query row ``i`` (position inside its block) may see the key at position ``p`` (relative
    to the start of the same block, negative in the previous block) when

    * ``sliding``: ``i - W <= p < i``, exactly the ``W`` tokens before it (the paper's
      sliding window; a token does not attend to itself);
    * otherwise: ``p <= i``, itself, the earlier tokens of its block and the whole previous
      block when ``lookback = W`` (the behaviour of block-recurrent-transformer-pytorch).

    Compressed slots, which come first, are always visible.

    Returns:
        the mask ``(rows, slots)`` bool, the query positions ``(rows,)`` and the key
        positions ``(slots,)`` (int64, relative to the block start; compressed slots at the
        position of the last token they summarise, see `compressed_positions`).
    """
    row_start, row_stop = geom.rows
    i = torch.arange(row_start, row_stop, device=device)
    p = torch.arange(-lookback, geom.current_length if geom.single else geom.width, device=device)
    rel_i, rel_p = i[:, None], p[None, :]
    if sliding:
        allowed = (rel_p < rel_i) & (rel_p >= rel_i - geom.width)
    else:
        allowed = rel_p <= rel_i
    if compressed:
        allowed = torch.cat((allowed.new_ones(len(i), compressed), allowed), dim=1)
        slots = compressed_positions(geom.width, compressed, device, per_block=per_block)
        p = torch.cat((slots, p))
    return allowed, i, p


def compressed_positions(width: int, slots: int, device, *, per_block: int | None = None) -> Tensor:
    """Positions of the ``slots`` compressed slots seen by a block, relative to the block start.

    The newest ``per_block`` slots summarise the block before the previous one, the next ones the
    block before that, and so on; slot ``g`` of a block stands at the last of the tokens it
    summarises."""
    per_block = per_block or slots
    u = torch.arange(slots, device=device)
    age = (slots - 1 - u) // per_block  # 0 for the newest block
    factor = width // per_block
    return (-2 - age) * width + (u % per_block) * factor + factor - 1
