"""Helpers of the transformer builders.

Size settings that may be unset, and the builder settings that reach the attention builders
(fast-transformers' rule)."""

from __future__ import annotations

from contextlib import contextmanager

from .attention_builders import BaseAttentionBuilder


def positive_int(name: str, value) -> int | None:
    """Return a positive int, or ``None`` for "not set".

    ``None`` is what argparse gives for an absent option, see ``from_namespace``; ``get()`` refuses
    to build while a size is ``None``."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


# settings of a transformer builder that also reach its attention builders when the user set
# them and an attention declares a parameter of that name (fast-transformers' rule, e.g. a
# custom attention taking ``n_heads``); ``query_dimensions`` always does, its default
# included; a decoder's cross attention gets the cross_* values
FORWARDED = ("n_heads", "query_dimensions", "value_dimensions", "feed_forward_dimensions")
ALWAYS_FORWARDED = ("query_dimensions",)
SIZE_SETTINGS = ("n_layers", *FORWARDED)


@contextmanager
def with_defaults(builder: BaseAttentionBuilder, values: dict):
    """Set the attention's own defaults on ``builder`` for the duration of the block.

    Sets the ``values`` that some attention declares and the user did not set; a later change of the
    transformer setting is seen."""
    added = []
    for name, value in values.items():
        if value is None or name in builder._parameters:
            continue
        if builder._registry.contains_parameter(name):
            setattr(builder, name, value)
            added.append(name)
    try:
        yield builder
    finally:
        for name in added:
            builder._parameters.pop(name, None)
