"""The base of the recurrent states: `RecurrentState` and the checks of a state given to an
attention (documented and re-exported by `recurrent_transformer.state`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["RecurrentState", "check_state_tensor", "check_state_type"]


# helpers


def _parse_to(*args: Any, **kwargs: Any) -> tuple[torch.device | None, torch.dtype | None]:
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"state.to() accepts only floating dtypes; got {dtype}")
    return device, dtype


def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, RecurrentState):
        return value.map_tensors(fn)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, RecurrentState):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def check_state_type(name: str, state: Any, expected: type | tuple[type, ...], owner: str) -> Any:
    """Return ``state`` as an instance of ``expected``, or raise ``TypeError``.

    A plain list or tuple (fast-transformers' form of a state, e.g. ``[keys, values]``) is
    converted with ``expected.from_sequence`` when ``expected`` is one state class.

    Arguments:
        name: how the state is called in the message (e.g. ``"state"``).
        state: the object given.
        expected: the accepted state class(es).
        owner: the module that received it, for the message.

    Returns:
        the state, an instance of ``expected``.
    """
    sequence_form = isinstance(state, (list, tuple)) and isinstance(expected, type)
    if sequence_form and isinstance(expected, type) and issubclass(expected, RecurrentState):
        return expected.from_sequence(state, name=name, owner=owner)
    if not isinstance(state, expected):
        names = (
            " or ".join(t.__name__ for t in expected)
            if isinstance(expected, tuple)
            else expected.__name__
        )
        raise TypeError(
            f"{owner} needs a {names} as {name} (the state it returned at the previous step); "
            f"got {type(state).__name__}"
        )
    return state


def check_state_tensor(name: str, t: Tensor, shape: tuple[int, ...], like: Tensor) -> None:
    """Raise unless ``t`` has ``shape`` and the dtype and device of ``like``.

    Raises ``ValueError`` or ``TypeError``; ``-1`` in ``shape`` matches any size.

    The message explains that a state belongs to one batch size and one model width.
    """
    if t.dim() != len(shape) or any(s not in (-1, a) for s, a in zip(shape, t.shape)):
        expected = "(" + ", ".join("*" if s == -1 else str(s) for s in shape) + ")"
        raise ValueError(
            f"{name} must have shape {expected} for this input; got {tuple(t.shape)} "
            "(a state belongs to one batch size and one model: start a new one with state=None)"
        )
    if t.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but the input has {like.dtype}; use state.to({like.dtype})"
        )
    if t.device != like.device:
        raise ValueError(
            f"{name} is on {t.device} but the input is on {like.device}; "
            f"use state.to({str(like.device)!r})"
        )


# base class


@dataclasses.dataclass(eq=False)
class RecurrentState:
    """Base class of all states.

    A dataclass whose fields are tensors, ints, ``None``, nested states or tuples of them."""

    # fast-transformers' sequence form: the items, in order, and how to build a state from them

    def as_sequence(self) -> tuple:
        """The state as fast-transformers' list of tensors (see each class), as a tuple."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.init)

    @classmethod
    def from_sequence(cls, items: Any, name: str = "state", owner: str = "") -> RecurrentState:
        """Build the state from its sequence form (the inverse of `as_sequence`).

        Arguments:
            items: a list or tuple of the items of `as_sequence`.
            name: how the state is called in error messages.
            owner: the module that received it, for error messages.
        """
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        if len(items) != len(fields):
            raise ValueError(
                f"{owner or cls.__name__} needs {name} as a {cls.__name__} or a list of "
                f"{len(fields)} items [{', '.join(fields)}]; got {len(items)} items"
            )
        return cls(*items)

    def __len__(self) -> int:
        return len(self.as_sequence())

    def __getitem__(self, index):
        return self.as_sequence()[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.as_sequence())

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> RecurrentState:
        """A new state of the same class with ``fn`` applied to every tensor."""
        changes = {
            f.name: _map(getattr(self, f.name), fn) for f in dataclasses.fields(self) if f.init
        }
        return dataclasses.replace(self, **changes)

    def tensors(self) -> list[Tensor]:
        """Every tensor of the state (nested states included), in field order."""
        return list(_tensors(self))

    def to(self, *args: Any, **kwargs: Any) -> RecurrentState:
        """Move the state like ``Tensor.to``.

        Accepts ``to(device)``, ``to(dtype)``, ``to(tensor)``, ``to(device=..., dtype=...)``. Only
        floating tensors change dtype."""
        device, dtype = _parse_to(*args, **kwargs)

        def move(t: Tensor) -> Tensor:
            target = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=target)

        return self.map_tensors(move)

    def detach(self) -> RecurrentState:
        """The same values, detached from the autograd graph (shares memory)."""
        return self.map_tensors(Tensor.detach)

    def clone(self) -> RecurrentState:
        """An independent copy."""
        return self.map_tensors(Tensor.clone)

    @property
    def device(self) -> torch.device:
        """The device of the first tensor of the state."""
        return self.tensors()[0].device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating tensor of the state."""
        return next(t.dtype for t in self.tensors() if t.is_floating_point())

    @property
    def batch_size(self) -> int:
        """``N``, the first dimension of the state's tensors."""
        return self.tensors()[0].shape[0]
