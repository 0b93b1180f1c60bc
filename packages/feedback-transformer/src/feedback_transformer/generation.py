"""This module decodes a `FeedbackTransformer` token by token.

It implements the ``prefill``/``step`` protocol of ``attention_core.generation``.

Decoding computes the function that `FeedbackTransformer.forward` computes, one token at a
time. With ``seq_len = 1`` that is the Feedback Transformer's exact sequential model (Fan et
al. 2021, arXiv 2002.09402): each new token's layers attend to the memory of all earlier
steps. With ``seq_len > 1`` the tokens are grouped in windows of ``seq_len`` as in
``forward`` (counted from the prompt's first token): a token sees the memory of the earlier
windows and, at each layer, the earlier tokens of its own window; a step runs the window so
far (at most ``seq_len`` rows), and the window's memory is written when the window is full.
The memory lives in a ``RingBuffer`` that each step writes in place, and everything that
does not change from step to step (scaled query weights, position bias, the context's keys
and values) is computed once in `prefill`: the only per-step work that grows with the
memory's fill is the attention over it.

Einstein notation: ``b`` batch, ``t`` prompt length, ``h`` heads, ``m`` memory slots.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_core.generation import generate as _generate
from attention_core.generation import stream as _stream

from . import _inference_window, _window_loop
from ._inference_weights import InferenceWeights, query_weights
from ._inference_window import KVViews, WindowBiases
from ._inputs import check_memory, check_tokens, prepare_context
from ._kv_store import RingBuffer
from ._window_chain import DecodingChain, chain_serves
from .memory import FeedbackMemory

if TYPE_CHECKING:
    from ._window_loop import Cross
    from .model import FeedbackTransformer

__all__ = ["FeedbackState", "generate", "prefill", "step", "stream"]


class FeedbackState:
    """Hold the decoding state of a batch of ``b`` rows.

    The state is the memory ring buffer and what the steps reuse. Steps update it in place.

    Attributes:
        ring: the last ``mem_len`` keys and values of the steps of complete windows.
        batch: number of rows ``b``.
        steps: tokens consumed so far (prompt included).
        window: embeddings ``(b, r, dim)`` of the ``r < seq_len`` tokens of the window not
            yet complete (``r = 0`` with ``seq_len = 1``).
        window_memory: their memory keys and values ``(b, h, r, d)``, or ``None``.
        parameters: the model's parameters, and ``parameter_versions`` their version
            counters and data addresses at `prefill`: `step` refuses to go on when they
            changed (see `check_parameters`).
    """

    def __init__(
        self, model: FeedbackTransformer, memory: FeedbackMemory, cross: Cross | None, batch: int
    ):
        """Set up the state after the prompt.

        Arguments:
            model: the model that decodes.
            memory: its memory after the prompt.
            cross: the prepared context, or ``None``.
            batch: the batch size.
        """
        M, W = model.mem_len, model.seq_len
        self.ring = RingBuffer(memory, M, scratch=W if W > 1 else 0)
        self.views = KVViews(self.ring.kv, batch, model.heads)  # made once, read every step
        self.batch, self.steps = batch, 0
        self.cross = cross
        positions = torch.arange(-M, W, device=memory.keys.device)
        # queries 0 .. W-1 of a window over keys at -M .. W-1
        self.biases = WindowBiases(model.rel_pos(positions[M:], positions), W)
        self.weights = InferenceWeights(model, query_weights(model, stacked=False))
        # windows of more than one step (seq_len > 1) project queries, keys and values at once
        self.window_weights = (
            InferenceWeights(model, query_weights(model, stacked=True)) if W > 1 else self.weights
        )
        # seq_len 1: a step as one call of the core's step chain
        self.chain = None
        if W == 1 and chain_serves(model, memory.keys, cross):
            self.chain = DecodingChain(model, self.weights, self.views, self.biases.table)
        self.signature = model.signature
        self.window = memory.keys.new_zeros(batch, 0, model.dim)
        self.window_memory: tuple[Tensor, Tensor] | None = None
        # the parameters as the state read them: the steps use copies of some (the scaled
        # query weights) and the parameters themselves for others
        self.parameters = tuple(model.parameters())
        self.parameter_versions = _versions(self.parameters)

    def check_parameters(self) -> None:
        """Raise ``ValueError`` if the model's parameters changed since `prefill`.

        That is: changed in place or given other storage (an optimiser step,
        ``load_state_dict``, ``model.to``); the state's copies would no longer match the
        model. (An in-place change through ``.data`` is not seen: it bypasses the
        parameter's version counter.)"""
        if _versions(self.parameters) != self.parameter_versions:
            raise ValueError(
                "the model's parameters changed since prefill (an optimiser step, "
                "load_state_dict, an in-place update or model.to): the decoding state holds "
                "copies of the old ones; call prefill again"
            )

    @property
    def memory(self) -> FeedbackMemory:
        """A copy of the current memory ``(b, h, m, d)``, oldest step first.

        It is the memory that `FeedbackTransformer.forward` returns after the same tokens.
        """
        keys, values = self.ring.view()
        if self.window_memory is not None:
            capacity = self.ring.capacity
            keys = torch.cat((keys, self.window_memory[0]), dim=2)[:, :, -capacity:]
            values = torch.cat((values, self.window_memory[1]), dim=2)[:, :, -capacity:]
        return FeedbackMemory(keys.clone(), values.clone(), self.signature)


def _versions(parameters: tuple[Tensor, ...]) -> tuple[tuple[int, int], ...]:
    """Each parameter's version counter and data address."""
    return tuple([(p._version, p.data_ptr()) for p in parameters])


@torch.no_grad()
def prefill(
    model: FeedbackTransformer,
    tokens: Tensor,
    memory: FeedbackMemory | tuple[Tensor, Tensor] | None = None,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
) -> tuple[Tensor, FeedbackState]:
    """Run the prompt and return its last position's logits and the decoding state.

    This is ``model.prefill``. The prompt ``(b, t)`` runs in windows of ``seq_len`` tokens,
    as in ``forward``; the last ``t % seq_len`` tokens start the window that the decoding
    steps continue.

    Returns:
        The logits ``(b, num_tokens)`` of the prompt's last position, and the state.
    """
    check_tokens(model, "tokens", tokens, 2)
    h = model.token_emb(tokens)
    b, t = tokens.shape
    prefix = check_memory(model, memory, b, h)
    cross = prepare_context(model, context, context_mask, b, h)
    complete = t - t % model.seq_len  # tokens in complete windows
    last = None
    if complete:
        out, keys, values = _window_loop.run(model, h[:, :complete], prefix, cross, detach=True)
        start, last = FeedbackMemory(keys, values), out[:, -1]
    elif prefix is not None:
        start = FeedbackMemory(*prefix)
    else:
        empty = h.new_zeros(b, model.heads, 0, model.dim_head)
        start = FeedbackMemory(empty, empty)
    state = FeedbackState(model, start, cross, b)
    state.steps = t
    if complete < t:  # the prompt ends inside a window: the steps continue it
        with _inference():
            last = _advance(model, state, h[:, complete:])
        _keep_ordinary(state)
    return model.to_logits(last), state


def _inference() -> AbstractContextManager:
    """``torch.inference_mode`` around a step's window (5-6% less time per decoded token at
    d=256: no version counters or view tracking per op), except while ``torch.compile``
    traces the call. What the state keeps stays an ordinary tensor: the ring buffer is made
    outside it and written in place, the buffers that the window makes for later steps are
    made with inference mode off, the memory of an incomplete window is copied after it
    (`_keep_ordinary`), and the logits are computed after it."""
    return nullcontext() if torch.compiler.is_compiling() else torch.inference_mode()


def _keep_ordinary(state: FeedbackState) -> None:
    """Replace the incomplete window's memory, made under inference mode, by ordinary copies
    (``(b, h, r, d)`` with ``r < seq_len``: a few rows), which callers may use as any tensor."""
    if state.window_memory is not None and state.window_memory[0].is_inference():
        state.window_memory = (state.window_memory[0].clone(), state.window_memory[1].clone())


def _advance(model: FeedbackTransformer, state: FeedbackState, x: Tensor) -> Tensor:
    """Run the window so far, ``x`` ``(b, w, dim)``, after the memory in ``state`` and return
    the last token's output ``(b, dim)``; a full window's memory goes to the ring, an
    incomplete one stays in ``state``."""
    b, w, dim = x.shape
    ring = state.ring
    bias, first_empty = state.biases.get(ring.filled, w)
    # a window's first token: the memory only, queries only
    weights = state.weights if w == 1 else state.window_weights
    out, kv = _inference_window.window(
        weights, x.reshape(b * w, dim), state.views, ring.bounds(), bias, first_empty,
        state.cross,
    )  # fmt: skip
    memory = None  # "(b w) (two h d) -> two b h w d"
    if kv is not None:  # mem_len > 0
        memory = kv.view(b, w, 2, model.heads, model.dim_head).permute(2, 0, 3, 1, 4)
    if w == model.seq_len:  # the window is complete: its memory is final
        if memory is not None:
            ring.append(memory[0], memory[1])
        state.window, state.window_memory = x[:, :0], None
    else:
        state.window = x
        state.window_memory = None if memory is None else (memory[0], memory[1])
    return out.view(b, w, dim)[:, -1]


@torch.no_grad()
def step(
    model: FeedbackTransformer, tokens: Tensor, state: FeedbackState
) -> tuple[Tensor, FeedbackState]:
    """Decode one token per row ``(b,)`` and return logits ``(b, num_tokens)`` and the state.

    This is ``model.step``: the logits equal those of ``forward`` at the same position.
    """
    if not isinstance(state, FeedbackState):
        raise TypeError(f"state must be a FeedbackState from prefill; got {type(state).__name__}")
    if state.signature != model.signature or state.ring.capacity != model.mem_len:
        raise ValueError("state comes from another model; call prefill of this model")
    state.check_parameters()
    if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.shape[0] != state.batch:
        check_tokens(model, "tokens", tokens, 1)  # a TypeError or ValueError for the kind
        raise ValueError(
            f"tokens must have shape (b,) = ({state.batch},); got {tuple(tokens.shape)}"
        )
    if tokens.dtype != torch.long:
        check_tokens(model, "tokens", tokens, 1)
    elif tokens.numel():  # the common case: one reduction to see that the ids are in range
        low, high = tokens.aminmax()
        if low < 0 or high >= model.num_tokens:
            check_tokens(model, "tokens", tokens, 1)  # raises, naming the range
    if state.chain is not None and not torch.compiler.is_compiling():
        logits = state.chain(model.token_emb(tokens), state.ring)
        state.steps += 1
        return logits, state
    x = model.token_emb(tokens)[:, None]
    if state.window.shape[1]:  # continue the window (seq_len > 1)
        x = torch.cat((state.window, x), dim=1)
    with _inference():
        out = _advance(model, state, x)
    _keep_ordinary(state)
    state.steps += 1
    norm, head = model.to_logits  # LayerNorm, Linear: called without module dispatch
    norm, head = cast(nn.LayerNorm, norm), cast(nn.Linear, head)
    out = F.layer_norm(out, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return F.linear(out, head.weight, head.bias), state


class _Bound:
    """A model with its prefill keyword arguments bound: a ``StepModel``."""

    def __init__(self, model: FeedbackTransformer, **prefill_kwargs: Any):
        self.model, self.prefill_kwargs = model, prefill_kwargs

    def prefill(self, tokens: Tensor) -> tuple[Tensor, FeedbackState]:
        return self.model.prefill(tokens, **self.prefill_kwargs)

    def step(self, tokens: Tensor, state: FeedbackState) -> tuple[Tensor, FeedbackState]:
        return self.model.step(tokens, state)


def generate(
    model: FeedbackTransformer,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    memory: FeedbackMemory | None = None,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
    **sampling: Any,
) -> Tensor:
    """Return the prompt ``(b, t)`` followed by up to ``max_new_tokens`` new tokens.

    The result has shape ``(b, t + n)``; the sampling options are those of
    ``attention_core.generation.generate``.
    """
    bound = _Bound(model, memory=memory, context=context, context_mask=context_mask)
    return _generate(bound, prompt, max_new_tokens, **sampling)


def stream(
    model: FeedbackTransformer,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    memory: FeedbackMemory | None = None,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
    **sampling: Any,
) -> Iterator[Tensor]:
    """Yield up to ``max_new_tokens`` new tokens ``(b,)`` one at a time.

    The sampling options are those of ``attention_core.generation.stream``.
    """
    bound = _Bound(model, memory=memory, context=context, context_mask=context_mask)
    return _stream(bound, prompt, max_new_tokens, **sampling)
