"""Composable predicates that select which events a listener receives.

Filters combine with ``&``, ``|`` and ``~``; an `Event` subclass or any callable
taking an event can stand on either side of ``&`` and ``|``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .event import Event

__all__ = [
    "CallableEventFilter",
    "EventFilter",
    "LayerNameEventFilter",
    "event_class",
    "from_layer",
    "layer_name_contains",
]


class EventFilter:
    """A predicate on events; call it with an event to get a bool."""

    def __call__(self, event: Event) -> bool:
        raise NotImplementedError

    @staticmethod
    def _to_event_filter(other):
        if isinstance(other, EventFilter):
            return other
        if isinstance(other, type) and issubclass(other, Event):
            return event_class(other)
        if callable(other):
            return CallableEventFilter(other)
        return NotImplemented

    def __and__(self, other):
        other = self._to_event_filter(other)
        if other is NotImplemented:
            return other
        return CallableEventFilter(lambda ev: self(ev) and other(ev))

    def __rand__(self, other):
        other = self._to_event_filter(other)
        if other is NotImplemented:
            return other
        return CallableEventFilter(lambda ev: other(ev) and self(ev))

    def __or__(self, other):
        other = self._to_event_filter(other)
        if other is NotImplemented:
            return other
        return CallableEventFilter(lambda ev: self(ev) or other(ev))

    def __ror__(self, other):
        other = self._to_event_filter(other)
        if other is NotImplemented:
            return other
        return CallableEventFilter(lambda ev: other(ev) or self(ev))

    def __invert__(self):
        return CallableEventFilter(lambda ev: not self(ev))


class CallableEventFilter(EventFilter):
    """Wrap a callable ``event -> bool`` as a filter."""

    def __init__(self, event_filter: Callable[[Event], bool]):
        self._event_filter = event_filter

    def __call__(self, event: Event) -> bool:
        return bool(self._event_filter(event))


class LayerNameEventFilter(EventFilter):
    """Accept events whose source has the name ``layer_name`` in ``layer_name_map``.

    Arguments:
        layer_name_map: ``{module: name}``, e.g. built from ``model.named_modules()``.
        layer_name: the name to accept.
    """

    def __init__(self, layer_name_map: dict, layer_name: str):
        self.layer_name_map = layer_name_map
        self.layer_name = layer_name

    def __call__(self, event: Event) -> bool:
        return self.layer_name_map.get(event.source, None) == self.layer_name


def event_class(klass: type) -> EventFilter:
    """Accept events that are instances of ``klass``."""
    return CallableEventFilter(lambda ev: isinstance(ev, klass))


def from_layer(layer: nn.Module) -> EventFilter:
    """Accept events dispatched by ``layer`` itself."""
    return CallableEventFilter(lambda ev: ev.source is layer)


def layer_name_contains(root: nn.Module, name: str) -> EventFilter:
    """Accept events whose source's name inside ``root`` contains ``name``.

    Example:
        >>> listener_filter = layer_name_contains(model, "layers.3")  # doctest: +SKIP
    """
    layer_names = {module: module_name for module_name, module in root.named_modules()}
    return CallableEventFilter(lambda ev: name in layer_names.get(ev.source, ""))
