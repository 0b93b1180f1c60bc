"""Events let you observe what happens inside a model without changing its code.

For example attention matrices, projected queries, keys and values, and intermediate outputs."""

from .event import AttentionEvent, Event, IntermediateOutput, QKVEvent
from .event_dispatcher import EventDispatcher

__all__ = ["AttentionEvent", "Event", "EventDispatcher", "IntermediateOutput", "QKVEvent"]
