"""Builders of recurrent encoders and decoders, with the settings of the batch builders.

The settings are those of attention-core's batch builders;
``fast_transformers.builders.RecurrentEncoderBuilder`` and ``RecurrentDecoderBuilder`` live here
under their old names.

Importing this module registers every recurrent attention, so
``RecurrentEncoderBuilder.from_kwargs(attention_type="linear", ...)`` works right away. Models
built with the same settings by a batch builder and by these have identical parameter names,
so a ``state_dict`` moves between them.

Example:
    >>> model = RecurrentEncoderBuilder.from_kwargs(
    ...     n_layers=2, n_heads=4, query_dimensions=16, value_dimensions=16,
    ...     feed_forward_dimensions=128, attention_type="linear").get()
    >>> y, state = model(torch.rand(10, 64))
"""

from __future__ import annotations

from attention_core.builders import (
    RecurrentAttentionBuilder,
    RecurrentCrossAttentionBuilder,
)
from attention_core.builders.transformer_builders import (
    BaseTransformerDecoderBuilder,
    BaseTransformerEncoderBuilder,
)

from . import attention as _register_attentions  # noqa: F401  (fills the recurrent registries)
from .attention import RecurrentAttentionLayer, RecurrentCrossAttentionLayer
from .transformers import (
    RecurrentTransformerDecoder,
    RecurrentTransformerDecoderLayer,
    RecurrentTransformerEncoder,
    RecurrentTransformerEncoderLayer,
)

__all__ = [
    "RecurrentAttentionBuilder",
    "RecurrentCrossAttentionBuilder",
    "RecurrentDecoderBuilder",
    "RecurrentEncoderBuilder",
]


class RecurrentEncoderBuilder(BaseTransformerEncoderBuilder):
    """Build a `RecurrentTransformerEncoder`.

    Settings (``n_layers``, ``n_heads``, ``query_dimensions``, ``value_dimensions``,
    ``feed_forward_dimensions``, ``dropout``, ``activation``, ``final_normalization``,
    ``event_dispatcher``, ``attention_type`` and the attention parameters) are those of
    `attention_core.builders.TransformerEncoderBuilder`; ``attention_type`` names a
    recurrent self attention (default: ``"full"``).

    Example:
        >>> model = RecurrentEncoderBuilder.from_kwargs(
        ...     attention_type="linear", n_layers=2, n_heads=4,
        ...     query_dimensions=16, value_dimensions=16).get()
    """

    def _get_attention_builder(self):
        return RecurrentAttentionBuilder()

    def _get_attention_layer_class(self):
        return RecurrentAttentionLayer

    def _get_encoder_class(self):
        return RecurrentTransformerEncoder

    def _get_encoder_layer_class(self):
        return RecurrentTransformerEncoderLayer


class RecurrentDecoderBuilder(BaseTransformerDecoderBuilder):
    """Build a `RecurrentTransformerDecoder`.

    Settings are those of `attention_core.builders.TransformerDecoderBuilder`;
    ``self_attention_type`` names a recurrent self attention and ``cross_attention_type`` a
    recurrent cross attention (``"linear"`` or ``"full"``; both default to ``"full"``).

    Example:
        >>> decoder = RecurrentDecoderBuilder.from_kwargs(
        ...     n_layers=2, n_heads=4, self_attention_type="linear",
        ...     cross_attention_type="full").get()
    """

    def _get_self_attention_builder(self):
        return RecurrentAttentionBuilder()

    def _get_cross_attention_builder(self):
        return RecurrentCrossAttentionBuilder()

    def _get_self_attention_layer_class(self):
        return RecurrentAttentionLayer

    def _get_cross_attention_layer_class(self):
        return RecurrentCrossAttentionLayer

    def _get_decoder_class(self):
        return RecurrentTransformerDecoder

    def _get_decoder_layer_class(self):
        return RecurrentTransformerDecoderLayer
