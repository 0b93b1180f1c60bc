"""Deliver events from attention modules to the listeners that asked for them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .event import Event
from .filters import CallableEventFilter, EventFilter, event_class

__all__ = ["EventDispatcher"]


class EventDispatcher:
    """Holds listeners and calls each one whose filter accepts a dispatched event.

    Modules take an ``event_dispatcher`` argument that is either an instance or a string
    key; `get` maps a key to a process-wide instance (``""`` is the default one).

    Example:
        >>> dispatcher = EventDispatcher.get("my-model")
        >>> seen = []
        >>> dispatcher.listen(AttentionEvent, seen.append)  # doctest: +SKIP
    """

    _dispatchers: dict[str, EventDispatcher] = {}

    def __init__(self):
        self._listeners: OrderedDict = OrderedDict()

    def listen(self, event_filter, event_handler: Callable[[Event], None]) -> None:
        """Call ``event_handler(event)`` for every dispatched event that passes the filter.

        Arguments:
            event_filter: an `EventFilter`, an `Event` subclass or a callable
                ``event -> bool``.
            event_handler: the listener; it is also the key used by `remove`.
        """
        if isinstance(event_filter, type) and issubclass(event_filter, Event):
            event_filter = event_class(event_filter)
        elif not isinstance(event_filter, EventFilter):
            if not callable(event_filter):
                raise TypeError(
                    "event_filter must be an EventFilter, an Event subclass or a callable; "
                    f"got {type(event_filter).__name__}"
                )
            event_filter = CallableEventFilter(event_filter)
        self._listeners[event_handler] = event_filter

    def remove(self, event_handler) -> None:
        """Stop delivering events to ``event_handler``."""
        self._listeners.pop(event_handler, None)

    def clear(self) -> None:
        """Remove every listener."""
        self._listeners.clear()

    @property
    def has_listeners(self) -> bool:
        """``True`` when at least one listener is registered."""
        return bool(self._listeners)

    def dispatch(self, event: Event) -> None:
        """Deliver ``event`` to every listener whose filter accepts it."""
        for event_handler, event_filter in list(self._listeners.items()):
            if event_filter(event):
                event_handler(event)

    @classmethod
    def get(cls, key="") -> EventDispatcher:
        """Return ``key`` itself if it is a dispatcher, else the shared one named ``key``."""
        if isinstance(key, cls):
            return key
        if not isinstance(key, str):
            raise TypeError(
                f"event_dispatcher must be an EventDispatcher or a str; got {type(key).__name__}"
            )
        try:
            return cls._dispatchers[key]
        except KeyError:
            dispatcher = cls._dispatchers[key] = cls()
            return dispatcher
