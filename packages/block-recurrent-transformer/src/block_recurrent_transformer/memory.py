"""Transformer-XL memories of the Block-Recurrent Transformer.

The keys and values of the recent past that the next call still needs, with a validity mask per row.

Transformer-XL (Dai et al. 2019, arXiv 1901.02860) caches the keys and values of the previous
segment so that attention can look across the segment boundary. The Block-Recurrent
Transformer (Hutchins et al. 2022, arXiv 2203.07852) does the same one block at a time: a
token attends to a sliding window that reaches back into the previous block. Older blocks can
optionally be kept in compressed form, as in the Compressive Transformer (Rae et al. 2019,
arXiv 1911.05507).

The stream of tokens is cut into blocks of ``W = block_width`` tokens at absolute positions
``0, W, 2W, ...``, independently of how the stream is split into calls. After ``P`` tokens,
with ``r = P % W`` tokens in the unfinished current block, a layer keeps:

* the keys/values of the previous (complete) block and of the current block, that is the last
  ``min(P, W + r)`` positions, when it attends across the block boundary or when its state
  update reads the previous block;
* only the ``r`` positions of the current block otherwise.

Einstein notation: ``b`` batch, ``h`` key/value heads, ``m`` memory positions, ``c`` compressed
slots, ``d`` head feature, ``n`` blocks, ``e`` compressed slots per block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import Tensor, nn

from attention_core.checks import check_positive_int, check_tensor

__all__ = ["LayerMemory", "MemoryCompressor", "XLMemories"]


# containers


@dataclass
class LayerMemory:
    """What one layer remembers of the past of the stream.

    Attributes:
        keys: ``(B, Hkv, m, Dh)`` keys of the last ``m`` positions (oldest first), after the
            layer's key normalisation and before any rotary embedding.
        values: ``(B, Hkv, m, Dh)`` values of the same positions.
        valid: ``(B, m)`` bool; ``False`` marks positions a row must not attend to (before
            the start of the stream, or dropped with `XLMemories.drop`).
        compressed_keys: ``(B, Hkv, C, Dh)`` compressed keys of older blocks, or ``None``
            when the layer keeps no compressed memory.
        compressed_values: ``(B, Hkv, C, Dh)`` or ``None``.
        compressed_valid: ``(B, C)`` bool or ``None``.
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    compressed_keys: Tensor | None = None
    compressed_values: Tensor | None = None
    compressed_valid: Tensor | None = None

    @property
    def length(self) -> int:
        """Number ``m`` of remembered positions."""
        return self.keys.shape[2]

    def detach(self) -> LayerMemory:
        """The same memory cut from the autograd graph."""
        return LayerMemory(*(None if t is None else t.detach() for t in self._fields()))

    def drop(self, rows: Tensor) -> LayerMemory:
        """Mark every position of the rows where ``rows`` ``(B,)`` is true as invalid."""
        valid = self.valid.masked_fill(rows[:, None], False)
        cvalid = self.compressed_valid
        if cvalid is not None:
            cvalid = cvalid.masked_fill(rows[:, None], False)
        return replace(self, valid=valid, compressed_valid=cvalid)

    def _fields(self) -> tuple:
        return (
            self.keys,
            self.values,
            self.valid,
            self.compressed_keys,
            self.compressed_values,
            self.compressed_valid,
        )


@dataclass
class XLMemories:
    """The memories of every layer after ``position`` tokens of a stream.

    Returned by `BlockRecurrentTransformer` as its second
    output and passed back as ``xl_memories``. Indexing gives the `LayerMemory` of a
    layer (0-based): ``mems[2].keys`` is ``(B, Hkv, m, Dh)``.

    Attributes:
        position: number of tokens of the stream consumed so far.
        layers: one `LayerMemory` per layer, bottom first.
    """

    position: int
    layers: list[LayerMemory]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerMemory:
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    @property
    def batch_size(self) -> int:
        """Number of rows ``B``."""
        return self.layers[0].valid.shape[0]

    def detach(self) -> XLMemories:
        """The same memories cut from the autograd graph."""
        return XLMemories(self.position, [layer.detach() for layer in self.layers])

    def drop(self, rows: Tensor) -> XLMemories:
        """Forget the past of some rows (structured dropout, start of a new document).

        Arguments:
            rows: ``(B,)`` bool; the rows where it is true can no longer attend to any
                remembered position. Shapes and the block alignment stay as they are.

        Returns:
            new memories; ``self`` is not modified.
        """
        check_tensor("rows", rows, dim=1, dtype=torch.bool)
        if rows.shape[0] != self.batch_size:
            raise ValueError(f"rows must have shape ({self.batch_size},); got {tuple(rows.shape)}")
        rows = rows.to(self.layers[0].valid.device)
        return XLMemories(self.position, [layer.drop(rows) for layer in self.layers])


# ``torch.load(..., weights_only=True)`` may rebuild these two containers (they hold only
# tensors, ints and lists): saved memories load without unpickling arbitrary code.
torch.serialization.add_safe_globals([LayerMemory, XLMemories])


# compression of evicted blocks


class MemoryCompressor(nn.Module):
    """Compress each run of ``factor`` consecutive keys and values of a block into one slot.

    A learned linear map shared by all heads: a strided convolution of kernel and stride ``factor``,
    as in the Compressive Transformer, arXiv 1911.05507.

    Arguments:
        dim_head: head feature size ``Dh``.
        factor: compression factor ``c`` (``>= 2``).

    Shapes: ``forward(keys (B, Hkv, n, W, Dh), values, valid (B, n, W))`` ->
    ``(keys (B, Hkv, n, W // c, Dh), values, valid (B, n, W // c))``; a compressed slot is valid
    when all of its ``c`` sources are.
    """

    def __init__(self, dim_head: int, factor: int):
        super().__init__()
        check_positive_int("dim_head", dim_head)
        check_positive_int("compressed_mem_factor", factor)
        self.factor = factor
        self.to_keys = nn.Linear(factor * dim_head, dim_head, bias=False)
        self.to_values = nn.Linear(factor * dim_head, dim_head, bias=False)

    def forward(self, keys: Tensor, values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Compress blocks of keys/values ``(B, Hkv, n, W, Dh)`` and their validity ``(B, n, W)``.

        See the class docstring."""
        c = self.factor
        group = "b h n (e c) d -> b h n e (c d)"
        keys = self.to_keys(rearrange(keys, group, c=c))
        values = self.to_values(rearrange(values, group, c=c))
        valid = rearrange(valid, "b n (e c) -> b n e c", c=c).all(dim=-1)
        return keys, values, valid

    def extra_repr(self) -> str:
        """The module summary printed by ``repr``."""
        return f"factor={self.factor}"
