"""One layer of the Block-Recurrent Transformer: an attention block and a GEGLU feed-forward block.

Both blocks are pre-norm and are applied to all blocks of a call at once. References: Hutchins et
al. 2022, arXiv 2203.07852; GEGLU: Shazeer 2020, arXiv 2002.05202.

The attention block of a layer

* attends, block by block, over a sliding window of keys (`.blocks`); layers listed in
  ``xl_memories_layers`` reach into the previous block (Transformer-XL style, arXiv
  1901.02860) and into the compressed memory, the others stay inside their block;
* when the layer is recurrent, runs the state update of every block that ends in the call
  (`.state`) — the only part that is sequential over blocks;
* cross-attends from the tokens to the state of every recurrent layer it reads (its own, or a
  higher layer's with "enhanced recurrence"), the state being the one left by the previous
  block;
* concatenates the self- and cross-attention heads and projects them back to the model
  dimension.

The layer has no side effects: everything it needs comes in as arguments and everything it
produces is returned, so it can be re-run by activation checkpointing.

Einstein notation: ``b`` batch, ``n`` blocks, ``h`` heads, ``w`` rows of a block, ``t``
tokens of the call, ``s`` state vectors, ``d`` head feature, ``c`` compressed slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attention_core.nn import FeedForward, RMSNorm

from .attention import HeadNorm, PositionEncoding, attend_heads, attend_window, split_heads
from .blocks import BlockGeometry, all_valid, build_grid, next_memory, unseen_slots, windows
from .context import CallContext
from .memory import LayerMemory, MemoryCompressor
from .state import RecurrentState

__all__ = ["BlockRecurrentLayer", "LayerSpec"]

Prepared = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class LayerSpec:
    """Static role of a layer in the stack.

    Attributes:
        xl: attends into the previous block and the compressed memory.
        keeps_previous: its memory keeps the previous block (``xl``, or its state update
            reads the previous block).
        state_lookback: ``W`` when its state update reads the previous block too, else 0.
        reads_own_state: reads the state it writes (recurrent layers without enhanced
            recurrence).
        num_external_reads: states of other (higher) layers it reads.
        qk_norm: normalises queries and keys (recurrent, reading and, optionally, all layers).
    """

    xl: bool
    keeps_previous: bool
    state_lookback: int
    reads_own_state: bool
    num_external_reads: int
    qk_norm: bool

    @property
    def num_reads(self) -> int:
        """Number of states the tokens cross-attend to."""
        return int(self.reads_own_state) + self.num_external_reads


def _to_blocks(t: Tensor, geom: BlockGeometry) -> Tensor:
    """Cut ``(b, h, t, d)`` tokens into ``(b * n, h, w, d)`` blocks.

    Zero rows pad the last block; a single block keeps its rows unchanged. When ``t`` is a head view
    of a ``(b, t, h * d)`` projection and the call covers whole blocks, the result is a view (no
    copy)."""
    if geom.single:
        return t
    t = t.transpose(1, 2)  # b t h d: contiguous for a head view of a projection
    right = geom.current_length - geom.offset - geom.length
    if geom.offset or right:
        t = F.pad(t, (0, 0, 0, 0, geom.offset, right))
    return rearrange(t, "b (n w) h d -> (b n) h w d", w=geom.width)


def _from_blocks(t: Tensor, geom: BlockGeometry) -> Tensor:
    """Inverse of `_to_blocks`, with heads merged (one copy): -> ``(b, t, h * d)``."""
    if geom.single:
        return rearrange(t, "b h t d -> b t (h d)")
    t = rearrange(t, "(b n) h w d -> b (n w) (h d)", n=geom.num_blocks)
    if geom.offset or t.shape[1] != geom.length:
        t = t[:, geom.offset : geom.offset + geom.length]
    return t


def _per_block(t: Tensor, geom: BlockGeometry, batch: int) -> Tensor:
    """Windows ``(b * n, ...)`` -> ``(b, n, ...)``; a single block gets ``n = 1``."""
    if geom.single:
        return t[:, None]
    return t.reshape(batch, geom.num_blocks, *t.shape[1:])


class BlockRecurrentLayer(nn.Module):
    """Attention block (with optional recurrent state) and feed-forward block.

    Arguments:
        dim: model feature size.
        spec: the layer's role (`LayerSpec`).
        heads: query heads ``H``.
        dim_head: head feature size ``Dh``.
        kv_heads: key/value heads ``Hkv`` (divides ``H``).
        width: block width ``W``.
        temperature: logit scale when ``spec.qk_norm``.
        ff_mult: feed-forward width multiplier (GEGLU with ``2/3`` of it, so that the
            parameter count matches a plain feed-forward of ``ff_mult``).
        state: the `RecurrentState` this layer writes, or ``None``.
        compressor: the `MemoryCompressor` of an XL layer with compressed memory.
        compressed_slots: slots ``C`` of that compressed memory.

    Shapes: ``forward`` takes the call's hidden states ``(B, t, c)`` and returns the same
    shape, with the layer's new memory and state (see `forward`).
    """

    def __init__(
        self,
        dim: int,
        spec: LayerSpec,
        *,
        heads: int,
        dim_head: int,
        kv_heads: int,
        width: int,
        temperature: float,
        ff_mult: float,
        state: RecurrentState | None = None,
        compressor: MemoryCompressor | None = None,
        compressed_slots: int = 0,
    ):
        super().__init__()
        self.spec, self.heads, self.kv_heads, self.width = spec, heads, kv_heads, width
        self.temperature = float(temperature)
        self.compressed_slots = compressed_slots if compressor is not None else 0
        inner = heads * dim_head
        self.norm = RMSNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * dim_head, bias=False)
        self.to_read_q = (
            nn.Linear(dim, spec.num_reads * inner, bias=False) if spec.num_reads else None
        )
        if spec.qk_norm:
            self.q_norm, self.k_norm = HeadNorm(dim_head), HeadNorm(dim_head)
            self.read_q_norm = HeadNorm(dim_head) if spec.num_reads else None
        self.to_out = nn.Linear((1 + spec.num_reads) * inner, dim, bias=False)
        self.ff_norm = RMSNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult * 2 / 3, glu=True)
        self.state = state
        self.compressor = compressor

    # helpers

    @property
    def grid_lookback(self) -> int:
        """Look-back slots of this layer's key grid."""
        return self.width if self.spec.keeps_previous else 0

    @property
    def token_lookback(self) -> int:
        """Look-back slots of the token self-attention windows."""
        return self.width if self.spec.xl else 0

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, float | None]:
        """Pre-norm ``x`` and its queries ``(b, H, t, d)``, keys and values ``(b, Hkv, t, d)``."""
        xn = self.norm(x)
        q = split_heads(self.to_q(xn), self.heads)
        k, v = self.to_kv(xn).chunk(2, dim=-1)
        k, v = split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        scale = None
        if self.spec.qk_norm:
            q, k, scale = self.q_norm(q), self.k_norm(k), self.temperature
        return xn, q, k, v, scale

    def _compressed(
        self,
        compressor: MemoryCompressor,
        memory: LayerMemory,
        grid_k: Tensor,
        grid_v: Tensor,
        valid: Tensor,
        geom: BlockGeometry,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Compressed windows with validity, and the compressed memory handed to the next call.

        The windows are ``(b * n, Hkv, C, d)`` (or ``(b, Hkv, C, d)``)."""
        cap, width = self.compressed_slots, self.width
        per_block = width // compressor.factor
        count = max(geom.num_blocks - 1, geom.complete)  # blocks -1 .. count - 2 of the grid
        mem = (memory.compressed_keys, memory.compressed_values, memory.compressed_valid)
        if mem[0] is None or mem[1] is None or mem[2] is None:
            raise ValueError("a layer with compressed memory needs its compressed memory; got None")
        mem = (mem[0], mem[1], mem[2])
        if count:
            blocks = "b h (n w) d -> b h n w d"
            k = rearrange(grid_k[:, :, : count * width], blocks, w=width)
            v = rearrange(grid_v[:, :, : count * width], blocks, w=width)
            ok = rearrange(valid[:, : count * width], "b (n w) -> b n w", w=width)
            ck, cv, cok = compressor(k, v, ok)
            flat = "b h n e d -> b h (n e) d"
            seq_k = torch.cat((mem[0], rearrange(ck, flat)), dim=2)
            seq_v = torch.cat((mem[1], rearrange(cv, flat)), dim=2)
            seq_ok = torch.cat((mem[2], rearrange(cok, "b n e -> b (n e)")), dim=1)
        else:
            seq_k, seq_v, seq_ok = mem
        done = geom.complete * per_block
        new = (
            seq_k[:, :, done : done + cap],
            seq_v[:, :, done : done + cap],
            seq_ok[:, done : done + cap],
        )
        if geom.single:
            return mem[0], mem[1], mem[2], new
        span = cap + (geom.num_blocks - 1) * per_block
        unfold = "b h n d c -> (b n) h c d"
        win_k = rearrange(seq_k[:, :, :span].unfold(2, cap, per_block), unfold)
        win_v = rearrange(seq_v[:, :, :span].unfold(2, cap, per_block), unfold)
        win_ok = rearrange(seq_ok[:, :span].unfold(1, cap, per_block), "b n c -> (b n) c")
        return win_k, win_v, win_ok, new

    def _state_chain(
        self,
        recurrent: RecurrentState,
        state: Tensor,
        prepared: Prepared | None,
        grid_k: Tensor,
        grid_v: Tensor,
        valid: Tensor,
        geom: BlockGeometry,
    ) -> tuple[Tensor, list[Prepared], Prepared | None]:
        """Update the state after each block that ends in the call.

        Returns the final state ``(b, S, c)``, ``prepare(s_j)`` for each block ``j`` (the state
        its tokens read) and ``prepare`` of the final state when the last block is unfinished
        (``None`` otherwise)."""
        batch = state.shape[0]
        prepared = prepared if prepared is not None else recurrent.prepare(state)
        if geom.complete:
            lookback = self.spec.state_lookback
            win_k = _per_block(windows(grid_k, geom, self.grid_lookback, lookback), geom, batch)
            win_v = _per_block(windows(grid_v, geom, self.grid_lookback, lookback), geom, batch)
            win_ok = _per_block(windows(valid, geom, self.grid_lookback, lookback), geom, batch)
        preps = []
        for j in range(geom.num_blocks):
            preps.append(prepared)
            if j < geom.complete:
                ok = win_ok[:, j]
                state = recurrent.update(
                    state, prepared, win_k[:, j], win_v[:, j], None if all_valid(ok) else ok
                )
                if j + 1 < geom.num_blocks:
                    prepared = recurrent.prepare(state)
        final = prepared if geom.num_blocks > geom.complete else None
        return state, preps, final

    # forward

    def forward(
        self,
        x: Tensor,
        geom: BlockGeometry,
        memory: LayerMemory,
        ctx: CallContext,
        positions: PositionEncoding,
        state: Tensor | None = None,
        prepared: Prepared | None = None,
        external_reads: Sequence[tuple[Tensor, Tensor]] = (),
    ) -> tuple[Tensor, LayerMemory, Tensor | None, Prepared | None]:
        """Run the layer on a call.

        Arguments:
            x: ``(B, t, c)`` hidden states of the call's ``t = geom.length`` tokens.
            geom: where the tokens fall among blocks.
            memory: this layer's `LayerMemory` before the call.
            ctx: the shared window tables.
            positions: the model's position encoding (rotary is applied here).
            state: ``(B, S, c)`` state before the call (recurrent layers only).
            prepared: ``state``'s ``prepare`` if already computed, else ``None``.
            external_reads: keys and values ``(B * nb, Hkv, S, Dh)`` of each higher-layer
                state this layer reads, per block (one block when the call is single).

        Returns:
            ``(y (B, t, c), new memory, new state or None, prepare of the new state or None)``.
        """
        xn, q, k, v, scale = self._project(x)
        grid_k, grid_v, valid = build_grid(memory, k, v, geom, self.grid_lookback)
        new_memory = next_memory(
            grid_k, grid_v, valid, geom, self.grid_lookback, self.spec.keeps_previous
        )

        # recurrent state: sequential over the blocks that end in this call
        reads, final_prepared = [], None
        if self.state is not None:
            if state is None:
                raise ValueError("a recurrent layer needs the state before the call; got None")
            state, preps, final_prepared = self._state_chain(
                self.state, state, prepared, grid_k, grid_v, valid, geom
            )
            if self.spec.reads_own_state:
                own_k = torch.stack([p[1] for p in preps], dim=1)
                own_v = torch.stack([p[2] for p in preps], dim=1)
                reads.append(
                    (
                        rearrange(own_k, "b n h s d -> (b n) h s d"),
                        rearrange(own_v, "b n h s d -> (b n) h s d"),
                    )
                )
        reads.extend(external_reads)

        # token self-attention over the sliding windows
        lookback = self.token_lookback
        win_k = windows(grid_k, geom, self.grid_lookback, lookback)
        win_v = windows(grid_v, geom, self.grid_lookback, lookback)
        win_ok = windows(valid, geom, self.grid_lookback, lookback)
        skip = unseen_slots(geom, lookback, ctx.sliding)
        if skip:  # a step inside a block: only the slots its rows can see
            win_k, win_v, win_ok = win_k[:, :, skip:], win_v[:, :, skip:], win_ok[:, skip:]
        if self.compressor is not None:
            ck, cv, cok, compressed = self._compressed(
                self.compressor, memory, grid_k, grid_v, valid, geom
            )
            win_k, win_v = torch.cat((ck, win_k), dim=2), torch.cat((cv, win_v), dim=2)
            win_ok = torch.cat((cok, win_ok), dim=1)
            (
                new_memory.compressed_keys,
                new_memory.compressed_values,
                new_memory.compressed_valid,
            ) = compressed
        tables = ctx.tables(geom, lookback)
        q_blocks = positions.rotate(_to_blocks(q, geom), tables.query_angles)
        win_k = positions.rotate(win_k, tables.key_angles)
        additive = tables.additive
        if additive is not None and not all_valid(win_ok):
            # invalid slots (start of a stream, dropped memories, padding): still one fused
            # call when every row keeps a visible key, else the general path below
            visible = tables.mask & win_ok[:, None, None, :]
            if all_valid(visible.any(dim=-1)):
                blocked = torch.zeros(win_ok.shape, dtype=additive.dtype, device=win_ok.device)
                additive = additive + blocked.masked_fill(~win_ok, float("-inf"))[:, None, None]
            else:
                additive = None
        if additive is not None:
            outs = [attend_window(q_blocks, win_k, win_v, additive=additive, scale=scale)]
        else:  # some rows may see no key: the general masked path (zeros for such rows)
            mask = tables.mask
            if not all_valid(win_ok):
                mask = mask & win_ok[:, None, None, :]
            outs = [attend_heads(q_blocks, win_k, win_v, mask=mask, bias=tables.bias, scale=scale)]

        # cross-attention to the states read by this layer
        if reads:
            if self.to_read_q is None:
                raise ValueError(f"this layer reads no state (num_reads 0); got {len(reads)}")
            read_q = split_heads(self.to_read_q(xn), self.heads * len(reads))
            if self.spec.qk_norm and self.read_q_norm is not None:
                read_q = self.read_q_norm(read_q)
            read_qs = _to_blocks(read_q, geom).chunk(len(reads), dim=1)
            for q_read, (k_read, v_read) in zip(read_qs, reads):
                outs.append(attend_heads(q_read, k_read, v_read, scale=scale))

        out = _from_blocks(torch.cat(outs, dim=1) if reads else outs[0], geom)
        x = x + self.to_out(out)
        x = x + self.ff(self.ff_norm(x))
        return x, new_memory, state, final_prepared
