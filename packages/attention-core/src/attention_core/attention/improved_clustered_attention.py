"""Improved clustered attention: clustered attention refined on each centroid's top keys.

The approximation is refined, for each query, on the keys its centroid attends to most. Reference:
Vyas et al. 2020, "Fast Transformers with Clustered Attention", arXiv 2007.04825, section 3.3.

For a query ``i`` of cluster ``c`` with centroid attention ``A_c`` (a softmax over all valid
keys) and the set ``T_c`` of the ``topk`` keys with the highest centroid scores:

    V_i = m_c sum_{j in T_c} softmax_{T_c}(temp q_i . k_j) v_j
          + sum_{j not in T_c} A_c[j] v_j

where ``m_c = sum_{j in T_c} A_c[j]`` is the mass the centroid gives to ``T_c``: the top keys
are re-weighted exactly for each query, the remaining keys keep the centroid's weights.

Einstein notation: n batch, h heads, l queries, s keys, c clusters, k top keys, e/d features.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .._checks import check_positive_int
from ..aggregate import broadcast
from ..attention_registry import (
    AttentionRegistry,
    Bool,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
)
from ..events import AttentionEvent
from ..masking import zero_padding
from ..sparse_product import clustered_sparse_dot_product, clustered_sparse_weighted_average
from ._clustering import ClusteredAttentionBase, cluster_rows, keys_allowed
from ._inputs import check_attention_inputs, empty_attention
from .full_attention import masked_softmax

__all__ = ["ImprovedClusteredAttention", "top_keys"]


def top_keys(scores: Tensor, allowed: Tensor | None, topk: int) -> tuple[Tensor, Tensor]:
    """The ``min(topk, S)`` highest-scoring keys of every centroid.

    Arguments:
        scores: ``(N, H, C, S)`` centroid scores.
        allowed: ``(N, 1, 1, S)`` valid keys, or ``None``.
        topk: how many keys to keep.

    Returns:
        ``(index, valid)``, both ``(N, H, C, k)``: the key indices and whether each one is a
        valid key (a sequence with fewer than ``k`` valid keys fills up with invalid ones).
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    index = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices
    if allowed is None:
        return index, torch.ones_like(index, dtype=torch.bool)
    return index, allowed.expand(-1, scores.shape[1], scores.shape[2], -1).gather(-1, index)


class ImprovedClusteredAttention(ClusteredAttentionBase):
    """Clustered attention with per-query attention over each cluster's top keys.

    Clusters the valid queries like `ClusteredAttention`; then each cluster's
    centroid picks its ``topk`` best keys (clamped to the number of valid keys), and every
    query computes its own softmax over those keys, scaled by the centroid's attention mass
    on them, plus the centroid's attention on the other keys (see the module docstring).
    With ``topk >= S`` this is exact softmax attention. Padding queries get zeros.

    Arbitrary attention masks are not supported: ``attn_mask`` must be all ones.
    Dispatches an `AttentionEvent` with the ``(N, H, C, S)`` centroid attention.

    Arguments:
        clusters: how many clusters to group the queries into.
        iterations: Lloyd iterations of the clustering (default: 10).
        bits: hyperplanes per hash, in ``[1, 63]`` (default: 32).
        hash_bias: random offsets for the hyperplanes (default: True).
        topk: keys per cluster whose attention is recomputed per query (default: 32).
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights (default: 0.1).
        event_dispatcher: dispatcher instance or key.

    Shapes: queries ``(N, L, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``;
    returns ``(N, L, H, D)``.
    """

    def __init__(
        self,
        clusters,
        iterations=10,
        bits=32,
        hash_bias=True,
        topk=32,
        softmax_temp=None,
        attention_dropout=0.1,
        event_dispatcher="",
    ):
        super().__init__(
            clusters, iterations, bits, hash_bias, softmax_temp, attention_dropout, event_dispatcher
        )
        self.topk = check_positive_int("topk", topk)

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return the improved clustered attention of the queries over the valid keys."""
        N, L, S, _, E, _ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths
        )
        queries = zero_padding(queries, query_lengths)
        keys = zero_padding(keys, key_lengths)
        values = zero_padding(values, key_lengths)
        if not attn_mask.all_ones:
            raise ValueError(
                "ImprovedClusteredAttention does not support arbitrary attention masks; got an "
                "attn_mask that is not all ones"
            )
        if 0 in (N, L, S):
            return empty_attention(queries, keys, values)
        temp = self.temperature(E)
        q, k, v = (rearrange(t, "n l h e -> n h l e") for t in (queries, keys, values))
        lengths = query_lengths.lengths
        groups, counts = self.cluster_queries(q, lengths)
        centroids = self.centroids(q, groups, counts)

        # centroid attention over all valid keys, split into top keys and the rest
        scores = temp * torch.einsum("nhce,nhse->nhcs", centroids, k)
        allowed = keys_allowed(key_lengths)
        A = masked_softmax(scores, allowed)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(AttentionEvent(self, A))
        top, top_valid = top_keys(scores, allowed, self.topk)
        in_top = torch.zeros_like(A, dtype=torch.bool).scatter_(-1, top, top_valid)
        top_mass = (A * in_top).sum(dim=-1, keepdim=True)  # m_c, (N, H, C, 1)
        rest = self.dropout(A.masked_fill(in_top, 0.0))
        ones = torch.ones_like(counts, dtype=v.dtype)
        V_rest = broadcast(torch.einsum("nhcs,nhsd->nhcd", rest, v), groups, ones)

        # every query's own softmax over its cluster's top keys, scaled by m_c
        QK = temp * clustered_sparse_dot_product(q, k, top, groups, counts, lengths)
        A_top = masked_softmax(QK, cluster_rows(top_valid, groups)) * cluster_rows(top_mass, groups)
        V_top = clustered_sparse_weighted_average(self.dropout(A_top), v, top, groups, counts)
        return rearrange(V_top + V_rest, "n h l d -> n l h d").contiguous()


AttentionRegistry.register(
    "improved-clustered",
    ImprovedClusteredAttention,
    [
        ("clusters", Int),
        ("iterations", Optional(Int, 10)),
        ("bits", Optional(Int, 63)),
        ("hash_bias", Optional(Bool, True)),
        ("topk", Optional(Int, 32)),
        ("softmax_temp", Optional(Float)),
        ("attention_dropout", Optional(Float, 0.1)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
