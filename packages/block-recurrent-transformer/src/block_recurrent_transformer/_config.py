"""The configuration of a Block-Recurrent Transformer, checked once when the model is built.

`ModelConfig` holds the constructor's arguments with their defaults resolved, refuses invalid
ones with an error that names the argument, the expected and the actual value, and derives
what follows for each layer: its `LayerSpec`, the state it writes, the states of higher
layers it reads ("enhanced recurrence"), its modules and the order in which the layers run.

Layers are numbered from 1 in the arguments (as in the paper and
block-recurrent-transformer-pytorch) and indexed from 0 in the derived tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from attention_core.checks import (
    check_bool,
    check_choice,
    check_int,
    check_positive_int,
    check_positive_number,
)

from .gates import GATE_TYPES
from .layer import BlockRecurrentLayer, LayerSpec
from .memory import MemoryCompressor
from .state import RecurrentState

__all__ = ["ModelConfig"]


def _layer_numbers(name: str, value: object, depth: int) -> tuple[int, ...]:
    """Check a tuple of distinct 1-indexed layer numbers in `1..depth`."""
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"{name} must be a tuple of ints (1-indexed layers); got {value!r}")
    if any(not 1 <= v <= depth for v in value):
        raise ValueError(f"{name} must contain layers in 1..{depth} (depth); got {tuple(value)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} must not repeat a layer; got {tuple(value)}")
    return tuple(value)


def _readers(
    read_recurrent_layers: object, recurrent_layers: tuple[int, ...], depth: int
) -> dict[int, int]:
    """Map each recurrent layer to the layer that reads its state (at or below it)."""
    if read_recurrent_layers is None:
        return {w: w for w in recurrent_layers}
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
    return reader_of


@dataclass(init=False)
class ModelConfig:
    """The checked arguments of `BlockRecurrentTransformer`, with defaults resolved.

    The constructor takes the arguments of `BlockRecurrentTransformer` (see there), checks
    them and keeps them with their defaults resolved: `kv_heads` and `num_state_vectors` are
    ints, `ff_mult` and `qk_rmsnorm_scale` floats, the three layer lists tuples,
    `recurrent_layers` ascending and `read_recurrent_layers` in the same order.

    Raises:
        TypeError: an argument of the wrong type (a flag that is not a bool, a layer list
            that is not a tuple of ints, ...).
        ValueError: an argument out of range or inconsistent with another one.
    """

    num_tokens: int
    dim: int
    depth: int
    dim_head: int
    heads: int
    xl_memories_layers: tuple[int, ...]
    recurrent_layers: tuple[int, ...]
    read_recurrent_layers: tuple[int, ...]
    max_seq_len: int
    block_width: int
    num_state_vectors: int
    ff_mult: float
    all_layers_qk_rmsnorm: bool
    qk_rmsnorm_scale: float
    kv_heads: int
    sliding_window: bool
    state_attends_previous_block: bool
    gate_type: str
    state_ffn: bool
    position_encoding: str | None
    use_compressed_mem: bool
    compressed_mem_factor: int
    ignore_index: int
    checkpoint_layers: bool

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        dim_head: int,
        heads: int,
        xl_memories_layers: Sequence[int] | None,
        recurrent_layers: Sequence[int] | None,
        read_recurrent_layers: Sequence[int] | None,
        *,
        max_seq_len: int,
        block_width: int,
        num_state_vectors: int | None,
        ff_mult: float,
        all_layers_qk_rmsnorm: bool,
        qk_rmsnorm_scale: float,
        kv_heads: int | None,
        sliding_window: bool,
        state_attends_previous_block: bool,
        gate_type: str,
        state_ffn: bool,
        position_encoding: str | None,
        use_compressed_mem: bool,
        compressed_mem_factor: int,
        ignore_index: int,
        checkpoint_layers: bool,
    ) -> None:
        self.num_tokens = check_positive_int("num_tokens", num_tokens)
        self.dim = check_positive_int("dim", dim)
        self.depth = depth = check_positive_int("depth", depth)
        self.dim_head = check_positive_int("dim_head", dim_head)
        self.heads = heads = check_positive_int("heads", heads)
        self.max_seq_len = check_positive_int("max_seq_len", max_seq_len)
        self.block_width = width = check_positive_int("block_width", block_width)
        self.kv_heads = check_positive_int("kv_heads", heads if kv_heads is None else kv_heads)
        if heads % self.kv_heads:
            raise ValueError(f"kv_heads must divide heads = {heads}; got {self.kv_heads}")
        self.num_state_vectors = check_positive_int(
            "num_state_vectors", width if num_state_vectors is None else num_state_vectors
        )
        self.ff_mult = check_positive_number("ff_mult", ff_mult)
        self.qk_rmsnorm_scale = check_positive_number("qk_rmsnorm_scale", qk_rmsnorm_scale)
        self.gate_type = check_choice("gate_type", gate_type, GATE_TYPES)
        self.all_layers_qk_rmsnorm = check_bool("all_layers_qk_rmsnorm", all_layers_qk_rmsnorm)
        self.sliding_window = check_bool("sliding_window", sliding_window)
        self.state_attends_previous_block = check_bool(
            "state_attends_previous_block", state_attends_previous_block
        )
        self.state_ffn = check_bool("state_ffn", state_ffn)
        self.use_compressed_mem = check_bool("use_compressed_mem", use_compressed_mem)
        self.checkpoint_layers = check_bool("checkpoint_layers", checkpoint_layers)
        self.position_encoding = position_encoding
        self.ignore_index = check_int("ignore_index", ignore_index)
        c = compressed_mem_factor
        if self.use_compressed_mem and (
            not isinstance(c, int) or isinstance(c, bool) or c < 2 or c % 2 or width % c
        ):
            raise ValueError(
                "compressed_mem_factor must be an even int >= 2 that divides block_width = "
                f"{width}; got {c!r}"
            )
        self.compressed_mem_factor = c
        all_layers = tuple(range(1, depth + 1))
        self.xl_memories_layers = _layer_numbers(
            "xl_memories_layers",
            all_layers if xl_memories_layers is None else xl_memories_layers,
            depth,
        )
        recurrent = _layer_numbers(
            "recurrent_layers",
            (max(1, depth // 2),) if recurrent_layers is None else recurrent_layers,
            depth,
        )
        reader_of = _readers(read_recurrent_layers, recurrent, depth)
        self.recurrent_layers = tuple(sorted(recurrent))
        self.read_recurrent_layers = tuple(reader_of[w] for w in self.recurrent_layers)

    # what follows from the arguments

    @property
    def compressed_slots(self) -> int:
        """Slots of the compressed memory of an XL layer (`0` without one)."""
        return self.block_width // 2 if self.use_compressed_mem else 0

    @property
    def compressed_per_block(self) -> int:
        """Compressed slots that one block of `block_width` tokens fills."""
        return self.block_width // self.compressed_mem_factor if self.use_compressed_mem else 1

    @property
    def max_distance(self) -> int:
        """The largest query-key distance in a window (for the position biases)."""
        if not self.use_compressed_mem:
            return 2 * self.block_width
        return 2 * self.block_width + self.block_width * self.compressed_mem_factor // 2

    def writer_slot(self, index: int) -> int | None:
        """The position in `recurrent_layers` of the state that layer `index` (0-indexed)
        writes, or `None` when the layer is not recurrent."""
        layer = index + 1
        return self.recurrent_layers.index(layer) if layer in self.recurrent_layers else None

    def external_reads(self, index: int) -> tuple[int, ...]:
        """The positions in `recurrent_layers` of the higher layers' states that layer `index`
        (0-indexed) reads."""
        layer = index + 1
        return tuple(
            slot
            for slot, (w, r) in enumerate(zip(self.recurrent_layers, self.read_recurrent_layers))
            if r == layer and w != layer
        )

    def layer_spec(self, index: int) -> LayerSpec:
        """The static role of layer `index` (0-indexed) in the stack."""
        slot = self.writer_slot(index)
        writes = slot is not None
        reads_own = slot is not None and self.read_recurrent_layers[slot] == index + 1
        external = self.external_reads(index)
        xl = index + 1 in self.xl_memories_layers
        state_lookback = self.block_width if writes and self.state_attends_previous_block else 0
        return LayerSpec(
            xl=xl,
            keeps_previous=xl or state_lookback > 0,
            state_lookback=state_lookback,
            reads_own_state=reads_own,
            num_external_reads=len(external),
            qk_norm=self.all_layers_qk_rmsnorm or writes or reads_own or bool(external),
        )

    def make_layer(self, index: int) -> BlockRecurrentLayer:
        """Build layer `index` (0-indexed) with its state and its memory compressor, if any."""
        spec = self.layer_spec(index)
        state = None
        if self.writer_slot(index) is not None:
            state = RecurrentState(
                self.dim,
                self.num_state_vectors,
                self.heads,
                self.dim_head,
                self.kv_heads,
                self.qk_rmsnorm_scale,
                gate_type=self.gate_type,
                state_ffn=self.state_ffn,
                ff_mult=self.ff_mult,
            )
        compressor = None
        if spec.xl and self.use_compressed_mem:
            compressor = MemoryCompressor(self.dim_head, self.compressed_mem_factor)
        return BlockRecurrentLayer(
            self.dim,
            spec,
            heads=self.heads,
            dim_head=self.dim_head,
            kv_heads=self.kv_heads,
            width=self.block_width,
            temperature=self.qk_rmsnorm_scale,
            ff_mult=self.ff_mult,
            state=state,
            compressor=compressor,
            compressed_slots=self.compressed_slots,
        )

    def plan(self) -> list[tuple[int, int]]:
        """Runs of 0-indexed layers `(first, last)`: single layers run over all blocks at once,
        longer runs (from a state reader up to a higher writer) block by block."""
        spans = sorted(
            (r - 1, w - 1)
            for w, r in zip(self.recurrent_layers, self.read_recurrent_layers)
            if r < w
        )
        merged: list[list[int]] = []
        for first, last in spans:
            if merged and first <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        plan: list[tuple[int, int]] = []
        layer = 0
        for first, last in merged:
            plan.extend((i, i) for i in range(layer, first))
            plan.append((first, last))
            layer = last + 1
        plan.extend((i, i) for i in range(layer, self.depth))
        return plan
