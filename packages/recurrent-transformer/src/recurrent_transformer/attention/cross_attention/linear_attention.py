"""Linear cross attention with the memory folded once into a fixed-size state.

Reference: Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236.

``S = sum_j phi(K_j) V_j^T`` and ``Z = sum_j phi(K_j)`` over the real memory positions are
computed at the first step; every step then costs ``O(F M)`` per head whatever the memory
length.

Einstein notation: n batch, t queries, s memory positions, h heads, f features after the
feature map, m value features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attention_core.attention.linear_attention import LinearAttention
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentCrossAttentionRegistry,
)
from attention_core.masking import BaseMask

from ...state import LinearState, check_state_tensor, check_state_type
from .base import RecurrentCrossAttention, check_memory_heads

__all__ = ["RecurrentCrossLinearAttention"]


# the batch attention gives the constructor, parameters and registry entry; the
# recurrent interface (first in the MRO) replaces its forward
class RecurrentCrossLinearAttention(RecurrentCrossAttention, LinearAttention):  # type: ignore[misc]
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

    def make_state(
        self,
        queries: Tensor,
        keys: Tensor | None,
        values: Tensor | None,
        key_lengths: BaseMask | None,
    ) -> Any:
        """Fold the memory into ``S`` ``(N, H, F, M)`` and ``Z`` ``(N, H, F)``."""
        keys, values, key_lengths = check_memory_heads(queries, keys, values, key_lengths)
        self.feature_map.new_feature_map(queries.device)
        K = self.feature_map.forward_keys(keys)
        if not key_lengths.all_ones:
            K = K * key_lengths.float_matrix.to(K)[:, :, None, None]
        return LinearState(torch.einsum("nshf,nshm->nhfm", K, values), K.sum(dim=1))

    def check_state(self, state: Any, queries: Tensor) -> Any:
        state = check_state_type("state", state, LinearState, type(self).__name__)
        N, _, H, _ = queries.shape
        check_state_tensor("state.S", state.S, (N, H, -1, -1), queries)
        check_state_tensor("state.Z", state.Z, (N, H, state.S.shape[2]), queries)
        return state

    def attend(self, queries: Tensor, state: Any) -> Tensor:
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
    "linear", RecurrentCrossLinearAttention, AttentionRegistry.parameter_tuples("linear")
)
