"""Clustered attention: every query gets the output of its cluster's centroid.

Cluster the queries, let each cluster's centroid attend to the keys, and give every query its
centroid's output. Reference: Vyas et al. 2020, "Fast Transformers with Clustered Attention", arXiv
2007.04825.

Cost ``O(N H (C S + L C bits))`` instead of ``O(N H L S)`` for ``C`` clusters.

Einstein notation: n batch, h heads, l queries, s keys, c clusters, e/d features.
"""

from __future__ import annotations

import torch
from einops import rearrange

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
from ..nn.attend import attend
from ._clustering import ClusteredAttentionBase, keys_allowed
from ._inputs import check_attention_inputs, empty_attention
from .full_attention import masked_softmax

__all__ = ["ClusteredAttention"]


class ClusteredAttention(ClusteredAttentionBase):
    """Softmax attention computed once per cluster of queries.

    The queries of every sequence and head are hashed with ``bits`` random hyperplanes
    and grouped into ``clusters`` clusters (Hamming K-means, ``iterations`` rounds) over the
    valid queries (``query_lengths``). The centroid (mean query) of each cluster attends
    to the valid keys (``key_lengths``) with ``softmax(softmax_temp * q_c . k_j)``, and each
    query receives its cluster's output. Padding queries get zeros.

    Arbitrary attention masks are not supported: ``attn_mask`` must be all ones.
    The centroids attend through PyTorch's fused ``scaled_dot_product_attention`` unless a
    listener is registered on ``event_dispatcher``: then the ``(N, H, C, S)`` centroid
    attention is built explicitly and dispatched as an `AttentionEvent`.

    Arguments:
        clusters: how many clusters to group the queries into.
        iterations: Lloyd iterations of the clustering (default: 10).
        bits: hyperplanes per hash, in ``[1, 63]`` (default: 32).
        hash_bias: if ``True`` the hyperplanes have a random offset, so the Hamming
            distance approximates the L2 distance; otherwise the angle (default: True).
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
        softmax_temp=None,
        attention_dropout=0.1,
        event_dispatcher="",
    ):
        super().__init__(
            clusters, iterations, bits, hash_bias, softmax_temp, attention_dropout, event_dispatcher
        )

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return the clustered attention of the queries over the valid keys."""
        N, L, S, _, E, _ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths
        )
        queries = zero_padding(queries, query_lengths)
        keys = zero_padding(keys, key_lengths)
        values = zero_padding(values, key_lengths)
        if not attn_mask.all_ones:
            raise ValueError(
                "ClusteredAttention does not support arbitrary attention masks; got an "
                "attn_mask that is not all ones"
            )
        if 0 in (N, L, S):
            return empty_attention(queries, keys, values)
        q, k, v = (rearrange(t, "n l h e -> n h l e") for t in (queries, keys, values))
        groups, counts = self.cluster_queries(q, query_lengths.lengths)
        centroids = self.centroids(q, groups, counts)
        if self.event_dispatcher.has_listeners:
            scores = self.temperature(E) * torch.einsum("nhce,nhse->nhcs", centroids, k)
            A = self.dropout(masked_softmax(scores, keys_allowed(key_lengths)))
            self.event_dispatcher.dispatch(AttentionEvent(self, A))
            per_cluster = torch.einsum("nhcs,nhsd->nhcd", A, v)
        else:  # the centroids' attention is dense softmax attention: SDPA's fused kernel
            per_cluster = attend(
                centroids,
                k,
                v,
                mask=keys_allowed(key_lengths),
                dropout_p=self.dropout.p,
                scale=self.temperature(E),
                training=self.training,
            )
        out = broadcast(per_cluster, groups, torch.ones_like(counts, dtype=v.dtype))
        return rearrange(out, "n h l d -> n l h d").contiguous()


AttentionRegistry.register(
    "clustered",
    ClusteredAttention,
    [
        ("clusters", Int),
        ("iterations", Optional(Int, 10)),
        ("bits", Optional(Int, 63)),
        ("hash_bias", Optional(Bool, True)),
        ("softmax_temp", Optional(Float)),
        ("attention_dropout", Optional(Float, 0.1)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
