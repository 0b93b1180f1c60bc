"""The ``torch.library`` op ``attention_core::cache_attention``: its checks, its CPU kernel
(``csrc/cache_attention.h``) with the plain-PyTorch fallback, its fake registration and
autograd (through the reference).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_like, check_tensor
from .._extension import binding, needs_graph, row_major, use_kernels
from .._reference_autograd import register_reference_autograd
from .reference import cache_attention_reference

__all__ = [
    "attend",
    "cache_attention_op",
    "check_attention",
    "check_scale",
    "compute_attention",
    "kernel_bias",
    "kernel_cache",
    "run_attention",
]


def check_scale(scale: object) -> None:
    """``scale`` must be a finite number (an int or a float, not a bool)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")


def check_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    start: int,
    end: int,
    bias: Tensor | None,
    scale: float,
) -> None:
    """Check every argument of `cache_attention` before a kernel runs.

    ``query`` `(B, W, H, E)` floating; ``keys`` `(B, H, C, E)` and ``values`` `(B, H, C, M)`
    of its dtype and device; ``0 <= start <= end <= C`` ints; ``bias`` `(H, W, J)` or
    `(B, H, W, J)` with ``J = end - start``, or ``None``; ``scale`` a finite number."""
    check_tensor("query", query, floating=True)
    check_like("keys", keys, query, "query")
    check_like("values", values, query, "query")
    if query.dim() != 4:
        raise ValueError(f"query must have shape (B, W, H, E); got {tuple(query.shape)}")
    B, W, H, E = query.shape
    if keys.dim() != 4 or keys.shape[:2] != (B, H) or keys.shape[3] != E:
        raise ValueError(f"keys must have shape ({B}, {H}, C, {E}); got {tuple(keys.shape)}")
    C = keys.shape[2]
    if values.dim() != 4 or values.shape[:3] != (B, H, C):
        raise ValueError(f"values must have shape ({B}, {H}, {C}, M); got {tuple(values.shape)}")
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if not 0 <= start <= end <= C:
        raise ValueError(
            f"start and end must satisfy 0 <= start <= end <= {C} (the cache length); got "
            f"{start} and {end}"
        )
    check_scale(scale)
    if bias is None:
        return
    check_like("bias", bias, query, "query")
    J = end - start
    if bias.shape not in ((H, W, J), (B, H, W, J)):
        raise ValueError(
            f"bias must have shape ({H}, {W}, {J}) or ({B}, {H}, {W}, {J}) (J = end - start); "
            f"got {tuple(bias.shape)}"
        )


def compute_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    start: int,
    end: int,
    bias: Tensor | None,
    scale: float,
) -> Tensor:
    """Compute `cache_attention` on arguments that `check_attention` has accepted.

    The compiled kernel runs for float32 and float64 CPU tensors, the reference elsewhere.
    Returns a new contiguous `(B, W, H, M)` tensor; never writes its inputs."""
    if not use_kernels(query):
        return cache_attention_reference(query, keys, values, start, end, bias, scale)
    query, values = row_major(query), row_major(values)
    if keys.stride(3) != 1 and keys.stride(2) != 1:  # neither row- nor feature-major
        keys = keys.contiguous()
    bias = None if bias is None else row_major(bias)
    return run_attention(query, kernel_cache(keys, values), keys.shape[2], values.shape[3],
                         kernel_bias(bias), start, end, float(scale))  # fmt: skip


def kernel_cache(keys: Tensor, values: Tensor) -> tuple[int, tuple[int, ...], int, tuple[int, ...]]:
    """How the kernel reads ``keys`` `(B, H, C, E)` (row- or feature-major) and ``values``
    `(B, H, C, M)` (contiguous features): their addresses and strides."""
    return keys.data_ptr(), keys.stride(), values.data_ptr(), values.stride()[:3]


def kernel_bias(bias: Tensor | None) -> tuple[int, tuple[int, ...]]:
    """How the kernel reads ``bias`` `(H, W, J)` or `(B, H, W, J)` with a contiguous last
    dimension: its address and the strides of its first three dimensions (0: shared by the
    batch); ``(0, (0, 0, 0))`` for none."""
    if bias is None:
        return 0, (0, 0, 0)
    return bias.data_ptr(), bias.stride()[:3] if bias.dim() == 4 else (0, *bias.stride()[:2])


def run_attention(
    query: Tensor,
    cache: tuple[int, tuple[int, ...], int, tuple[int, ...]],
    C: int,
    M: int,
    bias: tuple[int, tuple[int, ...]],
    start: int,
    end: int,
    scale: float,
) -> Tensor:
    """Run the compiled kernel for ``query`` `(B, W, H, E)` (contiguous features) over the
    cache ``(keys address, keys strides, values address, values strides[:3])`` of ``C``
    positions and value width ``M``, with ``bias`` ``(address, strides[:3])`` (address 0:
    none); returns a new `(B, W, H, M)` tensor. Everything has been checked: this only
    passes addresses."""
    B, W, H, E = query.shape
    out = query.new_empty(B, W, H, M)
    keys, k_strides, values, v_strides = cache
    binding("cache_attention", query.dtype)(
        query.data_ptr(), query.stride()[:3], keys, k_strides, values, v_strides, *bias,
        out.data_ptr(), (B, W, H, E, M, C), start, end, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out


def attend(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    start: int,
    end: int,
    bias: Tensor | None,
    scale: float,
) -> Tensor:
    """`cache_attention` with every argument given: check them all, then run the registered
    op where autograd records or ``torch.compile`` traces the call, else the kernel
    directly."""
    check_attention(query, keys, values, start, end, bias, scale)
    if needs_graph(query, keys, values, bias):
        return cache_attention_op(query, keys, values, start, end, bias, float(scale))
    return compute_attention(query, keys, values, start, end, bias, float(scale))


@torch.library.custom_op("attention_core::cache_attention", mutates_args=())
def cache_attention_op(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    start: int,
    end: int,
    bias: Tensor | None,
    scale: float,
) -> Tensor:
    """Attention over a cache slice (see `attention_core.cache_attention.cache_attention`).

    Arguments:
        query: `(B, W, H, E)`.
        keys: `(B, H, C, E)`.
        values: `(B, H, C, M)`.
        start: the first cached position attended to.
        end: one past the last.
        bias: `(H, W, J)` or `(B, H, W, J)`, or ``None``.
        scale: the multiplier of the dot products.

    Returns:
        `(B, W, H, M)`.
    """
    check_attention(query, keys, values, start, end, bias, scale)
    return compute_attention(query, keys, values, start, end, bias, scale)


@cache_attention_op.register_fake
def _(query, keys, values, start, end, bias, scale):
    check_attention(query, keys, values, start, end, bias, scale)
    B, W, H, _ = query.shape
    return query.new_empty(B, W, H, values.shape[3])


register_reference_autograd(cache_attention_op, cache_attention_reference)
