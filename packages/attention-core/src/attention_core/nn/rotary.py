"""Rotary position embeddings with optional xPos length-extrapolation scales.

References: Su et al. 2021, RoFormer, arXiv 2104.09864; xPos: Sun et al. 2022, arXiv 2212.10554.

Feature ``k`` of the rotated block is paired with feature ``k + r/2`` (the "rotate half"
layout of GPT-NeoX and lucidrains) and the pair is rotated by the angle
``position * theta ** (-2k / r)``. Hence ``rot(q, m) . rot(k, n)`` depends only on ``m - n``.
With xPos, queries are multiplied by ``scale(m)`` and keys by ``1 / scale(n)`` where
``scale(p) = zeta ** (p / xpos_scale_base)``, so the product again depends only on ``m - n``.

Einstein notation: ``...`` leading axes (batch, heads), ``n`` sequence, ``d`` feature,
``r`` rotated features (``r <= d``, even).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from .._checks import check_positive_int, check_tensor

__all__ = ["RotaryEmbedding", "apply_rotary_pos_emb", "rotate_half"]


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last axis of ``x`` ``(..., r)``."""
    x1, x2 = rearrange(x, "... (two r) -> two ... r", two=2).unbind(dim=0)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(freqs: Tensor, t: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """Rotate the first ``r = freqs.shape[-1]`` features of ``t``; the rest pass unchanged.

    Arguments:
        freqs: ``(n, r)`` angles from `RotaryEmbedding.forward` (or any shape
            broadcastable to ``(..., n, r)``).
        t: ``(..., n, d)`` queries or keys with ``d >= r``.
        scale: xPos scale ``(n, r)`` from `RotaryEmbedding.scale` for queries, its
            reciprocal for keys; ``1.0`` for plain rotary.

    Returns:
        ``(..., n, d)`` in the dtype of ``t``.

    Example:
        >>> rotary = RotaryEmbedding(dim=16)
        >>> q = torch.randn(2, 4, 10, 64)  # (b, h, n, d): rotate 16 of 64 features
        >>> apply_rotary_pos_emb(rotary(torch.arange(10)), q).shape
        torch.Size([2, 4, 10, 64])
    """
    check_tensor("freqs", freqs, floating=True)
    check_tensor("t", t, floating=True)
    if freqs.dim() == 0 or t.dim() < 2:
        raise ValueError(
            f"freqs must be (n, r) and t (..., n, d); got shapes {tuple(freqs.shape)} and "
            f"{tuple(t.shape)}"
        )
    r = freqs.shape[-1]
    if r % 2 or r > t.shape[-1]:
        raise ValueError(
            f"freqs.shape[-1] must be even and at most t.shape[-1] = {t.shape[-1]}; got {r}"
        )
    if freqs.dim() >= 2 and freqs.shape[-2] not in (1, t.shape[-2]):
        raise ValueError(
            f"freqs must have {t.shape[-2]} positions (the n of t {tuple(t.shape)}); "
            f"got shape {tuple(freqs.shape)}"
        )
    t_rot, t_pass = t[..., :r], t[..., r:]
    freqs = freqs.to(t.dtype)
    if isinstance(scale, Tensor):
        scale = scale.to(t.dtype)
    rotated = (t_rot * freqs.cos() + rotate_half(t_rot) * freqs.sin()) * scale
    return torch.cat((rotated.to(t.dtype), t_pass), dim=-1)


class RotaryEmbedding(nn.Module):
    """Angles (and optional xPos scales) of rotary embeddings for given positions.

    Arguments:
        dim: number ``r`` of rotated features (even); may be smaller than the head dimension
            (partial rotary).
        theta: base of the geometric frequency progression.
        xpos_scale_base: enable xPos with this base (e.g. 512); ``None`` disables it.

    The module has no parameters or buffers: angles are computed on the fly in the requested
    dtype, so ``model.half()`` does not degrade them.

    Shapes: ``forward(positions (n,))`` -> ``(n, r)`` angles;
    ``scale(positions (n,))`` -> ``(n, r)`` xPos scales (ones without xPos).

    The xPos scale is ``zeta_k ** (position / xpos_scale_base)`` with
    ``zeta_k = (2k + 0.4 r) / (1.4 r)``; multiply queries by it and keys by its reciprocal.
    Large positions overflow it, so keep positions centred (for example relative to the
    middle of the current window) when using xPos.

    Example:
        >>> rotary = RotaryEmbedding(dim=8, xpos_scale_base=512)
        >>> positions = torch.arange(5)
        >>> freqs, scale = rotary(positions), rotary.scale(positions)
        >>> q = apply_rotary_pos_emb(freqs, torch.randn(1, 2, 5, 8), scale)
        >>> k = apply_rotary_pos_emb(freqs, torch.randn(1, 2, 5, 8), scale ** -1)
        >>> q.shape, k.shape
        (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 5, 8]))
    """

    def __init__(self, dim: int, theta: float = 10000, xpos_scale_base: float | None = None):
        super().__init__()
        check_positive_int("dim", dim)
        if dim % 2:
            raise ValueError(f"dim must be even; got {dim}")
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 1:
            raise ValueError(f"theta must be a number > 1; got {theta!r}")
        if xpos_scale_base is not None and (
            not isinstance(xpos_scale_base, (int, float))
            or isinstance(xpos_scale_base, bool)
            or xpos_scale_base <= 0
        ):
            raise ValueError(
                f"xpos_scale_base must be a positive number or None; got {xpos_scale_base!r}"
            )
        self.dim, self.theta, self.xpos_scale_base = dim, float(theta), xpos_scale_base

    @property
    def use_xpos(self) -> bool:
        """Whether xPos scales are enabled."""
        return self.xpos_scale_base is not None

    def _prepare(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        check_tensor("positions", positions, dim=1)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype; got {dtype}")
        dtype = torch.promote_types(dtype, torch.float32)
        k2 = torch.arange(0, self.dim, 2, dtype=dtype, device=positions.device)
        return positions.to(dtype), k2

    def forward(self, positions: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """Return the angles ``(n, r)`` for ``positions`` ``(n,)`` (integer or float).

        Computed in ``dtype`` (at least float32; pass ``torch.float64`` for float64 models) on the
        device of ``positions``."""
        positions, k2 = self._prepare(positions, dtype)
        inv_freq = self.theta ** (-k2 / self.dim)
        return repeat(torch.outer(positions, inv_freq), "n r -> n (two r)", two=2)

    def scale(self, positions: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """xPos scales ``(n, r)`` for ``positions`` ``(n,)`` in ``dtype``.

        All ones when xPos is off."""
        positions, k2 = self._prepare(positions, dtype)
        if not self.use_xpos:
            return positions.new_ones(positions.shape[0], self.dim)
        zeta = (k2 + 0.4 * self.dim) / (1.4 * self.dim)
        power = rearrange(positions / self.xpos_scale_base, "n -> n 1")
        return repeat(zeta**power, "n r -> n (two r)", two=2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}, xpos_scale_base={self.xpos_scale_base}"
