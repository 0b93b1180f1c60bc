"""Rotary relative positions for the language model's attentions.

Rotary embeddings (Su et al. 2021, RoFormer, arXiv 2104.09864) applied to the queries and keys of
any inner attention, in its batch form and in its recurrent form.

`RotaryAttention` wraps a batch inner attention (``(N, L, H, E)`` queries and keys at
positions ``0 .. L-1``); `RecurrentRotaryAttention` wraps the recurrent dual and counts
the positions it has consumed in its `RotaryState`, so that stepping through a sequence
rotates every query and key by the same angle as the batch form. With softmax attention the
scores then depend only on the distance between a query and a key.

Einstein notation: n batch, l/t positions, h heads, e query/key features.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from attention_core.nn.rotary import RotaryEmbedding, apply_rotary_pos_emb

from .state import RecurrentState

__all__ = ["RecurrentRotaryAttention", "RotaryAttention", "RotaryState"]


def _rotate(rotary: RotaryEmbedding, t: Tensor, start: int) -> Tensor:
    """Rotate ``t`` ``(N, T, H, E)`` as positions ``start .. start + T - 1``."""
    positions = torch.arange(start, start + t.shape[1], device=t.device)
    dtype = torch.promote_types(t.dtype, torch.float32)
    freqs = rotary(positions, dtype=dtype)[:, None]  # (t, 1, r): broadcast over heads
    return apply_rotary_pos_emb(freqs.transpose(0, 1), t.transpose(1, 2)).transpose(1, 2)


@dataclasses.dataclass(eq=False)
class RotaryState(RecurrentState):
    """State of `RecurrentRotaryAttention`.

    Attributes:
        position: the number of elements consumed so far (the next element's position).
        inner: the wrapped attention's state (``None`` before the first element).
    """

    position: int
    inner: Any


torch.serialization.add_safe_globals([RotaryState])


class RotaryAttention(nn.Module):
    """A batch inner attention whose queries and keys are rotated by their positions ``0 ..

    L-1`` first.

    Arguments:
        attention: the inner attention (e.g. ``CausalLinearAttention``, ``FullAttention``).
        dim: the number of rotated features per head (even, at most ``E``).
        theta: the base of the rotary frequencies (default: 10000).

    Shapes: queries ``(N, L, H, E)``, keys ``(N, L, H, E)``, values ``(N, L, H, D)``;
    returns what ``attention`` returns, ``(N, L, H, D)``.
    """

    def __init__(self, attention: nn.Module, dim: int, theta: float = 10000):
        super().__init__()
        self.attention = attention
        self.rotary = RotaryEmbedding(dim, theta=theta)

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Rotate ``queries`` and ``keys`` by their positions, then attend."""
        if queries.dim() != 4 or keys.dim() != 4 or queries.shape[1] != keys.shape[1]:
            raise ValueError(
                "RotaryAttention needs self attention: queries and keys (N, L, H, E) of the "
                f"same length; got shapes {tuple(queries.shape)} and {tuple(keys.shape)}"
            )
        q, k = _rotate(self.rotary, queries, 0), _rotate(self.rotary, keys, 0)
        return self.attention(q, k, values, attn_mask, query_lengths, key_lengths)


class RecurrentRotaryAttention(nn.Module):
    """The recurrent dual of `RotaryAttention`.

    It wraps a recurrent inner attention and rotates each query and key by its position, counted in
    a `RotaryState`.

    Arguments:
        attention: the recurrent inner attention.
        dim: the number of rotated features per head.
        theta: the base of the rotary frequencies (default: 10000).

    Shapes: ``forward`` takes query and key ``(N, H, E)``, value ``(N, H, D)``;
    ``prefill`` takes ``(N, T, H, E)`` queries and keys, ``(N, T, H, D)`` values.
    """

    def __init__(self, attention: nn.Module, dim: int, theta: float = 10000):
        super().__init__()
        self.attention = attention
        self.rotary = RotaryEmbedding(dim, theta=theta)

    @staticmethod
    def _unpack(state: Any) -> tuple[int, Any]:
        if state is None:
            return 0, None
        if not isinstance(state, RotaryState):
            raise TypeError(
                f"state must be the RotaryState returned by the previous call or None; got "
                f"{type(state).__name__}"
            )
        return state.position, state.inner

    def forward(self, query, key, value, state=None):
        """One element: rotate ``query`` and ``key`` by the next position, then attend."""
        position, inner = self._unpack(state)
        q = _rotate(self.rotary, query[:, None], position)[:, 0]
        k = _rotate(self.rotary, key[:, None], position)[:, 0]
        out, inner = self.attention(q, k, value, inner)
        return out, RotaryState(position + 1, inner)

    def prefill(self, queries, keys, values, state=None):
        """``T`` elements at once, as ``T`` calls of `forward` would."""
        position, inner = self._unpack(state)
        q, k = _rotate(self.rotary, queries, position), _rotate(self.rotary, keys, position)
        out, inner = self.attention.prefill(q, k, values, inner)
        return out, RotaryState(position + queries.shape[1], inner)
