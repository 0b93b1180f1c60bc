"""Argument checks of the causal product ops.

Shared by the ``torch.library`` ops in ``._op`` and the Triton launch functions in
``._triton``; a leaf that imports neither, so the two never import each other both ways.
"""

from __future__ import annotations

import math

from torch import Tensor

from .._checks import CPU_DTYPES, DtypeRule, check_floats


def check_causal(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    tensors: dict[str, Tensor | None],
    eps: float,
    dtypes: DtypeRule = CPU_DTYPES,
) -> None:
    """Every argument of the causal product ops: ``Q, K (N, H, L, E)``, ``V (N, H, L, M)``
    of one allowed dtype on one device, and the optional ``tensors`` by name (``S0``,
    ``grad_S (N, H, E, M)``, ``z0``, ``grad_z (N, H, E)``, ``grad``, ``out (N, H, L, M)``)
    of the same dtype (``grad`` and the state gradients may have any floating dtype) and
    device; ``eps`` finite and non-negative."""
    check_floats("Q, K and V", Q, K, V, dtypes=dtypes)
    if K.shape != Q.shape or V.shape[:3] != Q.shape[:3]:
        raise ValueError(
            "Q and K must be (N, H, L, E) and V (N, H, L, M); got "
            f"{tuple(Q.shape)}, {tuple(K.shape)} and {tuple(V.shape)}"
        )
    N, H, L, E = Q.shape
    M = V.shape[-1]
    shapes = {
        "S0": (N, H, E, M),
        "grad_S": (N, H, E, M),
        "z0": (N, H, E),
        "grad_z": (N, H, E),
        "grad": (N, H, L, M),
        "out": (N, H, L, M),
    }
    for name, t in tensors.items():
        if t is None:
            continue
        any_float = name.startswith("grad")
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if tuple(t.shape) != shapes[name] or (t.dtype != Q.dtype and not any_float):
            raise ValueError(
                f"{name} must be a {Q.dtype} tensor of shape {shapes[name]}; got "
                f"{t.dtype} {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor; got {t.dtype}")
        if t.device != Q.device:
            raise ValueError(f"{name} must be on device {Q.device}; got {t.device}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite non-negative number; got {eps!r}")
