"""The Feedback Transformer (Fan et al. 2021, "Addressing Some Limitations of Transformers
with Feedback Memory", arXiv 2002.09402).

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

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attention_core._checks import check_positive_int, check_tensor, check_token_ids
from attention_core.nn import T5RelativePositionBias

from . import kernel
from .attention import MemorySlice, window_bias
from .layers import FeedbackLayer, LinearFn
from .linear import StepLinear
from .memory import FeedbackMemory, KVStore, memory_source

__all__ = ["FeedbackTransformer"]

Cross = tuple[list[tuple[Tensor, Tensor]], Tensor | None]


def _check_probability(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a float in [0, 1); got {value!r}")
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


class FeedbackTransformer(nn.Module):
    """Feedback Transformer language model.

    The input is processed in windows of ``seq_len`` tokens. ``seq_len=1`` is the paper's
    exact model: each token's layers see the memory of all earlier tokens. With
    ``seq_len > 1`` (faster: fewer sequential steps) a window's tokens see the memory of the
    earlier windows plus, within the window, the earlier tokens' states at the same layer
    instead of their (not yet computed) memory: an approximation, which token-by-token
    generation (:meth:`step`) does not make.

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

    Without gradients, a float32 CPU forward runs its window loop in one compiled call
    (``feedback_transformer.kernel``), equal to the module path within float32 rounding; set
    ``use_kernel = False`` on a model (or the class) to always take the module path.

    Example:
        >>> model = FeedbackTransformer(num_tokens=100, dim=32, depth=2, seq_len=2,
        ...                             mem_len=8, dim_head=8, heads=2)
        >>> logits, memory = model(torch.randint(0, 100, (2, 5)), return_memory=True)
        >>> logits.shape, memory.keys.shape
        (torch.Size([2, 5, 100]), torch.Size([2, 2, 5, 8]))
    """

    use_kernel: bool = True

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
        attn_dropout = _check_probability("attn_dropout", attn_dropout)
        ff_dropout = _check_probability("ff_dropout", ff_dropout)
        self.keep_last_hidden = _check_bool("keep_last_hidden", keep_last_hidden)
        self.cross_attend = _check_bool("cross_attend", cross_attend)
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
        self.layers = nn.ModuleList(
            FeedbackLayer(dim, heads, dim_head, attn_dropout, ff_dropout, ff_mult, cross_attend)
            for _ in range(depth)
        )
        # weights of the embedding and the depth layer outputs in the memory (zeros: the
        # uniform mix, as in the paper's code)
        mixed = not keep_last_hidden and mem_len > 0  # no memory, nothing to mix
        self.layer_weight = nn.Parameter(torch.zeros(depth + 1)) if mixed else None
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens))

    # ---------------------------------------------------------------- checks

    @property
    def signature(self) -> tuple[int, int, int, int]:
        """``(dim, depth, heads, dim_head)``: what a memory must come from."""
        return (self.dim, self.depth, self.heads, self.dim_head)

    def _check_tokens(self, name: str, x, dim: int) -> None:
        check_tensor(name, x, dim=dim, integer=True)
        if dim == 2 and x.shape[1] < 1:
            raise ValueError(f"{name} must have shape (b, n) with n >= 1; got {tuple(x.shape)}")
        check_token_ids(name, x, self.num_tokens)

    def _check_memory(self, memory, batch: int, like: Tensor) -> FeedbackMemory | None:
        if memory is None:
            return None
        if not isinstance(memory, (tuple, list)) or len(memory) != 2:
            raise TypeError(
                "memory must be a FeedbackMemory or a (keys, values) tuple; "
                f"got {type(memory).__name__}"
                + (f" of length {len(memory)}" if isinstance(memory, (tuple, list)) else "")
            )
        keys, values = memory
        source = memory_source(memory)
        if source is not None and source != self.signature:
            raise ValueError(
                "memory comes from a model with (dim, depth, heads, dim_head) = "
                f"{tuple(source)}; this model has {self.signature}"
            )
        for name, t in (("memory.keys", keys), ("memory.values", values)):
            check_tensor(name, t, dim=4, dtype=like.dtype, device=like.device)
            if t.shape[:2] != (batch, self.heads) or t.shape[3] != self.dim_head:
                raise ValueError(
                    f"{name} must have shape (b, heads, m, dim_head) = "
                    f"({batch}, {self.heads}, m, {self.dim_head}); got {tuple(t.shape)}"
                )
        if keys.shape != values.shape:
            raise ValueError(
                "memory.keys and memory.values must have the same shape; got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        keep = min(self.mem_len, keys.shape[2])  # a longer memory keeps its newest steps
        if not keep:
            return None
        return FeedbackMemory(keys[:, :, -keep:], values[:, :, -keep:], self.signature)

    def _prepare_cross(self, context, context_mask, batch: int, like: Tensor) -> Cross | None:
        """Context keys/values per layer, projected once (masked positions zeroed first), and
        the visibility mask."""
        if not self.cross_attend:
            if context is not None or context_mask is not None:
                raise ValueError(
                    "context and context_mask need a model built with cross_attend=True"
                )
            return None
        if context is None:
            raise ValueError("context is required: the model was built with cross_attend=True")
        check_tensor("context", context, dim=3, dtype=like.dtype, device=like.device)
        if context.shape[0] != batch or context.shape[2] != self.dim or context.shape[1] < 1:
            raise ValueError(
                f"context must have shape (b, s, dim) = ({batch}, s >= 1, {self.dim}); "
                f"got {tuple(context.shape)}"
            )
        mask = None
        if context_mask is not None:
            check_tensor("context_mask", context_mask, dim=2, dtype=torch.bool)
            if context_mask.shape != context.shape[:2]:
                raise ValueError(
                    f"context_mask must have shape (b, s) = {tuple(context.shape[:2])}; "
                    f"got {tuple(context_mask.shape)}"
                )
            context_mask = context_mask.to(like.device)
            # masked positions become zero keys and values (a select, not a product: 0 * nan
            # is nan), so whatever they held reaches no output nor gradient on either path
            context = torch.where(context_mask[..., None], context, 0.0)
            mask = rearrange(context_mask, "b s -> b 1 1 s")
        return [layer.cross.project(context) for layer in self.layers], mask

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        x: Tensor,
        memory: FeedbackMemory | tuple[Tensor, Tensor] | None = None,
        return_memory: bool = False,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        detach_memory: bool = True,
    ) -> Tensor | tuple[Tensor, FeedbackMemory]:
        """Logits of every position of ``x``, continuing after ``memory``.

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
            :class:`FeedbackMemory` of the last ``min(mem_len, m + n)`` steps.
        """
        self._check_tokens("x", x, 2)
        h = self.token_emb(x)
        prefix = self._check_memory(memory, x.shape[0], h)
        cross = self._prepare_cross(context, context_mask, x.shape[0], h)
        out, new_memory = self._run(h, prefix, cross, _check_bool("detach_memory", detach_memory))
        logits = self.to_logits(out)
        return (logits, new_memory) if return_memory else logits

    def _query_weights(self, fused: bool) -> list[Tensor]:
        """Per layer: the query weight scaled by ``dim_head ** -0.5``, with the shared
        key/value weight stacked below it when ``fused`` (one projection per window)."""
        scale = self.dim_head**-0.5
        if not fused:
            return [layer.to_q.weight * scale for layer in self.layers]
        return [torch.cat((layer.to_q.weight * scale, self.to_kv.weight)) for layer in self.layers]

    def _mix(self) -> Tensor | None:
        return None if self.layer_weight is None else self.layer_weight.softmax(dim=-1)

    def _window(
        self,
        x: Tensor,
        memory: MemorySlice,
        bias: Tensor,
        first_empty: bool,
        weights: list[Tensor],
        cross: Cross | None,
        mix: Tensor | None,
        linear: LinearFn = F.linear,
        proj0: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Run a window of ``w`` steps, ``x`` ``(b w, dim)``, through every layer
        (``linear``: ``F.linear`` or the call's ``StepLinear``; ``proj0``: the first layer's
        projection of ``x`` if already computed).

        Returns the last layer's output ``(b w, dim)`` and the window's memory keys and
        values ``(b, h, w, d)`` (``None`` when ``mem_len == 0``).
        """
        states = [x]
        for i, layer in enumerate(self.layers):
            layer_cross = None if cross is None else (*cross[0][i], cross[1])
            proj = proj0 if i == 0 else None
            x = layer(
                x, self.attn_norm, weights[i], memory, bias, first_empty, layer_cross, linear, proj
            )
            states.append(x)
        if not self.mem_len:
            return x, None, None
        merged = x if mix is None else torch.stack(states, dim=-1) @ mix  # (b w) dim l, l
        norm = self.attn_norm
        merged = F.layer_norm(merged, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        kv = linear(merged, self.to_kv.weight, None)
        w = bias.shape[1]
        # "(b w) (two h d) -> two b h w d"
        kv = kv.view(-1, w, 2, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        return x, kv[0], kv[1]

    def _run(
        self,
        h: Tensor,
        prefix: FeedbackMemory | None,
        cross: Cross | None,
        detach: bool,
        window: int | None = None,
    ) -> tuple[Tensor, FeedbackMemory]:
        """Process the embedded tokens ``h`` ``(b, n, dim)`` in windows of ``window``
        (default ``seq_len``) steps; returns the last layer's outputs ``(b, n, dim)`` and
        the memory."""
        b, n, dim = h.shape
        W, M = window or self.seq_len, self.mem_len
        m0 = 0 if prefix is None else prefix.keys.shape[2]
        # every step's keys and values, written once; with mem_len == 0 just the scratch
        # slots of the window's own keys
        store = KVStore(h, b, self.heads, m0 + n if M else W, self.dim_head)
        link = store.write(prefix.keys, prefix.values) if m0 else None
        # bias of queries 0 .. W-1 over memory slots -M .. -1 and window keys 0 .. W-1
        positions = torch.arange(-M, W, device=h.device)
        bias_full = self.rel_pos(positions[M:], positions)
        weights = self._query_weights(fused=W > 1 and n > 1)
        linear = StepLinear() if torch.is_grad_enabled() else F.linear
        # the first layer's input is the embedding, known for every step: its pre-norm and
        # projection are one product over all b * n rows instead of one per window
        norm = self.attn_norm
        a = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        proj_all = linear(a.reshape(b * n, dim), weights[0], None).view(b, n, weights[0].shape[0])
        if kernel.available(self, h):  # the whole window loop in one compiled call
            out = kernel.run(self, h, proj_all, bias_full, store, m0, W, weights, cross)
        else:
            out, link = self._run_windows(
                h, proj_all, bias_full, store, link, m0, W, weights, cross, linear
            )

        if not M:
            empty = h.new_zeros(b, self.heads, 0, self.dim_head)
            return out, FeedbackMemory(empty, empty.clone(), self.signature)
        hi = m0 + n
        keys, values = store.read(max(0, hi - M), hi, link, detach)
        return out, FeedbackMemory(keys, values, self.signature)

    def _run_windows(
        self,
        h: Tensor,
        proj_all: Tensor,
        bias_full: Tensor,
        store: KVStore,
        link: Tensor | None,
        m0: int,
        W: int,
        weights: list[Tensor],
        cross: Cross | None,
        linear: LinearFn,
    ) -> tuple[Tensor, Tensor | None]:
        """The module path of :meth:`_run`: the windows one after another through
        :meth:`_window`, each writing its memory to ``store``. Returns the last layer's
        outputs ``(b, n, dim)`` and the autograd link of the last write."""
        b, n, dim = h.shape
        M = self.mem_len
        q_weights = [wt[: self.heads * self.dim_head] for wt in weights]
        mix = self._mix()
        biases: dict[tuple[int, int], tuple[Tensor, bool]] = {}  # one view per shape
        # split once: one backward node for all windows (slicing per window would zero-fill
        # a gradient of the whole input per window in the backward pass)
        h_windows, proj_windows = h.split(W, dim=1), proj_all.split(W, dim=1)
        outputs = []
        for index, start in enumerate(range(0, n, W)):
            w = min(W, n - start)
            x = h_windows[index].reshape(b * w, dim)
            hi = m0 + start if M else 0
            lo = max(0, hi - M)
            if (w, hi - lo) not in biases:
                biases[w, hi - lo] = window_bias(bias_full, hi - lo, w, W)
            bias, first_empty = biases[w, hi - lo]
            memory = MemorySlice(store, lo, hi, link)
            layer_weights = weights if w > 1 else q_weights
            o = layer_weights[0].shape[0]  # "b w o -> (b w) o" (a copy when b > 1)
            proj0 = proj_windows[index][:, :, :o].reshape(b * w, o)
            x, k, v = self._window(
                x, memory, bias, first_empty, layer_weights, cross, mix, linear, proj0
            )
            outputs.append(x.view(b, w, dim))
            if M:
                link = store.write(k, v)
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), link

    # ---------------------------------------------------------------- generation

    def prefill(
        self,
        tokens: Tensor,
        *,
        memory: FeedbackMemory | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ):
        """Consume a prompt ``tokens`` ``(b, t)``; returns the logits ``(b, num_tokens)`` of
        its last position and a :class:`~feedback_transformer.FeedbackState` for
        :meth:`step` (the ``attention_core.generation.StepModel`` protocol).

        The prompt is consumed one step at a time like the generated tokens (the paper's
        exact model, whatever ``seq_len`` is: the logits are those of :meth:`forward` of a
        ``seq_len=1`` model with the same weights), without gradients;
        ``context``/``context_mask`` are projected once and kept in the state.
        """
        from .generation import prefill

        return prefill(self, tokens, memory, context, context_mask)

    def step(self, tokens: Tensor, state):
        """Consume one token per row, ``tokens`` ``(b,)``, after ``state`` (which is updated
        in place and returned); returns the logits ``(b, num_tokens)`` of the next position
        and the state. Apart from the attention products over the memory, a step costs the same
        whatever the memory's fill (nothing is copied or re-stacked), and equals
        :meth:`forward` of a ``seq_len=1`` model."""
        from .generation import step

        return step(self, tokens, state)

    def generate(self, prompt: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """``attention_core.generation.generate`` on this model: the prompt ``(b, t)``
        followed by up to ``max_new_tokens`` sampled tokens. Keyword arguments: ``memory``,
        ``context``, ``context_mask`` (passed to :meth:`prefill`) and the sampling options
        ``temperature``, ``top_k``, ``top_p``, ``eos_token``, ``generator``."""
        from .generation import generate

        return generate(self, prompt, max_new_tokens, **kwargs)

    def stream(self, prompt: Tensor, max_new_tokens: int, **kwargs):
        """``attention_core.generation.stream`` on this model: yields up to
        ``max_new_tokens`` sampled tokens ``(b,)`` one at a time after the prompt ``(b, t)``,
        each at a cost that depends on the memory's fill only through the attention products.
        Keyword arguments as
        :meth:`generate`."""
        from .generation import stream

        return stream(self, prompt, max_new_tokens, **kwargs)
