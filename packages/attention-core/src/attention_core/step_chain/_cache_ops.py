"""The ops of a `StepChain` on a held key/value cache: softmax attention over a range of its
positions and a write of a value's rows into it (``csrc/step_chain.h``:
``cache_attention::Problem``, ``CacheWrite``), with the positions that change from call to
call (`Position`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_like
from ..cache_attention import cache_attention
from ..cache_attention._op import check_attention
from ..checks import check_tensor
from ._ops import NULL, Bases, Op, Slot, value, weight_address

__all__ = ["CACHE_ATTENTION", "CACHE_WRITE", "CacheAttentionOp", "CacheWriteOp", "Position"]

CACHE_ATTENTION, CACHE_WRITE = 5, 6
_NO_GRAD = "cache must not require grad (the chain writes it in place)"


@dataclasses.dataclass(frozen=True)
class Position:
    """A non-negative int, at most ``limit``, given at each call of a `StepChain`.

    It is one of the call's ``positions``: where in a cache an op reads or writes. Made by
    `StepChain.position`; pass it to that chain's cache ops."""

    chain: int  # id of the chain that made it
    index: int  # its place in the call's positions
    limit: int


def _rows_per_batch(rows: int, batch: int, op: str) -> int:
    if rows % batch:
        raise ValueError(f"{op}: x must have a multiple of the cache's batch ({batch}) rows; "
                         f"got {rows}")  # fmt: skip
    return rows // batch


def _cache(name: str, t: object, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t`` a `(B, H, C, E)` tensor of the chain's dtype and device, ``B >= 1``."""
    t = check_tensor(name, t, dim=4, floating=True)
    if t.shape[0] == 0:
        raise ValueError(f"{name} must have a batch B >= 1; got shape {tuple(t.shape)}")
    return check_like(name, t, torch.empty(0, dtype=dtype, device=device), "the chain's weights")


def feature_major(t: Tensor) -> bool:
    """Whether a `(B, H, C, E)` cache is stored feature-major: the transpose of a contiguous
    `(B, H, E, C)` (positions contiguous for each feature, as a cache that grows along its
    last dimension stores them), and not contiguous itself."""
    return not t.is_contiguous() and t.transpose(2, 3).is_contiguous()


def _cache_strides(cache: Tensor) -> list[int]:
    """The element strides of a `(B, H, C, E)` cache, contiguous or feature-major."""
    _, H, C, E = cache.shape
    return [H * C * E, C * E, 1, C] if feature_major(cache) else [H * C * E, C * E, E, 1]


def _check_limit(name: str, position: Position, most: int, what: str) -> None:
    if position.limit > most:
        raise ValueError(f"{name} must be a position of limit at most {most} ({what}); got one "
                         f"of limit {position.limit}")  # fmt: skip


@dataclasses.dataclass(eq=False)
class CacheAttentionOp(Op):
    """`attention_core.cache_attention.cache_attention` of the heads of ``query`` over the
    positions ``start .. end - 1`` of the held ``keys`` and ``values``, with the bias columns
    from ``bias_start``."""

    query: Slot
    keys: Tensor
    values: Tensor
    start: Position
    end: Position
    bias: Tensor | None
    bias_start: Position
    scale: float
    dtype: torch.dtype
    device: torch.device
    kind = CACHE_ATTENTION

    def __post_init__(self) -> None:
        keys = _cache("keys", self.keys, self.dtype, self.device)
        B, H, C, E = keys.shape
        if self.query.width != H * E:
            raise ValueError(f"query must have width H E = {H * E} (keys {tuple(keys.shape)}); "
                             f"got {self.query.width}")  # fmt: skip
        like = torch.empty(B, 1, H, E, dtype=self.dtype, device=self.device)
        check_attention(like, keys, self.values, 0, C, None, self.scale)
        for name, position in (("start", self.start), ("end", self.end)):
            _check_limit(name, position, C, "the cache length")
        if self.bias is not None:
            batched = isinstance(self.bias, Tensor) and self.bias.dim() == 4
            shape = (B, H, None, None) if batched else (H, None, None)
            check_tensor("bias", self.bias, shape=shape)
            check_like("bias", self.bias, like, "the chain's weights")
            _check_limit("bias_start", self.bias_start, self.bias.shape[-1], "the bias's columns")
        self.shape = (B, H, C, E, self.values.shape[3])
        self.width = H * self.shape[4]

    def scalar(self) -> float:
        return float(self.scale)

    def weights(self) -> tuple[Tensor | None, ...]:
        return (self.keys, self.values, self.bias)

    def readable(self) -> bool:
        bias = self.bias
        return (
            (self.keys.is_contiguous() or feature_major(self.keys))
            and self.values.is_contiguous()
            and (bias is None or bias.is_contiguous())
        )

    def fields(self, bases: Bases, out: tuple[int, int], weight_index: int) -> list[int]:
        B, H, C, E, M = self.shape
        q_base, q_offset, ldq = bases.of(self.query)
        k, v, bias = (
            weight_address(bases, weight_index + i, t) for i, t in enumerate(self.weights())
        )
        # the bias is contiguous, the keys contiguous or feature-major (`readable`); its
        # batch stride is 0 when the batch shares it
        bias_fields = [0] * 5
        if self.bias is not None:
            rows, columns = self.bias.shape[-2:]
            batch = H * rows * columns if self.bias.dim() == 4 else 0
            bias_fields = [batch, rows * columns, columns, rows, columns]
        k_strides = _cache_strides(self.keys)
        return [
            q_base, q_offset, ldq, bases.rows, *k, *k_strides, *v, H * C * M, C * M,
            M, *(bias if self.bias is not None else NULL), *bias_fields, *out, B, H, E, M, C,
            self.start.index, self.end.index, self.bias_start.index,
        ]  # fmt: skip

    def check_call(self, rows: int, positions: Sequence[int]) -> None:
        W = _rows_per_batch(rows, self.shape[0], "cache attention")
        start, end = positions[self.start.index], positions[self.end.index]
        if end < start:  # end <= C: its limit is at most C
            raise ValueError(
                f"cache attention: start and end must satisfy 0 <= start <= end <= "
                f"{self.shape[2]} (the cache length); got {start} and {end}"
            )
        bias = self.bias
        if bias is not None:
            column = positions[self.bias_start.index]
            rows, columns = bias.shape[-2:]
            if rows < W or column + end - start > columns:
                raise ValueError(
                    f"cache attention: the bias ({rows} rows, {columns} columns) "
                    f"must hold {W} rows and {end - start} columns from column {column}"
                )

    def compose(
        self, values: list[Tensor], state: tuple[Tensor, Tensor] | None, positions: Sequence[int]
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        B, H, _, E, M = self.shape
        q = value(values, self.query)
        R = q.shape[0]
        W = R // B  # check_call: a multiple of B
        start, end = positions[self.start.index], positions[self.end.index]
        bias = self.bias
        if bias is not None:
            column = positions[self.bias_start.index]
            bias = bias[..., :W, column : column + end - start]
        out = cache_attention(q.reshape(B, W, H, E), self.keys, self.values, start, end, bias,
                              scale=self.scale)  # fmt: skip
        return out.reshape(R, H * M), None


@dataclasses.dataclass(eq=False)
class CacheWriteOp(Op):
    """``cache[b, h, position + w] = x[b W + w]``'s head ``h``, for the ``R = B W`` rows of
    ``x`` `(R, H E)` and the held ``cache`` `(B, H, C, E)`."""

    x: Slot
    cache: Tensor
    position: Position
    dtype: torch.dtype
    device: torch.device
    kind = CACHE_WRITE
    eps = 0.0
    width = 0  # it makes no value

    def __post_init__(self) -> None:
        B, H, C, E = _cache("cache", self.cache, self.dtype, self.device).shape
        if self.x.width != H * E:
            raise ValueError(f"x must have width H E = {H * E} (cache {tuple(self.cache.shape)}); "
                             f"got {self.x.width}")  # fmt: skip
        if self.cache.requires_grad:
            raise ValueError(_NO_GRAD)
        _check_limit("position", self.position, C, "the cache length")
        self.shape = (B, H, C, E)

    def weights(self) -> tuple[Tensor | None, ...]:
        return (self.cache,)

    def written(self) -> tuple[Tensor, ...]:
        return (self.cache,)

    def readable(self) -> bool:
        return self.cache.is_contiguous() or feature_major(self.cache)

    def fields(self, bases: Bases, out: tuple[int, int], weight_index: int) -> list[int]:
        B, H, C, E = self.shape
        x_base, x_offset, ldx = bases.of(self.x)
        return [
            x_base, x_offset, ldx, bases.rows, B, H, E,
            *weight_address(bases, weight_index, self.cache), *_cache_strides(self.cache), C,
            self.position.index,
        ]  # fmt: skip

    def check_call(self, rows: int, positions: Sequence[int]) -> None:
        if self.cache.is_leaf and self.cache.requires_grad and torch.is_grad_enabled():
            # made to require grad after it was added: autograd refuses the in-place write
            raise ValueError(_NO_GRAD)
        W = _rows_per_batch(rows, self.shape[0], "cache write")
        p, C = positions[self.position.index], self.shape[2]
        if p + W > C:
            raise ValueError(f"cache write: {W} positions from position {p} outside the cache "
                             f"({C} positions)")  # fmt: skip

    def compose(
        self, values: list[Tensor], state: tuple[Tensor, Tensor] | None, positions: Sequence[int]
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        B, H, _, E = self.shape
        x = value(values, self.x)
        W = x.shape[0] // B  # check_call: a multiple of B, inside the cache
        p = positions[self.position.index]
        # "(b w) (h e) -> b h w e"
        self.cache[:, :, p : p + W].copy_(x.reshape(B, W, H, E).transpose(1, 2))
        return x.new_empty(x.shape[0], 0), None
