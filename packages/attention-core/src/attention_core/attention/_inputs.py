"""Input validation of the inner attentions: queries, keys, values and their masks."""

from __future__ import annotations

import torch

from .._checks import check_tensor
from ..masking import BaseMask

__all__ = ["check_attention_inputs", "empty_attention"]


def _check_mask(name: str, mask, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(mask, BaseMask):
        raise TypeError(f"{name} must be a BaseMask (e.g. FullMask); got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(mask.shape)}")
    mask_device = mask.device  # not bool_matrix.device: a causal mask's is L x L
    if mask_device.type != device.type:
        raise ValueError(f"{name} must be on device {device}; got {mask_device}")


def check_attention_inputs(
    queries,
    keys,
    values,
    attn_mask,
    query_lengths,
    key_lengths,
    *,
    same_dims: bool = False,
    mask_shape: tuple[int, int] | None = None,
) -> tuple[int, int, int, int, int, int]:
    """Validate the inputs of an inner attention.

    Arguments:
        queries: ``(N, L, H, E)``.
        keys: ``(N, S, H, E)``.
        values: ``(N, S, H, D)``.
        attn_mask: a mask of shape ``(L, S)``.
        query_lengths: a mask of shape ``(N, L)``.
        key_lengths: a mask of shape ``(N, S)``.
        same_dims: also require ``D == E``.
        mask_shape: the expected ``attn_mask`` shape when it is not ``(L, S)``.

    Returns:
        ``(N, L, S, H, E, D)``.
    """
    check_tensor("queries", queries, dim=4, floating=True)
    check_tensor("keys", keys, dim=4, floating=True)
    check_tensor("values", values, dim=4, floating=True)
    N, L, H, E = queries.shape
    if keys.shape[0] != N or values.shape[0] != N:
        raise ValueError(
            "queries, keys and values must have the same batch size; got "
            f"{N}, {keys.shape[0]} and {values.shape[0]}"
        )
    if keys.shape[2] != H or values.shape[2] != H:
        raise ValueError(
            "queries, keys and values must have the same number of heads; got "
            f"{H}, {keys.shape[2]} and {values.shape[2]}"
        )
    if keys.shape[3] != E:
        raise ValueError(
            f"queries and keys must have the same head dimension; got {E} and {keys.shape[3]}"
        )
    S = keys.shape[1]
    if values.shape[1] != S:
        raise ValueError(
            f"keys and values must have the same sequence length; got {S} and {values.shape[1]}"
        )
    D = values.shape[3]
    if same_dims and D != E:
        raise ValueError(
            f"this attention needs queries and values with the same head dimension; got {E} and {D}"
        )
    for name, t in (("keys", keys), ("values", values)):
        if t.dtype != queries.dtype:
            raise TypeError(
                f"{name} must have the dtype of queries ({queries.dtype}); got {t.dtype}"
            )
        if t.device != queries.device:
            raise ValueError(
                f"{name} must be on the device of queries ({queries.device}); got {t.device}"
            )
    _check_mask("attn_mask", attn_mask, mask_shape or (L, S), queries.device)
    _check_mask("query_lengths", query_lengths, (N, L), queries.device)
    _check_mask("key_lengths", key_lengths, (N, S), queries.device)
    return N, L, S, H, E, D


def empty_attention(queries, keys, values):
    """The ``(N, L, H, D)`` result of an attention whose batch, queries or keys are empty.

    That is when ``0 in (N, L, S)``: the result is empty, or zeros where a query has no key to see.

    It stays in the autograd graph of all three inputs (with zero gradients), like the
    result of an attention that computes.
    """
    # an empty sum over the keys is exactly 0 whatever the values hold; the output is empty
    # unless S == 0, so adding keys.sum() * 0 (a NaN for infinite keys) changes nothing
    return torch.einsum("nlhe,nshd->nlhd", queries, values) + keys.sum() * 0
