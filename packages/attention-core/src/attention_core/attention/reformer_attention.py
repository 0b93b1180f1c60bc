"""Shared-QK LSH attention of the Reformer.

Reference: Kitaev et al. 2020, "Reformer: The Efficient Transformer", arXiv 2001.04451.

Einstein notation: n batch, h heads, l sequence, c chunk index, i / j positions inside a
chunk / inside a chunk's key window (own chunk plus previous one), e query/key feature,
d value feature.
"""

from __future__ import annotations

from math import sqrt

import torch
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_positive_int
from ..attention_registry import (
    AttentionRegistry,
    Bool,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
)
from ..events import AttentionEvent, EventDispatcher
from ..masking import zero_padding
from ._inputs import check_attention_inputs
from .full_attention import masked_softmax

__all__ = ["ReformerAttention"]


# helpers


def _sort_by(x: Tensor, order: Tensor) -> Tensor:
    """Reorder ``x`` ``(N, H, L, F)`` along ``L`` by ``order`` ``(N, H, L)``."""
    return x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))


def _chunks_with_look_back(x: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Split a sequence into chunks and key windows that also hold the previous chunk.

    ``(N, H, C * chunk, ...)`` becomes chunks ``(N, H, C, chunk, ...)`` and key windows
    ``(N, H, C, 2 * chunk, ...)`` that hold the previous chunk followed by the chunk itself (chunk 0
    gets the last chunk as its previous one; callers mask it out)."""
    chunks = x.unflatten(2, (-1, chunk))
    return chunks, torch.cat([chunks.roll(1, dims=2), chunks], dim=3)


# the attention


class ReformerAttention(nn.Module):
    """Reformer's locality-sensitive-hashing attention with shared queries and keys.

    The keys are the L2-normalised queries: the ``keys`` argument is validated but
    otherwise **ignored** (as in fast-transformers), so it is a self attention that needs
    ``L == S``. In every one of ``rounds`` rounds, ``bits`` random hyperplanes ``R`` hash
    each normalised key ``x`` to ``argmax([x R, -x R])``; the positions of each (batch, head)
    are sorted by hash (stably, so ties keep their order) and split into chunks of
    ``chunk_size``; each chunk attends with softmax to itself and to the previous chunk (the
    first chunk only to itself). The output is the average of the rounds' outputs.

    Masks: ``key_lengths`` and ``attn_mask`` (boolean, ``True`` = may attend) are respected
    inside each chunk window; a query with no allowed key in its window gets a zero output
    for that round. Keys outside ``key_lengths`` are hashed to a bucket of their own, after
    every real bucket. With ``masked=True`` a query does not attend to itself unless nothing
    else in its window is allowed. When ``L`` is not a multiple of ``chunk_size`` the
    sequence is padded internally with masked positions that are dropped from the output
    (fast-transformers fails there).

    With ``chunk_size >= L`` (one chunk) the result equals `FullAttention` with keys
    ``Q / |Q|``.

    Arguments:
        chunk_size: positions per chunk (default: 32).
        bits: hyperplanes per hash, giving ``2 * bits`` buckets (default: 8).
        rounds: hashing rounds whose outputs are averaged (default: 4).
        masked: forbid attending to oneself when other keys are available (default: False).
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights (default: 0.1).
        event_dispatcher: dispatcher instance or key; listeners receive one
            `AttentionEvent` per forward with the dense ``(N, H, L, L)`` attention
            averaged over rounds (built only when someone listens).

    Shapes: queries ``(N, L, H, E)``, keys ``(N, L, H, E)`` (ignored), values
    ``(N, L, H, D)``, ``attn_mask`` ``(L, L)``, ``query_lengths`` / ``key_lengths`` ``(N, L)``;
    returns ``(N, L, H, D)``.

    Example:
        >>> from attention_core.masking import FullMask, LengthMask
        >>> attention = ReformerAttention(chunk_size=4, bits=2, rounds=2)
        >>> q, v = torch.randn(2, 10, 3, 8), torch.randn(2, 10, 3, 5)
        >>> lengths = LengthMask(torch.tensor([10, 7]), max_len=10)
        >>> attention(q, q, v, FullMask(10), lengths, lengths).shape
        torch.Size([2, 10, 3, 5])
    """

    def __init__(
        self,
        chunk_size=32,
        bits=8,
        rounds=4,
        masked=False,
        softmax_temp=None,
        attention_dropout=0.1,
        event_dispatcher="",
    ):
        super().__init__()
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.bits = check_positive_int("bits", bits)
        self.rounds = check_positive_int("rounds", rounds)
        if not isinstance(masked, bool):
            raise TypeError(f"masked must be a bool; got {type(masked).__name__}")
        self.masked = masked
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def _hash(self, keys: Tensor, valid: Tensor) -> Tensor:
        """Bucket ``(N, H, Lp)`` of the normalised keys ``(N, H, Lp, E)``.

        Invalid positions (``valid`` ``(N, Lp)`` false) go to bucket ``2 * bits``, after every real
        one."""
        planes = torch.randn(keys.shape[-1], self.bits, dtype=keys.dtype, device=keys.device)
        projected = keys @ planes
        buckets = torch.cat([projected, -projected], dim=-1).argmax(dim=-1)
        return buckets.masked_fill(~valid[:, None, :], 2 * self.bits)

    def _round(
        self,
        Q: Tensor,
        K: Tensor,
        V: Tensor,
        valid: Tensor,
        allowed_pairs: Tensor | None,
        chunk: int,
        softmax_temp: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One hashing round on padded ``(N, H, Lp, .)`` inputs.

        Returns the output ``(N, H, Lp, D)`` in the original order, and the chunked
        attention ``(N, H, C, chunk, 2 * chunk)`` with the original positions of its
        queries ``(N, H, C, chunk)`` and keys ``(N, H, C, 2 * chunk)``.
        """
        N, H, Lp, _ = Q.shape
        order = torch.argsort(self._hash(K, valid), dim=-1, stable=True)
        Qc = _sort_by(Q, order).unflatten(2, (-1, chunk))
        _, Kw = _chunks_with_look_back(_sort_by(K, order), chunk)
        _, Vw = _chunks_with_look_back(_sort_by(V, order), chunk)
        q_pos, k_pos = _chunks_with_look_back(order, chunk)
        C = Qc.shape[2]

        # what each query may see inside its window
        key_valid = valid[:, None, :].expand(N, H, Lp).gather(2, order)
        allowed = _chunks_with_look_back(key_valid, chunk)[1][..., None, :]
        first_chunk = torch.arange(C, device=Q.device)[:, None] == 0
        look_back = torch.arange(2 * chunk, device=Q.device)[None, :] < chunk
        allowed = allowed & ~(first_chunk & look_back)[:, None, :]
        if allowed_pairs is not None:
            allowed = allowed & allowed_pairs[q_pos[..., :, None], k_pos[..., None, :]]
        if self.masked:
            others = allowed & (q_pos[..., :, None] != k_pos[..., None, :])
            allowed = torch.where(others.any(dim=-1, keepdim=True), others, allowed)

        scores = torch.einsum("nhcie,nhcje->nhcij", Qc, Kw) * softmax_temp
        A = self.dropout(masked_softmax(scores, allowed))
        out = rearrange(torch.einsum("nhcij,nhcjd->nhcid", A, Vw), "n h c i d -> n h (c i) d")
        unsorted = torch.zeros_like(out).scatter(2, order[..., None].expand_as(out), out)
        return unsorted, A, q_pos, k_pos

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return the average over rounds of the chunked LSH attention, ``(N, L, H, D)``."""
        N, L, S, H, E, D = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths
        )
        # the keys are the normalised queries, zeroed (with the values) where keys are padding
        key_source = zero_padding(queries, key_lengths)
        values = zero_padding(values, key_lengths)
        if L != S:
            raise ValueError(
                "ReformerAttention is a self attention: queries and keys must have the same "
                f"length; got L={L} and S={S}"
            )
        if L == 0:
            return values.new_zeros(N, 0, H, D)
        softmax_temp = self.softmax_temp or 1.0 / sqrt(E)
        chunk = min(self.chunk_size, L)
        pad = -L % chunk
        Lp = L + pad

        to_heads = lambda t: rearrange(t, "n l h e -> n h l e")  # noqa: E731
        pad_positions = lambda t: nn.functional.pad(t, (0, 0, 0, pad))  # noqa: E731
        Q = pad_positions(to_heads(queries))
        K = nn.functional.normalize(pad_positions(to_heads(key_source)), dim=-1)
        V = pad_positions(to_heads(values))
        valid = nn.functional.pad(key_lengths.bool_matrix, (0, pad), value=False)
        allowed_pairs = None
        if not attn_mask.all_ones:
            allowed_pairs = nn.functional.pad(attn_mask.bool_matrix, (0, pad, 0, pad))

        listening = self.event_dispatcher.has_listeners
        dense = Q.new_zeros(N, H, Lp * Lp) if listening else None
        out = 0
        for _ in range(self.rounds):
            round_out, A, q_pos, k_pos = self._round(
                Q, K, V, valid, allowed_pairs, chunk, softmax_temp
            )
            out = out + round_out / self.rounds
            if dense is not None:
                flat = q_pos[..., :, None] * Lp + k_pos[..., None, :]
                dense.scatter_add_(2, flat.flatten(2), A.flatten(2) / self.rounds)
        if dense is not None:
            dense = dense.view(N, H, Lp, Lp)[:, :, :L, :L]
            self.event_dispatcher.dispatch(AttentionEvent(self, dense))
        return rearrange(out[:, :, :L], "n h l d -> n l h d").contiguous()


AttentionRegistry.register(
    "reformer",
    ReformerAttention,
    [
        ("chunk_size", Optional(Int, 32)),
        # 63 as in fast-transformers' registry (and clustered attention's spec for "bits");
        # builders therefore default to 63 bits while the constructor defaults to 8
        ("bits", Optional(Int, 63)),
        ("rounds", Optional(Int, 4)),
        ("masked", Optional(Bool, False)),
        ("softmax_temp", Optional(Float)),
        ("attention_dropout", Optional(Float, 0.1)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
