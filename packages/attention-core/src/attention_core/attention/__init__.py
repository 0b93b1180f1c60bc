"""Every attention of fast-transformers. Importing this package registers them all in
:data:`attention_core.attention_registry.AttentionRegistry`."""

from .attention_layer import AttentionLayer
from .causal_linear_attention import CausalLinearAttention
from .full_attention import FullAttention
from .linear_attention import LinearAttention

__all__ = [
    "AttentionLayer",
    "CausalLinearAttention",
    "FullAttention",
    "LinearAttention",
]
