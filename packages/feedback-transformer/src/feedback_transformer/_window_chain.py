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

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attention_core.step_chain import StepChain

if TYPE_CHECKING:
    from attention_core.step_chain import Slot

    from ._inference_weights import InferenceWeights
    from ._inference_window import KVViews
    from .model import FeedbackTransformer

__all__ = ["WindowChains", "chain_serves"]


def chain_serves(model: FeedbackTransformer, h: Tensor, cross: object) -> bool:
    """Whether the windows of a call on ``h`` ``(b, n, dim)`` run as step chains: a model
    with a memory, no context, a batch, float32 or float64 on the CPU, nothing being
    compiled."""
    return (
        model.mem_len > 0
        and h.shape[0] > 0
        and cross is None
        and h.device.type == "cpu"
        and h.dtype in (torch.float32, torch.float64)
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

    __slots__ = ("_chains", "_model", "_table", "_views", "_weights")

    def __init__(
        self,
        model: FeedbackTransformer,
        weights: tuple[InferenceWeights, InferenceWeights],
        views: KVViews,
        table: Tensor,
    ):
        self._model, self._weights, self._views, self._table = model, weights, views, table
        self._chains: dict[bool, tuple[StepChain, Slot]] = {}

    def __call__(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """Run the window ``x`` ``(b w, dim)`` (rows in ``(b, w)`` order) after the memory
        slots ``lo .. hi - 1``, write its memory keys and values to the slots
        ``hi .. hi + w - 1``, and return the last layer's output ``(b w, dim)``."""
        w = x.shape[0] // self._views.keys.shape[0]
        chain, output = self._chain(w > 1)
        M = self._table.shape[2] - self._table.shape[1]
        end = hi + w if w > 1 else hi  # one step reads the memory only
        out, _ = chain(x, positions=[lo, end, M - (hi - lo), hi], output=output)
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
    last layer's output."""
    keys, values = views.keys, views.values
    C = keys.shape[2]
    hd = weights.heads * weights.dim_head
    chain = StepChain(model.dim)
    lo, end = chain.position(C), chain.position(C)
    column, hi = chain.position(table.shape[2]), chain.position(C)
    _, norm_weight, norm_bias, eps = weights.norm
    x = chain.input
    states = [x]
    for layer, p in zip(model.layers, weights.layers):
        a = chain.layer_norm(x, norm_weight, norm_bias, eps)
        projection = chain.linear(a, p.projection_t.t())  # "(b w) ((one + two) h d)"
        q = chain.columns(projection, 0, hd)
        if window:  # the window's own keys and values, after the memory
            chain.cache_write(chain.columns(projection, hd, 2 * hd), keys, hi)
            chain.cache_write(chain.columns(projection, 2 * hd, 3 * hd), values, hi)
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
    kv = chain.linear(
        chain.layer_norm(merged, norm_weight, norm_bias, eps), weights.kv_weight_t.t()
    )
    chain.cache_write(chain.columns(kv, 0, hd), keys, hi)  # "(b w) (two h d)"
    chain.cache_write(chain.columns(kv, hd, 2 * hd), values, hi)
    return chain, x
