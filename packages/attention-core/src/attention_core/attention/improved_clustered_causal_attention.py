"""Causal improved clustered attention.

Each query attends only to the past keys among its cluster's top keys. Reference: Vyas et al. 2020,
"Fast Transformers with Clustered Attention", arXiv 2007.04825.

The queries are clustered and each centroid picks its ``topk`` highest-scoring valid keys
``T_c``; query ``i`` of cluster ``c`` then computes ``softmax_{j in T_c, j <= i}(temp q_i . k_j)``
over those keys. Unlike the non-causal version there is no term for the keys outside
``T_c``, and a query with no key ``j <= i`` in ``T_c`` outputs zeros.

Einstein notation: n batch, h heads, l queries, s keys, c clusters, k top keys, e/d features.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..attention_registry import (
    AttentionRegistry,
    Bool,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
)
from ..errors import UnsupportedMaskError
from ..events import AttentionEvent
from ..masking import zero_padding
from ..sparse_product import clustered_sparse_dot_product, clustered_sparse_weighted_average
from ._clustering import cluster_rows, keys_allowed
from ._inputs import check_attention_inputs, empty_attention
from .full_attention import masked_softmax
from .improved_clustered_attention import ImprovedClusteredAttention, top_keys

__all__ = ["ImprovedClusteredCausalAttention"]


class ImprovedClusteredCausalAttention(ImprovedClusteredAttention):
    """Causal attention of every query over the past keys among its cluster's top keys.

    Needs a lower-triangular ``attn_mask`` (e.g. `TriangularCausalMask`), so
    ``L == S``. ``topk`` is clamped to the number of valid keys. Padding queries and queries
    whose cluster's top keys all lie in their future get zeros. Dispatches an
    `AttentionEvent` with the ``(N, H, L, k)`` per-query weights over the top keys.

    Arguments:
        clusters: how many clusters to group the queries into.
        iterations: Lloyd iterations of the clustering (default: 10).
        bits: hyperplanes per hash, in ``[1, 63]`` (default: 32).
        hash_bias: random offsets for the hyperplanes (default: True).
        topk: keys per cluster that its queries attend to (default: 32).
        softmax_temp: multiplier of ``Q K^T`` (default: ``1 / sqrt(E)``).
        attention_dropout: dropout on the attention weights (default: 0.1).
        event_dispatcher: dispatcher instance or key.

    Shapes: queries ``(N, L, H, E)``, keys ``(N, L, H, E)``, values ``(N, L, H, D)``;
    returns ``(N, L, H, D)``.
    """

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return the causal top-key attention of every query."""
        N, L, S, _, E, _ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths
        )
        queries = zero_padding(queries, query_lengths)
        keys = zero_padding(keys, key_lengths)
        values = zero_padding(values, key_lengths)
        if not attn_mask.lower_triangular:
            raise UnsupportedMaskError(
                "ImprovedClusteredCausalAttention needs a lower triangular (causal) attn_mask "
                f"such as TriangularCausalMask({L}); got {attn_mask!r} that is not"
            )
        if 0 in (N, L, S):
            return empty_attention(queries, keys, values)
        temp = self.temperature(E)
        q, k, v = (rearrange(t, "n l h e -> n h l e") for t in (queries, keys, values))
        lengths = query_lengths.lengths
        groups, counts = self.cluster_queries(q, lengths)
        centroids = self.centroids(q, groups, counts)

        scores = temp * torch.einsum("nhce,nhse->nhcs", centroids, k)
        top, top_valid = top_keys(scores, keys_allowed(key_lengths), self.topk)

        QK = temp * clustered_sparse_dot_product(q, k, top, groups, counts, lengths)
        positions = torch.arange(L, device=q.device).view(L, 1)
        allowed = cluster_rows(top_valid, groups) & (cluster_rows(top, groups) <= positions)
        A = self.dropout(masked_softmax(QK, allowed))
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(AttentionEvent(self, A))
        V = clustered_sparse_weighted_average(A, v, top, groups, counts)
        return rearrange(V, "n h l d -> n l h d").contiguous()


AttentionRegistry.register(
    "causal-improved-clustered",
    ImprovedClusteredCausalAttention,
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
