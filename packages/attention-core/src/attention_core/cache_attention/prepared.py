"""Attention over one key/value cache with the cache checked once, for many calls.

A forward pass that runs a window at a time over a memory calls `cache_attention` with the
same key and value buffers hundreds of times, a few query rows each. `PreparedCacheAttention`
holds the buffers: its first call checks every argument as `cache_attention` does, later
calls check the queries, the range and the bias, and that the buffers still have the
storage, shape and strides they were checked with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import PLAIN_TENSORS, layouts, storages
from .._extension import direct_call_mode, use_kernels
from ._op import attend, check_scale, kernel_bias, kernel_cache, run_attention

__all__ = ["PreparedCacheAttention"]


class PreparedCacheAttention:
    """Apply `cache_attention` over key and value buffers fixed when the object is made.

    ``attention(query, start, end, bias)`` equals ``cache_attention(query, keys, values,
    start, end, bias, scale=scale)``, and costs less per call where one cache serves many
    calls (the windows of a forward pass over a memory). The first call checks every
    argument as `cache_attention` does; later calls with grad mode off (``torch.no_grad``,
    ``torch.inference_mode``) and outside ``torch.compile`` check the queries, ``start`` and
    ``end``, the bias, and that the buffers still have the data address, dtype, device,
    shape and strides they were checked with, then run the CPU kernel. Anything else (other
    shapes or dtypes, a buffer given other storage, grad mode on, tensor subclasses) takes
    `cache_attention` itself, which checks it again. The buffers are read at every call, so
    values written into them in place (a window's own keys) are seen; the buffers and the
    scale are fixed.

    Arguments:
        keys: `(B, H, C, E)`, row-major (features contiguous) or feature-major.
        values: `(B, H, C, M)`.
        scale: the multiplier of ``q . k`` (default: ``1 / sqrt(E)``).

    Example:
        >>> from attention_core.cache_attention import cache_attention
        >>> keys, values = torch.rand(2, 4, 10, 8), torch.rand(2, 4, 10, 16)
        >>> attention = PreparedCacheAttention(keys, values)
        >>> q = torch.rand(2, 1, 4, 8)
        >>> torch.equal(attention(q, 0, 6), cache_attention(q, keys, values, 0, 6))
        True
    """

    __slots__ = ("_checked", "_keys", "_scale", "_values")

    def __init__(self, keys: Tensor, values: Tensor, *, scale: float | None = None):
        if scale is None:
            scale = keys.shape[-1] ** -0.5 if isinstance(keys, Tensor) and keys.dim() else 1.0
        check_scale(scale)
        self._keys, self._values, self._scale = keys, values, float(scale)
        # after a call that ran the kernel: (dtype, (B, H, C, E, M), buffer layouts, how the
        # kernel reads the buffers, their storages, held so that their addresses stay theirs)
        self._checked: tuple | None = None

    @property
    def keys(self) -> Tensor:
        """The key buffer `(B, H, C, E)` (fixed when the object is made)."""
        return self._keys

    @property
    def values(self) -> Tensor:
        """The value buffer `(B, H, C, M)` (fixed when the object is made)."""
        return self._values

    @property
    def scale(self) -> float:
        """The multiplier of ``q . k`` (fixed when the object is made)."""
        return self._scale

    def __call__(
        self, query: Tensor, start: int = 0, end: int | None = None, bias: Tensor | None = None
    ) -> Tensor:
        """Attend from ``query`` to the cached positions ``start .. end - 1``.

        Arguments:
            query: `(B, W, H, E)` (any strides with contiguous features).
            start: the first position attended to (default: 0).
            end: one past the last (default: ``C``).
            bias: `(H, W, J)` or `(B, H, W, J)` with ``J = end - start`` and a contiguous
                last dimension, added to the scores; or ``None``.

        Returns:
            `(B, W, H, M)`, a new contiguous tensor.
        """
        checked = self._checked
        if end is None:
            keys = self._keys
            end = keys.shape[2] if isinstance(keys, Tensor) and keys.dim() == 4 else -1
        if (
            checked is not None
            and type(query) in PLAIN_TENSORS
            and query.dtype is checked[0]
            and query.is_cpu
            and type(start) is int
            and type(end) is int
            and direct_call_mode()
        ):
            B, H, C, E, M = checked[1]
            if (
                query.dim() == 4
                and query.shape[0] == B
                and query.shape[2] == H
                and query.shape[3] == E
                and (query.stride(3) == 1 or E <= 1)
                and 0 <= start <= end <= C
                and layouts((self._keys, self._values)) == checked[2]
            ):
                W = query.shape[1]
                bias_args = _bias_arguments(bias, (B, H, W, end - start), checked[0])
                if bias_args is None:
                    return self._attend(query, start, end, bias)
                return run_attention(query, checked[3], C, M, bias_args, start, end, self._scale)
        return self._attend(query, start, end, bias)

    def _attend(self, query: Tensor, start: int, end: int, bias: Tensor | None) -> Tensor:
        """`cache_attention` with every check; then keep what later calls need."""
        keys, values = self._keys, self._values
        out = attend(query, keys, values, start, end, bias, self._scale)
        if (
            type(keys) in PLAIN_TENSORS
            and type(values) in PLAIN_TENSORS
            and use_kernels(keys, values)
            and (keys.stride(3) == 1 or keys.stride(2) == 1)  # read in place by the kernel
            and (values.stride(3) == 1 or values.shape[3] <= 1)
        ):
            B, H, C, E = keys.shape
            self._checked = (
                keys.dtype, (B, H, C, E, values.shape[3]), layouts((keys, values)),
                kernel_cache(keys, values), storages((keys, values)),
            )  # fmt: skip
        return out


def _bias_arguments(
    bias: Tensor | None, sizes: tuple[int, int, int, int], dtype: torch.dtype
) -> tuple[int, tuple[int, ...]] | None:
    """The kernel's bias address and strides of its first three dimensions (0 to broadcast)
    for a bias of the fast path, ``(0, (0, 0, 0))`` for none; ``None`` when ``bias`` needs
    the full checks (another shape, dtype or device, a strided last dimension, a subclass)."""
    if bias is None:
        return 0, (0, 0, 0)
    B, H, W, J = sizes
    if (
        type(bias) not in PLAIN_TENSORS
        or bias.dim() not in (3, 4)
        or bias.dtype is not dtype
        or not bias.is_cpu
        or (bias.stride(-1) != 1 and J > 1)
    ):
        return None
    if bias.shape not in ((H, W, J), (B, H, W, J)):
        return None
    return kernel_bias(bias)
