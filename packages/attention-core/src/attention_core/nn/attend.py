"""Softmax attention on ``scaled_dot_product_attention`` with the conventions of recurrent models.

Built on ``torch.nn.functional.scaled_dot_product_attention`` (Vaswani et al. 2017, arXiv
1706.03762), with multi-query keys/values (Shazeer 2019, arXiv 1911.02150), end-aligned causal
masking for keys that start with a memory prefix, an additive bias, and zeros (never NaN) for
queries that may attend to nothing.

Einstein notation: ``b`` batch, ``h`` heads, ``i`` queries, ``j`` keys, ``d`` feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_tensor

__all__ = ["attend", "causal_mask"]


def causal_mask(i: int, j: int, *, device: torch.device | None = None) -> Tensor:
    """End-aligned causal mask ``(i, j)``: query ``q`` may see key ``k`` iff ``k <= q + j - i``.

    The queries are the last ``i`` of the ``j`` keys.

    Example:
        >>> causal_mask(2, 4).int()
        tensor([[1, 1, 1, 0],
                [1, 1, 1, 1]], dtype=torch.int32)
    """
    return torch.ones(i, j, dtype=torch.bool, device=device).tril(j - i)


def _broadcast_to_scores(name: str, t: Tensor, scores: tuple[int, int, int, int]) -> None:
    try:
        shape = torch.broadcast_shapes(t.shape, scores)
    except RuntimeError:
        shape = None
    if t.dim() > 4 or shape != torch.Size(scores):
        raise ValueError(
            f"{name} must be broadcastable to (B, H, I, J) = {scores}; got shape {tuple(t.shape)}"
        )


def _check(q, k, v, mask, bias) -> tuple[int, int, int, int]:
    check_tensor("q", q, dim=4, floating=True)
    check_tensor("k", k, dim=4, dtype=q.dtype, device=q.device)
    check_tensor("v", v, dim=4, dtype=q.dtype, device=q.device)
    B, H, I, D = q.shape
    J = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B or t.shape[1] not in (1, H) or t.shape[2] != J:
            raise ValueError(
                f"{name} must have shape (B, H or 1, J, ·) = ({B}, {H} or 1, {J}, ·); "
                f"got {tuple(t.shape)}"
            )
    if k.shape[3] != D:
        raise ValueError(f"q and k must have the same feature size; got {D} and {k.shape[3]}")
    if mask is not None:
        check_tensor("mask", mask, dtype=torch.bool, device=q.device)
        _broadcast_to_scores("mask", mask, (B, H, I, J))
    if bias is not None:
        check_tensor("bias", bias, floating=True, device=q.device)
        _broadcast_to_scores("bias", bias, (B, H, I, J))
    return B, H, I, J


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    training: bool = False,
) -> Tensor:
    """``softmax(scale * q k^T + bias, masked) v``.

    Arguments:
        q: ``(B, H, I, D)`` queries.
        k: ``(B, H, J, D)`` keys, or ``(B, 1, J, D)`` shared by all heads (multi-query).
        v: ``(B, H, J, Dv)`` values, or ``(B, 1, J, Dv)``.
        mask: boolean, broadcastable to ``(B, H, I, J)``; ``True`` = may attend.
        causal: also require ``j <= i + J - I`` (aligned to the end: the queries are the
            last ``I`` positions of the ``J`` keys, which may start with a memory prefix).
        bias: additive float bias broadcastable to ``(B, H, I, J)``, e.g. ``(H, I, J)`` from a
            relative position bias. Keep it finite; mask with ``mask``.
        dropout_p: dropout probability on the attention weights, used only when
            ``training`` is true.
        scale: multiplier of ``q k^T``; default ``D ** -0.5``.
        training: whether to apply dropout.

    Returns:
        ``(B, H, I, Dv)``. Queries that may attend to no key (all masked, or ``I > J`` with
        ``causal``) get zeros, and no gradient flows through them.

    Example:
        >>> q = torch.randn(2, 4, 3, 16)  # 3 new queries
        >>> k = v = torch.randn(2, 1, 10, 16)  # 7 memories + 3 new keys
        >>> attend(q, k, v, causal=True).shape
        torch.Size([2, 4, 3, 16])
    """
    B, H, I, J = _check(q, k, v, mask, bias)
    if (
        not isinstance(dropout_p, (int, float))
        or isinstance(dropout_p, bool)
        or not 0.0 <= dropout_p < 1.0
    ):
        raise ValueError(f"dropout_p must be a float in [0, 1); got {dropout_p!r}")
    dropout_p = float(dropout_p) if training else 0.0
    if J == 0:
        return q.new_zeros(B, H, I, v.shape[-1])
    k = k.expand(B, H, *k.shape[2:])
    v = v.expand(B, H, *v.shape[2:])

    if mask is None and bias is None and (not causal or I == J):
        # fast path: no row can be empty (I == J with causal sees at least the diagonal)
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale
        )

    allowed = mask
    if causal:
        tri = causal_mask(I, J, device=q.device)
        allowed = tri if allowed is None else allowed & tri
    empty = None
    if allowed is not None:
        # queries with no allowed key: let them attend to everything, then zero their output.
        # Eager mode looks first whether there is one (a check of a (·, ·, I, 1) tensor that
        # spares a pass over the output); a trace always takes the equivalent branch.
        empty = ~allowed.any(dim=-1, keepdim=True)
        if torch.compiler.is_compiling() or bool(empty.any()):
            allowed = allowed | empty
        else:
            empty = None
    attn_mask = allowed
    if bias is not None:
        bias = bias.to(q.dtype)
        attn_mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )
    if empty is not None:
        out = torch.where(empty, 0.0, out)  # unlike masked_fill, keeps SDPA's memory layout
    return out
