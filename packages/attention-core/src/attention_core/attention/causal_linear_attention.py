"""Causal linear attention: each position attends to itself and the past in ``O(L)``.

Reference: Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236."""

from __future__ import annotations

import collections.abc

import torch
from torch import Tensor, nn

from ..attention_registry import (
    AttentionRegistry,
    Callable,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
)
from ..causal_product import elu_normalized_causal_dot_product, normalized_causal_dot_product
from ..errors import UnsupportedMaskError
from ..events import EventDispatcher
from ..feature_maps import FeatureMap, elu_feature_map, is_elu_feature_map
from ..masking import BaseMask
from ._inputs import check_attention_inputs

__all__ = ["CausalLinearAttention"]


class CausalLinearAttention(nn.Module):
    """Causal linear attention.

    ``V'_i = phi(Q_i)^T sum_{j<=i} phi(K_j) V_j^T / (phi(Q_i)^T sum_{j<=i} phi(K_j) + eps)``.
    The attention mask must be a `TriangularCausalMask` (or any lower-triangular
    mask); padded keys are dropped with ``key_lengths``. When ``L != S`` the keys are
    truncated or zero-padded to ``L``, as in fast-transformers. With the default feature map,
    ``S == L`` and no padded keys the layer is one call of
    `elu_normalized_causal_dot_product` (on the CPU
    kernel: feature map, numerator and normaliser in one pass over the ``(N, L, H, .)``
    layout); any other feature map runs it first and then the normalised product.

    Arguments:
        query_dimensions: the head dimension ``E``.
        feature_map: a factory ``query_dims -> FeatureMap`` (default: ``elu(x) + 1``).
        eps: added to the normaliser (default: 1e-6).
        event_dispatcher: dispatcher instance or key.

    Shapes: queries ``(N, L, H, E)``, keys ``(N, S, H, E)``, values ``(N, S, H, D)``;
    returns ``(N, L, H, D)``.
    """

    def __init__(
        self,
        query_dimensions: int,
        feature_map: collections.abc.Callable[[int], FeatureMap] | None = None,
        eps: float = 1e-6,
        event_dispatcher: EventDispatcher | str = "",
    ):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        values: Tensor,
        attn_mask: BaseMask,
        query_lengths: BaseMask,
        key_lengths: BaseMask,
    ) -> Tensor:
        """Return the causal linear attention ``(N, L, H, D)``."""
        # a non-tensor or a wrong rank is refused by check_attention_inputs before L is used
        L = queries.shape[1] if isinstance(queries, Tensor) and queries.dim() == 4 else 0
        _, L, S, _, _, _ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths, mask_shape=(L, L)
        )
        if not attn_mask.lower_triangular:
            raise UnsupportedMaskError(
                "CausalLinearAttention needs a lower triangular attention mask "
                "(TriangularCausalMask); got a mask that is not"
            )
        # (N, L, H, D) <-> (N, H, L, D) as views: Tensor.transpose costs a fraction of an
        # einops rearrange's call, which counts at short lengths
        to_heads = lambda t: t.transpose(1, 2)  # noqa: E731
        if S == L and key_lengths.all_ones and is_elu_feature_map(self.feature_map):
            # the whole layer in one kernel call: feature map, numerator and normaliser,
            # reading and writing the (N, L, H, .) layout in place
            V = elu_normalized_causal_dot_product(
                to_heads(queries), to_heads(keys), to_heads(values), self.eps
            )
            return V.transpose(1, 2).contiguous()
        self.feature_map.new_feature_map(queries.device)
        Q = self.feature_map.forward_queries(queries)
        K = self.feature_map.forward_keys(keys)
        if not key_lengths.all_ones:
            K = K * key_lengths.float_matrix.to(K.dtype)[:, :, None, None]
        if S > L:
            K, values = K[:, :L], values[:, :L]
        elif S < L:
            K = torch.nn.functional.pad(K, (0, 0, 0, 0, 0, L - S))
            values = torch.nn.functional.pad(values, (0, 0, 0, 0, 0, L - S))
        # numerator and normaliser in one pass; on the kernel path the result is written
        # straight into (N, L, H, D) storage, so the final transpose is free
        V = normalized_causal_dot_product(to_heads(Q), to_heads(K), to_heads(values), self.eps)
        return V.transpose(1, 2).contiguous()


AttentionRegistry.register(
    "causal-linear",
    CausalLinearAttention,
    [
        ("query_dimensions", Int),
        ("feature_map", Optional(Callable)),
        ("eps", Optional(Float, 1e-6)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
