"""This module holds the Feedback Transformer model.

The model is from Fan et al. 2021, "Addressing Some Limitations of Transformers with Feedback
Memory" (arXiv 2002.09402).

At every time step ``t`` the states of all layers (the token embedding ``x_t^0`` and each
layer's output ``x_t^l``) are merged into one memory vector
``m_t = sum_l softmax(w)_l x_t^l`` (or the last layer's output only), projected once to a key
and a value with the projection that all layers share, and appended to a FIFO memory of the
last ``mem_len`` steps. Every layer of every later step attends to that same memory, so the
lowest layer sees the highest-level representations of the past; the price is that steps
run one after another.

Built from ``attention_core.nn``: pre-norm layers, GEGLU feed-forward (Shazeer 2020, arXiv
2002.05202) and T5 relative position bias (Raffel et al. 2020, arXiv 1910.10683) with each
memory slot at its real distance.

Einstein notation: ``b`` batch, ``n`` tokens, ``w`` steps of a window, ``h`` heads, ``m``
memory slots, ``d`` head feature, ``l`` merged layer states.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from attention_core.checks import check_bool, check_positive_int, check_probability
from attention_core.nn import T5RelativePositionBias

from . import _window_loop
from ._inputs import check_memory, check_tokens, prepare_context
from .layers import FeedbackLayer
from .memory import FeedbackMemory
from .reference import feedback_forward

if TYPE_CHECKING:
    from .generation import FeedbackState

__all__ = ["FeedbackTransformer"]


class FeedbackTransformer(nn.Module):
    """Feedback Transformer language model.

    The input is processed in windows of ``seq_len`` tokens. ``seq_len=1`` is the paper's
    exact model: each token's layers see the memory of all earlier tokens. With
    ``seq_len > 1`` (faster: fewer sequential steps) a window's tokens see the memory of the
    earlier windows plus, within the window, the earlier tokens' states at the same layer
    instead of their (not yet computed) memory: an approximation of the paper's model, and
    the function that `forward`, `prefill` and `step` all compute.

    Arguments:
        num_tokens: vocabulary size.
        dim: model width.
        depth: number of layers.
        seq_len: window length (``>= 1``).
        mem_len: number of past steps kept in the memory (``>= 0``; ``0``: no memory).
        dim_head: width of each attention head.
        heads: number of attention heads.
        attn_dropout: dropout on attention weights.
        ff_dropout: dropout inside the feed-forward blocks.
        keep_last_hidden: memory of a step is the last layer's output instead of the
            softmax-weighted mix of all layers' states (then there is no mixing parameter).
        cross_attend: add a cross attention block to every layer; ``forward`` then needs a
            ``context``.
        ff_mult: feed-forward hidden width multiplier.
        rel_pos_num_buckets: number of T5 relative position buckets.
        rel_pos_max_distance: distance from which on all keys share the last bucket.

    Shapes: ``forward(x (b, n))`` -> logits ``(b, n, num_tokens)``.

    How the model computes is written in `feedback_transformer.reference`, next to the
    paper; ``forward`` computes the same function on a faster path (a preallocated memory
    buffer, fused training steps, one weight gradient per call), proved equal to it by the
    tests. Set ``use_fast_path = False`` on a model (or the class) to run the reference
    instead.

    Example:
        >>> model = FeedbackTransformer(num_tokens=100, dim=32, depth=2, seq_len=2,
        ...                             mem_len=8, dim_head=8, heads=2)
        >>> logits, memory = model(torch.randint(0, 100, (2, 5)), return_memory=True)
        >>> logits.shape, memory.keys.shape
        (torch.Size([2, 5, 100]), torch.Size([2, 2, 5, 8]))
    """

    use_fast_path: bool = True

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        *,
        seq_len: int = 2,
        mem_len: int,
        dim_head: int = 64,
        heads: int = 8,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        keep_last_hidden: bool = False,
        cross_attend: bool = False,
        ff_mult: float = 4,
        rel_pos_num_buckets: int = 32,
        rel_pos_max_distance: int = 128,
    ):
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth)):
            check_positive_int(name, value)
        check_positive_int("seq_len", seq_len)
        check_positive_int("mem_len", mem_len, allow_zero=True)
        if seq_len == 1 and mem_len == 0:
            raise ValueError(
                "mem_len must be positive when seq_len=1 (a single step without memory has "
                "nothing to attend to); got mem_len=0"
            )
        check_positive_int("dim_head", dim_head)
        check_positive_int("heads", heads)
        attn_dropout = check_probability("attn_dropout", attn_dropout, allow_one=False)
        ff_dropout = check_probability("ff_dropout", ff_dropout, allow_one=False)
        self.keep_last_hidden = check_bool("keep_last_hidden", keep_last_hidden)
        self.cross_attend = check_bool("cross_attend", cross_attend)
        self.num_tokens, self.dim, self.depth = num_tokens, dim, depth
        self.seq_len, self.mem_len, self.heads, self.dim_head = seq_len, mem_len, heads, dim_head

        self.token_emb = nn.Embedding(num_tokens, dim)
        self.rel_pos = T5RelativePositionBias(
            heads, causal=True, num_buckets=rel_pos_num_buckets, max_distance=rel_pos_max_distance
        )
        # shared by all layers: the attention pre-norm and the key/value projection, so the
        # memory's keys and the window's keys come from the same normalisation
        self.attn_norm = nn.LayerNorm(dim)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        # an nn.ModuleList (registers the layers); torch does not type its items
        self.layers = cast(
            "Sequence[FeedbackLayer]",
            nn.ModuleList(
                FeedbackLayer(dim, heads, dim_head, attn_dropout, ff_dropout, ff_mult, cross_attend)
                for _ in range(depth)
            ),
        )
        # weights of the embedding and the depth layer outputs in the memory (zeros: the
        # uniform mix, as in the paper's code)
        mixed = not keep_last_hidden and mem_len > 0  # no memory, nothing to mix
        self.layer_weight = nn.Parameter(torch.zeros(depth + 1)) if mixed else None
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens))

    @property
    def signature(self) -> tuple[int, int, int, int]:
        """``(dim, depth, heads, dim_head)``: what a memory must come from."""
        return (self.dim, self.depth, self.heads, self.dim_head)

    def forward(
        self,
        x: Tensor,
        memory: FeedbackMemory | tuple[Tensor, Tensor] | None = None,
        return_memory: bool = False,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        detach_memory: bool = True,
    ) -> Tensor | tuple[Tensor, FeedbackMemory]:
        """Return the logits of every position of ``x``, continuing after ``memory``.

        Arguments:
            x: ``(b, n)`` token ids, ``n >= 1``.
            memory: what an earlier call returned (keys/values ``(b, heads, m, dim_head)``);
                only its newest ``mem_len`` steps are used.
            return_memory: also return the memory after ``x``.
            context: ``(b, s, dim)`` encoded context (models with ``cross_attend=True``).
            context_mask: ``(b, s)`` boolean, ``True`` for context positions to attend to;
                what the other positions of ``context`` hold (even NaN) has no effect.
            detach_memory: return the memory cut from the graph (default); ``False`` keeps
                it differentiable, for backpropagation through several calls.

        Returns:
            logits ``(b, n, num_tokens)``, and with ``return_memory`` a
            `FeedbackMemory` of the last ``min(mem_len, m + n)`` steps.
        """
        check_tokens(self, "x", x, 2)
        detach = check_bool("detach_memory", detach_memory)
        h = self.token_emb(x)
        prefix = check_memory(self, memory, x.shape[0], h)
        cross = prepare_context(self, context, context_mask, x.shape[0], h)
        if self.use_fast_path:
            out, keys, values = _window_loop.run(self, h, prefix, cross, detach)
        else:
            context_kv, mask = (None, None) if cross is None else cross
            out, keys, values = feedback_forward(self, h, prefix, context_kv, mask)
            if detach:
                keys, values = keys.detach(), values.detach()
        logits = self.to_logits(out)
        if not return_memory:
            return logits
        return logits, FeedbackMemory(keys, values, self.signature)

    # ---------------------------------------------------------------- generation

    def prefill(
        self,
        tokens: Tensor,
        *,
        memory: FeedbackMemory | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, FeedbackState]:
        """Consume a prompt and return the logits of its last position and a decoding state.

        ``tokens`` ``(b, t)``; returns the logits ``(b, num_tokens)`` and a `FeedbackState`
        for `step` (the ``attention_core.generation.StepModel`` protocol).

        The prompt runs in windows of ``seq_len`` tokens as in `forward` (the logits are
        those of `forward` on the same tokens), without gradients; its last ``t % seq_len``
        tokens start the window that `step` continues. ``context``/``context_mask`` are
        projected once and kept in the state.
        """
        from .generation import prefill

        return prefill(self, tokens, memory, context, context_mask)

    def step(self, tokens: Tensor, state: FeedbackState) -> tuple[Tensor, FeedbackState]:
        """Consume one token per row and return the logits of the next position.

        ``tokens`` ``(b,)`` come after ``state`` (which is updated in place and returned);
        returns the logits ``(b, num_tokens)`` and the state, equal to those of `forward` at
        the same position: with ``seq_len > 1`` a step runs the window so far (at most
        ``seq_len`` rows) and writes its memory when the window is full. Apart from the
        attention products over the memory, a step costs the same whatever the memory's
        fill (nothing is copied or re-stacked)."""
        from .generation import step

        return step(self, tokens, state)

    def generate(self, prompt: Tensor, max_new_tokens: int, **kwargs: Any) -> Tensor:
        """Sample up to ``max_new_tokens`` tokens after a prompt.

        ``attention_core.generation.generate`` on this model: returns the prompt ``(b, t)``
        followed by the sampled tokens. Keyword arguments: ``memory``,
        ``context``, ``context_mask`` (passed to `prefill`) and the sampling options
        ``temperature``, ``top_k``, ``top_p``, ``eos_token``, ``generator``."""
        from .generation import generate

        return generate(self, prompt, max_new_tokens, **kwargs)

    def stream(self, prompt: Tensor, max_new_tokens: int, **kwargs: Any) -> Iterator[Tensor]:
        """Yield up to ``max_new_tokens`` sampled tokens ``(b,)`` one at a time after a prompt.

        ``attention_core.generation.stream`` on this model, after the prompt ``(b, t)``; each
        token costs what the memory's fill adds through the attention products only.
        Keyword arguments as `generate`."""
        from .generation import stream

        return stream(self, prompt, max_new_tokens, **kwargs)
