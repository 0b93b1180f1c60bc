"""Padded positions that cannot leak: what a user leaves in them (``torch.empty`` garbage,
NaN, inf) must not reach a valid output. A masked attention weight of ``0`` times a NaN
value is still NaN, so masking the weights is not enough: the padded rows themselves are
replaced before any arithmetic touches them."""

from __future__ import annotations

import torch
from torch import Tensor

from ..masking import BaseMask

__all__ = ["zero_padding"]


def zero_padding(x: Tensor, lengths: BaseMask) -> Tensor:
    """``x`` with the positions that ``lengths`` masks out set to zero.

    A ``torch.where`` (not a product with the mask, since ``0 * nan`` is NaN), and no work
    at all when ``lengths`` pads nothing.

    Arguments:
        x: ``(N, S, H, F)`` queries, keys or values.
        lengths: a mask of shape ``(N, S)``, ``True`` at the valid positions.

    Returns:
        ``(N, S, H, F)``, ``x`` itself when nothing is padded.
    """
    if lengths.all_ones:
        return x
    return torch.where(lengths.bool_matrix[:, :, None, None], x, 0.0)
