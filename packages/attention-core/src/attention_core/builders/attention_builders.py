"""Builders of inner attentions by name, e.g. ``"linear"`` or ``"conditional-full:linear"``."""

from __future__ import annotations

import inspect
from difflib import get_close_matches

from .. import attention as _register_attentions  # noqa: F401  (fills AttentionRegistry)
from ..attention_registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
    RecurrentCrossAttentionRegistry,
    Registry,
)
from ..errors import MissingParameterError
from .base import BaseBuilder

__all__ = [
    "AttentionBuilder",
    "BaseAttentionBuilder",
    "RecurrentAttentionBuilder",
    "RecurrentCrossAttentionBuilder",
]


def _suggest(name: str, choices: list[str]) -> str:
    close = get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class BaseAttentionBuilder(BaseBuilder):
    """Build attentions registered in ``registry``.

    Parameters are set as attributes and validated against the registry's specs.

    Composite names such as ``"conditional-full:improved-clustered"`` build the rightmost
    attention first and pass it as ``attention=`` to the one on its left.
    """

    def __init__(self, registry: Registry):
        self._registry = registry
        self._parameters: dict = {}

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._registry.parameters))

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self._parameters.items())
        return f"{type(self).__name__}({items})"

    def __getattr__(self, key):
        parameters = self.__dict__.get("_parameters", {})
        if key in parameters:
            return parameters[key]
        raise AttributeError(f"{type(self).__name__} has no parameter {key!r} set")

    def __setattr__(self, key, value):
        if key in ("_registry", "_parameters"):
            return object.__setattr__(self, key, value)
        if not self._registry.contains_parameter(key):
            raise AttributeError(
                f"{key!r} is not a parameter of any registered {self._registry.name}"
                f"{_suggest(key, self._registry.parameters)}"
            )
        self._parameters[key] = self._registry.validate_parameter(key, value)

    def validate_attention_type(self, attention_type: str) -> str:
        """Return ``attention_type`` or raise ``ValueError`` listing the known names."""
        if not isinstance(attention_type, str) or not attention_type:
            raise ValueError(f"attention_type must be a non-empty str; got {attention_type!r}")
        for name in attention_type.split(":"):
            if name not in self._registry:
                raise ValueError(
                    f"unknown {self._registry.name} type {name!r} in {attention_type!r}"
                    f"{_suggest(name, self._registry.keys)}; known: "
                    f"{', '.join(self._registry.keys)}"
                )
        return attention_type

    def get(self, attention_type: str):
        """Construct the attention named ``attention_type`` from the parameters set."""
        self.validate_attention_type(attention_type)
        names = attention_type.split(":")
        attention = None
        for position, name in enumerate(reversed(names)):
            attention_class, _ = self._registry[name]
            signature = inspect.signature(attention_class)
            parameters = self._registry.class_parameters(name, self._parameters)
            if position > 0:
                if "attention" not in signature.parameters:
                    raise ValueError(
                        f"{name!r} cannot wrap another attention in {attention_type!r}; only "
                        "the leftmost names of a composite type may be wrappers"
                    )
                parameters["attention"] = attention
            missing = [
                p.name
                for p in signature.parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in parameters
            ]
            if missing:
                if missing == ["attention"]:
                    raise MissingParameterError(
                        f"{name!r} wraps another attention; use a composite type such as "
                        f"'{name}:linear'"
                    )
                raise MissingParameterError(
                    f"{self._registry.name} {name!r} needs the parameter(s) "
                    f"{', '.join(map(repr, missing))}; set them on the builder"
                )
            attention = attention_class(**parameters)
        return attention


class AttentionBuilder(BaseAttentionBuilder):
    """Build batch attentions from `AttentionRegistry`.

    Example:
        >>> builder = AttentionBuilder.from_kwargs(query_dimensions=64)
        >>> builder.get("linear")
        LinearAttention(...)
    """

    def __init__(self):
        super().__init__(AttentionRegistry)


class RecurrentAttentionBuilder(BaseAttentionBuilder):
    """Build recurrent self attentions from `RecurrentAttentionRegistry`.

    The ``recurrent-transformer`` package fills that registry."""

    def __init__(self):
        super().__init__(RecurrentAttentionRegistry)


class RecurrentCrossAttentionBuilder(BaseAttentionBuilder):
    """Build recurrent cross attentions from `RecurrentCrossAttentionRegistry`.

    The ``recurrent-transformer`` package fills that registry."""

    def __init__(self):
        super().__init__(RecurrentCrossAttentionRegistry)
