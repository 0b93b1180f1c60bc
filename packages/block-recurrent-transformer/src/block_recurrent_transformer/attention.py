"""Attention helpers of the Block-Recurrent Transformer.

Head splitting, query/key normalisation, multi-head / grouped / multi-query keys, and the relative
position encodings.

* Query/key normalisation (cosine-similarity attention with a temperature, as in the paper's
  code; "QK-norm", Henry et al. 2020, arXiv 2010.04245): ``q`` and ``k`` are l2-normalised,
  multiplied by a learned gain per feature, and the logits are scaled by a fixed temperature
  instead of ``1 / sqrt(Dh)``.
* Keys/values may have fewer heads than queries: ``kv_heads = heads`` is the paper's
  multi-head attention, ``kv_heads = 1`` multi-query attention (Shazeer 2019,
  arXiv 1911.02150), anything in between grouped-query attention (Ainslie et al. 2023,
  arXiv 2305.13245).
* Positions: rotary embeddings (Su et al. 2021, arXiv 2104.09864), a dynamic position bias
  (an MLP of the distance, CrossFormer, arXiv 2108.00154) or T5's bucketed bias (Raffel et al.
  2020, arXiv 1910.10683, used by the paper), all from ``attention_core.nn``.

Einstein notation: ``b`` batch, ``h`` heads, ``g`` query heads per key/value head, ``n``
sequence, ``i`` queries, ``j`` keys, ``d`` head feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.torch_version import TorchVersion

from attention_core.nn import (
    DynamicPositionBias,
    RotaryEmbedding,
    T5RelativePositionBias,
    attend,
    l2norm,
)

__all__ = [
    "POSITION_ENCODINGS",
    "HeadNorm",
    "PositionEncoding",
    "attend_heads",
    "attend_window",
    "split_heads",
]


# ``scaled_dot_product_attention(..., enable_gqa=True)`` exists from torch 2.5 on
_SDPA_SHARES_HEADS = TorchVersion(torch.__version__) >= "2.5"


def split_heads(t: Tensor, heads: int) -> Tensor:
    """``(b, n, h * d)`` -> ``(b, h, n, d)``."""
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


class HeadNorm(nn.Module):
    """l2-normalise the last axis and multiply by a learned gain ``(d,)`` (starts at ones).

    Shapes: ``(..., d)`` -> ``(..., d)``.
    """

    def __init__(self, dim_head: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim_head))

    def forward(self, t: Tensor) -> Tensor:
        """Normalised and scaled ``t`` ``(..., d)``."""
        return l2norm(t) * self.gain


def attend_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention of ``q (B, H, I, D)`` over ``k``/``v`` ``(B, Hkv, J, D)``, ``Hkv`` dividing ``H``.

    Each key/value head serves ``H / Hkv`` consecutive query heads.

    ``mask`` (bool, ``True`` = may attend) and ``bias`` broadcast to ``(B, H, I, J)``; pass
    them 4-dimensional so that ``scaled_dot_product_attention`` keeps its fused kernel. Rows
    with no visible key return zeros. Without mask and bias, the query heads that share a
    key/value head are folded into the query rows (the keys are neither expanded nor repeated).
    Returns ``(B, H, I, D)``.
    """
    b, heads, rows, d = q.shape
    kv_heads = k.shape[1]
    if mask is None and bias is None and kv_heads != heads and k.shape[2] and 0 not in q.shape:
        folded = q.reshape(b, kv_heads, heads // kv_heads * rows, d)
        out = F.scaled_dot_product_attention(folded, k, v, scale=scale)
        return out.view(b, heads, rows, v.shape[-1])
    if kv_heads not in (1, heads):
        groups = heads // kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return attend(q, k, v, mask=mask, bias=bias, scale=scale)


def attend_window(
    q: Tensor, k: Tensor, v: Tensor, *, additive: Tensor, scale: float | None = None
) -> Tensor:
    """Attention over a window with a ready-made additive mask in which every row sees a key.

    Attention of ``q`` ``(B, H, I, D)`` over ``k``/``v`` ``(B, Hkv, J, D)`` (``Hkv`` divides ``H``)
    with a ready-made additive mask ``(1 or B, 1 or H, I, J)`` (position bias, and ``-inf`` where a
    key is forbidden) in which every row allows at least one key: one call of
    ``scaled_dot_product_attention``, without the checks and the empty-row handling of
    `attend_heads`. With fewer key/value heads than query heads (multi-query, grouped) the keys
    are neither expanded nor repeated, so that the backward pass needs no sum over expanded heads:
    with a mask shared by the batch, the ``g`` query heads of a key/value head are folded into its
    query rows, ``(B, Hkv, g * I, D)``, and the mask with them; with a mask per batch row (invalid
    slots), ``scaled_dot_product_attention`` shares the key/value heads itself (``enable_gqa``).
    Returns ``(B, H, I, D)``."""
    b, heads, rows, d = q.shape
    kv_heads = k.shape[1]
    if kv_heads == heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale)
    batch, mask_heads, _, slots = additive.shape
    if batch != 1 and _SDPA_SHARES_HEADS:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=additive, scale=scale, enable_gqa=True
        )
    if batch != 1:  # torch < 2.5: repeat the key/value heads
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale)
    groups = heads // kv_heads
    if mask_heads == 1:  # one mask for all heads: repeat it for the folded heads
        mask = additive.expand(1, groups, rows, slots).reshape(1, 1, groups * rows, slots)
    else:  # a mask per query head (position bias): heads j g .. j g + g - 1 of key/value head j
        mask = additive.reshape(1, kv_heads, groups * rows, slots)
    folded = q.reshape(b, kv_heads, groups * rows, d)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return out.view(b, heads, rows, d)


POSITION_ENCODINGS = ("rotary", "dynamic", "t5", None)


class PositionEncoding(nn.Module):
    """Relative positions for the token self-attention, shared by all layers.

    Arguments:
        kind: ``"rotary"`` (rotate queries and keys), ``"dynamic"`` (an MLP bias of the
            log-distance), ``"t5"`` (T5's bucketed bias) or ``None``.
        heads: number of query heads.
        dim_head: head feature size (rotary rotates all of it).
        mlp_dim: hidden width of the dynamic bias MLP.
        max_distance: distance from which on the T5 buckets saturate.

    Positions are integers relative to the start of the current block (negative in the past).
    """

    def __init__(
        self, kind: str | None, heads: int, dim_head: int, *, mlp_dim: int, max_distance: int
    ):
        super().__init__()
        if kind not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding must be one of {POSITION_ENCODINGS}; got {kind!r}")
        self.kind = kind
        self.rotary = RotaryEmbedding(dim_head - dim_head % 2) if kind == "rotary" else None
        self.bias_module: DynamicPositionBias | T5RelativePositionBias | None
        if kind == "dynamic":
            self.bias_module = DynamicPositionBias(mlp_dim, heads, depth=2, log_distance=True)
        elif kind == "t5":
            self.bias_module = T5RelativePositionBias(
                heads, causal=True, num_buckets=32, max_distance=max_distance
            )
        else:
            self.bias_module = None

    def bias(
        self, query_positions: Tensor, key_positions: Tensor, dtype: torch.dtype
    ) -> Tensor | None:
        """Additive bias ``(1, H, i, j)`` for queries ``(i,)`` and keys ``(j,)``, or ``None``."""
        if self.bias_module is None:
            return None
        return self.bias_module(query_positions, key_positions)[None].to(dtype)

    def angles(self, positions: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Rotation table ``(n, 2, r)`` for integer ``positions (n,)``, or ``None`` without rotary.

        The cosines and the signed sines (``-sin`` on the first half of the rotated features,
        ``+sin`` on the second) of the rotary angles, computed once per call."""
        if self.rotary is None:
            return None
        angles = self.rotary(positions, dtype=dtype)
        half = angles.shape[-1] // 2
        sin = angles.sin()
        signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return torch.stack((angles.cos(), signed), dim=1)

    @staticmethod
    def rotate(t: Tensor, table: Tensor | None) -> Tensor:
        """Rotate ``t`` ``(..., n, d)`` by a rotation table ``(n, 2, r)`` from `angles`.

        The identity for ``None``. Computes ``t * cos + roll(t, r / 2) * signed_sin`` on the first
        ``r`` features, which is rotary's ``t * cos + rotate_half(t) * sin`` in three passes."""
        if table is None:
            return t
        r = table.shape[-1]
        if table.dtype != t.dtype:
            table = table.to(t.dtype)
        cos, signed_sin = table[:, 0], table[:, 1]
        if r == t.shape[-1]:
            return torch.addcmul(t * cos, t.roll(r // 2, dims=-1), signed_sin)
        head = t[..., :r]
        rotated = torch.addcmul(head * cos, head.roll(r // 2, dims=-1), signed_sin)
        return torch.cat((rotated, t[..., r:]), dim=-1)

    def extra_repr(self) -> str:
        """The module summary printed by ``repr``."""
        return f"kind={self.kind!r}"
