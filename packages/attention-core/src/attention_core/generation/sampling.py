"""Logit filters and token sampling for autoregressive decoding.

Top-k, nucleus (top-p, Holtzman et al. 2019, arXiv 1904.09751), lucidrains' ``thres`` top-k,
temperature and greedy decoding.

Einstein notation: ``...`` leading axes, ``b`` batch, ``v`` vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_positive_int, check_tensor

__all__ = ["filter_by_threshold", "sample", "threshold_top_k", "top_k_filter", "top_p_filter"]


def _check_logits(logits: Tensor, *, dim: int | None = None) -> Tensor:
    check_tensor("logits", logits, dim=dim, floating=True)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1; got {tuple(logits.shape)}")
    return logits


def _softmax_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _check_top_p(p: object) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be a float in (0, 1]; got {p!r}")
    return float(p)


def _check_temperature(temperature: object) -> float:
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not temperature >= 0.0
        or math.isinf(temperature)
    ):
        raise ValueError(f"temperature must be a finite float >= 0; got {temperature!r}")
    return float(temperature)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row and set the others to ``-inf``.

    Exactly ``min(k, V)`` entries are kept even with ties (ties are broken by
    ``torch.topk``).

    Arguments:
        logits: ``(..., V)`` floating logits.
        k: number of entries to keep (``>= 1``).

    Returns:
        ``(..., V)``, a new tensor.

    Example:
        >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
        tensor([[-inf, 3., 2., -inf]])
    """
    _check_logits(logits)
    check_positive_int("top_k", k)
    if k >= logits.shape[-1]:
        return logits.clone()
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose probability is ``>= p``.

    The total probability is taken under ``softmax(logits)``; the other tokens become ``-inf``.

    A token is kept when the probability mass of the tokens ranked strictly above it is
    ``< p``, so the most probable token is always kept. ``p = 1`` keeps everything.

    Arguments:
        logits: ``(..., V)`` floating logits (``-inf`` entries have probability 0).
        p: probability mass in ``(0, 1]``.

    Returns:
        ``(..., V)``, a new tensor.

    Example:
        >>> logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
        >>> top_p_filter(logits, 0.7).exp()
        tensor([[0.5000, 0.3000, 0.0000, 0.0000]])
    """
    _check_logits(logits)
    p = _check_top_p(p)
    if p >= 1.0:
        return logits.clone()
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1, dtype=_softmax_dtype(logits))
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_by_threshold(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keep the ``max(1, ceil((1 - thres) * V))`` largest logits of each row.

    This is lucidrains' ``top_k(logits, thres)``: ``thres = 0.9`` keeps the top 10 %.

    Arguments:
        logits: ``(..., V)`` floating logits.
        thres: fraction of the vocabulary to drop, in ``[0, 1]``.

    Returns:
        ``(..., V)``, a new tensor.

    Example:
        >>> filter_by_threshold(torch.arange(10.0)[None], thres=0.8)
        tensor([[-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, 8., 9.]])
    """
    _check_logits(logits)
    return top_k_filter(logits, threshold_top_k(thres, logits.shape[-1]))


def threshold_top_k(thres: float, vocab_size: int) -> int:
    """The `k` of lucidrains' `thres` filter: `max(1, ceil((1 - thres) * vocab_size))`.

    For a decoding loop that takes `top_k` (`attention_core.generation.generate`) and a
    caller that speaks in `filter_thres`.

    Arguments:
        thres: fraction of the vocabulary to drop, in `[0, 1]`.
        vocab_size: the vocabulary size `V` (`>= 1`).

    Returns:
        the number of logits to keep, in `[1, V]`.

    Example:
        >>> threshold_top_k(0.9, 256)
        26
        >>> threshold_top_k(1.0, 256)
        1
    """
    if not isinstance(thres, (int, float)) or isinstance(thres, bool) or not 0.0 <= thres <= 1.0:
        raise ValueError(f"thres must be a float in [0, 1]; got {thres!r}")
    check_positive_int("vocab_size", vocab_size)
    return max(1, math.ceil((1.0 - thres) * vocab_size))


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from ``softmax(filtered(logits / temperature))``.

    The filters apply in the order temperature, top-k, top-p. ``temperature = 0`` is greedy
    decoding (``argmax``, the first index on ties) and ignores the filters.

    Arguments:
        logits: ``(B, V)`` floating logits.
        temperature: ``>= 0``.
        top_k: keep only the ``top_k`` most likely tokens (``>= 1``), or ``None``.
        top_p: nucleus mass in ``(0, 1]``, or ``None``.
        generator: random generator on the device of ``logits``, for reproducible draws.

    Returns:
        ``(B,)`` int64 token ids.

    Example:
        >>> logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 0.0]])
        >>> sample(logits, temperature=0.0)
        tensor([1, 0])
        >>> sample(logits, top_k=1, generator=torch.Generator().manual_seed(0))
        tensor([1, 0])
    """
    _check_logits(logits, dim=2)
    temperature = _check_temperature(temperature)
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if top_p is not None:
        _check_top_p(top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    # subtract the row maximum first so that small temperatures cannot overflow
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1, dtype=_softmax_dtype(logits))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
