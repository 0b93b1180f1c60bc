"""Normalisation helpers: RMSNorm and L2-normalisation along an axis.

Reference: RMSNorm, Zhang & Sennrich 2019, arXiv 1910.07467.

Einstein notation: ``...`` any leading axes, ``d`` feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int, check_tensor

__all__ = ["RMSNorm", "l2norm"]


def l2norm(t: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Divide ``t`` by its Euclidean norm along ``dim`` (norms below ``eps`` count as ``eps``).

    Arguments:
        t: ``(...)`` floating tensor.
        dim: the axis to normalise.
        eps: lower bound of the norm, so that zero vectors stay zero instead of NaN.

    Returns:
        a tensor of the shape of ``t`` whose slices along ``dim`` have unit norm.

    Example:
        >>> l2norm(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """
    check_tensor("t", t, floating=True)
    return F.normalize(t, p=2.0, dim=dim, eps=eps)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``x / sqrt(mean(x ** 2) + eps) * weight``.

    No mean subtraction and no bias. The learnable gain is called ``weight`` (as in
    ``torch.nn.RMSNorm`` and ``torch.nn.LayerNorm``) and starts at ones.

    Arguments:
        dim: size ``d`` of the last axis.
        eps: added to the mean square before the square root.

    Shapes: ``x`` ``(..., d)`` -> ``(..., d)``.

    Example:
        >>> norm = RMSNorm(8)
        >>> y = norm(torch.randn(2, 5, 8))
        >>> y.shape
        torch.Size([2, 5, 8])
        >>> bool(torch.allclose(y.pow(2).mean(-1), torch.ones(2, 5), atol=1e-5))
        True
    """

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"eps must be a non-negative float; got {eps!r}")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``(..., d)`` over its last axis; returns ``(..., d)``."""
        check_tensor("x", x, floating=True)
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}); got {tuple(x.shape)}")
        inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x * inv_rms * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
