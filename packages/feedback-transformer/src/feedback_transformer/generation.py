"""This module decodes a `FeedbackTransformer` token by token.

It implements the ``prefill``/``step`` protocol of ``attention_core.generation``.

Decoding is the Feedback Transformer's exact sequential model (Fan et al. 2021, arXiv
2002.09402): each new token's layers attend to the memory of all earlier steps. The memory
lives in a ``RingBuffer`` that each step writes in place, and everything that does not
change from step to step (scaled query weights, position bias, the context's keys and
values) is computed once in `prefill`: the only per-step work that grows with the
memory's fill is the attention over it.

Einstein notation: ``b`` batch, ``t`` prompt length, ``h`` heads, ``m`` memory slots.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_core.generation import generate as _generate
from attention_core.generation import stream as _stream

from . import _inference_window, _window_loop
from ._inputs import check_memory, check_tokens, prepare_context
from ._kv_store import RingBuffer
from ._window_attention import MemorySlice
from .memory import FeedbackMemory

if TYPE_CHECKING:
    from ._window_loop import Cross
    from .model import FeedbackTransformer

__all__ = ["FeedbackState", "generate", "prefill", "step", "stream"]


class FeedbackState:
    """Hold the decoding state of a batch of ``b`` rows.

    The state is the memory ring buffer and what the steps reuse. Steps update it in place.

    Attributes:
        ring: the last ``mem_len`` steps' keys and values.
        batch: number of rows ``b``.
        steps: tokens consumed so far (prompt included).
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
        M = model.mem_len
        self.ring = RingBuffer(memory, M)
        self.batch, self.steps = batch, 0
        self.cross = cross
        positions = torch.arange(-M, 1, device=memory.keys.device)
        self.bias = model.rel_pos(positions[M:], positions[:M])  # (h, 1, M)
        self.weights = _window_loop.query_weights(model, fused=False)
        self.mix = _window_loop.memory_mix(model)
        self.signature = model.signature

    @property
    def memory(self) -> FeedbackMemory:
        """A copy of the current memory ``(b, h, m, d)``, oldest step first."""
        keys, values = self.ring.view()
        return FeedbackMemory(keys.clone(), values.clone(), self.signature)


@torch.no_grad()
def prefill(
    model: FeedbackTransformer,
    tokens: Tensor,
    memory: FeedbackMemory | tuple[Tensor, Tensor] | None = None,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
) -> tuple[Tensor, FeedbackState]:
    """Run the prompt and return its last position's logits and the decoding state.

    This is ``model.prefill``. The prompt ``(b, t)`` runs one step at a time (windows of 1),
    as the decoding steps do.

    Returns:
        The logits ``(b, num_tokens)`` of the prompt's last position, and the state.
    """
    check_tokens(model, "tokens", tokens, 2)
    h = model.token_emb(tokens)
    prefix = check_memory(model, memory, tokens.shape[0], h)
    cross = prepare_context(model, context, context_mask, tokens.shape[0], h)
    out, keys, values = _window_loop.run(model, h, prefix, cross, detach=True, seq_len=1)
    state = FeedbackState(model, FeedbackMemory(keys, values), cross, tokens.shape[0])
    state.steps = tokens.shape[1]
    return model.to_logits(out[:, -1]), state


@torch.no_grad()
def step(
    model: FeedbackTransformer, tokens: Tensor, state: FeedbackState
) -> tuple[Tensor, FeedbackState]:
    """Decode one token per row ``(b,)`` and return logits ``(b, num_tokens)`` and the state.

    This is ``model.step``.
    """
    if not isinstance(state, FeedbackState):
        raise TypeError(f"state must be a FeedbackState from prefill; got {type(state).__name__}")
    if state.signature != model.signature or state.ring.capacity != model.mem_len:
        raise ValueError("state comes from another model; call prefill of this model")
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
    x = model.token_emb(tokens)
    ring = state.ring
    memory = MemorySlice(ring, *ring.bounds())
    bias = state.bias[:, :, model.mem_len - ring.filled :]
    out, k, v = _inference_window.window(
        model, x, memory, bias, False, state.weights, state.cross, state.mix
    )
    if k is not None and v is not None:  # mem_len > 0
        ring.append(k, v)
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
