"""Causal linear attention as a recurrence with a fixed-size state.

Reference: Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236.

With ``S_i = sum_{j<=i} phi(K_j) V_j^T`` and ``Z_i = sum_{j<=i} phi(K_j)``, the output is
``V'_i = phi(Q_i)^T S_i / (phi(Q_i)^T Z_i + eps)``: each step adds one outer product to the
state and costs the same however long the sequence already is.

A step is one call of `attention_core.linear_step.linear_attention_step` (a fused kernel for
float32/float64 CPU tensors: feature map, state update and normalised read in one pass over the
state). ``prefill`` uses the causal product for the whole prompt.

The state accumulates in float32 for float16/bfloat16 inputs (a half-precision sum of
thousands of steps stops growing: bfloat16 cannot add 1 to 1024); outputs keep the input dtype.

Einstein notation: n batch, t prompt positions, h heads, f features after the feature map,
m value features.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from attention_core.attention.causal_linear_attention import CausalLinearAttention
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
)
from attention_core.causal_product import causal_dot_product
from attention_core.feature_maps import is_elu_feature_map
from attention_core.linear_step import accumulation_dtype, linear_attention_step

from ..._checks import check_sequence_heads
from ...state import LinearState, check_state_tensor, check_state_type
from .base import RecurrentAttention

__all__ = ["RecurrentLinearAttention"]


def _accumulating(t: Tensor) -> Tensor:
    """``t`` in the dtype the state accumulates in: float32 for half precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# the batch attention gives the constructor, parameters and registry entry; the
# recurrent interface (first in the MRO) replaces its forward
class RecurrentLinearAttention(RecurrentAttention, CausalLinearAttention):  # type: ignore[misc]
    """Recurrent causal linear attention, the dual of ``causal-linear``.

    Registered as ``"linear"`` and ``"causal-linear"``. The state is a `LinearState`
    (``S`` of shape ``(N, H, F, M)``, ``Z`` of shape ``(N, H, F)``, with ``F`` the size of the
    feature map). A random feature map draws its features at the first step (``state=None``)
    and keeps them for the rest of the sequence.

    Arguments:
        query_dimensions: the head dimension ``E``.
        feature_map: a factory ``query_dims -> FeatureMap`` (default: ``elu(x) + 1``).
        eps: added to the normaliser (default: 1e-6).
        event_dispatcher: dispatcher instance or key.

    Shapes: query and key ``(N, H, E)``, value ``(N, H, M)``; returns ``(N, H, M)``.

    Example:
        >>> attention = RecurrentLinearAttention(8)
        >>> q = k = v = torch.rand(2, 4, 8)
        >>> out, state = attention(q, k, v)
        >>> out.shape, state.S.shape
        (torch.Size([2, 4, 8]), torch.Size([2, 4, 8, 8]))
    """

    def _check(self, state: Any, Q: Tensor, value: Tensor) -> LinearState:
        if type(state) is LinearState:  # the common case in one pass of comparisons
            S, Z, shape = state.S, state.Z, Q.shape
            dtype, device = Q.dtype, Q.device
            if (
                type(S) is Tensor
                and type(Z) is Tensor
                and S.shape == (*shape, value.shape[-1])
                and Z.shape == shape
                and S.dtype == dtype
                and Z.dtype == dtype
                and S.device == device
                and Z.device == device
            ):
                return state
        state = check_state_type("state", state, LinearState, type(self).__name__)
        N, H, F = Q.shape[0], Q.shape[-2], Q.shape[-1]
        check_state_tensor("state.S", state.S, (N, H, F, value.shape[-1]), Q)
        check_state_tensor("state.Z", state.Z, (N, H, F), Q)
        return state

    def step(self, query: Tensor, key: Tensor, value: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Add ``phi(K) V^T`` to the state and read it with ``phi(Q)``.

        One call of `attention_core.linear_step.linear_attention_step`, which applies the
        default feature map itself for float32/float64 inputs."""
        feature_map: Any = self._modules["feature_map"]  # a dict lookup, not __getattr__
        if state is None:
            feature_map.new_feature_map(query.device)
        dtype = value.dtype
        elu = is_elu_feature_map(feature_map) and accumulation_dtype(dtype) == dtype
        if elu:
            Q, K = query, key
        else:
            Q = _accumulating(feature_map.forward_queries(query))
            K = _accumulating(feature_map.forward_keys(key))
            value = _accumulating(value)
        if state is not None:
            state = self._check(state, Q, value)
            state = (state.S, state.Z)
        out, (S, Z) = linear_attention_step(Q, K, value, state, self.eps, elu_feature_map=elu)
        return (out if out.dtype == dtype else out.to(dtype)), LinearState(S, Z)

    def prefill(
        self, queries: Tensor, keys: Tensor, values: Tensor, state: Any = None
    ) -> tuple[Tensor, Any]:
        """Consume a prompt in one parallel pass and return the state after it.

        The pass is the batch causal-linear computation; it continues from ``state`` when one is
        given.

        Arguments:
            queries: ``(N, T, H, E)``.
            keys: ``(N, T, H, E)``.
            values: ``(N, T, H, M)``.
            state: a `LinearState` to continue from, or ``None``.

        Returns:
            ``(N, T, H, M)`` and the `LinearState` after the last position.
        """
        check_sequence_heads(queries, keys, values)
        if state is None:
            self.feature_map.new_feature_map(queries.device)
        dtype = values.dtype
        Q = _accumulating(self.feature_map.forward_queries(queries))
        K = _accumulating(self.feature_map.forward_keys(keys))
        values = _accumulating(values)
        to_heads = lambda t: rearrange(t, "n t h f -> n h t f")  # noqa: E731
        numerator = rearrange(
            causal_dot_product(to_heads(Q), to_heads(K), to_heads(values)), "n h t m -> n t h m"
        )
        K_sums = K.cumsum(dim=1)
        S = torch.einsum("nthf,nthm->nhfm", K, values)
        Z = K.sum(dim=1)
        if state is not None:
            state = self._check(state, Q[:, 0], values[:, 0])
            numerator = numerator + torch.einsum("nthf,nhfm->nthm", Q, state.S)
            K_sums = K_sums + state.Z.unsqueeze(1)
            S = S + state.S
            Z = Z + state.Z
        denominator = torch.einsum("nthf,nthf->nth", Q, K_sums).unsqueeze(-1) + self.eps
        return (numerator / denominator).to(dtype), LinearState(S, Z)


RecurrentAttentionRegistry.register(
    "linear", RecurrentLinearAttention, AttentionRegistry.parameter_tuples("linear")
)
RecurrentAttentionRegistry.register(
    "causal-linear", RecurrentLinearAttention, AttentionRegistry.parameter_tuples("causal-linear")
)
