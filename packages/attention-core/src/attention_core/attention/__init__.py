"""Every attention of fast-transformers.

Importing this package registers them all in `attention_core.attention_registry.AttentionRegistry`.
"""

from .aft_attention import AFTFullAttention, AFTSimpleAttention
from .attention_layer import AttentionLayer
from .causal_linear_attention import CausalLinearAttention
from .clustered_attention import ClusteredAttention
from .conditional_full_attention import ConditionalFullAttention
from .exact_topk_attention import ExactTopKAttention
from .full_attention import FullAttention
from .improved_clustered_attention import ImprovedClusteredAttention
from .improved_clustered_causal_attention import ImprovedClusteredCausalAttention
from .linear_attention import LinearAttention
from .local_attention import LocalAttention
from .reformer_attention import ReformerAttention

__all__ = [
    "AFTFullAttention",
    "AFTSimpleAttention",
    "AttentionLayer",
    "CausalLinearAttention",
    "ClusteredAttention",
    "ConditionalFullAttention",
    "ExactTopKAttention",
    "FullAttention",
    "ImprovedClusteredAttention",
    "ImprovedClusteredCausalAttention",
    "LinearAttention",
    "LocalAttention",
    "ReformerAttention",
]
