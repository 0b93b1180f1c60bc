"""Argument checks of the local product ops.

Shared by the ``torch.library`` ops in ``._op`` and the Triton launch functions in
``._triton``; a leaf that imports neither, so the two never import each other both ways.
"""

from __future__ import annotations

from torch import Tensor

from .._checks import CPU_DTYPES, DtypeRule, check_floats, check_grad, check_index


def check_local_dot(
    Q: Tensor,
    K: Tensor,
    attn_mask: Tensor | None,
    key_lengths: Tensor,
    local_context: int,
    grad: Tensor | None = None,
    dtypes: DtypeRule = CPU_DTYPES,
) -> None:
    """Check every argument of the local dot product ops.

    ``Q (N, H, L, E)`` and ``K (N, H, S, E)`` of one allowed dtype and device, ``attn_mask (L, S)``
    of that dtype and device (``None`` in the backward), ``key_lengths (N,)`` int64,
    ``local_context >= 1`` and ``grad (N, H, L, local_context)``."""
    check_floats("Q and K", Q, K, dtypes=dtypes)
    if K.shape[:2] != Q.shape[:2] or K.shape[3] != Q.shape[3]:
        raise ValueError(
            f"Q must be (N, H, L, E) and K (N, H, S, E); got {tuple(Q.shape)} and {tuple(K.shape)}"
        )
    N, H, L, _ = Q.shape
    S = K.shape[2]
    if isinstance(local_context, bool) or not isinstance(local_context, int) or local_context < 1:
        raise ValueError(f"local_context must be a positive int; got {local_context!r}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor; got {type(attn_mask).__name__}")
        if attn_mask.dtype != Q.dtype or tuple(attn_mask.shape) != (L, S):
            raise ValueError(
                f"attn_mask must be a {Q.dtype} tensor of shape ({L}, {S}); got "
                f"{attn_mask.dtype} {tuple(attn_mask.shape)}"
            )
        if attn_mask.device != Q.device:
            raise ValueError(f"attn_mask must be on device {Q.device}; got {attn_mask.device}")
    check_index("key_lengths", key_lengths, (N,), Q.device)
    if grad is not None:
        check_grad("grad", grad, (N, H, L, local_context), Q)


def check_local_average(
    attention: Tensor, V: Tensor, grad: Tensor | None = None, dtypes: DtypeRule = CPU_DTYPES
) -> None:
    """Check every argument of the local weighted average ops.

    ``attention (N, H, L, C)`` with ``C >= 1`` and ``V (N, H, S, D)`` of one allowed dtype and
    device, ``grad (N, H, L, D)``."""
    check_floats("attention and V", attention, V, dtypes=dtypes)
    if V.shape[:2] != attention.shape[:2] or attention.shape[3] < 1:
        raise ValueError(
            "attention must be (N, H, L, C) with C > 0 and V (N, H, S, D); got "
            f"{tuple(attention.shape)} and {tuple(V.shape)}"
        )
    if grad is not None:
        N, H, L, _ = attention.shape
        check_grad("grad", grad, (N, H, L, V.shape[3]), V)
