"""Inference speed-up: a window through every layer as one call of the core's step chain.

A window works on a few rows (``b * w``), so what `_inference_window.window` pays in torch
calls and the Python around them is a large part of its time: about 29 calls per window, each
dearer inside the model than in a tight loop (the dense products' weights push the
interpreter's own data out of the caches). Here the same window is one
`attention_core.step_chain.StepChain`, built once per call from the call's
`_inference_weights.InferenceWeights` and key/value buffer:

* per layer: the shared pre-norm, the projection (queries, and with ``w > 1`` the window's
  own keys and values, written to the buffer's slots after the memory), the attention over
  the memory and the window (`StepChain.cache_attention` with the masked position bias), the
  output projection with its residual and the pre-norm GEGLU feed-forward block;
* then the memory of the window: the layer states' weighted sum, the norm and the key/value
  projection, written to the window's slots.

The positions that change from window to window (the memory's range, the bias column of its
first slot, the window's first slot) are the chain's `Position` values. A window whose first
query sees no key gets zeros there from the attention itself (its scores are all ``-inf``),
which is what `_inference_window.window` writes for ``first_empty``.

Einstein notation: ``b`` batch, ``w`` steps of the window, ``h`` heads, ``d`` head feature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from attention_core.step_chain import StepChain

if TYPE_CHECKING:
    from attention_core.step_chain import Position, Slot

    from ._inference_weights import InferenceWeights
    from ._inference_window import KVViews
    from ._kv_store import RingBuffer
    from .model import FeedbackTransformer

__all__ = ["DecodingChain", "WindowChains", "chain_serves"]


def chain_serves(model: FeedbackTransformer, like: Tensor, cross: object) -> bool:
    """Whether the windows of a call (or the steps of a decoding state) run as step chains:
    a model with a memory, no context, a batch (``like``'s first dimension: the embeddings
    ``(b, n, dim)`` or the memory's keys ``(b, h, m, d)``), float32 or float64 on the CPU,
    nothing being compiled."""
    return (
        model.mem_len > 0
        and like.shape[0] > 0
        and cross is None
        and like.device.type == "cpu"
        and like.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
    )


class WindowChains:
    """The step chains of a call's windows: one for windows of one step (queries only) and
    one for longer windows, each made at its first window.

    Arguments:
        model: the `FeedbackTransformer`.
        weights: ``(w == 1, w > 1)``: the call's `InferenceWeights` with the query weights
            alone and with the key/value weight stacked below them.
        views: the `KVViews` of the call's key/value buffer ``(2, b h, c, d)``.
        table: ``(h, W, M + W)``, the position bias of queries ``0 .. W - 1`` over keys at
            ``-M .. W - 1``, window keys that are not strictly earlier masked.
    """

    __slots__ = ("_chains", "_memory", "_model", "_table", "_views", "_weights")

    def __init__(
        self,
        model: FeedbackTransformer,
        weights: tuple[InferenceWeights, InferenceWeights],
        views: KVViews,
        table: Tensor,
    ):
        self._model, self._weights, self._views, self._table = model, weights, views, table
        self._memory = table.shape[2] - table.shape[1]  # M
        self._chains: dict[bool, tuple[StepChain, Slot]] = {}

    def __call__(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """Run the window ``x`` ``(b w, dim)`` (rows in ``(b, w)`` order) after the memory
        slots ``lo .. hi - 1``, write its memory keys and values to the slots
        ``hi .. hi + w - 1``, and return the last layer's output ``(b w, dim)``."""
        w = x.shape[0] // self._views.keys.shape[0]
        chain, output = self._chain(w > 1)
        end = hi + w if w > 1 else hi  # one step reads the memory only
        out, _ = chain(x, positions=[lo, end, self._memory - (hi - lo), hi], output=output)
        return out

    def _chain(self, window: bool) -> tuple[StepChain, Slot]:
        if window not in self._chains:
            self._chains[window] = _build(
                self._model, self._weights[window], self._views, self._table, window
            )
        return self._chains[window]


def _build(
    model: FeedbackTransformer,
    weights: InferenceWeights,
    views: KVViews,
    table: Tensor,
    window: bool,
) -> tuple[StepChain, Slot]:
    """The chain of a window of one step (``window`` false) or more, and the slot of its
    last layer's output; the window's memory goes to its slots ``hi ..``."""
    chain = StepChain(model.dim)
    memory = _memory_positions(chain, views, table)
    hi = chain.position(views.keys.shape[2])
    x, kv = _layers(chain, model, weights, views, table, memory, hi if window else None)
    _write(chain, kv, views, hi)
    return chain, x


def _memory_positions(
    chain: StepChain, views: KVViews, table: Tensor
) -> tuple[Position, Position, Position]:
    """The positions of the memory a window reads: its first slot, one past its last (the
    window's own slots included when it has more than one step), and the bias column of its
    first slot."""
    C = views.keys.shape[2]
    return chain.position(C), chain.position(C), chain.position(table.shape[2])


class DecodingChain:
    """A decoding step of a ``seq_len = 1`` model as one step chain: the layers over the
    ring buffer's memory, the step's memory written to the ring's two slots, and the logits.

    Arguments:
        model: the `FeedbackTransformer` (``seq_len == 1``, ``mem_len > 0``, no context).
        weights: the decoding state's `InferenceWeights` (query weights alone).
        views: the `KVViews` of the ring buffer ``(2, b h, 2 M, d)``.
        table: ``(h, 1, M + 1)``, the position bias of the query over keys at ``-M .. 0``.
    """

    __slots__ = ("_chain", "_memory")

    def __init__(
        self, model: FeedbackTransformer, weights: InferenceWeights, views: KVViews, table: Tensor
    ):
        C = views.keys.shape[2]
        self._memory = model.mem_len
        chain = StepChain(model.dim)
        memory = _memory_positions(chain, views, table)
        x, kv = _layers(chain, model, weights, views, table, memory, None)
        for slot in (chain.position(C - 1), chain.position(C - 1)):  # the ring's two copies
            _write(chain, kv, views, slot)
        norm, head = model.to_logits  # LayerNorm, Linear
        norm, head = cast(nn.LayerNorm, norm), cast(nn.Linear, head)
        normed = chain.layer_norm(x, norm.weight, norm.bias, norm.eps)
        chain.linear(normed, head.weight, head.bias)
        self._chain = chain

    def __call__(self, x: Tensor, ring: RingBuffer) -> Tensor:
        """Run the step of the embeddings ``x`` ``(b, dim)`` after the ring's memory, append
        the step's memory to the ring and return the logits ``(b, num_tokens)``."""
        lo, hi = ring.bounds()
        M, s = self._memory, ring.next
        logits, _ = self._chain(x, positions=[lo, hi, M - (hi - lo), s, s + M])
        ring.advance()
        return logits


def _layers(
    chain: StepChain,
    model: FeedbackTransformer,
    weights: InferenceWeights,
    views: KVViews,
    table: Tensor,
    memory: tuple[Position, Position, Position],
    own: Position | None,
) -> tuple[Slot, Slot]:
    """Add the layers of a window to ``chain``: the attention reads the slots
    ``lo .. end - 1`` of the key/value buffer with the bias columns from ``column``
    (``memory``); with ``own`` each layer first writes the window's keys and values to its
    slots ``own ..``. Returns the last layer's output and the window's memory keys and
    values ``(b w, 2 h d)``."""
    keys, values = views.keys, views.values
    hd = weights.heads * weights.dim_head
    lo, end, column = memory
    _, norm_weight, norm_bias, eps = weights.norm
    x = chain.input
    states = [x]
    for layer, p in zip(model.layers, weights.layers):
        a = chain.layer_norm(x, norm_weight, norm_bias, eps)
        projection = chain.linear(a, p.projection_t.t())  # "(b w) ((one + two) h d)"
        q = chain.columns(projection, 0, hd)
        if own is not None:  # the window's own keys and values, after the memory
            chain.cache_write(chain.columns(projection, hd, 2 * hd), keys, own)
            chain.cache_write(chain.columns(projection, 2 * hd, 3 * hd), values, own)
        # the queries are scaled by their weights
        heads = chain.cache_attention(q, keys, values, lo, end, table, column, scale=1.0)
        x = chain.linear(heads, p.out_weight_t.t(), p.out_bias, residual=x)
        first, _, last = layer.ff_parts()
        norm = layer.ff_norm
        x = chain.feed_forward(
            x, first.weight, first.bias, last.weight, last.bias, norm.weight, norm.bias,
            activation="geglu", norm_first=True, eps=norm.eps,
        )  # fmt: skip
        states.append(x)
    merged = x if weights.mix is None else chain.weighted_sum(states, weights.mix)
    normed = chain.layer_norm(merged, norm_weight, norm_bias, eps)
    return x, chain.linear(normed, weights.kv_weight_t.t())


def _write(chain: StepChain, kv: Slot, views: KVViews, position: Position) -> None:
    """Add the writes of the memory keys and values ``kv`` ``(b w, 2 h d)`` to the buffer's
    slots ``position ..``."""
    hd = kv.width // 2  # "(b w) (two h d)"
    chain.cache_write(chain.columns(kv, 0, hd), views.keys, position)
    chain.cache_write(chain.columns(kv, hd, 2 * hd), views.values, position)
