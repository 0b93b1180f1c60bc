"""This module holds the plain-PyTorch form of softmax attention over a key/value cache slice.

It is the oracle of the tests and the path for autograd and for dtypes and devices without a
compiled kernel.

Einstein notation: b batch, w query rows, h heads, j cached positions, e query/key features,
m value features.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cache_attention_reference"]


def cache_attention_reference(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    start: int,
    end: int,
    bias: Tensor | None,
    scale: float,
) -> Tensor:
    """Attend from ``query`` rows to cached positions ``start .. end - 1``.

    ``s = scale q . k_j + bias``, ``out = softmax(s) v`` over those positions; a row whose
    scores are all ``-inf`` gives zeros.

    Arguments:
        query: `(B, W, H, E)`.
        keys: `(B, H, C, E)`.
        values: `(B, H, C, M)`.
        start: the first cached position attended to.
        end: one past the last.
        bias: `(H, W, J)` or `(B, H, W, J)` with ``J = end - start``, or ``None``.
        scale: the multiplier of the dot products.

    Returns:
        `(B, W, H, M)`.
    """
    k, v = keys[:, :, start:end], values[:, :, start:end]
    scores = torch.einsum("bwhe,bhje->bhwj", query, k) * scale
    if bias is not None:
        scores = scores + bias
    weights = scores.softmax(dim=-1)
    blind = torch.isneginf(scores).all(dim=-1, keepdim=True)  # rows that see no key
    weights = weights.masked_fill(blind, 0.0)
    return torch.einsum("bhwj,bhjm->bwhm", weights, v).contiguous()
