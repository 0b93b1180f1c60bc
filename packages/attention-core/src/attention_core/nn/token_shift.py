"""A causal depthwise convolution over the last few positions ("token shift").

It gives relative position information that does not depend on the absolute position, so a model
that uses it behaves the same at any distance from the start of the sequence.

Each feature of the output at position ``t`` adds a learned mix of the same feature at
positions ``t - k + 1 .. t``: ``y_t = x_t + sum_{i<k} w_i * x_{t-i} + b`` (one weight per
feature and offset; zero-initialised, so a new block is the identity). It gives an attention
that ignores order (causal linear attention) the order of the last ``k`` elements. In the
recurrent form the state is the last ``k - 1`` inputs: a constant cost per step.

Related: RWKV's token shift (Peng et al. 2023, arXiv 2305.13048) mixes the previous token;
the H3 and Mamba blocks put short causal convolutions before their recurrences
(Fu et al. 2022, arXiv 2212.14052; Gu and Dao 2023, arXiv 2312.00752).

Einstein notation: b batch, t positions, d features, k kernel offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_positive_int, check_tensor

__all__ = ["TokenShift"]


class TokenShift(nn.Module):
    """``x + causal_depthwise_conv(x)`` over the last ``kernel_size`` positions.

    Arguments:
        dim: the number of features ``d``.
        kernel_size: how many positions each output sees, itself included (default: 4).

    Shapes: ``forward(x (b, t, d)) -> (b, t, d)``; ``step(x (b, d), cache) -> ((b, d),
    cache)`` with ``cache`` ``(b, kernel_size - 1, d)`` (``None`` at the start: zeros, as the
    padding of ``forward``); ``prefill(x (b, t, d), cache) -> ((b, t, d), cache)``.

    Example:
        >>> shift = TokenShift(8, kernel_size=3)
        >>> x = torch.randn(2, 5, 8)
        >>> y, cache = shift.prefill(x[:, :4])
        >>> last, cache = shift.step(x[:, 4], cache)
        >>> torch.allclose(last, shift(x)[:, 4], atol=1e-6), cache.shape
        (True, torch.Size([2, 2, 8]))
    """

    def __init__(self, dim: int, kernel_size: int = 4):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("kernel_size", kernel_size)
        self.dim, self.kernel_size = dim, kernel_size
        # weight[:, i] multiplies x_{t - (k - 1) + i}: the last column is the current position
        self.weight = nn.Parameter(torch.zeros(dim, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim))

    def _check(self, name: str, x: Tensor, dim: int) -> None:
        check_tensor(name, x, dim=dim, floating=True)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must have {self.dim} features in its last dimension; got shape "
                f"{tuple(x.shape)}"
            )

    def _cache(self, cache: Tensor | None, x: Tensor) -> Tensor:
        shape = (x.shape[0], self.kernel_size - 1, self.dim)
        if cache is None:
            return x.new_zeros(shape)
        check_tensor("cache", cache, dim=3, floating=True, device=x.device)
        if tuple(cache.shape) != shape:
            raise ValueError(
                f"cache must have shape {shape} (batch, kernel_size - 1, dim); got "
                f"{tuple(cache.shape)}"
            )
        return cache.to(x.dtype)

    def _convolve(self, padded: Tensor) -> Tensor:
        """Map ``(b, t + k - 1, d)`` inputs to the ``(b, t, d)`` outputs.

        ``(b, t + k - 1, d)`` inputs (the ``k - 1`` before the first output included) to the
        ``(b, t, d)`` outputs."""
        weight = rearrange(self.weight.to(padded.dtype), "d k -> d 1 k")
        mixed = F.conv1d(
            rearrange(padded, "b t d -> b d t"), weight, self.bias.to(padded.dtype), groups=self.dim
        )
        return padded[:, self.kernel_size - 1 :] + rearrange(mixed, "b d t -> b t d")

    def forward(self, x: Tensor) -> Tensor:
        """The block over whole sequences ``(b, t, d)``, with zeros before the first position."""
        self._check("x", x, 3)
        return self._convolve(F.pad(x, (0, 0, self.kernel_size - 1, 0)))

    def prefill(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``t`` positions at once after ``cache``; returns the outputs and the new cache."""
        self._check("x", x, 3)
        padded = torch.cat([self._cache(cache, x), x], dim=1)
        return self._convolve(padded), padded[:, padded.shape[1] - (self.kernel_size - 1) :]

    def step(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One position ``(b, d)`` after ``cache``; returns its output and the new cache.

        The weighted sum of the window written out: a convolution of one output position
        cost about six times as much (127 against 21 us for ``b = 1``, ``d = 128``)."""
        self._check("x", x, 2)
        window = torch.cat([self._cache(cache, x), x[:, None]], dim=1)  # "b k d"
        mixed = (window * self.weight.to(x.dtype).t()).sum(1)  # "b k d, d k -> b d"
        return x + mixed + self.bias.to(x.dtype), window[:, 1:]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"
