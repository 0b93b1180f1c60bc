"""Linear cross attention with the memory folded once into a fixed-size state.

Reference: Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236.

``S = sum_j phi(K_j) V_j^T`` and ``Z = sum_j phi(K_j)`` over the real memory positions are
computed at the first step; every step then costs ``O(F M)`` per head whatever the memory
length.

Einstein notation: n batch, t queries, s memory positions, h heads, f features after the
feature map, m value features.
"""

from __future__ import annotations

import torch

from attention_core.attention_registry import (
    Callable,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
    RecurrentCrossAttentionRegistry,
)
from attention_core.events import EventDispatcher
from attention_core.feature_maps import elu_feature_map

from ...state import LinearState, check_state_tensor, check_state_type
from .base import RecurrentCrossAttention, check_memory_heads

__all__ = ["RecurrentCrossLinearAttention"]


class RecurrentCrossLinearAttention(RecurrentCrossAttention):
    """Recurrent linear cross attention, the dual of ``linear`` with a full mask.

    The state is a `LinearState` computed from the memory at the first step (when a
    random feature map draws its features).

    Arguments:
        query_dimensions: the head dimension ``E``.
        feature_map: a factory ``query_dims -> FeatureMap`` (default: ``elu(x) + 1``).
        eps: added to the normaliser (default: 1e-6).
        event_dispatcher: dispatcher instance or key.

    Shapes: query ``(N, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, M)``; returns
    ``(N, H, M)``.
    """

    def __init__(self, query_dimensions, feature_map=None, eps=1e-6, event_dispatcher=""):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def make_state(self, queries, keys, values, key_lengths):
        """Fold the memory into ``S`` ``(N, H, F, M)`` and ``Z`` ``(N, H, F)``."""
        check_memory_heads(queries, keys, values, key_lengths)
        self.feature_map.new_feature_map(queries.device)
        K = self.feature_map.forward_keys(keys)
        if not key_lengths.all_ones:
            K = K * key_lengths.float_matrix.to(K)[:, :, None, None]
        return LinearState(torch.einsum("nshf,nshm->nhfm", K, values), K.sum(dim=1))

    def check_state(self, state, queries):
        state = check_state_type("state", state, LinearState, type(self).__name__)
        N, _, H, _ = queries.shape
        check_state_tensor("state.S", state.S, (N, H, -1, -1), queries)
        check_state_tensor("state.Z", state.Z, (N, H, state.S.shape[2]), queries)
        return state

    def attend(self, queries, state):
        """``phi(Q) S / (phi(Q) Z + eps)``."""
        Q = self.feature_map.forward_queries(queries)
        if Q.shape[-1] != state.S.shape[2]:
            raise ValueError(
                f"state.S must have {Q.shape[-1]} features (the feature map's size); "
                f"got {tuple(state.S.shape)}"
            )
        numerator = torch.einsum("nthf,nhfm->nthm", Q, state.S)
        denominator = torch.einsum("nthf,nhf->nth", Q, state.Z).unsqueeze(-1) + self.eps
        return numerator / denominator


RecurrentCrossAttentionRegistry.register(
    "linear",
    RecurrentCrossLinearAttention,
    [
        ("query_dimensions", Int),
        ("feature_map", Optional(Callable)),
        ("eps", Optional(Float, 1e-6)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
