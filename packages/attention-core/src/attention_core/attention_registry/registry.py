"""Registries that map attention names to classes and their declared parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .spec import Optional, Spec

__all__ = [
    "AttentionRegistry",
    "RecurrentAttentionRegistry",
    "RecurrentCrossAttentionRegistry",
    "Registry",
]


class Registry:
    """A name -> (class, parameter names) map plus one spec per parameter name.

    A parameter name means the same thing in every attention of a registry, so its spec
    is declared once; registering a conflicting spec for a known name is an error.
    """

    def __init__(self, name: str = "attention"):
        self.name = name
        self._classes: dict[str, type] = {}
        self._class_params: dict[str, list[str]] = {}
        self._class_specs: dict[str, dict[str, Spec]] = {}
        self._parameters: dict[str, Spec] = {}

    def register(
        self, key: str, class_object: type, parameter_tuples: Iterable[tuple[str, Spec]]
    ) -> None:
        """Register ``class_object`` under ``key`` with ``[(parameter, spec), ...]``."""
        if key in self._classes:
            raise ValueError(f"{key!r} is already registered in the {self.name} registry")
        for parameter, spec in parameter_tuples:
            known = self._parameters.get(parameter)
            if known is not None and not _compatible(known, spec):
                raise ValueError(
                    f"parameter {parameter!r} is already registered with spec {known!r}; "
                    f"{key!r} declares {spec!r}"
                )
        self._classes[key] = class_object
        self._class_params[key] = [p for p, _ in parameter_tuples]
        self._class_specs[key] = dict(parameter_tuples)
        for parameter, spec in parameter_tuples:
            self._parameters.setdefault(parameter, spec)

    def __contains__(self, key: str) -> bool:
        return key in self._classes

    def __getitem__(self, key: str) -> tuple[type, list[str]]:
        try:
            return self._classes[key], self._class_params[key]
        except KeyError:
            raise KeyError(
                f"{key!r} is not a registered {self.name} type; known: {', '.join(self.keys)}"
            ) from None

    @property
    def keys(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    @property
    def parameters(self) -> list[str]:
        """Every parameter name declared by some registered attention, sorted."""
        return sorted(self._parameters)

    def contains_parameter(self, key: str) -> bool:
        """Return ``True`` if some registered attention declares parameter ``key``."""
        return key in self._parameters

    def parameter_tuples(self, key: str) -> list[tuple[str, Spec]]:
        """The ``[(parameter, spec), ...]`` that attention ``key`` was registered with.

        A recurrent twin of a batch attention registers the same list, e.g.
        ``RecurrentAttentionRegistry.register("full", RecurrentFullAttention,
        AttentionRegistry.parameter_tuples("full"))``."""
        names = self[key][1]  # a clear KeyError for an unknown key
        return [(p, self._class_specs[key][p]) for p in names]

    def spec(self, key: str) -> Spec:
        """The spec registered for parameter ``key``."""
        return self._parameters[key]

    def class_parameters(self, key: str, values: dict) -> dict:
        """Resolve ``values`` for attention ``key`` with its own specs.

        Parameters it declares are converted, and ``None`` becomes that attention's registered
        default."""
        specs = self._class_specs[key]
        return {p: specs[p].get(values[p]) for p in self._class_params[key] if p in values}

    def validate_parameter(self, key: str, value: object) -> Any:
        """Return ``value`` checked (and possibly converted) by the spec of ``key``.

        ``None`` for an optional parameter is kept (each attention applies its default)."""
        spec = self._parameters[key]
        if value is None and isinstance(spec, Optional):
            return None
        try:
            return spec.get(value)
        except Exception as e:
            raise ValueError(
                f"invalid value {value!r} for attention parameter {key!r}; "
                f"expected {self._parameters[key]!r}"
            ) from e


def _compatible(a: Spec, b: Spec) -> bool:
    strip = lambda s: s.other_spec if isinstance(s, Optional) else s  # noqa: E731
    return a == b or strip(a) == strip(b)


AttentionRegistry = Registry("attention")
RecurrentAttentionRegistry = Registry("recurrent attention")
RecurrentCrossAttentionRegistry = Registry("recurrent cross attention")
