"""Events let you observe what happens inside a model (attention matrices, projected
queries, keys and values, intermediate outputs) without changing its code."""

from .event import AttentionEvent, Event, IntermediateOutput, QKVEvent
from .event_dispatcher import EventDispatcher

__all__ = ["AttentionEvent", "Event", "EventDispatcher", "IntermediateOutput", "QKVEvent"]
