"""Builders of whole transformer encoders and decoders."""

from __future__ import annotations

from torch.nn import LayerNorm

from ..attention import AttentionLayer
from ..errors import MissingParameterError
from ..events import EventDispatcher
from ..transformers import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from ._settings import ALWAYS_FORWARDED, FORWARDED, SIZE_SETTINGS, positive_int, with_defaults
from ._sizes import check_parameter_sizes
from .attention_builders import AttentionBuilder, BaseAttentionBuilder, _suggest
from .base import BaseBuilder

__all__ = [
    "BaseTransformerBuilder",
    "BaseTransformerDecoderBuilder",
    "BaseTransformerEncoderBuilder",
    "TransformerDecoderBuilder",
    "TransformerEncoderBuilder",
]


class BaseTransformerBuilder(BaseBuilder):
    """Settings shared by encoder and decoder builders.

    The model dimension is ``value_dimensions * n_heads``.
    """

    def __init__(self):
        self._n_layers = 4
        self._n_heads = 4
        self._d_query = 64
        self._d_value = 64
        self._d_ff = 1024
        self._dropout = 0.1
        self._activation = "relu"
        self._final_norm = True
        self._event_dispatcher = ""
        self._set_by_user: set[str] = set()

    @property
    def n_layers(self) -> int:
        """The number of layers (default: 4)."""
        return self._n_layers

    @n_layers.setter
    def n_layers(self, val):
        self._n_layers = positive_int("n_layers", val)

    @property
    def n_heads(self) -> int:
        """The number of attention heads (default: 4)."""
        return self._n_heads

    @n_heads.setter
    def n_heads(self, val):
        self._n_heads = positive_int("n_heads", val)

    @property
    def feed_forward_dimensions(self) -> int:
        """The hidden size of the feed-forward networks (default: 1024)."""
        return self._d_ff

    @feed_forward_dimensions.setter
    def feed_forward_dimensions(self, val):
        self._d_ff = positive_int("feed_forward_dimensions", val)

    @property
    def query_dimensions(self) -> int:
        """The head dimension of queries and keys (default: 64)."""
        return self._d_query

    @query_dimensions.setter
    def query_dimensions(self, val):
        self._d_query = positive_int("query_dimensions", val)

    @property
    def value_dimensions(self) -> int:
        """The head dimension of values (default: 64)."""
        return self._d_value

    @value_dimensions.setter
    def value_dimensions(self, val):
        self._d_value = positive_int("value_dimensions", val)

    @property
    def dropout(self) -> float:
        """The dropout rate of the layers (default: 0.1)."""
        return self._dropout

    @dropout.setter
    def dropout(self, val):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val <= 1:
            raise ValueError(f"dropout must be a float in [0, 1]; got {val!r}")
        self._dropout = float(val)

    @property
    def activation(self) -> str:
        """The feed-forward activation, ``"relu"`` or ``"gelu"`` (default: ``"relu"``)."""
        return self._activation

    @activation.setter
    def activation(self, val):
        activations = ["relu", "gelu"]
        if val not in activations:
            raise ValueError(f"activation must be one of {activations}; got {val!r}")
        self._activation = val

    @property
    def final_normalization(self) -> bool:
        """Apply a LayerNorm to the output of the last layer (default: True)."""
        return self._final_norm

    @final_normalization.setter
    def final_normalization(self, val):
        self._final_norm = bool(val)

    @property
    def event_dispatcher(self):
        """The event dispatcher instance or key given to every module (default: ``""``)."""
        return self._event_dispatcher

    @event_dispatcher.setter
    def event_dispatcher(self, val):
        EventDispatcher.get(val)  # validates the type
        self._event_dispatcher = val

    @property
    def model_dimensions(self) -> int:
        """``value_dimensions * n_heads``, the feature size of inputs and outputs."""
        return self.value_dimensions * self.n_heads

    def _check_sizes(self, attention_layers_per_layer: int) -> None:
        """Refuse sizes whose projections and feed-forward networks cannot be allocated."""
        d_model, heads = self.model_dimensions, self.n_heads
        queries = keys = d_model * heads * self.query_dimensions
        values = outputs = d_model * heads * self.value_dimensions
        feed_forward = d_model * self.feed_forward_dimensions
        layer = [queries, keys, values, outputs] * attention_layers_per_layer
        layer += [feed_forward, feed_forward]
        check_parameter_sizes(
            type(self).__name__,
            {
                "n_layers": self.n_layers,
                "n_heads": heads,
                "query_dimensions": self.query_dimensions,
                "value_dimensions": self.value_dimensions,
                "feed_forward_dimensions": self.feed_forward_dimensions,
            },
            layer,
            self.n_layers,
        )

    def _set_attention_parameter(self, builders: list[BaseAttentionBuilder], key, val):
        accepted = False
        for builder in builders:
            try:
                setattr(builder, key, val)
                accepted = True
            except AttributeError:
                continue
        if not accepted:
            settings = [n for n in dir(type(self)) if isinstance(getattr(type(self), n), property)]
            for builder in builders:
                settings += builder._registry.parameters
            raise AttributeError(
                f"{key!r} is neither a setting of {type(self).__name__} nor an attention "
                f"parameter{_suggest(key, settings)}"
            )

    def _forwarded(self, names: dict[str, str]) -> dict:
        """Map each forwarded parameter to the value of the setting that ``names`` gives it."""
        return {
            parameter: getattr(self, setting)
            for parameter, setting in names.items()
            if parameter in ALWAYS_FORWARDED or {parameter, setting} & self._set_by_user
        }

    def _prepare(self, builder: BaseAttentionBuilder, names: dict[str, str] | None = None):
        """Check the sizes and return a context in which ``builder`` holds the forwarded settings.

        Also gives ``builder`` the event dispatcher. ``names``: see `_forwarded`; default: each
        parameter from the setting of its name."""
        unset = [name for name in SIZE_SETTINGS if getattr(self, name) is None]
        if unset:
            raise MissingParameterError(
                f"{type(self).__name__} cannot build: {', '.join(unset)} not set (None)"
            )
        builder.event_dispatcher = self.event_dispatcher
        names = names or {name: name for name in FORWARDED}
        return with_defaults(builder, self._forwarded(names))


class BaseTransformerEncoderBuilder(BaseTransformerBuilder):
    """Build encoders; subclasses choose the attention builder and the module classes.

    Attention parameters (e.g. ``local_context``) can be set on the builder directly or
    on ``builder.attention``.
    """

    def __init__(self):
        super().__init__()
        self._attention_builder = self._get_attention_builder()
        self._attention_type = "full"

    def _get_attention_builder(self) -> BaseAttentionBuilder:
        raise NotImplementedError

    def _get_attention_layer_class(self):
        raise NotImplementedError

    def _get_encoder_class(self):
        raise NotImplementedError

    def _get_encoder_layer_class(self):
        raise NotImplementedError

    @property
    def attention(self) -> BaseAttentionBuilder:
        """The attention builder holding the attention parameters."""
        return self._attention_builder

    @property
    def attention_type(self) -> str:
        """The attention name, e.g. ``"full"`` (default) or ``"causal-linear"``."""
        return self._attention_type

    @attention_type.setter
    def attention_type(self, val):
        self._attention_type = self._attention_builder.validate_attention_type(val)

    def __setattr__(self, key, val):
        if key.startswith("_") or hasattr(type(self), key):
            object.__setattr__(self, key, val)
            if not key.startswith("_"):
                self._set_by_user.add(key)
            return
        self._set_attention_parameter([self._attention_builder], key, val)

    def get(self):
        """Construct the encoder."""
        with self._prepare(self.attention) as attention:
            return self._build(attention)

    def _build(self, attention: BaseAttentionBuilder):
        self._check_sizes(attention_layers_per_layer=1)
        Encoder = self._get_encoder_class()
        EncoderLayer = self._get_encoder_layer_class()
        Attention = self._get_attention_layer_class()
        d_model = self.model_dimensions
        return Encoder(
            [
                EncoderLayer(
                    Attention(
                        attention.get(self.attention_type),
                        d_model,
                        self.n_heads,
                        d_keys=self.query_dimensions,
                        d_values=self.value_dimensions,
                        event_dispatcher=self.event_dispatcher,
                    ),
                    d_model,
                    self.feed_forward_dimensions,
                    self.dropout,
                    self.activation,
                    event_dispatcher=self.event_dispatcher,
                )
                for _ in range(self.n_layers)
            ],
            LayerNorm(d_model) if self.final_normalization else None,
            event_dispatcher=self.event_dispatcher,
        )


class TransformerEncoderBuilder(BaseTransformerEncoderBuilder):
    """Build a `TransformerEncoder`.

    Example:
        >>> encoder = TransformerEncoderBuilder.from_kwargs(
        ...     n_layers=2, n_heads=4, query_dimensions=32, value_dimensions=32,
        ...     feed_forward_dimensions=256, attention_type="causal-linear",
        ... ).get()
    """

    def _get_attention_builder(self):
        return AttentionBuilder()

    def _get_attention_layer_class(self):
        return AttentionLayer

    def _get_encoder_class(self):
        return TransformerEncoder

    def _get_encoder_layer_class(self):
        return TransformerEncoderLayer


class BaseTransformerDecoderBuilder(BaseTransformerBuilder):
    """Build decoders.

    Attention parameters set on the builder go to both the self and the cross attention builders (to
    whichever accepts them)."""

    def __init__(self):
        super().__init__()
        self._self_attention_builder = self._get_self_attention_builder()
        self._cross_attention_builder = self._get_cross_attention_builder()
        self._self_attention_type = "full"
        self._cross_attention_type = "full"
        self._cross_n_heads = None
        self._cross_d_query = None
        self._cross_d_value = None
        self._cross_d_model = None

    def _get_self_attention_builder(self) -> BaseAttentionBuilder:
        raise NotImplementedError

    def _get_cross_attention_builder(self) -> BaseAttentionBuilder:
        raise NotImplementedError

    def _get_self_attention_layer_class(self):
        raise NotImplementedError

    def _get_cross_attention_layer_class(self):
        raise NotImplementedError

    def _get_decoder_class(self):
        raise NotImplementedError

    def _get_decoder_layer_class(self):
        raise NotImplementedError

    @property
    def self_attention(self) -> BaseAttentionBuilder:
        """The builder of the self attentions."""
        return self._self_attention_builder

    @property
    def cross_attention(self) -> BaseAttentionBuilder:
        """The builder of the cross attentions."""
        return self._cross_attention_builder

    @property
    def self_attention_type(self) -> str:
        """The self attention name (default: ``"full"``)."""
        return self._self_attention_type

    @self_attention_type.setter
    def self_attention_type(self, val):
        self._self_attention_type = self._self_attention_builder.validate_attention_type(val)

    @property
    def cross_attention_type(self) -> str:
        """The cross attention name (default: ``"full"``)."""
        return self._cross_attention_type

    @cross_attention_type.setter
    def cross_attention_type(self, val):
        self._cross_attention_type = self._cross_attention_builder.validate_attention_type(val)

    @property
    def cross_n_heads(self) -> int:
        """The number of cross attention heads (default: ``n_heads``)."""
        return self._cross_n_heads or self.n_heads

    @cross_n_heads.setter
    def cross_n_heads(self, val):
        self._cross_n_heads = positive_int("cross_n_heads", val)

    @property
    def cross_query_dimensions(self) -> int:
        """Head size of the cross attention's queries and keys (default: ``query_dimensions``)."""
        return self._cross_d_query or self.query_dimensions

    @cross_query_dimensions.setter
    def cross_query_dimensions(self, val):
        self._cross_d_query = positive_int("cross_query_dimensions", val)

    @property
    def cross_value_dimensions(self) -> int:
        """The head dimension of the cross attention's values (default: ``value_dimensions``)."""
        return self._cross_d_value or self.value_dimensions

    @cross_value_dimensions.setter
    def cross_value_dimensions(self, val):
        self._cross_d_value = positive_int("cross_value_dimensions", val)

    @property
    def cross_model_dimensions(self) -> int:
        """The feature size of the memory.

        Default: ``cross_n_heads * cross_value_dimensions``, which is ``model_dimensions`` when no
        cross_* size is set."""
        return self._cross_d_model or self.cross_n_heads * self.cross_value_dimensions

    @cross_model_dimensions.setter
    def cross_model_dimensions(self, val):
        self._cross_d_model = positive_int("cross_model_dimensions", val)

    def __setattr__(self, key, val):
        if key.startswith("_") or hasattr(type(self), key):
            object.__setattr__(self, key, val)
            if not key.startswith("_"):
                self._set_by_user.add(key)
            return
        self._set_attention_parameter(
            [self._self_attention_builder, self._cross_attention_builder], key, val
        )

    def get(self):
        """Construct the decoder."""
        cross = {name: name for name in FORWARDED}
        cross.update(
            n_heads="cross_n_heads",
            query_dimensions="cross_query_dimensions",
            value_dimensions="cross_value_dimensions",
        )
        with (
            self._prepare(self.self_attention) as self_attention,
            self._prepare(self.cross_attention, cross) as cross_attention,
        ):
            return self._build(self_attention, cross_attention)

    def _build(self, self_attention: BaseAttentionBuilder, cross_attention: BaseAttentionBuilder):
        self._check_sizes(attention_layers_per_layer=2)
        Decoder = self._get_decoder_class()
        DecoderLayer = self._get_decoder_layer_class()
        SelfAttention = self._get_self_attention_layer_class()
        CrossAttention = self._get_cross_attention_layer_class()
        d_model = self.model_dimensions
        return Decoder(
            [
                DecoderLayer(
                    SelfAttention(
                        self_attention.get(self.self_attention_type),
                        d_model,
                        self.n_heads,
                        d_keys=self.query_dimensions,
                        d_values=self.value_dimensions,
                        event_dispatcher=self.event_dispatcher,
                    ),
                    CrossAttention(
                        cross_attention.get(self.cross_attention_type),
                        d_model,
                        self.cross_n_heads,
                        d_keys=self.cross_query_dimensions,
                        d_values=self.cross_value_dimensions,
                        d_model_keys=self.cross_model_dimensions,
                        event_dispatcher=self.event_dispatcher,
                    ),
                    d_model,
                    self.feed_forward_dimensions,
                    self.dropout,
                    self.activation,
                    event_dispatcher=self.event_dispatcher,
                )
                for _ in range(self.n_layers)
            ],
            LayerNorm(d_model) if self.final_normalization else None,
            event_dispatcher=self.event_dispatcher,
        )


class TransformerDecoderBuilder(BaseTransformerDecoderBuilder):
    """Build a `TransformerDecoder`.

    Example:
        >>> decoder = TransformerDecoderBuilder.from_kwargs(
        ...     n_layers=2, n_heads=4, self_attention_type="causal-linear",
        ...     cross_attention_type="linear",
        ... ).get()
    """

    def _get_self_attention_builder(self):
        return AttentionBuilder()

    def _get_cross_attention_builder(self):
        return AttentionBuilder()

    def _get_self_attention_layer_class(self):
        return AttentionLayer

    def _get_cross_attention_layer_class(self):
        return AttentionLayer

    def _get_decoder_class(self):
        return TransformerDecoder

    def _get_decoder_layer_class(self):
        return TransformerDecoderLayer
