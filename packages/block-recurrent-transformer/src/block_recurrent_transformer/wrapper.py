"""Training over long sequences and generation with recurrence for the Block-Recurrent Transformer.

The model is Hutchins et al. 2022, arXiv 2203.07852.
`RecurrentTrainerWrapper` cuts a long sequence into segments of ``max_seq_len`` tokens
and runs them one after the other, carrying the Transformer-XL memories and the recurrent
states (truncated back-propagation: gradients stop at segment boundaries). During training it
applies *structured dropout*: for each segment and each row, the whole memory is forgotten
with probability ``xl_memories_dropout`` and the whole state reset to the initial state with
probability ``state_dropout``, so that the model learns not to depend on either blindly.

Generation runs the decoding loop of `attention_core.generation` over the model's `prefill`
and `step`: the prompt is prefilled, then one token per step is fed, carrying memories and
states and caching keys/values within the current block, so a new token costs
``O(block_width)``.

Einstein notation: ``b`` batch, ``n`` sequence, ``v`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attention_core.checks import check_positive_int, check_probability, check_tokens
from attention_core.generation import generate, threshold_top_k

from .memory import XLMemories
from .transformer import BlockRecurrentTransformer

__all__ = ["RecurrentTrainerWrapper"]


class RecurrentTrainerWrapper(nn.Module):
    """Segment-by-segment training loss and generation for a `BlockRecurrentTransformer`.

    Arguments:
        model: the transformer (its ``max_seq_len`` is the segment length).
        xl_memories_dropout: per segment and row, probability of forgetting the memories
            (training mode only).
        state_dropout: per segment and row, probability of resetting the states to the
            initial state (training mode only).

    Shapes: ``forward(seq (B, n))`` with ``n >= 2`` -> scalar loss;
    ``generate(prime (B, T), length)`` -> ``(B, length - T)`` new tokens.

    Example:
        >>> model = BlockRecurrentTransformer(
        ...     num_tokens=50, dim=32, depth=2, dim_head=8, heads=2,
        ...     max_seq_len=16, block_width=8, num_state_vectors=4)
        >>> wrapper = RecurrentTrainerWrapper(model, state_dropout=0.1)
        >>> # 3 segments of 16 predictions
        >>> loss = wrapper(torch.randint(0, 50, (2, 49)))
        >>> loss.backward()
        >>> wrapper.generate(torch.randint(0, 50, (2, 5)), 12).shape
        torch.Size([2, 7])
    """

    def __init__(
        self,
        model: BlockRecurrentTransformer,
        xl_memories_dropout: float = 0.0,
        state_dropout: float = 0.0,
    ):
        super().__init__()
        if not isinstance(model, BlockRecurrentTransformer):
            raise TypeError(
                f"model must be a BlockRecurrentTransformer; got {type(model).__name__}"
            )
        self.model: BlockRecurrentTransformer = model
        self.seq_len: int = model.max_seq_len
        self.xl_memories_dropout = check_probability("xl_memories_dropout", xl_memories_dropout)
        self.state_dropout = check_probability("state_dropout", state_dropout)

    def _dropout(
        self,
        memories: XLMemories | None,
        states: list[Tensor] | None,
        batch: int,
        device: torch.device,
    ) -> tuple[XLMemories | None, list[Tensor] | None]:
        if not self.training or memories is None:
            return memories, states
        if self.xl_memories_dropout > 0:
            rows = torch.rand(batch, device=device) < self.xl_memories_dropout
            memories = memories.drop(rows)
        if self.state_dropout > 0 and states:
            rows = torch.rand(batch, device=device) < self.state_dropout
            states = self.model.reset_states(states, rows)
        return memories, states

    def forward(
        self, seq: Tensor, return_memories_and_states: bool = False
    ) -> Tensor | tuple[Tensor, XLMemories, list[Tensor]]:
        """Mean next-token cross-entropy over all predicted (non-ignored) tokens of ``seq``.

        Arguments:
            seq: ``(B, n)`` token ids, ``n >= 2``; segment ``k`` predicts
                ``seq[:, k L + 1 : (k + 1) L + 1]`` from ``seq[:, k L : (k + 1) L]`` with
                ``L = max_seq_len`` (the last segment may be shorter). Labels may hold
                ``ignore_index``.
            return_memories_and_states: also return the memories and states after the
                last segment.

        Returns:
            the scalar loss (token-weighted mean over segments), or
            ``(loss, memories, states)``.
        """
        model = self.model
        check_tokens("seq", seq, model.num_tokens, min_length=2, ignore_index=model.ignore_index)
        batch, total = seq.shape
        memories: XLMemories | None = None
        states: list[Tensor] | None = None
        loss_sum = seq.new_zeros((), dtype=model.token_emb.weight.dtype)
        count = 0
        for start in range(0, total - 1, self.seq_len):
            inputs = seq[:, start : start + self.seq_len]
            labels = seq[:, start + 1 : start + self.seq_len + 1]
            inputs = inputs[:, : labels.shape[1]]
            memories, states = self._dropout(memories, states, batch, seq.device)
            logits, memories, states = model(inputs, xl_memories=memories, states=states)
            loss_sum = loss_sum + F.cross_entropy(
                rearrange(logits, "b n v -> (b n) v"),
                rearrange(labels, "b n -> (b n)"),
                ignore_index=model.ignore_index,
                reduction="sum",
            )
            count += int((labels != model.ignore_index).sum())
        loss = loss_sum / max(count, 1)
        if not return_memories_and_states:
            return loss
        if memories is None or states is None:  # not reached: seq has at least one segment
            raise RuntimeError("no segment of seq was run")
        return loss, memories, states

    @torch.no_grad()
    def generate(
        self,
        prime: Tensor,
        length: int,
        temperature: float = 1.0,
        filter_thres: float = 0.9,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample a continuation of ``prime``.

        The decoding loop is `attention_core.generation.generate` over the model's
        `prefill` (the prompt, in pieces of ``max_seq_len``) and `step` (one
        ``O(block_width)`` step per new token, carrying memories and states across blocks).

        Arguments:
            prime: ``(B, T)`` token ids, ``T >= 1``.
            length: total length ``> T`` of prompt plus continuation.
            temperature: sampling temperature (``0`` = greedy).
            filter_thres: keep the top ``1 - filter_thres`` fraction of the vocabulary (at
                least one token), as ``attention_core.generation.filter_by_threshold``.
            generator: random generator for reproducible sampling.

        Returns:
            ``(B, length - T)`` the new tokens only.
        """
        model = self.model
        check_tokens("prime", prime, model.num_tokens, min_length=1)
        check_positive_int("length", length)
        if length <= prime.shape[1]:
            raise ValueError(
                f"length must exceed the prime's length {prime.shape[1]} (it is the total "
                f"length of prime plus continuation); got {length}"
            )
        check_probability("filter_thres", filter_thres)
        out = generate(
            model,
            prime.long(),
            length - prime.shape[1],
            temperature=temperature,
            top_k=threshold_top_k(filter_thres, model.num_tokens),
            generator=generator,
        )
        return out[:, prime.shape[1] :]
