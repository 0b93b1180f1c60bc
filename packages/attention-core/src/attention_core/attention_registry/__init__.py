"""Where attention implementations register their names and typed parameters.

Three registries exist: `AttentionRegistry` (batch attentions),
`RecurrentAttentionRegistry` and `RecurrentCrossAttentionRegistry` (filled by
the recurrent-transformer package). Builders look attentions up here.
"""

from .registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
    RecurrentCrossAttentionRegistry,
    Registry,
)
from .spec import Bool, Callable, Choice, EventDispatcherInstance, Float, Int, Optional, Spec

__all__ = [
    "AttentionRegistry",
    "Bool",
    "Callable",
    "Choice",
    "EventDispatcherInstance",
    "Float",
    "Int",
    "Optional",
    "RecurrentAttentionRegistry",
    "RecurrentCrossAttentionRegistry",
    "Registry",
    "Spec",
]
