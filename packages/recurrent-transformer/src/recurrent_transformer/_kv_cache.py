"""`KVCache`: the keys and values of the steps so far (documented and re-exported by
`recurrent_transformer.state`).

Einstein notation: n batch (``N``), h heads (``H``), t steps so far, c cache capacity,
e query features (``E``), d value features (``D``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._state_base import RecurrentState

__all__ = ["KVCache"]


class _Claim:
    """How many slots of a shared key/value buffer are in use.

    The caches that view the same buffer share it, so that only the newest may append in place.
    An encoder's step chain over the buffer (`recurrent_transformer._step_chain`) is kept here,
    so that it lives as long as the states that use the buffer; a copy of the claim keeps
    the count only."""

    __slots__ = ("chain", "filled")

    def __init__(self, filled: int):
        self.filled = filled
        self.chain: Any = None

    def __copy__(self) -> _Claim:
        return _Claim(self.filled)

    def __deepcopy__(self, memo: dict) -> _Claim:
        return _Claim(self.filled)


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
        cache.length, cache._claim = t, _Claim(t)  # the new cache is its buffers' only owner
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
        claim = self._claim
        if claim is not None and self._in_place_ok(new_length):
            self.key_buffer[:, :, self.length : new_length] = keys
            self.value_buffer[:, :, self.length : new_length] = values
            claim.filled = new_length
            return KVCache(self.key_buffer, self.value_buffer, new_length, claim)
        grown = self.with_room(new_length)
        grown.key_buffer[:, :, self.length : new_length] = keys
        grown.value_buffer[:, :, self.length : new_length] = values
        grown.length, grown._claim = new_length, _Claim(new_length)  # sole owner, as above
        return grown

    def with_room(self, new_length: int) -> KVCache:
        """A copy of this cache in new buffers with room for ``new_length`` steps (at least
        twice the capacity), their only owner: what `append` makes when it cannot append in
        place."""
        capacity = max(_MIN_CAPACITY, new_length, 2 * self.capacity)
        return KVCache.from_tensors(self.keys, self.values, capacity)

    def as_sequence(self) -> tuple[Tensor, Tensor]:
        """fast-transformers' ``[keys, values]``: ``(N, H, t, E)`` and ``(N, H, t, D)``."""
        return self.keys, self.values

    @classmethod
    def from_sequence(cls, items: Any, name: str = "state", owner: str = "") -> KVCache:
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
