"""Building blocks shared by the model packages built on attention-core.

Feed-forward blocks, norms, relative position biases, rotary embeddings, a causal token shift and a
masked ``attend``."""

from .attend import attend, causal_mask
from .feedforward import GEGLU, GLU, FeedForward
from .norms import RMSNorm, l2norm
from .position import DynamicPositionBias, T5RelativePositionBias, relative_positions
from .rotary import RotaryEmbedding, apply_rotary_pos_emb, rotate_half
from .token_shift import TokenShift

__all__ = [
    "GEGLU",
    "GLU",
    "DynamicPositionBias",
    "FeedForward",
    "RMSNorm",
    "RotaryEmbedding",
    "T5RelativePositionBias",
    "TokenShift",
    "apply_rotary_pos_emb",
    "attend",
    "causal_mask",
    "l2norm",
    "relative_positions",
    "rotate_half",
]
