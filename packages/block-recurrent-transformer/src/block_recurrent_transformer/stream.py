"""The stream of tokens that a Block-Recurrent Transformer continues from call to call.

After `p` tokens of a stream, layer `l` keeps the keys and values of the tokens that later
tokens still attend to (its `LayerMemory`: the current, incomplete block, plus the previous
block for the layers that reach into it), and every recurrent layer keeps its state vectors
`(B, S, dim)`. A call continues from both and returns them after its tokens; this module
starts a new stream, checks a stream passed back by the user against the model's
configuration (another depth, batch, dtype or position is refused with the reason), holds
the `DecodeState` of incremental decoding and runs the model's layers over the tokens of a
call (`run_layers`).

Einstein notation: `b` batch, `h` key/value heads, `m` memory slots, `d` head feature,
`s` state vectors, `c` model feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attention_core.checks import check_positive_int, check_tensor

from ._config import ModelConfig
from .blocks import BlockGeometry
from .context import CallContext
from .layer import Prepared
from .memory import LayerMemory, XLMemories

if TYPE_CHECKING:
    from .transformer import BlockRecurrentTransformer

__all__ = [
    "DecodeState",
    "Stream",
    "check_memories",
    "check_states",
    "fresh_stream",
    "memory_length",
    "resume",
    "run_layers",
]


@dataclass
class Stream:
    """Everything a call continues from.

    Attributes:
        memories: the memories of every layer after the stream's tokens.
        states: the states `(B, S, dim)` of the recurrent layers, in ascending layer order.
        prepared: for each state, its `RecurrentState.prepare` when already computed, or
            `None`.
    """

    memories: XLMemories
    states: list[Tensor]
    prepared: list[Prepared | None]


@dataclass
class DecodeState:
    """The state of incremental decoding with `BlockRecurrentTransformer.prefill` and `step`.

    It holds the stream's memories and states plus the cached position tables and the
    buffers of the fast decoding steps (`cache`), and stays valid only while the model's
    weights do not change.
    """

    stream: Stream
    context: CallContext
    cache: Any = None

    @property
    def xl_memories(self) -> XLMemories:
        """The memories after the tokens consumed so far."""
        return self.stream.memories

    @property
    def states(self) -> list[Tensor]:
        """The recurrent states `(B, S, dim)` after the tokens consumed so far."""
        return self.stream.states


def memory_length(config: ModelConfig, index: int, position: int) -> int:
    """The number of memory slots `m` of layer `index` (0-indexed) after `position` tokens.

    Arguments:
        config: the model's configuration.
        index: the layer.
        position: the number of tokens of the stream so far.

    Returns:
        the tokens of the current block, plus those of the previous block when the layer keeps
        it.
    """
    r = position % config.block_width
    if config.layer_spec(index).keeps_previous:
        return min(position, config.block_width + r)
    return r


def fresh_stream(config: ModelConfig, batch: int, states: list[Tensor], like: Tensor) -> Stream:
    """A new stream of `batch` rows: empty memories and the given initial states.

    Arguments:
        config: the model's configuration.
        batch: the batch size `B`.
        states: the initial states `(B, S, dim)`, one per recurrent layer.
        like: a parameter of the model (its dtype and device).

    Returns:
        the stream at position 0.
    """
    empty = like.new_zeros(batch, config.kv_heads, 0, config.dim_head)
    no_valid = torch.zeros(batch, 0, dtype=torch.bool, device=like.device)
    layers = []
    for index in range(config.depth):
        memory = LayerMemory(empty, empty, no_valid)
        if _compresses(config, index):
            slots = config.compressed_slots
            memory.compressed_keys = like.new_zeros(batch, config.kv_heads, slots, config.dim_head)
            memory.compressed_values = memory.compressed_keys
            memory.compressed_valid = torch.zeros(
                batch, slots, dtype=torch.bool, device=like.device
            )
        layers.append(memory)
    return Stream(XLMemories(0, layers), states, [None] * len(states))


def _compresses(config: ModelConfig, index: int) -> bool:
    return config.use_compressed_mem and index + 1 in config.xl_memories_layers


# checks of a stream passed back by the user


def resume(
    config: ModelConfig, xl_memories: object, states: object, batch: int, like: Tensor
) -> Stream | None:
    """The stream to continue from the memories and states a user passed, after checking them.

    `xl_memories=None` (or `[]`, block-recurrent-transformer-pytorch's "no memories yet")
    without states starts a new stream. States need the memories returned with them, and a
    model with recurrent layers needs the states returned with the memories.

    Arguments:
        config: the model's configuration.
        xl_memories: an `XLMemories`, `None` or `[]`.
        states: a list of `(B, S, dim)` tensors, `None` or `[]`.
        batch: the batch size `B` of the call.
        like: a parameter of the model (its dtype and device).

    Returns:
        the stream, or `None` for a new stream.

    Raises:
        TypeError: a memory or state of the wrong type or dtype.
        ValueError: memories or states that do not fit the model, the batch or each other.
    """
    if isinstance(xl_memories, (list, tuple)) and not xl_memories:
        xl_memories = None
    if isinstance(states, (list, tuple)) and not states and xl_memories is None:
        states = None
    if xl_memories is None:
        if states is not None:
            raise ValueError(
                "xl_memories is required when states is given: pass the memories returned "
                "together with these states"
            )
        return None
    if not isinstance(xl_memories, XLMemories):
        raise TypeError(
            f"xl_memories must be the XLMemories returned by the model; got "
            f"{type(xl_memories).__name__}"
        )
    if states is None:
        if config.recurrent_layers:
            raise ValueError(
                "states is required when xl_memories is given (the model has recurrent "
                f"layers {config.recurrent_layers}): pass the states returned with these memories"
            )
        states = []
    check_memories(config, xl_memories, batch, like)
    states = check_states(config, states, batch, like)
    return Stream(xl_memories, states, [None] * len(states))


def check_memories(config: ModelConfig, mems: XLMemories, batch: int, like: Tensor) -> None:
    """Check that `mems` holds, for every layer, the memory of a stream of `batch` rows.

    Arguments:
        config: the model's configuration.
        mems: the memories, at position `p`.
        batch: the batch size `B`.
        like: a parameter of the model (its dtype and device).

    Raises:
        TypeError: a memory of the wrong type or dtype.
        ValueError: a memory from another depth, configuration, batch or position.
    """
    position = mems.position
    check_positive_int("xl_memories.position", position, allow_zero=True)
    if len(mems.layers) != config.depth:
        raise ValueError(
            f"xl_memories must hold one LayerMemory per layer ({config.depth}); got "
            f"{len(mems.layers)} (memories from a model of another depth?)"
        )
    for index, memory in enumerate(mems.layers):
        name = f"xl_memories[{index}]"
        if not isinstance(memory, LayerMemory):
            raise TypeError(f"{name} must be a LayerMemory; got {type(memory).__name__}")
        m = memory_length(config, index, position)
        expected = (batch, config.kv_heads, m, config.dim_head)
        for field in ("keys", "values"):
            t = check_tensor(
                f"{name}.{field}", getattr(memory, field), dtype=like.dtype, device=like.device
            )
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"{name}.{field} must have shape (B, kv_heads, m, dim_head) = {expected} "
                    f"at position {position}; got {tuple(t.shape)} (memories from another "
                    "configuration, another batch or out of sync?)"
                )
        check_tensor(
            f"{name}.valid", memory.valid, shape=(batch, m), dtype=torch.bool, device=like.device
        )
        compressed = memory.compressed_keys is not None
        if compressed != _compresses(config, index):
            raise ValueError(
                f"{name} {'has' if compressed else 'lacks'} a compressed memory but the layer "
                f"{'does not use' if compressed else 'uses'} one (memories from another "
                "configuration?)"
            )
        if compressed:
            slots = (batch, config.kv_heads, config.compressed_slots, config.dim_head)
            for field in ("compressed_keys", "compressed_values"):
                check_tensor(
                    f"{name}.{field}",
                    getattr(memory, field),
                    shape=slots,
                    dtype=like.dtype,
                    device=like.device,
                )
            check_tensor(
                f"{name}.compressed_valid",
                memory.compressed_valid,
                shape=(batch, config.compressed_slots),
                dtype=torch.bool,
                device=like.device,
            )


def check_states(config: ModelConfig, states: object, batch: int, like: Tensor) -> list[Tensor]:
    """Check that `states` holds one state `(B, S, dim)` per recurrent layer.

    Arguments:
        config: the model's configuration.
        states: a list or tuple of tensors.
        batch: the batch size `B`.
        like: a parameter of the model (its dtype and device).

    Returns:
        the states as a new list.

    Raises:
        TypeError: not a list, or a state of the wrong dtype.
        ValueError: a state of the wrong shape or device, or a wrong number of states.
    """
    if not isinstance(states, (list, tuple)):
        raise TypeError(f"states must be a list of tensors; got {type(states).__name__}")
    if len(states) != len(config.recurrent_layers):
        raise ValueError(
            f"states must hold one tensor per recurrent layer {config.recurrent_layers}; got "
            f"{len(states)} (states from another configuration?)"
        )
    expected = (batch, config.num_state_vectors, config.dim)
    for i, s in enumerate(states):
        check_tensor(f"states[{i}]", s, dtype=like.dtype, device=like.device)
        if tuple(s.shape) != expected:
            raise ValueError(
                f"states[{i}] must have shape (B, num_state_vectors, dim) = {expected}; got "
                f"{tuple(s.shape)}"
            )
    return list(states)


# running the layers over a call


def run_layers(
    model: BlockRecurrentTransformer, x: Tensor, stream: Stream, ctx: CallContext
) -> tuple[Tensor, Stream]:
    """Run the layers of `model` on the embedded tokens `x` that continue `stream`.

    The layers run in the order of the model's plan: a single layer over all the blocks of
    the call at once, a run of layers (from a state reader up to a higher writer) block by
    block.

    Arguments:
        model: the model.
        x: `(B, n, dim)` the embedded tokens of the call.
        stream: the stream that the tokens continue.
        ctx: the call's shared window tables.

    Returns:
        the hidden states `(B, n, dim)` of the tokens and the stream after them.

    Raises:
        RuntimeError: a recurrent layer returned no state.
    """
    width = model.block_width
    geom = BlockGeometry(stream.memories.position, x.shape[1], width)
    memories = list(stream.memories.layers)
    states, prepared = list(stream.states), list(stream.prepared)
    modules = model._states_modules()

    def run(index: int, h: Tensor, g: BlockGeometry) -> Tensor:
        slot = model._writer_slot[index]
        reads = []
        for w in model._external_reads[index]:
            read = prepared[w]
            if read is None:
                read = prepared[w] = modules[w].prepare(states[w])
            reads.append((read[1], read[2]))
        state = None if slot is None else states[slot]
        prep = None if slot is None else prepared[slot]
        # build the window tables (a position bias may need gradients) outside the layer,
        # so that an activation-checkpointed layer computes the same thing when re-run
        ctx.tables(g, model._layer(index).token_lookback)
        h, memories[index], state, prep = model._call_layer(
            index, h, g, memories[index], ctx, model.positions, state, prep, reads
        )
        if slot is not None:
            if state is None:
                raise RuntimeError(f"recurrent layer {index + 1} returned no state")
            states[slot], prepared[slot] = state, prep
        return h

    for first, last in model._plan:
        if first == last:
            x = run(first, x, geom)
            continue
        pieces = []
        for start, stop in geom.block_slices():
            h = x[:, start:stop]
            g = BlockGeometry(geom.start + start, stop - start, width)
            for index in range(first, last + 1):
                h = run(index, h, g)
            pieces.append(h)
        x = torch.cat(pieces, dim=1)
    return x, Stream(XLMemories(geom.end, memories), states, prepared)
