"""Recurrent attentions, mirroring ``fast_transformers.recurrent.attention``.

Self attentions in `.self_attention`, cross attentions in `.cross_attention`. Importing this package
registers all of them in attention-core's recurrent registries."""

from .cross_attention import (
    RecurrentCrossAFTFullAttention,
    RecurrentCrossAFTSimpleAttention,
    RecurrentCrossAttention,
    RecurrentCrossAttentionLayer,
    RecurrentCrossExactTopKAttention,
    RecurrentCrossFullAttention,
    RecurrentCrossLinearAttention,
    RecurrentCrossLocalAttention,
)
from .self_attention import (
    RecurrentAFTFullAttention,
    RecurrentAFTSimpleAttention,
    RecurrentAttention,
    RecurrentAttentionLayer,
    RecurrentConditionalFullAttention,
    RecurrentExactTopKAttention,
    RecurrentFullAttention,
    RecurrentLinearAttention,
    RecurrentLocalAttention,
)

__all__ = [
    "RecurrentAFTFullAttention",
    "RecurrentAFTSimpleAttention",
    "RecurrentAttention",
    "RecurrentAttentionLayer",
    "RecurrentConditionalFullAttention",
    "RecurrentCrossAFTFullAttention",
    "RecurrentCrossAFTSimpleAttention",
    "RecurrentCrossAttention",
    "RecurrentCrossAttentionLayer",
    "RecurrentCrossExactTopKAttention",
    "RecurrentCrossFullAttention",
    "RecurrentCrossLinearAttention",
    "RecurrentCrossLocalAttention",
    "RecurrentExactTopKAttention",
    "RecurrentFullAttention",
    "RecurrentLinearAttention",
    "RecurrentLocalAttention",
]
