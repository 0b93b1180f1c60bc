"""The Block-Recurrent Transformer language model (Hutchins et al. 2022, arXiv 2203.07852).

A stream of tokens is cut into blocks of ``block_width`` tokens at absolute positions. Every
layer attends within a sliding window (:mod:`.blocks`); the layers in ``xl_memories_layers``
reach back into the previous block, Transformer-XL style; the layers in ``recurrent_layers``
carry state vectors from block to block (:mod:`.state`), read by the same layer or, with
``read_recurrent_layers``, by a lower one ("enhanced recurrence", after ERNIE-Doc, Ding et
al. 2021, arXiv 2012.15688).

A call may continue a stream anywhere, even inside a block: the memories returned by one call
hold exactly what the next call needs, so feeding a sequence in one call or in pieces of any
lengths gives the same outputs (up to floating-point rounding). That is also how generation
works: one token per call, each costing ``O(block_width)`` (:meth:`step`).

Layers that do not depend on a state from another layer run over all the blocks of a call at
once; only the state updates are sequential. Layers between a state reader and a higher
writer run block by block.

Einstein notation: ``b`` batch, ``n`` sequence, ``v`` vocabulary, ``s`` state vectors,
``c`` model feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attention_core.checks import (
    check_bool,
    check_int,
    check_positive_int,
    check_positive_number,
    check_tensor,
    check_token_ids,
)
from attention_core.nn import RMSNorm

from .attention import PositionEncoding
from .blocks import BlockGeometry
from .context import CallContext
from .gates import GATE_TYPES
from .layer import BlockRecurrentLayer, LayerSpec, Prepared
from .memory import LayerMemory, MemoryCompressor, XLMemories
from .state import RecurrentState

__all__ = ["BlockRecurrentTransformer", "DecodeState"]


# helpers


def _layers(name: str, value, depth: int, *, allow_empty: bool) -> tuple[int, ...]:
    """Validate a tuple of 1-indexed layer numbers."""
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"{name} must be a tuple of ints (1-indexed layers); got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must name at least one layer; got {value!r}")
    bad = [v for v in value if not 1 <= v <= depth]
    if bad:
        raise ValueError(f"{name} must contain layers in 1..{depth} (depth); got {tuple(value)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} must not repeat a layer; got {tuple(value)}")
    return tuple(value)


@dataclass
class _Stream:
    """Everything a call continues from: memories, states and (when known) each state's
    ``prepare``."""

    memories: XLMemories
    states: list[Tensor]
    prepared: list[Prepared | None]


@dataclass
class DecodeState:
    """The state of incremental decoding (:meth:`BlockRecurrentTransformer.prefill` /
    :meth:`~BlockRecurrentTransformer.step`): the stream's memories and states plus cached
    tables. Valid only while the model's weights do not change."""

    stream: _Stream
    context: CallContext

    @property
    def xl_memories(self) -> XLMemories:
        """The memories after the tokens consumed so far."""
        return self.stream.memories

    @property
    def states(self) -> list[Tensor]:
        """The recurrent states ``(B, S, dim)`` after the tokens consumed so far."""
        return self.stream.states


# main class


class BlockRecurrentTransformer(nn.Module):
    """Block-Recurrent Transformer language model.

    Arguments:
        num_tokens: vocabulary size ``V``.
        dim: model feature size.
        depth: number of layers.
        dim_head: feature size per head.
        heads: query heads.
        xl_memories_layers: 1-indexed layers whose attention window reaches into the previous
            block (and across calls through the memories); the others attend within their
            block only. Default: every layer.
        recurrent_layers: 1-indexed layers with recurrent state vectors. Default: the middle
            layer ``max(1, depth // 2)``; ``()`` gives a sliding-window Transformer-XL.
        read_recurrent_layers: for each recurrent layer (same order), the layer whose tokens
            read its state (``<=`` the recurrent layer). Default: the recurrent layer itself.
        max_seq_len: segment length used by
            :class:`~block_recurrent_transformer.RecurrentTrainerWrapper`
            and by :meth:`prefill`; a call to :meth:`forward` may be of any length.
        block_width: block width ``W``.
        num_state_vectors: state vectors ``S`` per recurrent layer. Default: ``block_width``.
        ff_mult: feed-forward width multiplier.
        all_layers_qk_rmsnorm: normalise queries and keys in every layer (always done in the
            layers that write or read a state).
        qk_rmsnorm_scale: logit temperature of normalised queries and keys.
        kv_heads: key/value heads; ``None`` = ``heads`` (the paper), ``1`` = multi-query
            attention (block-recurrent-transformer-pytorch), or any divisor of ``heads``.
        sliding_window: ``True`` (the paper): each token attends to exactly the ``W`` tokens
            before it; ``False``: to itself, the earlier tokens of its block and the whole
            previous block (``W + 1 .. 2W`` keys, as block-recurrent-transformer-pytorch).
        state_attends_previous_block: the state update cross-attends to the previous and the
            current block (the paper's code) instead of the current block only.
        gate_type: ``"fixed"`` (learned moving average) or ``"lstm"`` (input and forget gates).
        state_ffn: a gated feed-forward block after the state's attention (the paper's "dual"
            configuration; the default is its cheaper "skip" configuration).
        position_encoding: ``"rotary"``, ``"dynamic"`` (dynamic position bias), ``"t5"`` (the
            paper's T5 bias) or ``None``. The bias options train on the unfused attention
            path of ``scaled_dot_product_attention`` and are slower on CPU.
        use_compressed_mem: XL layers also attend to a compressed memory of older blocks
            (``block_width // 2`` slots).
        compressed_mem_factor: tokens per compressed slot (even, divides ``block_width``).
        ignore_index: label ignored by the loss.
        checkpoint_layers: recompute each layer's activations during the backward pass
            (activation checkpointing) when training.

    Shapes: ``forward(seq (B, n) int64)`` -> ``(logits (B, n, V), XLMemories, states)``
    with ``states`` a list of ``(B, S, dim)``, one per recurrent layer in ascending layer
    order.

    Example:
        >>> model = BlockRecurrentTransformer(num_tokens=100, dim=32, depth=2, dim_head=8,
        ...                                   heads=2, block_width=8, num_state_vectors=4)
        >>> seq = torch.randint(0, 100, (1, 20))
        >>> out, mems, states = model(seq)
        >>> out.shape, mems.position, states[0].shape
        (torch.Size([1, 20, 100]), 20, torch.Size([1, 4, 32]))
        >>> out, mems, states = model(seq, xl_memories=mems, states=states)
        >>> mems.position
        40
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        xl_memories_layers: tuple[int, ...] | None = None,
        recurrent_layers: tuple[int, ...] | None = None,
        read_recurrent_layers: tuple[int, ...] | None = None,
        *,
        max_seq_len: int = 1024,
        block_width: int = 512,
        num_state_vectors: int | None = None,
        ff_mult: float = 4,
        all_layers_qk_rmsnorm: bool = False,
        qk_rmsnorm_scale: float = 8.0,
        kv_heads: int | None = None,
        sliding_window: bool = True,
        state_attends_previous_block: bool = True,
        gate_type: str = "fixed",
        state_ffn: bool = False,
        position_encoding: str | None = "rotary",
        use_compressed_mem: bool = False,
        compressed_mem_factor: int = 4,
        ignore_index: int = -100,
        checkpoint_layers: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("num_tokens", num_tokens),
            ("dim", dim),
            ("depth", depth),
            ("dim_head", dim_head),
            ("heads", heads),
            ("max_seq_len", max_seq_len),
            ("block_width", block_width),
        ):
            check_positive_int(name, value)
        kv_heads = heads if kv_heads is None else check_positive_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"kv_heads must divide heads = {heads}; got {kv_heads}")
        num_state_vectors = block_width if num_state_vectors is None else num_state_vectors
        check_positive_int("num_state_vectors", num_state_vectors)
        ff_mult = check_positive_number("ff_mult", ff_mult)
        temperature = check_positive_number("qk_rmsnorm_scale", qk_rmsnorm_scale)
        if gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type must be one of {GATE_TYPES}; got {gate_type!r}")
        for name, value in (
            ("all_layers_qk_rmsnorm", all_layers_qk_rmsnorm),
            ("sliding_window", sliding_window),
            ("state_attends_previous_block", state_attends_previous_block),
            ("state_ffn", state_ffn),
            ("use_compressed_mem", use_compressed_mem),
            ("checkpoint_layers", checkpoint_layers),
        ):
            check_bool(name, value)
        check_int("ignore_index", ignore_index)
        compressed_slots = 0
        if use_compressed_mem:
            c = compressed_mem_factor
            if not isinstance(c, int) or isinstance(c, bool) or c < 2 or c % 2 or block_width % c:
                raise ValueError(
                    "compressed_mem_factor must be an even int >= 2 that divides block_width = "
                    f"{block_width}; got {c!r}"
                )
            compressed_slots = block_width // 2

        xl_memories_layers = _layers(
            "xl_memories_layers",
            tuple(range(1, depth + 1)) if xl_memories_layers is None else xl_memories_layers,
            depth,
            allow_empty=True,
        )
        recurrent_layers = _layers(
            "recurrent_layers",
            (max(1, depth // 2),) if recurrent_layers is None else recurrent_layers,
            depth,
            allow_empty=True,
        )
        if read_recurrent_layers is None:
            read_recurrent_layers = recurrent_layers
        if not isinstance(read_recurrent_layers, (tuple, list)):
            raise TypeError(
                f"read_recurrent_layers must be a tuple of ints; got {read_recurrent_layers!r}"
            )
        if len(read_recurrent_layers) != len(recurrent_layers):
            raise ValueError(
                "read_recurrent_layers must have one layer per recurrent layer "
                f"({len(recurrent_layers)}); got {tuple(read_recurrent_layers)}"
            )
        for r in read_recurrent_layers:
            if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= depth:
                raise ValueError(
                    f"read_recurrent_layers must contain layers in 1..{depth}; "
                    f"got {tuple(read_recurrent_layers)}"
                )
        reader_of = dict(zip(recurrent_layers, read_recurrent_layers))
        bad = {w: r for w, r in reader_of.items() if r > w}
        if bad:
            raise ValueError(
                "each read_recurrent_layers entry must be <= its recurrent layer (a state is "
                f"read at or below the layer that writes it); got {bad} (writer: reader)"
            )

        self.num_tokens, self.dim, self.depth = num_tokens, dim, depth
        self.heads, self.dim_head, self.kv_heads = heads, dim_head, kv_heads
        self.max_seq_len, self.block_width = max_seq_len, block_width
        self.num_state_vectors, self.ignore_index = num_state_vectors, ignore_index
        self.xl_memories_layers = xl_memories_layers
        self.recurrent_layers = tuple(sorted(recurrent_layers))
        self.read_recurrent_layers = tuple(reader_of[w] for w in self.recurrent_layers)
        self.sliding_window = sliding_window
        self.checkpoint_layers = checkpoint_layers
        self.compressed_slots = compressed_slots
        self.compressed_per_block = (
            block_width // compressed_mem_factor if use_compressed_mem else 1
        )

        # layers
        max_distance = 2 * block_width + (
            block_width * compressed_mem_factor // 2 if use_compressed_mem else 0
        )
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.positions = PositionEncoding(
            position_encoding,
            heads,
            dim_head,
            mlp_dim=max(8, dim // 4),
            max_distance=max(32, max_distance),
        )
        self._writer_slot: list[int | None] = []
        self._external_reads: list[tuple[int, ...]] = []
        layers = []
        for layer in range(1, depth + 1):
            writes = layer in reader_of
            external = tuple(
                self.recurrent_layers.index(w)
                for w in self.recurrent_layers
                if reader_of[w] == layer and w != layer
            )
            reads_own = writes and reader_of[layer] == layer
            xl = layer in xl_memories_layers
            state_lookback = block_width if writes and state_attends_previous_block else 0
            spec = LayerSpec(
                xl=xl,
                keeps_previous=xl or state_lookback > 0,
                state_lookback=state_lookback,
                reads_own_state=reads_own,
                num_external_reads=len(external),
                qk_norm=all_layers_qk_rmsnorm or writes or reads_own or bool(external),
            )
            state = None
            if writes:
                state = RecurrentState(
                    dim,
                    num_state_vectors,
                    heads,
                    dim_head,
                    kv_heads,
                    temperature,
                    gate_type=gate_type,
                    state_ffn=state_ffn,
                    ff_mult=ff_mult,
                )
            compressor = (
                MemoryCompressor(dim_head, compressed_mem_factor)
                if xl and use_compressed_mem
                else None
            )
            layers.append(
                BlockRecurrentLayer(
                    dim,
                    spec,
                    heads=heads,
                    dim_head=dim_head,
                    kv_heads=kv_heads,
                    width=block_width,
                    temperature=temperature,
                    ff_mult=ff_mult,
                    state=state,
                    compressor=compressor,
                    compressed_slots=compressed_slots,
                )
            )
            self._writer_slot.append(self.recurrent_layers.index(layer) if writes else None)
            self._external_reads.append(external)
        self.layers = nn.ModuleList(layers)
        self.final_norm = RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)
        self._plan = self._make_plan(reader_of)

    def _make_plan(self, reader_of: dict[int, int]) -> list[tuple[int, int]]:
        """Runs of 0-indexed layers ``(first, last)``: single layers run over all blocks at
        once, longer runs (from a state reader up to a higher writer) block by block."""
        spans = sorted((r - 1, w - 1) for w, r in reader_of.items() if r < w)
        merged: list[list[int]] = []
        for first, last in spans:
            if merged and first <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        plan, layer = [], 0
        for first, last in merged:
            plan.extend((i, i) for i in range(layer, first))
            plan.append((first, last))
            layer = last + 1
        plan.extend((i, i) for i in range(layer, self.depth))
        return plan

    # properties

    @property
    def _param(self) -> Tensor:
        return self.token_emb.weight

    def _states_modules(self) -> list[RecurrentState]:
        return [self.layers[w - 1].state for w in self.recurrent_layers]

    def _memory_length(self, layer: int, position: int) -> int:
        r = position % self.block_width
        if self.layers[layer].spec.keeps_previous:
            return min(position, self.block_width + r)
        return r

    # streams: creation, validation, reset

    def _fresh_stream(self, batch: int) -> _Stream:
        weight = self._param
        empty = weight.new_zeros(batch, self.kv_heads, 0, self.dim_head)
        no_valid = torch.zeros(batch, 0, dtype=torch.bool, device=weight.device)
        layers = []
        for layer in self.layers:
            memory = LayerMemory(empty, empty, no_valid)
            if layer.compressor is not None:
                slots = self.compressed_slots
                memory.compressed_keys = weight.new_zeros(
                    batch, self.kv_heads, slots, self.dim_head
                )
                memory.compressed_values = memory.compressed_keys
                memory.compressed_valid = torch.zeros(
                    batch, slots, dtype=torch.bool, device=weight.device
                )
            layers.append(memory)
        states = [module.initial_state(batch) for module in self._states_modules()]
        return _Stream(XLMemories(0, layers), states, [None] * len(states))

    def _check_memories(self, mems: XLMemories, batch: int) -> None:
        weight = self._param
        position = mems.position
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"xl_memories.position must be a non-negative int; got {position!r}")
        if len(mems.layers) != self.depth:
            raise ValueError(
                f"xl_memories must hold one LayerMemory per layer ({self.depth}); got "
                f"{len(mems.layers)} (memories from a model of another depth?)"
            )
        for index, (layer, memory) in enumerate(zip(self.layers, mems.layers)):
            name = f"xl_memories[{index}]"
            if not isinstance(memory, LayerMemory):
                raise TypeError(f"{name} must be a LayerMemory; got {type(memory).__name__}")
            m = self._memory_length(index, position)
            expected = (batch, self.kv_heads, m, self.dim_head)
            for field in ("keys", "values"):
                t = getattr(memory, field)
                check_tensor(f"{name}.{field}", t, dtype=weight.dtype, device=weight.device)
                if tuple(t.shape) != expected:
                    raise ValueError(
                        f"{name}.{field} must have shape (B, kv_heads, m, dim_head) = {expected} "
                        f"at position {position}; got {tuple(t.shape)} (memories from another "
                        "configuration, another batch or out of sync?)"
                    )
            check_tensor(f"{name}.valid", memory.valid, dtype=torch.bool, device=weight.device)
            if tuple(memory.valid.shape) != (batch, m):
                raise ValueError(
                    f"{name}.valid must have shape {(batch, m)}; got {tuple(memory.valid.shape)}"
                )
            compressed = memory.compressed_keys is not None
            if compressed != (layer.compressor is not None):
                raise ValueError(
                    f"{name} {'has' if compressed else 'lacks'} a compressed memory but the layer "
                    f"{'does not use' if compressed else 'uses'} one (memories from another "
                    "configuration?)"
                )
            if compressed:
                slots = (batch, self.kv_heads, self.compressed_slots, self.dim_head)
                for field in ("compressed_keys", "compressed_values"):
                    t = getattr(memory, field)
                    check_tensor(f"{name}.{field}", t, dtype=weight.dtype, device=weight.device)
                    if tuple(t.shape) != slots:
                        raise ValueError(
                            f"{name}.{field} must have shape {slots}; got {tuple(t.shape)}"
                        )
                ok = memory.compressed_valid
                check_tensor(f"{name}.compressed_valid", ok, dtype=torch.bool, device=weight.device)
                if tuple(ok.shape) != slots[:1] + slots[2:3]:
                    raise ValueError(
                        f"{name}.compressed_valid must have shape {slots[:1] + slots[2:3]}; "
                        f"got {tuple(ok.shape)}"
                    )

    def _check_states(self, states, batch: int) -> list[Tensor]:
        weight = self._param
        if not isinstance(states, (list, tuple)):
            raise TypeError(f"states must be a list of tensors; got {type(states).__name__}")
        if len(states) != len(self.recurrent_layers):
            raise ValueError(
                f"states must hold one tensor per recurrent layer {self.recurrent_layers}; got "
                f"{len(states)} (states from another configuration?)"
            )
        expected = (batch, self.num_state_vectors, self.dim)
        for i, s in enumerate(states):
            check_tensor(f"states[{i}]", s, dtype=weight.dtype, device=weight.device)
            if tuple(s.shape) != expected:
                raise ValueError(
                    f"states[{i}] must have shape (B, num_state_vectors, dim) = {expected}; got "
                    f"{tuple(s.shape)}"
                )
        return list(states)

    def _stream_from(self, xl_memories, states, batch: int) -> _Stream:
        if isinstance(xl_memories, (list, tuple)) and not xl_memories:
            xl_memories = None  # block-recurrent-transformer-pytorch's "no memories yet"
        if isinstance(states, (list, tuple)) and not states and xl_memories is None:
            states = None
        if xl_memories is None:
            if states is not None and len(states) > 0:
                raise ValueError(
                    "xl_memories is required when states is given: pass the memories returned "
                    "together with these states"
                )
            return self._fresh_stream(batch)
        if not isinstance(xl_memories, XLMemories):
            raise TypeError(
                f"xl_memories must be the XLMemories returned by the model; got "
                f"{type(xl_memories).__name__}"
            )
        if states is None:
            if self.recurrent_layers:
                raise ValueError(
                    "states is required when xl_memories is given (the model has recurrent "
                    f"layers {self.recurrent_layers}): pass the states returned with these memories"
                )
            states = []
        self._check_memories(xl_memories, batch)
        states = self._check_states(states, batch)
        return _Stream(xl_memories, states, [None] * len(states))

    def reset_states(self, states: list[Tensor], rows: Tensor) -> list[Tensor]:
        """Replace the states of some rows with the learned initial state.

        Arguments:
            states: the list of ``(B, S, dim)`` states returned by :meth:`forward`.
            rows: ``(B,)`` bool; the rows to reset.

        Returns:
            a new list; the input tensors are not modified.
        """
        check_tensor("rows", rows, dim=1, dtype=torch.bool)
        states = self._check_states(states, rows.shape[0])
        rows = rows.to(self._param.device)[:, None, None]
        return [
            torch.where(rows, module.initial_state(s.shape[0]), s)
            for module, s in zip(self._states_modules(), states)
        ]

    def _check_tokens(self, name: str, seq, *, min_length: int) -> None:
        check_tensor(name, seq, dim=2, integer=True, device=self._param.device)
        if seq.shape[1] < min_length:
            raise ValueError(
                f"{name} must have shape (B, n) with n >= {min_length}; got {tuple(seq.shape)}"
            )
        check_token_ids(name, seq, self.num_tokens)

    # the computation

    def _context(self) -> CallContext:
        weight = self._param
        return CallContext(
            self.positions,
            self.block_width,
            self.sliding_window,
            self.compressed_slots,
            self.compressed_per_block,
            weight.dtype,
            weight.device,
        )

    def _call_layer(self, index: int, *args):
        layer = self.layers[index]
        if self.checkpoint_layers and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def _run(self, x: Tensor, stream: _Stream, ctx: CallContext) -> tuple[Tensor, _Stream]:
        """Hidden states ``(B, n, dim)`` of the embedded tokens ``x`` continuing ``stream``,
        and the stream after them."""
        geom = BlockGeometry(stream.memories.position, x.shape[1], self.block_width)
        memories = list(stream.memories.layers)
        states, prepared = list(stream.states), list(stream.prepared)
        modules = self._states_modules()

        def run(index: int, h: Tensor, g: BlockGeometry) -> Tensor:
            slot = self._writer_slot[index]
            reads = []
            for w in self._external_reads[index]:
                if prepared[w] is None:
                    prepared[w] = modules[w].prepare(states[w])
                reads.append((prepared[w][1], prepared[w][2]))
            state = None if slot is None else states[slot]
            prep = None if slot is None else prepared[slot]
            # build the window tables (a position bias may need gradients) outside the layer,
            # so that an activation-checkpointed layer computes the same thing when re-run
            ctx.tables(g, self.layers[index].token_lookback)
            h, memories[index], state, prep = self._call_layer(
                index, h, g, memories[index], ctx, self.positions, state, prep, reads
            )
            if slot is not None:
                states[slot], prepared[slot] = state, prep
            return h

        for first, last in self._plan:
            if first == last:
                x = run(first, x, geom)
                continue
            pieces = []
            for start, stop in geom.block_slices():
                h = x[:, start:stop]
                g = BlockGeometry(geom.start + start, stop - start, self.block_width)
                for index in range(first, last + 1):
                    h = run(index, h, g)
                pieces.append(h)
            x = torch.cat(pieces, dim=1)
        return x, _Stream(XLMemories(geom.end, memories), states, prepared)

    # public API

    def forward(
        self,
        seq: Tensor,
        xl_memories: XLMemories | None = None,
        states: list[Tensor] | None = None,
        return_loss: bool = False,
        *,
        reset: Tensor | None = None,
    ) -> tuple[Tensor, XLMemories, list[Tensor]]:
        """Continue a stream with the tokens ``seq``.

        Arguments:
            seq: ``(B, n)`` integer token ids in ``[0, num_tokens)``, ``n >= 1`` (``>= 2``
                with ``return_loss``; the last column is then only a label and may hold
                ``ignore_index``).
            xl_memories: the memories returned by the previous call of the stream, or
                ``None`` (or ``[]``, as in block-recurrent-transformer-pytorch) to start a new
                stream.
            states: the states returned with ``xl_memories`` (required with them when the
                model has recurrent layers).
            return_loss: return the next-token cross-entropy of ``seq[:, 1:]`` given
                ``seq[:, :-1]`` instead of the logits.
            reset: ``(B,)`` bool; rows that start a new document: they forget their memories
                and restart from the initial state (exactly a fresh stream when the call
                starts on a block boundary).

        Returns:
            ``(logits (B, n, V) or the loss (scalar), memories, states)``; memories and
            states are detached and describe the stream after the consumed tokens (all of
            ``seq``, or ``seq[:, :-1]`` with ``return_loss``).
        """
        check_bool("return_loss", return_loss)
        if return_loss:
            check_tensor("seq", seq, dim=2, integer=True)
            if seq.shape[1] < 2:
                raise ValueError(
                    "seq must have shape (B, n) with n >= 2 when return_loss; "
                    f"got {tuple(seq.shape)}"
                )
            inputs, labels = seq[:, :-1], seq[:, 1:]
            self._check_tokens("seq[:, :-1]", inputs, min_length=1)
            check_token_ids("seq[:, 1:]", labels, self.num_tokens, ignore_index=self.ignore_index)
        else:
            self._check_tokens("seq", seq, min_length=1)
            inputs, labels = seq, None
        stream = self._stream_from(xl_memories, states, inputs.shape[0])
        if reset is not None:
            stream = self._reset(stream, reset)
        hidden, stream = self._run(self.token_emb(inputs), stream, self._context())
        logits = self.to_logits(self.final_norm(hidden))
        memories = stream.memories.detach()
        states = [s.detach() for s in stream.states]
        if labels is None:
            return logits, memories, states
        loss = F.cross_entropy(
            rearrange(logits, "b n v -> b v n"), labels, ignore_index=self.ignore_index
        )
        return loss, memories, states

    def _reset(self, stream: _Stream, rows: Tensor) -> _Stream:
        check_tensor("reset", rows, dim=1, dtype=torch.bool)
        batch = stream.memories.batch_size
        if rows.shape[0] != batch:
            raise ValueError(f"reset must have shape ({batch},); got {tuple(rows.shape)}")
        states = self.reset_states(stream.states, rows)
        return _Stream(stream.memories.drop(rows), states, [None] * len(states))

    @torch.no_grad()
    def prefill(
        self,
        tokens: Tensor,
        xl_memories: XLMemories | None = None,
        states: list[Tensor] | None = None,
    ) -> tuple[Tensor, DecodeState]:
        """Consume a prompt for incremental decoding (the ``StepModel`` protocol of
        ``attention_core.generation``).

        Arguments:
            tokens: ``(B, T)`` token ids, ``T >= 1``; consumed in pieces of ``max_seq_len``.
            xl_memories: continue an earlier stream (as in :meth:`forward`), or ``None``.
            states: the states returned with ``xl_memories``.

        Returns:
            the logits ``(B, V)`` of the last position and a :class:`DecodeState`.
        """
        self._check_tokens("tokens", tokens, min_length=1)
        stream = self._stream_from(xl_memories, states, tokens.shape[0])
        ctx = self._context()
        for piece in tokens.split(self.max_seq_len, dim=1):
            hidden, stream = self._run(self.token_emb(piece), stream, ctx)
        return self.to_logits(self.final_norm(hidden[:, -1])), DecodeState(stream, ctx)

    @torch.no_grad()
    def step(self, tokens: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Consume one token per row after ``state``; costs ``O(block_width)`` per token plus
        a state update each time a block completes.

        Arguments:
            tokens: ``(B,)`` token ids.
            state: from :meth:`prefill` or a previous :meth:`step` (not modified).

        Returns:
            the logits ``(B, V)`` of the next position and the new :class:`DecodeState`.
        """
        if not isinstance(state, DecodeState):
            raise TypeError(f"state must be a DecodeState; got {type(state).__name__}")
        check_tensor("tokens", tokens, dim=1, integer=True)
        batch = state.stream.memories.batch_size
        if tokens.shape[0] != batch:
            raise ValueError(f"tokens must have shape ({batch},); got {tuple(tokens.shape)}")
        self._check_tokens("tokens", tokens[:, None], min_length=1)
        hidden, stream = self._run(self.token_emb(tokens[:, None]), state.stream, state.context)
        return self.to_logits(self.final_norm(hidden[:, -1])), DecodeState(stream, state.context)
