"""The recurrent state of a Block-Recurrent Transformer layer.

Reference: Hutchins et al. 2022, arXiv 2203.07852, section 3.

A recurrent layer carries ``S`` state vectors from block to block. For each block:

* *vertical direction* (the tokens, in `.layer`): the tokens cross-attend to the state
  of the previous block, beside their own sliding-window self-attention;
* *horizontal direction* (here): the state vectors self-attend among themselves and
  cross-attend to the keys/values of the block's tokens (those of the previous and the current
  block by default, as in the paper's code); both results are concatenated, projected and
  gated into the state (`.gates`), optionally followed by a gated feed-forward block
  (the paper's "dual" gate configuration; without it, the cheaper "skip" configuration).

The state keys/values are shared by the state self-attention and by every token layer that
reads this state. The state gets a learned position embedding per vector, added after its
norm (the paper calls it critical). The initial state is learned.

Einstein notation: ``b`` batch, ``h`` heads, ``s`` state vectors, ``j`` token keys,
``d`` head feature, ``c`` model feature.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from attention_core.nn import FeedForward, RMSNorm

from .attention import HeadNorm, attend_heads, split_heads
from .gates import make_gate

__all__ = ["RecurrentState"]


class RecurrentState(nn.Module):
    """State vectors of one recurrent layer and their gated update.

    Arguments:
        dim: model feature size ``c``.
        num_state_vectors: number ``S`` of state vectors.
        heads: query heads ``H``.
        dim_head: head feature size ``Dh``.
        kv_heads: key/value heads ``Hkv`` (divides ``H``).
        temperature: logit scale of the (normalised) query/key products.
        gate_type: ``"fixed"`` or ``"lstm"``.
        state_ffn: add the gated feed-forward block after the attention gate.
        ff_mult: width multiplier of that feed-forward block.

    Shapes: a state is ``(B, S, c)``; `prepare` gives its normalised form and keys/values
    ``(B, Hkv, S, Dh)``; `update` takes token keys/values ``(B, Hkv, J, Dh)``.
    """

    def __init__(
        self,
        dim: int,
        num_state_vectors: int,
        heads: int,
        dim_head: int,
        kv_heads: int,
        temperature: float,
        gate_type: str = "fixed",
        state_ffn: bool = False,
        ff_mult: float = 4,
    ):
        super().__init__()
        self.heads, self.kv_heads, self.temperature = heads, kv_heads, float(temperature)
        inner = heads * dim_head
        self.initial = nn.Parameter(torch.randn(num_state_vectors, dim) * 0.1)
        self.position = nn.Parameter(torch.randn(num_state_vectors, dim))
        self.norm = RMSNorm(dim)
        self.to_q = nn.Linear(dim, 2 * inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * dim_head, bias=False)
        self.q_norm = HeadNorm(dim_head)
        self.q_cross_norm = HeadNorm(dim_head)
        self.k_norm = HeadNorm(dim_head)
        self.to_out = nn.Linear(2 * inner, dim, bias=False)
        self.gate = make_gate(gate_type, 2 * inner, dim)
        self.ff = None
        if state_ffn:
            self.ff_norm = RMSNorm(dim)
            self.ff = FeedForward(dim, mult=ff_mult * 2 / 3, glu=True)
            self.ff_gate = make_gate(gate_type, dim, dim)

    @property
    def num_state_vectors(self) -> int:
        """Number ``S`` of state vectors."""
        return self.initial.shape[0]

    def initial_state(self, batch: int) -> Tensor:
        """The learned initial state broadcast to ``(batch, S, c)`` (a view, not a copy)."""
        return self.initial.expand(batch, -1, -1)

    def prepare(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised state ``(B, S, c)`` and its keys and values ``(B, Hkv, S, Dh)``.

        The state includes position embeddings; the state update and the token layers that read it
        share the result."""
        normed = self.norm(state) + self.position
        k, v = self.to_kv(normed).chunk(2, dim=-1)
        return normed, self.k_norm(split_heads(k, self.kv_heads)), split_heads(v, self.kv_heads)

    def update(
        self,
        state: Tensor,
        prepared: tuple[Tensor, Tensor, Tensor],
        token_keys: Tensor,
        token_values: Tensor,
        token_valid: Tensor | None,
    ) -> Tensor:
        """The state after one block.

        Arguments:
            state: ``(B, S, c)`` state before the block.
            prepared: ``prepare(state)``.
            token_keys: ``(B, Hkv, J, Dh)`` normalised keys of the block's tokens (and of the
                previous block's); ``token_values`` likewise.
            token_valid: ``(B, J)`` bool, or ``None`` when every key is valid.

        Returns:
            ``(B, S, c)``.
        """
        normed, k, v = prepared
        q_self, q_cross = split_heads(self.to_q(normed), 2 * self.heads).chunk(2, dim=1)
        scale = self.temperature
        self_out = attend_heads(self.q_norm(q_self), k, v, scale=scale)
        mask = None if token_valid is None else token_valid[:, None, None, :]
        cross_out = attend_heads(
            self.q_cross_norm(q_cross), token_keys, token_values, mask=mask, scale=scale
        )
        h = rearrange(torch.cat((self_out, cross_out), dim=1), "b h s d -> b s (h d)")
        new = self.gate(h, state, self.to_out(h))
        if self.ff is not None:
            hidden = self.ff_norm(new)
            new = self.ff_gate(hidden, new, self.ff(hidden))
        return new
