"""Position-wise feed-forward blocks, optionally gated: GEGLU and its GLU relatives.

Reference: Shazeer 2020, "GLU Variants Improve Transformer", arXiv 2002.05202.

Einstein notation: ``...`` any leading axes (batch, sequence), ``d`` model feature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int, check_tensor
from ..utils import forward_hooks_registered

__all__ = ["GEGLU", "GLU", "FeedForward"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {name!r}")
    return ACTIVATIONS[name]


class GLU(nn.Module):
    """Gated linear unit on a pre-projected input.

    ``x, gate = t.chunk(2, -1)``, returns ``x * activation(gate)`` (``"gelu"``: GEGLU, ``"silu"``:
    SwiGLU, ``"relu"``: ReGLU).

    Arguments:
        activation: ``"gelu"``, ``"relu"`` or ``"silu"``.

    Shapes: ``t`` ``(..., 2 * d)`` -> ``(..., d)``.

    Example:
        >>> GLU("silu")(torch.randn(3, 10)).shape
        torch.Size([3, 5])
    """

    def __init__(self, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self._fn = _activation(activation)

    def forward(self, t: Tensor) -> Tensor:
        """Gate the first half of the last axis of ``t`` ``(..., 2d)`` by the second half."""
        check_tensor("t", t, floating=True)
        if t.dim() == 0 or t.shape[-1] % 2:
            raise ValueError(
                f"t must have an even last axis (..., 2 * d); got shape {tuple(t.shape)}"
            )
        x, gate = t.chunk(2, dim=-1)
        return x * self._fn(gate)

    def extra_repr(self) -> str:
        return repr(self.activation)


class GEGLU(GLU):
    """GELU-gated linear unit: ``x, gate = t.chunk(2, -1)``, returns ``x * gelu(gate)``.

    Shapes: ``t`` ``(..., 2 * d)`` -> ``(..., d)``.

    Example:
        >>> t = torch.randn(2, 7, 16)
        >>> GEGLU()(t).shape
        torch.Size([2, 7, 8])
    """

    def __init__(self):
        super().__init__("gelu")


class FeedForward(nn.Module):
    """A position-wise feed-forward network with one hidden layer.

    ``Linear(d, inner) -> activation -> Dropout -> Linear(inner, d)`` with
    ``inner = int(dim * mult)``.

    With ``glu=True`` the first projection is twice as wide, ``Linear(d, 2 * inner)``, and its
    halves are combined by `GLU` (``activation="gelu"`` gives GEGLU, as in lucidrains'
    recurrent transformers). ``inner`` is ``int(dim * mult)`` in both cases
    (the lucidrains convention), so the gated block has 1.5x the parameters of the plain one
    at equal ``mult``; pass ``mult=mult * 2 / 3`` to match parameter counts instead.

    Arguments:
        dim: model feature size ``d``.
        mult: hidden width multiplier (positive; ``int(dim * mult)`` must be >= 1).
        dropout: dropout probability after the activation, in ``[0, 1)``.
        glu: use a gated linear unit.
        activation: ``"gelu"``, ``"relu"`` or ``"silu"``.

    Shapes: ``x`` ``(..., d)`` -> ``(..., d)``.

    Example:
        >>> ff = FeedForward(16, mult=4, glu=True)
        >>> ff(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
        >>> ff.net[0].out_features  # 2 * int(16 * 4)
        128
    """

    def __init__(
        self,
        dim: int,
        mult: float = 4,
        dropout: float = 0.0,
        glu: bool = False,
        activation: str = "gelu",
    ):
        super().__init__()
        check_positive_int("dim", dim)
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
            raise ValueError(f"mult must be a positive number; got {mult!r}")
        inner = int(dim * mult)
        if inner < 1:
            raise ValueError(
                f"int(dim * mult) must be at least 1; got int({dim} * {mult}) = {inner}"
            )
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a float in [0, 1); got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1); got {dropout!r}")
        fn = _activation(activation)
        self.dim, self.inner_dim, self.glu = dim, inner, bool(glu)
        act: nn.Module
        if glu:
            first, act = nn.Linear(dim, 2 * inner), GLU(activation)
        else:
            first, act = nn.Linear(dim, inner), _Activation(activation, fn)
        self.net = nn.Sequential(first, act, nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` ``(..., d)``; returns ``(..., d)``."""
        check_tensor("x", x, floating=True)
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}); got {tuple(x.shape)}")
        net = self.net
        if not self.glu or len(net) != 4 or forward_hooks_registered(net[0], net[1]):
            return net(x)
        first, glu, dropout, last = net
        if type(first) is not nn.Linear or type(glu) is not GLU:
            return net(x)  # modules replaced by the user: their own calls
        # the two halves of the first product (what `GLU` splits) as two products: the gate's
        # elementwise work then runs on contiguous tensors instead of strided halves, which
        # makes the forward and backward of the block markedly faster on CPU
        inner, bias = self.inner_dim, first.bias
        value = F.linear(x, first.weight[:inner], None if bias is None else bias[:inner])
        gate = F.linear(x, first.weight[inner:], None if bias is None else bias[inner:])
        return last(dropout(value * glu._fn(gate)))


class _Activation(nn.Module):
    def __init__(self, name: str, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.name, self._fn = name, fn

    def forward(self, x: Tensor) -> Tensor:
        return self._fn(x)

    def extra_repr(self) -> str:
        return repr(self.name)
