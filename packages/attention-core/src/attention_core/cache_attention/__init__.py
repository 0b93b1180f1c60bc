"""This module computes softmax attention of a few query rows over a slice of a key/value cache.

A recurrent step (one query per sequence over every earlier key) and a model with a memory
that steps a short window at a time (a few queries over the memory and the window's own
earlier keys) read a cache that is already in memory: the work is one pass over the cached
keys and values, and composed torch ops (products, bias add, softmax, product, layout
changes) cost more in dispatch than that pass.

For query ``i`` of batch element ``b`` and head ``h``, over positions ``start <= j < end``:
``s_j = scale q_i . k_j + bias[b, h, i, j - start]``, ``out_i = sum_j softmax(s)_j v_j``;
a row whose scores are all ``-inf`` (it sees no key) gives zeros.

Implementations behind `cache_attention`: the plain-PyTorch reference
(`attention_core.cache_attention.reference`), the oracle of the tests and the path for other
dtypes and devices; and the compiled CPU kernel of ``attention_core._C``
(``csrc/cache_attention.h``) for float32 and float64 CPU tensors: one pass per (batch, head)
over the slice on torch's thread pool, reading keys stored row-major or feature-major in
place, writing the output with the heads joined. ``ATTENTION_CORE_FORCE_REFERENCE=1`` forces
the reference. Both are the ``torch.library`` op ``torch.ops.attention_core.cache_attention``
with a fake registration for ``torch.compile``; its backward differentiates the reference.

`PreparedCacheAttention` holds one key/value cache for many calls: the cache is checked with
its first call, and later calls check the queries, the range and the bias and compare the
cache's layout with what was checked.
"""

from __future__ import annotations

from torch import Tensor

from ._op import attend
from .prepared import PreparedCacheAttention
from .reference import cache_attention_reference

__all__ = ["PreparedCacheAttention", "cache_attention", "cache_attention_reference"]


def cache_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    start: int = 0,
    end: int | None = None,
    bias: Tensor | None = None,
    *,
    scale: float | None = None,
) -> Tensor:
    """Attend from a few query rows to the cached positions ``start .. end - 1``.

    ``s = scale q . k_j + bias``, ``out = softmax(s) v``; a row whose scores are all ``-inf``
    gives zeros (so a bias can hide every key from a query). Keys may be stored row-major
    (features contiguous) or feature-major (positions contiguous, e.g. a transposed view of a
    cache that grows along its last dimension): both are read in place.

    Differentiable (the backward differentiates the reference); works under
    ``torch.compile``.

    Arguments:
        query: `(B, W, H, E)`, ``W`` query rows per batch element (any strides with
            contiguous features, e.g. a view of a joint query/key/value projection).
        keys: `(B, H, C, E)`, the cache (``C`` positions, of which ``start .. end - 1`` are
            read).
        values: `(B, H, C, M)`.
        start: the first position attended to (default: 0).
        end: one past the last (default: ``C``).
        bias: `(H, W, J)` (shared by the batch) or `(B, H, W, J)` added to the scores, with
            ``J = end - start``; ``-inf`` hides a key. ``None`` (default): no bias.
        scale: the multiplier of ``q . k`` (default: ``1 / sqrt(E)``).

    Returns:
        `(B, W, H, M)`, a new contiguous tensor (``reshape(B * W, H * M)`` joins the heads).

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: shapes or devices disagree, the range is outside the cache, or ``scale``
            is not finite.

    Example:
        >>> q = torch.rand(2, 1, 4, 8)  # one query per sequence, 4 heads
        >>> keys, values = torch.rand(2, 4, 10, 8), torch.rand(2, 4, 10, 16)
        >>> cache_attention(q, keys, values, 0, 6).shape  # over the first 6 positions
        torch.Size([2, 1, 4, 16])
    """
    if end is None:
        end = keys.shape[2] if isinstance(keys, Tensor) and keys.dim() == 4 else -1
    if scale is None:
        scale = query.shape[-1] ** -0.5 if isinstance(query, Tensor) and query.dim() else 1.0
    return attend(query, keys, values, start, end, bias, scale)
