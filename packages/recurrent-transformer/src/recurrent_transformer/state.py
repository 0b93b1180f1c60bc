"""The states that recurrent attentions carry from one element of a sequence to the next.

Every state is a small dataclass of tensors (plus a few ints) with the same four methods:

- ``to(device=None, dtype=None)``: move it (floating tensors change dtype, masks stay bool);
- ``detach()``: cut it from the autograd graph, e.g. between truncated-BPTT windows;
- ``clone()``: an independent copy;
- pickling: ``torch.save`` writes it and ``torch.load`` reads it back, also with
  ``weights_only=True`` (the classes are registered with
  ``torch.serialization.add_safe_globals``). A key/value cache is saved trimmed to its length.

Every state is also the sequence that fast-transformers uses for it: ``len(state)``,
``state[i]`` and unpacking give its items (a `KVCache` is ``[keys, values]`` of shapes
``(N, H, t, E)`` and ``(N, H, t, D)``, a `LinearState` ``[S, Z]``), and every
recurrent attention accepts that plain list or tuple as its state
(`RecurrentState.from_sequence` builds the state object from it).

A model's state (`TransformerState`) holds one state per layer; a decoder layer's state
(`DecoderLayerState`) holds the state of its self attention and that of its cross
attention. Which state an attention uses:

========================  ==================================  ==================================
state                     attention                           contents
========================  ==================================  ==================================
`LinearState`      ``linear`` / ``causal-linear``,     ``S = sum_j phi(K_j) V_j^T``
                          cross ``linear``                    ``(N, H, F, M)``, ``Z = sum_j
                                                              phi(K_j)`` ``(N, H, F)``
`KVCache`          ``full``, ``exact-topk``,           keys ``(N, H, t, E)`` and values
                          ``aft-full``                        ``(N, H, t, D)`` of the past
`WindowState`      ``local``                           the last ``local_context // 2 + 1``
                                                              keys and values
`AFTSimpleState`   ``aft-simple``                      running per-feature softmax sums
`ConditionalState` ``conditional-full``                the full cache until the switch,
                                                              then the other attention's state
`MemoryState`      cross ``full``, ``local``,          projected memory keys and values
                          ``exact-topk``, ``aft-simple``,     (and the step's position)
                          ``aft-full``
========================  ==================================  ==================================

Einstein notation: n batch (``N``), h heads (``H``), t steps so far, c cache capacity,
e/f query features (``E``, or ``F`` after a feature map), d/m value features (``D``/``M``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AFTSimpleState",
    "ConditionalState",
    "DecoderLayerState",
    "KVCache",
    "LinearState",
    "MemoryState",
    "RecurrentState",
    "TransformerState",
    "WindowState",
    "check_state_tensor",
    "check_state_type",
]


# helpers


def _parse_to(*args, **kwargs) -> tuple[torch.device | None, torch.dtype | None]:
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
    if sequence_form and issubclass(expected, RecurrentState):
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
    def from_sequence(cls, items, name: str = "state", owner: str = "") -> RecurrentState:
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

    def to(self, *args, **kwargs) -> RecurrentState:
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


# self attention states


@dataclasses.dataclass(eq=False)
class LinearState(RecurrentState):
    """State of linear attention (Katharopoulos et al. 2020, arXiv 2006.16236).

    Attributes:
        S: ``(N, H, F, M)``, ``sum_j phi(K_j) V_j^T`` over the keys seen so far.
        Z: ``(N, H, F)``, ``sum_j phi(K_j)``, the normaliser.

    Its size does not depend on the number of steps: every step costs the same. As a
    sequence it is fast-transformers' ``[S, Z]``.
    """

    S: Tensor
    Z: Tensor


class _Claim:
    """How many slots of a shared key/value buffer are in use.

    The caches that view the same buffer share it, so that only the newest may append in place."""

    __slots__ = ("filled",)

    def __init__(self, filled: int):
        self.filled = filled


_MIN_CAPACITY = 16


@dataclasses.dataclass(eq=False)
class KVCache(RecurrentState):
    """The keys and values of the steps so far, in buffers that grow by doubling.

    Appending writes into free capacity in place (amortised ``O(1)`` per step; a full buffer is
    copied into one twice as large), so step ``t`` costs ``O(t)`` attention arithmetic and no
    copy of the history. A cache behaves as a value: appending to an older cache whose buffer a
    newer cache has already extended copies the buffer first (copy-on-write), so keeping and
    re-using old states is safe. While autograd records (grad mode on and a tensor requiring
    grad), appending concatenates instead, so that gradients flow through the cache.

    The key buffer is stored feature-major (it is the transpose of a contiguous
    ``(N, H, E, C)`` tensor), so that a step's product ``q @ keys^T`` streams every key feature
    contiguously over the positions, at memory speed. A cache loaded with ``torch.load`` may
    hold row-major keys until its first append reallocates it.

    Attributes:
        key_buffer: ``(N, H, C, E)``, the first ``length`` slots are the keys.
        value_buffer: ``(N, H, C, D)``.
        length: ``t``, the number of steps stored.

    Example:
        >>> cache = KVCache.empty(2, 4, 8, 8, dtype=torch.float32)
        >>> cache = cache.append(torch.rand(2, 4, 1, 8), torch.rand(2, 4, 1, 8))
        >>> cache.keys.shape, cache.capacity
        (torch.Size([2, 4, 1, 8]), 16)
        >>> keys, values = cache  # fast-transformers' [keys, values]
        >>> len(cache), values.shape
        (2, torch.Size([2, 4, 1, 8]))
    """

    key_buffer: Tensor
    value_buffer: Tensor
    length: int
    _claim: _Claim | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def empty(
        cls,
        N: int,
        H: int,
        E: int,
        D: int,
        capacity: int = _MIN_CAPACITY,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty cache with room for ``capacity`` steps (keys stored feature-major)."""
        keys = torch.empty(N, H, E, capacity, dtype=dtype, device=device).transpose(2, 3)
        values = torch.empty(N, H, capacity, D, dtype=dtype, device=device)
        return cls(keys, values, 0, _Claim(0))

    @classmethod
    def from_tensors(cls, keys: Tensor, values: Tensor, capacity: int | None = None) -> KVCache:
        """Build a cache holding ``keys`` ``(N, H, t, E)`` and ``values`` ``(N, H, t, D)``.

        It has room for ``capacity`` steps (default: the next power of two above ``t``)."""
        N, H, t, E = keys.shape
        D = values.shape[-1]
        if capacity is None:
            capacity = max(_MIN_CAPACITY, 1 << t.bit_length())
        if capacity < t:
            raise ValueError(f"capacity must be at least the length {t}; got {capacity}")
        cache = cls.empty(N, H, E, D, capacity, keys.dtype, keys.device)
        cache.key_buffer[:, :, :t] = keys
        cache.value_buffer[:, :, :t] = values
        cache.length = cache._claim.filled = t
        return cache

    @property
    def keys(self) -> Tensor:
        """``(N, H, t, E)``, a view of the buffer."""
        return self.key_buffer[:, :, : self.length]

    @property
    def values(self) -> Tensor:
        """``(N, H, t, D)``, a view of the buffer."""
        return self.value_buffer[:, :, : self.length]

    @property
    def capacity(self) -> int:
        """``C``, how many steps fit before the buffers are reallocated."""
        return self.key_buffer.shape[2]

    def _in_place_ok(self, new_length: int) -> bool:
        buffers = (self.key_buffer, self.value_buffer)
        return (
            self._claim is not None
            and self._claim.filled == self.length
            and new_length <= self.capacity
            and not any(b.requires_grad for b in buffers)
            and (torch.is_inference_mode_enabled() or not any(b.is_inference() for b in buffers))
        )

    def append(self, keys: Tensor, values: Tensor) -> KVCache:
        """A cache with ``keys`` ``(N, H, T, E)`` and ``values`` ``(N, H, T, D)`` appended.

        The returned cache may share (and extend) this one's buffer; this cache stays valid.
        """
        T = keys.shape[2]
        new_length = self.length + T
        recording = torch.is_grad_enabled() and any(
            t.requires_grad for t in (keys, values, self.key_buffer, self.value_buffer)
        )
        if recording:
            k = torch.cat([self.keys, keys], dim=2)
            v = torch.cat([self.values, values], dim=2)
            return KVCache(k, v, new_length, None)
        if self._in_place_ok(new_length):
            self.key_buffer[:, :, self.length : new_length] = keys
            self.value_buffer[:, :, self.length : new_length] = values
            self._claim.filled = new_length
            return KVCache(self.key_buffer, self.value_buffer, new_length, self._claim)
        capacity = max(_MIN_CAPACITY, new_length, 2 * self.capacity)
        grown = KVCache.empty(
            keys.shape[0],
            keys.shape[1],
            keys.shape[3],
            values.shape[3],
            capacity,
            keys.dtype,
            keys.device,
        )
        for buffer, old, new in (
            (grown.key_buffer, self.keys, keys),
            (grown.value_buffer, self.values, values),
        ):
            buffer[:, :, : self.length] = old
            buffer[:, :, self.length : new_length] = new
        grown.length = grown._claim.filled = new_length
        return grown

    def as_sequence(self) -> tuple[Tensor, Tensor]:
        """fast-transformers' ``[keys, values]``: ``(N, H, t, E)`` and ``(N, H, t, D)``."""
        return self.keys, self.values

    @classmethod
    def from_sequence(cls, items, name: str = "state", owner: str = "") -> KVCache:
        """Build a cache holding fast-transformers' ``[keys, values]``.

        Shapes ``(N, H, t, E)`` and ``(N, H, t, D)``, copied into a growable buffer."""
        if len(items) != 2 or not all(isinstance(t, Tensor) and t.dim() == 4 for t in items):
            got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in items]
            raise ValueError(
                f"{owner or cls.__name__} needs {name} as a KVCache or [keys (N, H, t, E), "
                f"values (N, H, t, D)]; got {got}"
            )
        keys, values = items
        if keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"{name}'s keys and values must have the same (N, H, t); got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        return cls.from_tensors(keys, values)

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> KVCache:
        keys, values = fn(self.key_buffer), fn(self.value_buffer)
        shared = keys.untyped_storage().data_ptr() == self.key_buffer.untyped_storage().data_ptr()
        return KVCache(keys, values, self.length, self._claim if shared else _Claim(self.length))

    def __getstate__(self) -> dict:
        # saved trimmed to its length and without the claim; it regrows after loading
        return {
            "key_buffer": self.keys.detach().clone(),
            "value_buffer": self.values.detach().clone(),
            "length": self.length,
        }


@dataclasses.dataclass(eq=False)
class WindowState(RecurrentState):
    """State of causal local attention: the last keys and values, oldest first.

    It holds the last ``w = local_context // 2 + 1`` keys and values (fewer during the first steps).
    Each step drops the oldest entry once the window is full, so the state has a fixed size.

    As a sequence it is ``[keys, values, length]``.

    Attributes:
        keys: ``(N, H, min(t, w), E)``.
        values: ``(N, H, min(t, w), D)``.
        length: ``t``, the number of steps so far.
    """

    keys: Tensor
    values: Tensor
    length: int


@dataclasses.dataclass(eq=False)
class AFTSimpleState(RecurrentState):
    """State of causal AFT-simple: running sums over the past, shifted so that nothing overflows.

    Per-feature running sums of ``exp(K_s - m)`` and ``exp(K_s - m) V_s`` over the past, shifted by
    their running maximum ``m``. Reference: Zhai et al. 2021, arXiv 2105.14103.

    Attributes:
        maximum: ``(N, H, D)``, ``m = max_s K_s``.
        numerator: ``(N, H, D)``, ``sum_s exp(K_s - m) V_s``.
        denominator: ``(N, H, D)``, ``sum_s exp(K_s - m)``.
    """

    maximum: Tensor
    numerator: Tensor
    denominator: Tensor


@dataclasses.dataclass(eq=False)
class ConditionalState(RecurrentState):
    """State of recurrent conditional-full attention.

    Attributes:
        full: the `KVCache` of the full attention while ``length <= length_limit``,
            then ``None``.
        other: the state of the wrapped attention (it sees every step from the first).
        length: ``t``, the number of steps so far.
    """

    full: KVCache | None
    other: Any
    length: int


# cross attention state


@dataclasses.dataclass(eq=False)
class MemoryState(RecurrentState):
    """State of recurrent softmax-like cross attentions: the memory projected once.

    Used by ``full``, ``local``, ``exact-topk``, ``aft-simple`` and ``aft-full``.

    Attributes:
        keys: ``(N, H, S, E)``.
        values: ``(N, H, S, D)``.
        key_mask: ``(N, S)`` bool, ``True`` for real (non-padded) memory positions, or
            ``None`` when nothing is padded.
        position: how many elements attended so far (used by ``local`` and ``aft-full``, whose
            rows depend on the query position; 0 and unused otherwise).

    As a sequence it is fast-transformers' ``[keys, values]``.
    """

    keys: Tensor
    values: Tensor
    key_mask: Tensor | None = None
    position: int = 0

    def as_sequence(self) -> tuple[Tensor, Tensor]:
        """fast-transformers' ``[keys, values]``: ``(N, H, S, E)`` and ``(N, H, S, D)``."""
        return self.keys, self.values

    @classmethod
    def from_sequence(cls, items, name: str = "state", owner: str = "") -> MemoryState:
        """Build the memory from fast-transformers' ``[keys, values]`` or from the four fields.

        The keys are ``(N, H, S, E)`` and the values ``(N, H, S, D)`` (no padding, position 0)."""
        if len(items) not in (2, 3, 4):
            raise ValueError(
                f"{owner or cls.__name__} needs {name} as a MemoryState or [keys (N, H, S, E), "
                f"values (N, H, S, D)]; got {len(items)} items"
            )
        return cls(*items)


# per-layer and per-model containers


@dataclasses.dataclass(eq=False)
class DecoderLayerState(RecurrentState):
    """State of one recurrent decoder layer.

    Unpacks as ``self_state, cross_state`` like the ``[self_state, cross_state]`` list of
    fast-transformers.

    Attributes:
        self_attention: the self attention's state.
        cross_attention: the cross attention's state (the memory, projected once).
    """

    self_attention: Any
    cross_attention: Any


@dataclasses.dataclass(eq=False)
class TransformerState(RecurrentState):
    """State of a recurrent encoder or decoder: one state per layer.

    It behaves like the list of per-layer states that fast-transformers returns
    (``len(state)``, ``state[i]``, iteration).

    Attributes:
        layers: a tuple with one state per layer.
    """

    layers: tuple

    def as_sequence(self) -> tuple:
        """The per-layer states."""
        return tuple(self.layers)

    @classmethod
    def from_sequence(cls, items, name: str = "state", owner: str = "") -> TransformerState:
        """The model state from a list of per-layer states."""
        return cls(tuple(items))


torch.serialization.add_safe_globals(
    [
        AFTSimpleState,
        ConditionalState,
        DecoderLayerState,
        KVCache,
        LinearState,
        MemoryState,
        TransformerState,
        WindowState,
    ]
)
