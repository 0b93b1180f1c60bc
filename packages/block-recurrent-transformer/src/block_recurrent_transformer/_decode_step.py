"""A faster `BlockRecurrentTransformer.step` for a token that neither starts nor ends a block.

Most decoding steps (all but two of every ``W``) add a token inside a block: no state update,
no memory roll-over, only an append to every layer's memory. For those steps this module
runs the same computation as `.layer` with fewer, larger operations:

* every layer's keys and values live in a preallocated buffer that a step appends to in place
  (a `LayerMemory` handed back to the user is a view of the filled part); the keys are also
  kept rotated (rotary positions relative to the start of the current block, as in `.layer`),
  so a step rotates one key instead of the whole window;
* the queries, keys, values and state-read queries come from one product with the
  concatenated weights (rebuilt when a weight is replaced or modified in place);
* the visible keys are a contiguous range of the buffer, so the attention needs no mask, and
  the query heads that share a key/value head are folded into the rows of one call;
* norms are `torch.nn.functional.rms_norm` and the residual additions are fused into the
  output products.

Anything else (block starts and ends, the first block of a stream, invalid memory slots,
position biases, compressed memory, a forward hook on any module of the model) returns
``None`` and `BlockRecurrentTransformer.step` takes the general path. Tests prove both paths
equal in float64.

Einstein notation: ``b`` batch, ``h`` key/value heads, ``g`` query heads per key/value head,
``m`` memory slots, ``d`` head feature, ``c`` model feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_core.utils import forward_hooks_registered

from .attention import PositionEncoding
from .layer import BlockRecurrentLayer
from .memory import LayerMemory, XLMemories
from .stream import DecodeState, Stream

if TYPE_CHECKING:
    from .transformer import BlockRecurrentTransformer

__all__ = ["DecodeCache", "fast_step"]


@dataclass
class _KeyBuffer:
    """The keys (as stored and rotated) and values of one layer during one block.

    ``filled`` slots are written; a memory that views the first ``filled`` slots may be
    extended in place. ``origin`` is the stream position of the block start."""

    keys: Tensor
    rotated: Tensor
    values: Tensor
    valid: Tensor
    filled: int
    origin: int

    def owns(self, memory: LayerMemory, origin: int) -> bool:
        """Whether ``memory`` is the filled part of this buffer (then it may be appended to)."""
        return (
            origin == self.origin
            and memory.keys.shape[2] == self.filled
            and memory.keys.data_ptr() == self.keys.data_ptr()
            and memory.values.data_ptr() == self.values.data_ptr()
            and memory.keys.shape[0] == self.keys.shape[0]
        )


@dataclass
class DecodeCache:
    """What the fast steps of one decoding stream keep between steps.

    Attributes:
        model: ``id`` of the model it belongs to.
        angles: ``(2W, 2, r)`` rotation table of the positions ``-W .. W - 1`` (relative to
            the block start), or ``None`` without rotary positions.
        roll: ``(d, d)`` the permutation of `PositionEncoding.rotate`'s ``roll`` as a matrix.
        weights: per layer, the fused input weights and the identities they were built from.
        buffers: per layer, the key/value buffer of the current block, or ``None``.
    """

    model: int
    angles: Tensor | None
    roll: Tensor | None = None
    weights: dict[int, tuple[tuple, Tensor]] = field(default_factory=dict)
    buffers: dict[int, _KeyBuffer] = field(default_factory=dict)


def _fused_weight(cache: DecodeCache, index: int, layer: BlockRecurrentLayer) -> Tensor:
    """``[to_q; to_kv; to_read_q]`` of a layer, rebuilt when a weight changed.

    A weight changes when it is replaced (identity), modified in place (``_version``) or given
    new data (``.data``, ``module.to``: data pointer)."""
    parts = [layer.to_q.weight, layer.to_kv.weight]
    if layer.to_read_q is not None:
        parts.append(layer.to_read_q.weight)
    key = tuple((id(w), w._version, w.data_ptr()) for w in parts)
    cached = cache.weights.get(index)
    if cached is None or cached[0] != key:
        cached = (key, torch.cat(parts, dim=0))
        cache.weights[index] = cached
    return cached[1]


def _applies(model: BlockRecurrentTransformer, state: DecodeState) -> bool:
    """Whether the next token of ``state`` may take the fast path (see the module docstring)."""
    width = model.block_width
    position = state.stream.memories.position
    offset = position % width
    if position < width or offset == 0 or offset + 1 == width:
        return False
    if model.positions.kind not in ("rotary", None) or model.compressed_slots:
        return False
    if forward_hooks_registered(*model.modules()):  # the fast step calls few of the modules
        return False
    return not model.training or all(
        m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)
    )


def _buffer(
    cache: DecodeCache, index: int, memory: LayerMemory, origin: int, offset: int, width: int
) -> _KeyBuffer | None:
    """The layer's buffer extended by this step, or ``None`` when a memory slot is invalid."""
    buf = cache.buffers.get(index)
    if buf is not None and buf.owns(memory, origin):
        return buf
    if not bool(memory.valid.all()):
        return None
    b, h, m, d = memory.keys.shape
    capacity = m + width - offset
    keys = memory.keys.new_empty(b, h, capacity, d)
    values = memory.values.new_empty(b, h, capacity, d)
    keys[:, :, :m] = memory.keys
    values[:, :, :m] = memory.values
    rotated = keys.clone()
    if cache.angles is not None:  # slot s stands at offset - m + s
        table = cache.angles[width + offset - m : width + offset]
        rotated[:, :, :m] = PositionEncoding.rotate(memory.keys, table)
    valid = memory.valid.new_ones(b, capacity)
    buf = _KeyBuffer(keys, rotated, values, valid, m, origin)
    cache.buffers[index] = buf
    return buf


def _rotation(cache: DecodeCache, index: int, dim_head: int) -> Tensor | None:
    """The rotary embedding of row ``index`` of ``cache.angles`` as a matrix ``(d, d)``.

    ``t @ R`` is `PositionEncoding.rotate` of ``t (..., d)``: ``t * cos + roll(t, r / 2) *
    signed_sin`` on the first ``r`` features, the identity on the others."""
    if cache.angles is None:
        return None
    cos, signed_sin = cache.angles[index]
    r = cos.shape[0]
    if cache.roll is None:  # (t @ roll)[j] = roll(t, r / 2)[j] for j < r, 0 beyond
        roll = cos.new_zeros(dim_head, dim_head)
        roll[:r, :r] = torch.eye(r, dtype=cos.dtype, device=cos.device).roll(r // 2, dims=1)
        cache.roll = roll
    diagonal = cos.new_ones(dim_head)
    diagonal[:r] = cos
    column_sin = cos.new_zeros(dim_head)
    column_sin[:r] = signed_sin
    return torch.diag(diagonal) + cache.roll * column_sin


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """Attention of the ``g`` query heads ``q (b, h, g, d)`` of each key/value head.

    Over ``k``/``v`` ``(b, h, j, d)`` (one query row per head, no mask); -> ``(b, h * g * d)``."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    b, h, g, d = out.shape
    return out.reshape(b, h * g * d)


def _layer_step(
    model: BlockRecurrentTransformer,
    cache: DecodeCache,
    index: int,
    x: Tensor,
    buf: _KeyBuffer,
    offset: int,
    reads: list[tuple[Tensor, Tensor]],
    rotation: Tensor | None,
) -> tuple[Tensor, LayerMemory]:
    """One layer on one token ``x (b, c)``; returns ``x`` after the layer and its new memory.

    ``rotation`` is the ``(d, d)`` rotary matrix of the token's position (see `_rotation`)."""
    layer = model._layer(index)
    spec, width = layer.spec, model.block_width
    b = x.shape[0]
    kv_heads, d = model.kv_heads, model.dim_head
    groups = layer.heads // kv_heads
    inner = layer.heads * d
    xn = F.rms_norm(x, (x.shape[-1],), layer.norm.weight, layer.norm.eps)
    proj = F.linear(xn, _fused_weight(cache, index, layer))
    # queries and the key side by side: one normalisation and one rotation for both
    qk = proj[:, : inner + kv_heads * d].view(b, layer.heads + kv_heads, d)
    v = proj[:, inner + kv_heads * d : inner + 2 * kv_heads * d].view(b, kv_heads, d)
    scale = None
    if spec.qk_norm:
        qk = F.normalize(qk, dim=-1, eps=1e-12)
        qk[:, : layer.heads].mul_(layer.q_norm.gain)
        qk[:, layer.heads :].mul_(layer.k_norm.gain)
        scale = layer.temperature
    m = buf.filled
    buf.keys.select(2, m).copy_(qk[:, layer.heads :])
    buf.values.select(2, m).copy_(v)
    if rotation is not None:
        qk = qk @ rotation
    buf.rotated.select(2, m).copy_(qk[:, layer.heads :])
    q = qk[:, : layer.heads].view(b, kv_heads, groups, d)
    buf.filled = m + 1

    # the visible slots (slot s stands at offset - m + s): the sliding window holds the W
    # tokens before the token, within its block without XL memory; otherwise the token sees
    # itself, the earlier tokens of its block and, with XL memory, the previous block
    if model.sliding_window:
        first, stop = m - (width if spec.xl else offset), m
    else:
        first, stop = m - offset - (width if spec.xl else 0), m + 1
    outs = [_attend(q, buf.rotated[:, :, first:stop], buf.values[:, :, first:stop], scale)]
    if reads:
        read_q = proj[:, inner + 2 * kv_heads * d :].view(b, len(reads), kv_heads, groups, d)
        if spec.qk_norm and layer.read_q_norm is not None:
            read_q = F.normalize(read_q, dim=-1, eps=1e-12) * layer.read_q_norm.gain
        for j, (k_read, v_read) in enumerate(reads):
            outs.append(_attend(read_q[:, j], k_read, v_read, scale))
    x = torch.addmm(x, torch.cat(outs, dim=1), layer.to_out.weight.t())
    first_ff, second_ff = layer.ff.net[0], layer.ff.net[3]
    if not isinstance(first_ff, torch.nn.Linear) or not isinstance(second_ff, torch.nn.Linear):
        raise TypeError("the feed-forward block must be Linear, GLU, Dropout, Linear")
    hidden = F.rms_norm(x, (x.shape[-1],), layer.ff_norm.weight, layer.ff_norm.eps)
    hidden = F.linear(hidden, first_ff.weight, first_ff.bias)
    a, gate = hidden.chunk(2, dim=-1)
    x = torch.addmm(second_ff.bias, a * F.gelu(gate), second_ff.weight.t()).add_(x)
    memory = LayerMemory(buf.keys[:, :, : m + 1], buf.values[:, :, : m + 1], buf.valid[:, : m + 1])
    return x, memory


def fast_step(
    model: BlockRecurrentTransformer, tokens: Tensor, state: DecodeState
) -> tuple[Tensor, DecodeState] | None:
    """`BlockRecurrentTransformer.step` for a token inside a block, or ``None``.

    ``None`` means that the step needs the general path (see the module docstring); nothing
    has been changed then.

    Arguments:
        model: the model.
        tokens: ``(B,)`` checked token ids.
        state: the decoding state before the token.

    Returns:
        the logits ``(B, V)`` of the next position and the new `DecodeState`, or ``None``.
    """
    if not _applies(model, state):
        return None
    width = model.block_width
    stream = state.stream
    position = stream.memories.position
    offset = position % width
    cache = state.cache
    if not isinstance(cache, DecodeCache) or cache.model != id(model):
        positions = torch.arange(-width, width, device=model._param.device)
        cache = DecodeCache(id(model), model.positions.angles(positions, model._param.dtype))
    origin = position - offset
    buffers = []
    for index, memory in enumerate(stream.memories.layers):
        buf = _buffer(cache, index, memory, origin, offset, width)
        if buf is None:
            return None
        buffers.append(buf)

    rotation = _rotation(cache, offset + width, model.dim_head)
    modules = model._states_modules()
    prepared = list(stream.prepared)
    x = model.token_emb(tokens)
    memories = []
    for index, buf in enumerate(buffers):
        reads = []
        slot = model._writer_slot[index]
        wanted = list(model._external_reads[index])
        if slot is not None and model._layer(index).spec.reads_own_state:
            wanted.insert(0, slot)
        for w in wanted:
            read = prepared[w]
            if read is None:
                read = prepared[w] = modules[w].prepare(stream.states[w])
            reads.append((read[1], read[2]))
        x, memory = _layer_step(model, cache, index, x, buf, offset, reads, rotation)
        memories.append(memory)
    x = F.rms_norm(x, (x.shape[-1],), model.final_norm.weight, model.final_norm.eps)
    logits = F.linear(x, model.to_logits.weight)
    new = Stream(XLMemories(position + 1, memories), list(stream.states), prepared)
    return logits, DecodeState(new, state.context, cache)
