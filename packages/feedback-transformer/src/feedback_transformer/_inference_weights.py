"""Inference speed-up: the parameters that the windows of a call read, gathered once.

`_inference_window` runs a window through every layer in few torch ops; the tensors it
reads (the scaled query weights stacked on the shared key/value weight, the transposed
output projections, the feed-forward weights, the memory mix) are looked up here once per
call or decoding state instead of on the modules per window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_core.residual_step import PreparedFeedForward

if TYPE_CHECKING:
    from torch import nn

    from .layers import CrossAttention, FeedbackLayer
    from .model import FeedbackTransformer

__all__ = ["InferenceWeights", "LayerWeights", "layer_norm", "query_weights"]


def layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(x)`` for an ``nn.LayerNorm`` ``norm``, without module dispatch."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class LayerWeights:
    """The tensors of one layer as a window reads them.

    Attributes:
        projection_t: ``(dim, h d)``, the query weight times ``dim_head ** -0.5``,
            transposed, or ``(dim, 3 h d)``: that with the shared key/value weight (windows
            of ``w > 1`` steps).
        out_weight_t: ``(h d, dim)``, the output projection transposed, and ``out_bias``.
        feed_forward_step: the pre-norm GEGLU feed-forward block with its residual as one
            prepared call (`attention_core.residual_step.PreparedFeedForward`: its weights
            are checked once, not at every window).
        cross: the layer's cross attention, or ``None``.

    The transposed weights are views of ``(out, in)`` storage: at a few rows MKL's product
    with a transposed operand read that layout 15-25% faster than ``(in, out)`` storage
    (2 threads, the 17 products of a window: 0.52 against 0.63 ms; with the bias 0.56
    against 0.74 ms).
    """

    __slots__ = ("cross", "feed_forward_step", "out_bias", "out_weight_t", "projection_t")

    def __init__(self, layer: FeedbackLayer, weight: Tensor):
        first, _, last = layer.ff_parts()
        norm: nn.LayerNorm = layer.ff_norm
        to_out: nn.Linear = layer.to_out
        self.projection_t = weight.t()  # views: see the class docstring
        self.out_weight_t, self.out_bias = to_out.weight.t(), to_out.bias
        self.feed_forward_step = PreparedFeedForward(
            first.weight, first.bias, last.weight, last.bias, norm.weight, norm.bias,
            activation="geglu", norm_first=True, eps=norm.eps,
        )  # fmt: skip
        self.cross: CrossAttention | None = layer.cross


class InferenceWeights:
    """The model's parameters gathered once for a call (or a decoding state).

    Arguments:
        model: the `FeedbackTransformer`.
        weights: per layer the query weight ``(h d, dim)`` or ``(3 h d, dim)`` from
            `_window_loop.query_weights`.
    """

    __slots__ = ("dim_head", "has_memory", "heads", "kv_weight_t", "layers", "mix", "norm")

    def __init__(self, model: FeedbackTransformer, weights: list[Tensor]):
        norm = model.attn_norm
        self.norm = (norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        self.kv_weight_t = model.to_kv.weight.t()
        self.layers = [LayerWeights(layer, w) for layer, w in zip(model.layers, weights)]
        mix = model.layer_weight
        self.mix = None if mix is None or not model.mem_len else mix.softmax(dim=-1)
        self.heads, self.dim_head = model.heads, model.dim_head
        self.has_memory = model.mem_len > 0


def query_weights(model: FeedbackTransformer, stacked: bool) -> list[Tensor]:
    """Per layer: the query weight scaled by ``dim_head ** -0.5``, with the shared
    key/value weight stacked below it when ``stacked`` (one projection per window)."""
    scale = model.dim_head**-0.5
    if not stacked:
        return [layer.to_q.weight * scale for layer in model.layers]
    return [torch.cat((layer.to_q.weight * scale, model.to_kv.weight)) for layer in model.layers]
