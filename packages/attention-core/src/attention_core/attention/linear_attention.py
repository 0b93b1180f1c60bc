"""Linear attention, ``phi(Q) (phi(K)^T V)`` normalised by ``phi(Q) sum_j phi(K_j)``.

Reference: Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236."""

from __future__ import annotations

import torch
from torch import nn

from ..attention_registry import (
    AttentionRegistry,
    Callable,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
)
from ..errors import UnsupportedMaskError
from ..events import EventDispatcher
from ..feature_maps import elu_feature_map
from ..masking import zero_padding
from ._inputs import check_attention_inputs

__all__ = ["LinearAttention"]


class LinearAttention(nn.Module):
    """Non-causal linear attention in ``O(N (L + S) H E D)``.

    ``V'_i = phi(Q_i)^T sum_j phi(K_j) V_j^T / (phi(Q_i)^T sum_j phi(K_j) + eps)`` over the
    keys inside ``key_lengths``. Arbitrary attention masks cannot be expressed; passing
    one that is not all ones is an error (use ``causal-linear`` for causal masks).

    Arguments:
        query_dimensions: the head dimension ``E`` (sizes random feature maps).
        feature_map: a factory ``query_dims -> FeatureMap`` (default: ``elu(x) + 1``).
        eps: added to the normaliser (default: 1e-6).
        event_dispatcher: dispatcher instance or key.

    Shapes: queries ``(N, L, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``;
    returns ``(N, L, H, D)``.
    """

    def __init__(self, query_dimensions, feature_map=None, eps=1e-6, event_dispatcher=""):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return the linear attention of the queries over the unmasked keys."""
        check_attention_inputs(queries, keys, values, attn_mask, query_lengths, key_lengths)
        keys = zero_padding(keys, key_lengths)
        values = zero_padding(values, key_lengths)
        if not attn_mask.all_ones:
            raise UnsupportedMaskError(
                "LinearAttention does not support arbitrary attention masks; got a mask that "
                "is not all ones (use attention_type='causal-linear' for causal masks)"
            )
        self.feature_map.new_feature_map(queries.device)
        Q = self.feature_map.forward_queries(queries)
        K = self.feature_map.forward_keys(keys)
        if not key_lengths.all_ones:
            K = K * key_lengths.float_matrix.to(K.dtype)[:, :, None, None]
        KV = torch.einsum("nshd,nshm->nhmd", K, values)
        Z = 1 / (torch.einsum("nlhd,nhd->nlh", Q, K.sum(dim=1)) + self.eps)
        return torch.einsum("nlhd,nhmd,nlh->nlhm", Q, KV, Z).contiguous()


AttentionRegistry.register(
    "linear",
    LinearAttention,
    [
        ("query_dimensions", Int),
        ("feature_map", Optional(Callable)),
        ("eps", Optional(Float, 1e-6)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
