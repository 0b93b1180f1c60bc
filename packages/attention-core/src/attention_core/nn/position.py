"""Learned relative position biases added to attention logits.

* `T5RelativePositionBias`: one learned scalar per head and distance bucket, with
  exact buckets for small distances and log-spaced ones up to ``max_distance`` (Raffel et al.
  2020, T5, arXiv 1910.10683), also over a memory of past steps (keys at negative
  positions).
* `DynamicPositionBias`: a small MLP from the (optionally log-scaled) distance to one
  bias per head (Wang et al. 2021, CrossFormer, arXiv 2108.00154).

Both take explicit integer positions of the queries and the keys, so keys that lie far in
the past (memories, caches) get their real distance. The relative distance is always
``key_position - query_position`` (negative for keys in the past). Both also offer
``bias(i, j)`` for the common layout "the ``i`` queries are the last ``i`` of ``j`` keys".

Einstein notation: ``h`` heads, ``i`` queries, ``j`` keys, ``u`` unique distances.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_positive_int, check_tensor

__all__ = ["DynamicPositionBias", "T5RelativePositionBias", "relative_positions"]


def relative_positions(query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """``key_positions[j] - query_positions[i]`` as an ``(i, j)`` integer tensor.

    Arguments:
        query_positions: ``(i,)`` integer positions of the queries.
        key_positions: ``(j,)`` integer positions of the keys.

    Example:
        >>> relative_positions(torch.tensor([2, 3]), torch.arange(4))
        tensor([[-2, -1,  0,  1],
                [-3, -2, -1,  0]])
    """
    check_tensor("query_positions", query_positions, dim=1, integer=True)
    check_tensor("key_positions", key_positions, dim=1, integer=True)
    if query_positions.device != key_positions.device:
        raise ValueError(
            "query_positions and key_positions must be on one device; got "
            f"{query_positions.device} and {key_positions.device}"
        )
    return key_positions.long()[None, :] - query_positions.long()[:, None]


def _last_positions(
    i: int, j: int, offset: int | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Positions for "queries ``offset .. offset + i - 1`` over keys ``0 .. j - 1``"."""
    check_positive_int("i", i, allow_zero=True)
    check_positive_int("j", j, allow_zero=True)
    if offset is None:
        offset = j - i
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int or None; got {type(offset).__name__}")
    queries = torch.arange(offset, offset + i, device=device)
    return queries, torch.arange(j, device=device)


class T5RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias.

    The distance ``n = query_position - key_position`` (how far back the key lies) is mapped
    to a bucket: with ``causal=True`` keys in the future share bucket 0 with ``n = 0``; with
    ``causal=False`` half of the buckets are for ``n < 0`` and ``|n|`` is bucketed in the
    other half. Among the ``B`` buckets for ``|n|``, the first ``B // 2`` are exact
    (``|n| = 0 .. B//2 - 1``) and the rest are log-spaced: bucket
    ``B//2 + floor(log(|n| / (B//2)) / log(max_distance / (B//2)) * (B - B//2))``, clipped to
    ``B - 1`` (so every distance ``>= max_distance`` shares the last bucket). The bucket is
    computed in float64 with a tolerance of ``1e-9`` so that distances landing exactly on a
    bucket edge go to the upper bucket, as the formula says.

    Arguments:
        heads: number of heads ``h``.
        causal: whether future keys are all in the zero-distance bucket (see above).
        num_buckets: number of buckets (``>= 2``, or ``>= 4`` when not causal).
        max_distance: distance from which on all keys share the last bucket; must exceed the
            number of exact buckets.
        scale: multiplier of the returned bias (e.g. ``dim_head ** 0.5`` when the bias is
            added to logits that are later divided by it).

    Shapes: ``forward(query_positions (i,), key_positions (j,))`` -> ``(h, i, j)``.

    Example:
        >>> rel_pos = T5RelativePositionBias(heads=4)
        >>> queries = torch.arange(10, 13)  # 3 new positions
        >>> keys = torch.arange(-500, 13)  # a long memory, then the new positions
        >>> rel_pos(queries, keys).shape
        torch.Size([4, 3, 513])
        >>> rel_pos.bias(3, 8).shape  # queries are the last 3 of 8 keys
        torch.Size([4, 3, 8])
    """

    def __init__(
        self,
        heads: int,
        causal: bool = True,
        num_buckets: int = 32,
        max_distance: int = 128,
        scale: float = 1.0,
    ):
        super().__init__()
        check_positive_int("heads", heads)
        check_positive_int("num_buckets", num_buckets)
        check_positive_int("max_distance", max_distance)
        minimum = 2 if causal else 4
        if num_buckets < minimum:
            raise ValueError(
                f"num_buckets must be at least {minimum} when causal={bool(causal)}; "
                f"got {num_buckets}"
            )
        exact = (num_buckets if causal else num_buckets // 2) // 2
        if max_distance <= exact:
            raise ValueError(
                f"max_distance must exceed the {exact} exact buckets; got {max_distance}"
            )
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float; got {type(scale).__name__}")
        self.heads, self.causal = heads, bool(causal)
        self.num_buckets, self.max_distance, self.scale = num_buckets, max_distance, float(scale)
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def bucket(self, relative_position: Tensor) -> Tensor:
        """Bucket index (int64, same shape) of each ``key - query`` distance."""
        check_tensor("relative_position", relative_position, integer=True)
        n = -relative_position.long()
        buckets = self.num_buckets
        offset = torch.zeros_like(n)
        if self.causal:
            n = n.clamp(min=0)
        else:
            buckets //= 2
            offset = (n < 0).long() * buckets
            n = n.abs()
        exact = buckets // 2
        ratio = n.double().clamp(min=exact) / exact
        log_bucket = torch.log(ratio) / math.log(self.max_distance / exact) * (buckets - exact)
        large = exact + torch.floor(log_bucket + 1e-9).long()
        large = large.clamp(max=buckets - 1)
        return offset + torch.where(n < exact, n, large)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """Bias ``(h, i, j)`` for queries and keys at the given positions.

        Queries at ``query_positions`` ``(i,)`` and keys at ``key_positions`` ``(j,)``: any
        integers, e.g. negative for memories."""
        rel = relative_positions(query_positions, key_positions)
        values = self.relative_attention_bias(self.bucket(rel).to(self._device))
        return rearrange(values, "i j h -> h i j") * self.scale

    def bias(self, i: int, j: int, *, offset: int | None = None) -> Tensor:
        """Bias ``(h, i, j)`` for queries at ``offset .. offset + i - 1`` and keys at ``0 .. j-1``.

        ``offset`` defaults to ``j - i`` (the queries are the last ``i`` keys)."""
        return self(*_last_positions(i, j, offset, self._device))

    @property
    def _device(self) -> torch.device:
        return self.relative_attention_bias.weight.device

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, causal={self.causal}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, scale={self.scale}"
        )


class DynamicPositionBias(nn.Module):
    """A per-head attention bias produced by an MLP of the relative distance.

    The MLP is ``Linear(1, dim) [-> LayerNorm] -> SiLU``, then ``depth - 1`` times
    ``Linear(dim, dim) [-> LayerNorm] -> SiLU``, then ``Linear(dim, heads)``. Its input is
    the distance ``d = key_position - query_position`` as a float, or
    ``sign(d) * log(1 + |d|)`` with ``log_distance=True``. The MLP runs once per distinct
    distance and the result is gathered into the ``(h, i, j)`` bias, so the cost is
    ``O(i + j)`` MLP evaluations for contiguous positions, not ``O(i * j)``.

    Arguments:
        dim: hidden width of the MLP.
        heads: number of heads ``h``.
        depth: number of hidden layers (``>= 1``).
        log_distance: feed ``sign(d) * log(1 + |d|)`` instead of ``d``.
        norm: add a LayerNorm after each hidden linear layer.

    Shapes: ``forward(query_positions (i,), key_positions (j,))`` -> ``(h, i, j)``.

    Example:
        >>> dpb = DynamicPositionBias(dim=16, heads=4, log_distance=True)
        >>> dpb.bias(5, 12).shape  # queries are the last 5 of 12 keys
        torch.Size([4, 5, 12])
        >>> dpb(torch.arange(3), torch.arange(-6, 3)).shape
        torch.Size([4, 3, 9])
    """

    def __init__(
        self, dim: int, heads: int, depth: int = 2, log_distance: bool = False, norm: bool = False
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        check_positive_int("depth", depth)
        self.heads, self.log_distance = heads, bool(log_distance)
        layers: list[nn.Module] = []
        for layer in range(depth):
            layers.append(nn.Linear(1 if layer == 0 else dim, dim))
            if norm:
                layers.append(nn.LayerNorm(dim))
            layers.append(nn.SiLU())
        layers.append(nn.Linear(dim, heads))
        self.mlp = nn.Sequential(*layers)

    def distance_features(self, distances: Tensor) -> Tensor:
        """The MLP input ``(u, 1)`` for integer distances ``(u,)``."""
        weight = next(self.mlp.parameters())  # the first Linear's weight
        d = distances.to(dtype=weight.dtype, device=weight.device)
        if self.log_distance:
            d = torch.sign(d) * torch.log1p(d.abs())
        return rearrange(d, "u -> u 1")

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """Bias ``(h, i, j)`` for queries and keys at the given positions.

        Queries at ``query_positions`` ``(i,)`` and keys at ``key_positions`` ``(j,)``."""
        rel = relative_positions(query_positions, key_positions)
        unique, index = torch.unique(rel, return_inverse=True)
        values = self.mlp(self.distance_features(unique))  # (u, h)
        index = index.to(values.device)
        return rearrange(values[index], "i j h -> h i j")

    def bias(self, i: int, j: int, *, offset: int | None = None) -> Tensor:
        """Bias ``(h, i, j)`` for queries at ``offset .. offset + i - 1`` and keys at ``0 .. j-1``.

        ``offset`` defaults to ``j - i`` (the queries are the last ``i`` keys)."""
        return self(*_last_positions(i, j, offset, next(self.mlp.parameters()).device))
