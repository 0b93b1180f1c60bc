"""The feedback memory: one key/value pair per past time step, shared by every layer.

The Feedback Transformer (Fan et al. 2021, arXiv 2002.09402) merges all layers' states of a
time step into one memory vector and projects it once to a key and a value with the
projection that every layer shares. This module holds those projections:

`FeedbackMemory` is what ``forward(..., return_memory=True)`` returns and accepts.

Einstein notation: ``b`` batch, ``h`` heads, ``m`` memory slots, ``d`` head feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["FeedbackMemory", "memory_source"]

Signature = tuple[int, int, int, int]  # (dim, depth, heads, dim_head)

# the attribute of a memory's tensors that names the model that wrote them
_SOURCE = "_feedback_memory_source"


class _KeysValues(NamedTuple):
    keys: Tensor
    values: Tensor


class FeedbackMemory(_KeysValues):
    """Hold the keys and values of the most recent steps, oldest first.

    A ``(keys, values)`` named tuple (like feedback-transformer-pytorch's ``Memory``, so
    ``keys, values = memory`` works) that also remembers the size of the model that wrote it.

    Attributes:
        keys: ``(b, h, m, d)`` keys of the last ``m <= mem_len`` steps.
        values: ``(b, h, m, d)`` their values.
        source: ``(dim, depth, heads, dim_head)`` of the model that wrote them, so that a model
            of another size rejects them; ``None`` skips that check. A source is also
            recorded on the ``keys`` and ``values`` tensors themselves (see
            `memory_source`), so the plain tuple ``tuple(memory)`` is checked as
            strictly; new tensors computed from them (slices, clones) carry no source.

    Example:
        >>> memory = FeedbackMemory(
        ...     torch.zeros(2, 8, 5, 64), torch.zeros(2, 8, 5, 64))
        >>> keys, values = memory
        >>> keys.shape, memory.source
        (torch.Size([2, 8, 5, 64]), None)
    """

    source: Signature | None

    def __new__(
        cls, keys: Tensor, values: Tensor, source: Signature | None = None
    ) -> FeedbackMemory:
        self = super().__new__(cls, keys, values)
        self.source = source
        if source is not None:
            for t in (keys, values):
                setattr(t, _SOURCE, tuple(source))
        return self

    def detach(self) -> FeedbackMemory:
        """The same memory cut from the autograd graph."""
        return FeedbackMemory(self.keys.detach(), self.values.detach(), self.source)


def memory_source(memory: Sequence[Tensor]) -> Signature | None:
    """Return the ``(dim, depth, heads, dim_head)`` of the model that wrote ``memory``.

    Arguments:
        memory: a `FeedbackMemory` or a plain ``(keys, values)`` tuple of its tensors.

    Returns:
        The model's ``(dim, depth, heads, dim_head)``, or ``None`` when unknown.

    Raises:
        ValueError: ``keys`` and ``values`` were written by models of different sizes.
    """
    source = getattr(memory, "source", None)
    if source is not None:
        return tuple(source)
    keys, values = memory
    key_source = getattr(keys, _SOURCE, None)
    value_source = getattr(values, _SOURCE, None)
    if key_source is not None and value_source is not None and key_source != value_source:
        raise ValueError(
            "memory's keys and values come from models with (dim, depth, heads, dim_head) = "
            f"{key_source} and {value_source}"
        )
    return key_source or value_source


# a memory is a tensor container that ``torch.load(..., weights_only=True)`` may rebuild
torch.serialization.add_safe_globals([FeedbackMemory])
