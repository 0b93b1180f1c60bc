"""The Block-Recurrent Transformer language model (Hutchins et al. 2022, arXiv 2203.07852).

A stream of tokens is cut into blocks of ``block_width`` tokens at absolute positions. Every
layer attends within a sliding window (`blocks`); the layers in ``xl_memories_layers``
reach back into the previous block, Transformer-XL style; the layers in ``recurrent_layers``
carry state vectors from block to block (`state`), read by the same layer or, with
``read_recurrent_layers``, by a lower one ("enhanced recurrence", after ERNIE-Doc, Ding et
al. 2021, arXiv 2012.15688).

A call may continue a stream anywhere, even inside a block: the memories returned by one call
hold exactly what the next call needs, so feeding a sequence in one call or in pieces of any
lengths gives the same outputs (up to floating-point rounding). That is also how generation
works: one token per call, each costing ``O(block_width)`` (`step`).

Layers that do not depend on a state from another layer run over all the blocks of a call at
once; only the state updates are sequential. Layers between a state reader and a higher
writer run block by block.

Einstein notation: ``b`` batch, ``n`` sequence, ``v`` vocabulary, ``s`` state vectors,
``c`` model feature.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attention_core.checks import check_bool, check_tensor, check_token_ids, check_tokens
from attention_core.nn import RMSNorm

from ._config import ModelConfig
from ._decode_step import fast_step
from .attention import PositionEncoding
from .context import CallContext
from .layer import BlockRecurrentLayer, Prepared
from .memory import LayerMemory, XLMemories
from .state import RecurrentState
from .stream import DecodeState, Stream, check_states, fresh_stream, resume, run_layers

__all__ = ["BlockRecurrentTransformer", "DecodeState"]


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
            `block_recurrent_transformer.RecurrentTrainerWrapper`
            and by `prefill`; a call to `forward` may be of any length.
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

    The arguments are checked once, before any module is built; an invalid one raises a
    `TypeError` or `ValueError` that names it. The model keeps them, with their defaults
    resolved, in `config` and as attributes (`num_tokens`, `dim`, `depth`, `heads`,
    `dim_head`, `kv_heads`, `max_seq_len`, `block_width`, `num_state_vectors`,
    `ignore_index`, `xl_memories_layers`, `recurrent_layers` in ascending order and
    `read_recurrent_layers` in the same order).

    Example:
        >>> model = BlockRecurrentTransformer(
        ...     num_tokens=100, dim=32, depth=2, dim_head=8, heads=2,
        ...     block_width=8, num_state_vectors=4)
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
        config = ModelConfig(
            num_tokens,
            dim,
            depth,
            dim_head,
            heads,
            xl_memories_layers,
            recurrent_layers,
            read_recurrent_layers,
            max_seq_len=max_seq_len,
            block_width=block_width,
            num_state_vectors=num_state_vectors,
            ff_mult=ff_mult,
            all_layers_qk_rmsnorm=all_layers_qk_rmsnorm,
            qk_rmsnorm_scale=qk_rmsnorm_scale,
            kv_heads=kv_heads,
            sliding_window=sliding_window,
            state_attends_previous_block=state_attends_previous_block,
            gate_type=gate_type,
            state_ffn=state_ffn,
            position_encoding=position_encoding,
            use_compressed_mem=use_compressed_mem,
            compressed_mem_factor=compressed_mem_factor,
            ignore_index=ignore_index,
            checkpoint_layers=checkpoint_layers,
        )
        self.config = config
        # the resolved arguments, as attributes (block-recurrent-transformer-pytorch's names)
        self.num_tokens, self.dim, self.depth = config.num_tokens, config.dim, config.depth
        self.heads, self.dim_head, self.kv_heads = config.heads, config.dim_head, config.kv_heads
        self.max_seq_len, self.block_width = config.max_seq_len, config.block_width
        self.num_state_vectors, self.ignore_index = config.num_state_vectors, config.ignore_index
        self.xl_memories_layers = config.xl_memories_layers
        self.recurrent_layers = config.recurrent_layers
        self.read_recurrent_layers = config.read_recurrent_layers
        self.sliding_window, self.checkpoint_layers = (
            config.sliding_window,
            config.checkpoint_layers,
        )
        self.compressed_slots = config.compressed_slots
        self.compressed_per_block = config.compressed_per_block

        self.token_emb = nn.Embedding(num_tokens, dim)
        self.positions = PositionEncoding(
            position_encoding,
            heads,
            dim_head,
            mlp_dim=max(8, dim // 4),
            max_distance=max(32, config.max_distance),
        )
        self.layers = nn.ModuleList(config.make_layer(index) for index in range(depth))
        self.final_norm = RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)
        self._writer_slot = [config.writer_slot(i) for i in range(depth)]
        self._external_reads = [config.external_reads(i) for i in range(depth)]
        self._plan = config.plan()
        # `step` takes `._decode_step` for a token inside a block (tests turn it off to compare)
        self._fast_decode = True

    # streams

    @property
    def _param(self) -> Tensor:
        return self.token_emb.weight

    def _layer(self, index: int) -> BlockRecurrentLayer:
        # `nn.ModuleList` indexes to `nn.Module`; every entry is built by `config.make_layer`
        return cast(BlockRecurrentLayer, self.layers[index])

    def _states_modules(self) -> list[RecurrentState]:
        modules = []
        for w in self.recurrent_layers:
            state = self._layer(w - 1).state
            if state is None:
                raise RuntimeError(f"recurrent layer {w} has no RecurrentState")
            modules.append(state)
        return modules

    def _fresh_stream(self, batch: int) -> Stream:
        states = [module.initial_state(batch) for module in self._states_modules()]
        return fresh_stream(self.config, batch, states, self._param)

    def _stream_from(self, xl_memories: object, states: object, batch: int) -> Stream:
        stream = resume(self.config, xl_memories, states, batch, self._param)
        return self._fresh_stream(batch) if stream is None else stream

    def reset_states(self, states: list[Tensor], rows: Tensor) -> list[Tensor]:
        """Replace the states of some rows with the learned initial state.

        Arguments:
            states: the list of ``(B, S, dim)`` states returned by `forward`.
            rows: ``(B,)`` bool; the rows to reset.

        Returns:
            a new list; the input tensors are not modified.
        """
        check_tensor("rows", rows, dim=1, dtype=torch.bool)
        states = check_states(self.config, states, rows.shape[0], self._param)
        rows = rows.to(self._param.device)[:, None, None]
        return [
            torch.where(rows, module.initial_state(s.shape[0]), s)
            for module, s in zip(self._states_modules(), states)
        ]

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

    def _call_layer(
        self, index: int, *args: object
    ) -> tuple[Tensor, LayerMemory, Tensor | None, Prepared | None]:
        layer = self.layers[index]
        if self.checkpoint_layers and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

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
        device = self._param.device
        if return_loss:
            check_tokens("seq", seq, self.num_tokens, min_length=2, device=device,
                         ignore_index=self.ignore_index)  # fmt: skip
            inputs, labels = seq[:, :-1], seq[:, 1:]
            check_token_ids("seq[:, :-1]", inputs, self.num_tokens)
        else:
            check_tokens("seq", seq, self.num_tokens, min_length=1, device=device)
            inputs, labels = seq, None
        stream = self._stream_from(xl_memories, states, inputs.shape[0])
        if reset is not None:
            stream = self._reset(stream, reset)
        hidden, stream = run_layers(self, self.token_emb(inputs), stream, self._context())
        logits = self.to_logits(self.final_norm(hidden))
        memories = stream.memories.detach()
        states = [s.detach() for s in stream.states]
        if labels is None:
            return logits, memories, states
        loss = F.cross_entropy(
            rearrange(logits, "b n v -> (b n) v"),  # rows of tokens: no transposed copy
            rearrange(labels, "b n -> (b n)"),
            ignore_index=self.ignore_index,
        )
        return loss, memories, states

    def _reset(self, stream: Stream, rows: Tensor) -> Stream:
        check_tensor("reset", rows, shape=(stream.memories.batch_size,), dtype=torch.bool)
        states = self.reset_states(stream.states, rows)
        return Stream(stream.memories.drop(rows), states, [None] * len(states))

    @torch.no_grad()
    def prefill(
        self,
        tokens: Tensor,
        xl_memories: XLMemories | None = None,
        states: list[Tensor] | None = None,
    ) -> tuple[Tensor, DecodeState]:
        """Consume a prompt for incremental decoding.

        This is the ``prefill`` of the ``StepModel`` protocol of ``attention_core.generation``.

        Arguments:
            tokens: ``(B, T)`` token ids, ``T >= 1``; consumed in pieces of ``max_seq_len``.
            xl_memories: continue an earlier stream (as in `forward`), or ``None``.
            states: the states returned with ``xl_memories``.

        Returns:
            the logits ``(B, V)`` of the last position and a `DecodeState`.
        """
        check_tokens("tokens", tokens, self.num_tokens, min_length=1, device=self._param.device)
        stream = self._stream_from(xl_memories, states, tokens.shape[0])
        ctx = self._context()
        for piece in tokens.split(self.max_seq_len, dim=1):
            hidden, stream = run_layers(self, self.token_emb(piece), stream, ctx)
        return self.to_logits(self.final_norm(hidden[:, -1])), DecodeState(stream, ctx)

    @torch.no_grad()
    def step(self, tokens: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Consume one token per row after ``state``.

        Each token costs ``O(block_width)``, plus a state update each time a block completes.

        Arguments:
            tokens: ``(B,)`` token ids.
            state: from `prefill` or a previous `step` (not modified).

        Returns:
            the logits ``(B, V)`` of the next position and the new `DecodeState`.
        """
        if not isinstance(state, DecodeState):
            raise TypeError(f"state must be a DecodeState; got {type(state).__name__}")
        batch = state.stream.memories.batch_size
        check_tokens("tokens", tokens, self.num_tokens, shape=(batch,), device=self._param.device)
        if self._fast_decode:
            fast = fast_step(self, tokens, state)
            if fast is not None:
                return fast
        x = self.token_emb(tokens[:, None])
        hidden, stream = run_layers(self, x, state.stream, state.context)
        logits = self.to_logits(self.final_norm(hidden[:, -1]))
        return logits, DecodeState(stream, state.context, state.cache)
