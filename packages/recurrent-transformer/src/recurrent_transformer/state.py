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
from typing import Any

import torch
from torch import Tensor

from ._kv_cache import KVCache
from ._state_base import RecurrentState, check_state_tensor, check_state_type

# the classes defined apart are documented, pickled and imported under this module's name
KVCache.__module__ = RecurrentState.__module__ = __name__

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
    def from_sequence(cls, items: Any, name: str = "state", owner: str = "") -> MemoryState:
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
    def from_sequence(cls, items: Any, name: str = "state", owner: str = "") -> TransformerState:
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
