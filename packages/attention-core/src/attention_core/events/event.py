"""The events that attention modules dispatch while they run."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["AttentionEvent", "Event", "IntermediateOutput", "QKVEvent"]


class Event:
    """Base class of all events.

    Arguments:
        source: the module that dispatched the event.
    """

    def __init__(self, source: nn.Module):
        self.source = source


class AttentionEvent(Event):
    """Dispatched by attentions that compute an attention matrix.

    Arguments:
        source: the attention module.
        attention_matrix: the attention weights, typically of shape ``(N, H, L, S)``.
    """

    def __init__(self, source: nn.Module, attention_matrix: Tensor):
        super().__init__(source)
        self.attention_matrix = attention_matrix


class QKVEvent(Event):
    """Dispatched by attention layers after projecting the inputs.

    Arguments:
        source: the attention layer.
        queries: ``(N, L, H, E)``.
        keys: ``(N, S, H, E)``.
        values: ``(N, S, H, D)``.
    """

    def __init__(self, source: nn.Module, queries: Tensor, keys: Tensor, values: Tensor):
        super().__init__(source)
        self.queries = queries
        self.keys = keys
        self.values = values


class IntermediateOutput(Event):
    """Dispatched by transformer layers with their output.

    Arguments:
        source: the layer.
        x: its output, ``(N, L, E)``.
    """

    def __init__(self, source: nn.Module, x: Tensor):
        super().__init__(source)
        self.x = x
