"""Builders construct attentions and whole transformers from keyword arguments.

``RecurrentEncoderBuilder`` and ``RecurrentDecoderBuilder`` live in the
``recurrent-transformer`` package (``recurrent_transformer.builders``).
"""

from .attention_builders import (
    AttentionBuilder,
    RecurrentAttentionBuilder,
    RecurrentCrossAttentionBuilder,
)
from .base import BaseBuilder
from .transformer_builders import TransformerDecoderBuilder, TransformerEncoderBuilder

__all__ = [
    "AttentionBuilder",
    "BaseBuilder",
    "RecurrentAttentionBuilder",
    "RecurrentCrossAttentionBuilder",
    "TransformerDecoderBuilder",
    "TransformerEncoderBuilder",
]

_MOVED = {"RecurrentEncoderBuilder", "RecurrentDecoderBuilder"}


def __getattr__(name):
    if name in _MOVED:
        raise AttributeError(
            f"{name} lives in the recurrent-transformer package: "
            f"`pip install recurrent-transformer` and "
            f"`from recurrent_transformer.builders import {name}`"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
