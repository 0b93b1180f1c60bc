"""The Attention Free Transformer's token mixing: a per-feature softmax over the keys.

An elementwise, per-feature softmax over the keys. Reference: Zhai et al. 2021, "An Attention Free
Transformer", arXiv 2105.14103.

``Y_t = sigmoid(Q_t) * sum_s exp(K_s + w_ts) V_s / sum_s exp(K_s + w_ts)``, where every
product and exponential is taken feature by feature (so ``E == D``) and ``w`` is a learned
position bias (AFT-full) or zero (AFT-simple).

Einstein notation: n batch, h heads, l / t query position, s key position, d feature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Int, Optional
from ..events import EventDispatcher
from ..masking import zero_padding
from ._inputs import check_attention_inputs, empty_attention

__all__ = ["AFTFullAttention", "AFTSimpleAttention"]


# helpers


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and zero where the denominator is zero.

    Then so is the numerator: no allowed key."""
    return numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)


def _masked_max(x: Tensor, allowed: Tensor, dim: int) -> Tensor:
    """The maximum of ``x`` over ``dim`` where ``allowed``, or zero where nothing is.

    Kept as a dimension, detached: it is only a shift."""
    x = x.detach().masked_fill(~allowed, float("-inf")).amax(dim=dim, keepdim=True)
    return x.nan_to_num(neginf=0.0)


# AFT-full


class AFTFullAttention(nn.Module):
    """AFT-full with a factorised learned position bias ``w = u[:L] v[:S]^T``.

    ``Y_t = sigmoid(Q_t) * sum_s exp(K_s + w_ts) V_s / sum_s exp(K_s + w_ts)`` over the keys
    allowed by ``attn_mask`` and ``key_lengths`` (masked entries of ``w`` are ``-inf``).
    It costs ``O(N H L S D)`` time and ``O(L S + N H (L + S) D)`` memory, computed as
    ``exp(w - max_s w) @ (exp(K - max_s K) V)`` divided by ``exp(w - max_s w) @ exp(K - max_s K)``;
    the maxima (over allowed entries) keep every exponential ``<= 1``. Queries without an
    allowed key get zeros. The result can underflow to zero when a row's allowed keys all
    have ``K + w`` about 87 (float32) below the per-feature maxima. There is no attention
    matrix, so no `AttentionEvent` is dispatched.

    Arguments:
        max_sequence_length: the largest ``L`` and ``S`` accepted; sizes ``u`` and ``v``
            (default: 1024).
        aft_parameterization: the rank of the position bias (default: 64).
        event_dispatcher: dispatcher instance or key.

    Parameters: ``u`` and ``v``, both ``(max_sequence_length, aft_parameterization)``,
    initialised with ``randn * 0.01``.

    Shapes: queries ``(N, L, H, D)``, keys ``(N, S, H, D)``, values ``(N, S, H, D)``,
    masks ``(L, S)``, ``(N, L)``, ``(N, S)``; returns ``(N, L, H, D)``.
    """

    def __init__(self, max_sequence_length=1024, aft_parameterization=64, event_dispatcher=""):
        super().__init__()
        self.max_sequence_length = check_positive_int("max_sequence_length", max_sequence_length)
        check_positive_int("aft_parameterization", aft_parameterization)
        self.u = nn.Parameter(torch.randn(max_sequence_length, aft_parameterization) * 0.01)
        self.v = nn.Parameter(torch.randn(max_sequence_length, aft_parameterization) * 0.01)
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def position_bias(self, L: int, S: int) -> Tensor:
        """The position bias ``w = u[:L] v[:S]^T`` of shape ``(L, S)``."""
        return self.u[:L] @ self.v[:S].T

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return AFT-full's ``(N, L, H, D)``."""
        N, L, S, *_ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths, same_dims=True
        )
        keys = zero_padding(keys, key_lengths)
        values = zero_padding(values, key_lengths)
        if max(L, S) > self.max_sequence_length:
            raise ValueError(
                f"AFTFullAttention supports sequences up to max_sequence_length="
                f"{self.max_sequence_length}; got L={L} and S={S}"
            )
        if 0 in (N, L, S):
            return empty_attention(queries, keys, values)
        w = self.position_bias(L, S).to(queries.dtype)
        pairs = attn_mask.bool_matrix
        key_valid = key_lengths.bool_matrix[:, :, None, None]
        exp_w = torch.exp(w - _masked_max(w, pairs, dim=1)).masked_fill(~pairs, 0.0)
        exp_k = torch.exp(keys - _masked_max(keys, key_valid, dim=1))
        exp_k = exp_k.masked_fill(~key_valid, 0.0)
        numerator = torch.einsum("ts,nshd->nthd", exp_w, exp_k * values)
        denominator = torch.einsum("ts,nshd->nthd", exp_w, exp_k)
        return torch.sigmoid(queries) * _safe_divide(numerator, denominator)


# AFT-simple


class AFTSimpleAttention(nn.Module):
    """AFT-simple: ``Y_t = sigmoid(Q_t) * sum_s softmax_s(K)_s V_s`` without position bias.

    Two attention masks are supported, both in ``O(L)``: all ones (every query sees the same
    softmax-weighted sum over the keys inside ``key_lengths``) and lower triangular (query
    ``t`` sees keys ``s <= t``; computed with ``logcumsumexp`` so that large keys neither
    overflow nor underflow). Any other mask would need ``O(L S)`` work and raises
    ``ValueError`` (use `AFTFullAttention`). Queries without an allowed key get
    zeros. There is no attention matrix, so no `AttentionEvent` is dispatched.

    Arguments:
        event_dispatcher: dispatcher instance or key.

    Shapes: queries ``(N, L, H, D)``, keys ``(N, S, H, D)``, values ``(N, S, H, D)``,
    masks ``(L, S)``, ``(N, L)``, ``(N, S)``; returns ``(N, L, H, D)``. The causal form needs
    ``L == S``.
    """

    def __init__(self, event_dispatcher=""):
        super().__init__()
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, queries, keys, values, attn_mask, query_lengths, key_lengths):
        """Return AFT-simple's ``(N, L, H, D)``."""
        N, L, S, *_ = check_attention_inputs(
            queries, keys, values, attn_mask, query_lengths, key_lengths, same_dims=True
        )
        if 0 in (N, L, S):
            return empty_attention(queries, keys, values)
        keys = zero_padding(keys, key_lengths)
        values = zero_padding(values, key_lengths)
        key_valid = key_lengths.bool_matrix[:, :, None, None]
        if attn_mask.all_ones:
            mixed = _global_mix(keys, values, key_valid)
        elif attn_mask.lower_triangular:
            mixed = _causal_mix(keys, values, key_valid)
        else:
            raise ValueError(
                "AFTSimpleAttention supports only an all-ones or a lower triangular attn_mask "
                "(anything else would be quadratic); got another mask, use AFTFullAttention"
            )
        return torch.sigmoid(queries) * mixed


def _global_mix(keys: Tensor, values: Tensor, key_valid: Tensor) -> Tensor:
    """``sum_s softmax_s(K) V`` over valid keys: ``(N, S, H, D)`` -> ``(N, 1, H, D)``."""
    exp_k = torch.exp(keys - _masked_max(keys, key_valid, dim=1)).masked_fill(~key_valid, 0.0)
    numerator = (exp_k * values).sum(dim=1, keepdim=True)
    return _safe_divide(numerator, exp_k.sum(dim=1, keepdim=True))


def _causal_mix(keys: Tensor, values: Tensor, key_valid: Tensor) -> Tensor:
    """``sum_{s<=t} softmax_{s<=t}(K) V`` over valid keys: ``(N, L, H, D)`` -> same shape.

    In log space: with ``b`` a constant (detached) offset that makes ``V + b > 0``, the
    weights sum to one, so ``Y_t = exp(LCSE(K + log(V + b))_t - LCSE(K)_t) - b`` where LCSE
    is ``logcumsumexp``. Masked keys get a huge finite negative log weight rather than
    ``-inf``, whose gradient through ``logcumsumexp`` is NaN.
    """
    dtype = keys.dtype
    never = torch.finfo(dtype).min / 4
    log_weights = keys.masked_fill(~key_valid, never)
    values = values.masked_fill(~key_valid, 0.0)
    offset = 1.5 * values.detach().abs().amax(dim=1, keepdim=True) + torch.finfo(dtype).tiny
    log_total = torch.logcumsumexp(log_weights, dim=1)
    log_shifted = torch.logcumsumexp(log_weights + torch.log(values + offset), dim=1)
    seen = key_valid.cumsum(dim=1) > 0
    log_total = log_total.masked_fill(~seen, 0.0)
    mixed = torch.exp(log_shifted - log_total) - offset
    return mixed.masked_fill(~seen, 0.0)


AttentionRegistry.register(
    "aft-full",
    AFTFullAttention,
    [
        ("max_sequence_length", Optional(Int, 1024)),
        ("aft_parameterization", Optional(Int, 64)),
        ("event_dispatcher", Optional(EventDispatcherInstance, "")),
    ],
)
AttentionRegistry.register(
    "aft-simple",
    AFTSimpleAttention,
    [("event_dispatcher", Optional(EventDispatcherInstance, ""))],
)
