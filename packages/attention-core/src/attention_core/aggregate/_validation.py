"""Argument checks of the aggregate and broadcast ops.

Shared by the ``torch.library`` ops in ``._op`` and the Triton launch functions in
``._triton``; a leaf that imports neither, so the two never import each other both ways.
"""

from __future__ import annotations

from torch import Tensor

from .._checks import CPU_DTYPES, DtypeRule, check_floats, check_grad, check_index


def check_groups(
    rows: Tensor,
    G: Tensor,
    F: Tensor,
    limits: Tensor | None,
    broadcast: bool,
    grad: Tensor | None = None,
    dtypes: DtypeRule = CPU_DTYPES,
) -> None:
    """Check every argument of the aggregate (``broadcast=False``) and broadcast ops.

    The rows ``X (N, H, L, E)`` or ``Y (N, H, C, E)`` and ``F (N, H, C)`` of one allowed dtype and
    device, ``G (N, H, L)`` and ``limits (N, H)`` int64 on that device, and ``grad`` of the output's
    shape: ``(N, H, C, E)`` for aggregate, ``(N, H, L, E)`` for broadcast."""
    name = "Y" if broadcast else "X"
    if not isinstance(F, Tensor) or F.dim() != 3:
        got = tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__
        raise ValueError(f"F must be an (N, H, C) tensor; got {got}")
    check_floats(f"{name} and F", rows, F.unsqueeze(-1), dtypes=dtypes)
    N, H, R, E = rows.shape
    if not isinstance(G, Tensor) or G.dim() != 3:
        got = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
        raise ValueError(f"G must be an (N, H, L) int64 tensor; got {got}")
    L = G.shape[2] if broadcast else R
    check_index("G", G, (N, H, L), rows.device)
    C = R if broadcast else F.shape[2]
    if tuple(F.shape) != (N, H, C):
        raise ValueError(f"F must have shape {(N, H, C)}; got {tuple(F.shape)}")
    check_index("limits", limits, (N, H), rows.device)
    if grad is not None:
        check_grad("grad", grad, (N, H, L if broadcast else C, E), rows)
