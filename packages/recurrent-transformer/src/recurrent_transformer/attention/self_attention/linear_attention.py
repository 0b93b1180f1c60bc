"""Causal linear attention as a recurrence with a fixed-size state (Katharopoulos et al. 2020,
"Transformers are RNNs", arXiv 2006.16236).

With ``S_i = sum_{j<=i} phi(K_j) V_j^T`` and ``Z_i = sum_{j<=i} phi(K_j)``, the output is
``V'_i = phi(Q_i)^T S_i / (phi(Q_i)^T Z_i + eps)``: each step adds one outer product to the
state and costs the same however long the sequence already is.

A step is computed directly (``addcmul`` into a new ``S``, one batched matrix-vector product,
one dot product): for the heads of fast-transformers' recurrent example (N=10, H=12, E=M=32,
float32, two threads) that took about 40 µs per layer, against about 80 µs through
:func:`attention_core.causal_product.normalized_causal_dot_product` with a state and 70 µs with
``einsum``. ``prefill`` uses the causal product for the whole prompt.

The state accumulates in float32 for float16/bfloat16 inputs (a half-precision sum of
thousands of steps stops growing: bfloat16 cannot add 1 to 1024); outputs keep the input dtype.

Einstein notation: n batch, t prompt positions, h heads, f features after the feature map,
m value features.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from attention_core.attention_registry import (
    Callable,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
    RecurrentAttentionRegistry,
)
from attention_core.causal_product import causal_dot_product
from attention_core.events import EventDispatcher
from attention_core.feature_maps import elu_feature_map

from ..._checks import check_sequence_heads
from ...state import LinearState, check_state_tensor, check_state_type
from .base import RecurrentAttention

__all__ = ["RecurrentLinearAttention"]


def _accumulating(t: Tensor) -> Tensor:
    """``t`` in the dtype the state accumulates in: float32 for half precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class RecurrentLinearAttention(RecurrentAttention):
    """Recurrent causal linear attention, the dual of ``causal-linear``.

    Registered as ``"linear"`` and ``"causal-linear"``. The state is a :class:`LinearState`
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

    def __init__(self, query_dimensions, feature_map=None, eps=1e-6, event_dispatcher=""):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def _check(self, state, Q: Tensor, value: Tensor) -> LinearState:
        state = check_state_type("state", state, LinearState, type(self).__name__)
        N, H, F = Q.shape[0], Q.shape[-2], Q.shape[-1]
        check_state_tensor("state.S", state.S, (N, H, F, value.shape[-1]), Q)
        check_state_tensor("state.Z", state.Z, (N, H, F), Q)
        return state

    def step(self, query, key, value, state):
        """One step: add ``phi(K) V^T`` to the state and read it with ``phi(Q)``."""
        if state is None:
            self.feature_map.new_feature_map(query.device)
        dtype = value.dtype
        Q = _accumulating(self.feature_map.forward_queries(query))
        K = _accumulating(self.feature_map.forward_keys(key))
        value = _accumulating(value)
        if state is None:
            S = K.unsqueeze(-1) * value.unsqueeze(-2)
            Z = K
        else:
            state = self._check(state, Q, value)
            S = torch.addcmul(state.S, K.unsqueeze(-1), value.unsqueeze(-2))
            Z = state.Z + K
        numerator = torch.matmul(Q.unsqueeze(-2), S).squeeze(-2)
        denominator = (Q * Z).sum(dim=-1, keepdim=True) + self.eps
        return (numerator / denominator).to(dtype), LinearState(S, Z)

    def prefill(self, queries, keys, values, state=None):
        """Consume a prompt in one parallel pass (the batch causal-linear computation) and
        return the state after it; continues from ``state`` when one is given.

        Arguments:
            queries: ``(N, T, H, E)``.
            keys: ``(N, T, H, E)``.
            values: ``(N, T, H, M)``.
            state: a :class:`LinearState` to continue from, or ``None``.

        Returns:
            ``(N, T, H, M)`` and the :class:`LinearState` after the last position.
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


_PARAMETERS = [
    ("query_dimensions", Int),
    ("feature_map", Optional(Callable)),
    ("eps", Optional(Float, 1e-6)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
]
RecurrentAttentionRegistry.register("linear", RecurrentLinearAttention, _PARAMETERS)
RecurrentAttentionRegistry.register("causal-linear", RecurrentLinearAttention, _PARAMETERS)
