"""Typed parameter specifications that attentions declare once in a registry.

A builder validates every value it is given against the spec registered for that
parameter name, so a wrong type fails when it is set, not deep inside a model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "Bool",
    "Callable",
    "Choice",
    "EventDispatcherInstance",
    "Float",
    "Int",
    "Optional",
    "Spec",
]


class Spec:
    """Accept instances of ``spec`` (a type or tuple of types).

    Arguments:
        spec: the accepted type(s).
        name: how the spec is shown in messages.
    """

    def __init__(self, spec: Any, name: str | None = None):
        self._spec = spec
        self._name = name

    def __repr__(self) -> str:
        if self._name:
            return self._name
        return getattr(self._spec, "__name__", repr(self._spec))

    def check(self, x: object) -> bool:
        """Return ``True`` if ``x`` conforms to the spec."""
        return isinstance(x, self._spec)

    def get(self, x: Any) -> Any:
        """Return ``x`` (possibly converted) or raise ``ValueError`` if it does not conform."""
        if not self.check(x):
            raise ValueError(f"{x!r} does not conform to {self!r}")
        return x

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__


class _Int(Spec):
    def __init__(self):
        super().__init__(int, "Int")

    def check(self, x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)


class _Float(Spec):
    def __init__(self):
        super().__init__(float, "Float")

    def check(self, x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def get(self, x: Any) -> Any:
        return float(super().get(x))


class Choice(Spec):
    """Accept one of a fixed set of values.

    Example:
        >>> Choice(["relu", "gelu"]).check("gelu")
        True
    """

    def __init__(self, choices: Iterable[Any]):
        super().__init__(None, f"Choice({list(choices)!r})")
        self._choices = tuple(choices)

    def check(self, x: object) -> bool:
        return x in self._choices


class _Callable(Spec):
    def __init__(self):
        super().__init__(None, "Callable")

    def check(self, x: object) -> bool:
        return callable(x)


class _EventDispatcherInstance(Spec):
    def __init__(self):
        super().__init__(None, "EventDispatcherInstance")

    def check(self, x: object) -> bool:
        from ..events import EventDispatcher

        return isinstance(x, (str, EventDispatcher))


class Optional(Spec):
    """Accept ``None`` (replaced by ``default``) or a value conforming to ``other_spec``.

    Example:
        >>> Optional(Int, 32).get(None)
        32
    """

    def __init__(self, other_spec: Spec, default: Any = None):
        super().__init__(None, f"Optional[{other_spec!r}]")
        self.other_spec = other_spec
        self.default = default

    def check(self, x: object) -> bool:
        return x is None or self.other_spec.check(x)

    def get(self, x: Any) -> Any:
        if x is None:
            return self.default
        return self.other_spec.get(x)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Optional)
            and self.other_spec == other.other_spec
            and self.default == other.default
        )

    __hash__ = object.__hash__


Int = _Int()
Float = _Float()
Bool = Spec(bool, "Bool")
Callable = _Callable()
EventDispatcherInstance = _EventDispatcherInstance()
