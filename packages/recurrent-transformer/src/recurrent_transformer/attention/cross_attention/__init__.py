"""Recurrent cross attentions.

Importing this package registers them in
`attention_core.attention_registry.RecurrentCrossAttentionRegistry` (``linear``, ``full``,
``local``, ``exact-topk``, ``aft-simple`` and ``aft-full``, with the parameters of the batch
attentions of the same names). ``clustered`` and ``improved-clustered`` have none (they cluster the
queries of the whole sequence) and ``reformer`` is a self attention only."""

from .attention_layer import RecurrentCrossAttentionLayer
from .base import RecurrentCrossAttention
from .full_attention import RecurrentCrossFullAttention
from .linear_attention import RecurrentCrossLinearAttention
from .local_attention import RecurrentCrossLocalAttention
from .rowwise_attention import (
    RecurrentCrossAFTFullAttention,
    RecurrentCrossAFTSimpleAttention,
    RecurrentCrossExactTopKAttention,
)

__all__ = [
    "RecurrentCrossAFTFullAttention",
    "RecurrentCrossAFTSimpleAttention",
    "RecurrentCrossAttention",
    "RecurrentCrossAttentionLayer",
    "RecurrentCrossExactTopKAttention",
    "RecurrentCrossFullAttention",
    "RecurrentCrossLinearAttention",
    "RecurrentCrossLocalAttention",
]
