"""Recurrent cross attentions; importing this package registers them in
:data:`attention_core.attention_registry.RecurrentCrossAttentionRegistry` (``linear`` and
``full``, with the parameters of the batch attentions of the same names)."""

from .attention_layer import RecurrentCrossAttentionLayer
from .base import RecurrentCrossAttention
from .full_attention import RecurrentCrossFullAttention
from .linear_attention import RecurrentCrossLinearAttention

__all__ = [
    "RecurrentCrossAttention",
    "RecurrentCrossAttentionLayer",
    "RecurrentCrossFullAttention",
    "RecurrentCrossLinearAttention",
]
