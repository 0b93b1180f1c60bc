"""Recurrent self attentions.

Importing this package registers them in
`attention_core.attention_registry.RecurrentAttentionRegistry`.

Every batch attention whose causal form can be computed one element at a time has a recurrent
twin here, under the same name and with the same parameters: ``linear`` and
``causal-linear``, ``full``, ``local``, ``exact-topk``, ``aft-simple``, ``aft-full`` and
``conditional-full``. ``clustered``, ``improved-clustered``, ``causal-improved-clustered`` and
``reformer`` have none: they group queries and keys by clustering or hashing the whole
sequence, so an element's output depends on elements that come after it.
"""

from .aft_attention import RecurrentAFTFullAttention, RecurrentAFTSimpleAttention
from .attention_layer import RecurrentAttentionLayer
from .base import RecurrentAttention
from .conditional_full_attention import RecurrentConditionalFullAttention
from .exact_topk_attention import RecurrentExactTopKAttention
from .full_attention import RecurrentFullAttention
from .linear_attention import RecurrentLinearAttention
from .local_attention import RecurrentLocalAttention

__all__ = [
    "RecurrentAFTFullAttention",
    "RecurrentAFTSimpleAttention",
    "RecurrentAttention",
    "RecurrentAttentionLayer",
    "RecurrentConditionalFullAttention",
    "RecurrentExactTopKAttention",
    "RecurrentFullAttention",
    "RecurrentLinearAttention",
    "RecurrentLocalAttention",
]
