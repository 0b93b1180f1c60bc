"""This module holds the plain-PyTorch form of one recurrent linear-attention step.

It is the oracle of the tests and the path for dtypes and devices without a compiled kernel.

Einstein notation: n batch, h heads, e query/key features (after the feature map), m value
features.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "elu_feature",
    "linear_attention_step_backward_reference",
    "linear_attention_step_reference",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the state accumulates in: float32 for float16/bfloat16, else ``dtype``.

    A half-precision sum of thousands of steps stops growing (bfloat16 cannot add 1 to 1024),
    so the state of half-precision inputs is kept in float32.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def elu_feature(x: Tensor) -> Tensor:
    """The default feature map of linear attention, ``elu(x) + 1`` (positive everywhere)."""
    return torch.nn.functional.elu(x) + 1


def _features(x: Tensor, elu_feature_map: bool, dtype: torch.dtype) -> Tensor:
    # the feature map runs in the input dtype, then the result joins the accumulation dtype
    return (elu_feature(x) if elu_feature_map else x).to(dtype)


def linear_attention_step_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    S: Tensor | None,
    Z: Tensor | None,
    eps: float,
    elu_feature_map: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of causal linear attention, written out.

    With ``phi`` the feature map (``elu(x) + 1``, or the identity for already mapped inputs):
    ``S' = S + phi(k) v^T``, ``Z' = Z + phi(k)``, ``out = phi(q)^T S' / (phi(q) . Z' + eps)``.

    Arguments:
        query: `(N, H, E)`.
        key: `(N, H, E)`.
        value: `(N, H, M)`.
        S: `(N, H, E, M)` state of the previous steps, or ``None`` for the first step.
        Z: `(N, H, E)` normaliser state, or ``None``.
        eps: added to the normaliser.
        elu_feature_map: apply ``elu(x) + 1`` to query and key.

    Returns:
        ``out`` `(N, H, M)` in the dtype of ``value``, and the new ``S`` `(N, H, E, M)` and
        ``Z`` `(N, H, E)` in the accumulation dtype (float32 for half precision).
    """
    dtype = accumulation_dtype(value.dtype)
    phi_q = _features(query, elu_feature_map, dtype)
    phi_k = _features(key, elu_feature_map, dtype)
    v = value.to(dtype)
    S_new = phi_k.unsqueeze(-1) * v.unsqueeze(-2)
    if S is not None:
        S_new = S + S_new
    Z_new = phi_k.clone() if Z is None else Z + phi_k
    numerator = torch.einsum("nhe,nhem->nhm", phi_q, S_new)
    denominator = (phi_q * Z_new).sum(dim=-1, keepdim=True) + eps
    out = (numerator / denominator).to(value.dtype)
    return out.contiguous(), S_new.contiguous(), Z_new.contiguous()


def linear_attention_step_backward_reference(
    grad_out: Tensor | None,
    grad_S: Tensor | None,
    grad_Z: Tensor | None,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    S_new: Tensor,
    Z_new: Tensor,
    eps: float,
    elu_feature_map: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `linear_attention_step_reference` from its new state.

    With ``a = phi(q)``, ``b = phi(k)``, ``d = a . Z' + eps``, ``out = a^T S' / d``,
    ``g = grad_out / d`` and ``c = -(grad_out . out) / d``, the gradients reaching the new state
    are ``G_S = grad_S + a g^T`` and ``G_Z = grad_Z + c a``; then ``dS = G_S``, ``dZ = G_Z``,
    ``dv = G_S^T b``, ``db = G_S v + G_Z``, ``da = S' g + c Z'``, and ``dq = da * phi'(q)``,
    ``dk = db * phi'(k)``.

    Arguments:
        grad_out: `(N, H, M)` gradient of the output, or ``None`` (zero).
        grad_S: `(N, H, E, M)` gradient of the new ``S``, or ``None`` (zero).
        grad_Z: `(N, H, E)` gradient of the new ``Z``, or ``None`` (zero).
        query: `(N, H, E)` the query of the step.
        key: `(N, H, E)` the key of the step.
        value: `(N, H, M)` the value of the step.
        S_new: `(N, H, E, M)` the state the step returned.
        Z_new: `(N, H, E)` the normaliser state the step returned.
        eps: added to the normaliser in the step.
        elu_feature_map: whether the step applied ``elu(x) + 1`` to query and key.

    Returns:
        ``dq`` `(N, H, E)`, ``dk`` `(N, H, E)`, ``dv`` `(N, H, M)` in the input dtypes, and
        ``dS`` `(N, H, E, M)`, ``dZ`` `(N, H, E)` in the accumulation dtype.
    """
    dtype = S_new.dtype
    phi_q = _features(query, elu_feature_map, dtype)
    phi_k = _features(key, elu_feature_map, dtype)
    v = value.to(dtype)
    denominator = (phi_q * Z_new).sum(dim=-1, keepdim=True) + eps
    out = torch.einsum("nhe,nhem->nhm", phi_q, S_new) / denominator
    g = torch.zeros_like(out) if grad_out is None else grad_out.to(dtype)
    g_numerator = g / denominator  # (n, h, m)
    g_denominator = -(g * out).sum(dim=-1, keepdim=True) / denominator  # (n, h, 1)
    G_S = phi_q.unsqueeze(-1) * g_numerator.unsqueeze(-2)
    if grad_S is not None:
        G_S = G_S + grad_S.to(dtype)
    G_Z = phi_q * g_denominator
    if grad_Z is not None:
        G_Z = G_Z + grad_Z.to(dtype)
    g_q = torch.einsum("nhem,nhm->nhe", S_new, g_numerator) + Z_new * g_denominator
    g_k = torch.einsum("nhem,nhm->nhe", G_S, v) + G_Z
    g_v = torch.einsum("nhem,nhe->nhm", G_S, phi_k)
    if elu_feature_map:  # d/dx (elu(x) + 1) = 1 above zero, exp(x) below
        g_q = g_q * torch.where(query > 0, 1.0, torch.exp(query.to(dtype)))
        g_k = g_k * torch.where(key > 0, 1.0, torch.exp(key.to(dtype)))
    return g_q.to(query.dtype), g_k.to(key.dtype), g_v.to(value.dtype), G_S, G_Z
