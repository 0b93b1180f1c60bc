"""Inference speed-up: a window through every layer in few torch ops, without autograd.

The model's steps run one after another on a few rows each (``b * w``), so the number of
ops dispatched per step, and the Python around them, is part of the cost. This is
`_window_loop.window` for calls that record no gradients (and apply no dropout):

* the parameters are gathered once per call (`_inference_weights.InferenceWeights`), not
  looked up on the modules per window; the attention's dense products read their
  ``(out, in)`` weights through transposed views (the faster layout at a few rows);
* the windows of a call run under ``torch.inference_mode`` (no version counters or view
  tracking per op: 10-15% less time per window in ops and Python at a few rows);
* keys and values live in one joint buffer ``(2, b h, c, d)`` whose views (`KVViews`) are
  made once per call; a window's slots after the memory take, at each layer, the window's
  own keys and values (one copy of a view of the projection) and at the end the window's
  memory (one copy), so one product covers memory and window;
* the attention over the memory and the window is one call of
  `attention_core.cache_attention.PreparedCacheAttention` (scores, position bias, softmax
  and weighted sum in one pass per batch element and head, output with the heads joined),
  the pre-norm GEGLU feed-forward block with its residual one call of
  `attention_core.residual_step.PreparedFeedForward`. Both check their fixed operands once
  per call, not at every window: inside the model those checks cost about a tenth of a
  window, and with them composed torch ops were as fast at one or two rows. The output
  projection with its residual is ``addmm`` and an add (measured faster than the core's
  ``residual_linear`` at a few rows). The position bias is read in place: its table is
  made contiguous once per call;
* the memory of a window is the weighted sum of the layer states as one stack and product.

Einstein notation: ``b`` batch, ``w`` steps of the window, ``h`` heads, ``j`` keys (memory
slots, then the window), ``d`` head feature, ``l`` layer states.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attention_core.cache_attention import PreparedCacheAttention

from ._inference_weights import InferenceWeights, query_weights
from ._window_attention import window_bias
from ._window_chain import WindowChains, chain_serves

if TYPE_CHECKING:
    from ._window_loop import Cross
    from .model import FeedbackTransformer

__all__ = ["KVViews", "WindowBiases", "run", "window"]

# The output projection stays a torch product: the core's `residual_linear` measured slower
# there (1 thread, 4 rows: 35 against 17 us).


class WindowBiases:
    """The position bias of a window of ``w`` queries over ``m`` memory slots, as a view.

    `_window_attention.window_bias` masks the window's keys per call; here the table of the
    longest memory is masked once and every window with memory reads a slice of it (a
    window without memory, the first of a call, gets its own).

    Arguments:
        table: ``(h, W, M + W)``, queries ``0 .. W - 1`` over keys at ``-M .. W - 1``.
        window: ``W``, the most steps of a window.
    """

    __slots__ = ("_empty", "_masked", "_table", "_window")

    def __init__(self, table: Tensor, window: int):
        self._table, self._window = table, window
        memory = table.shape[2] - window
        # with one step per window no query reads a window key: the table needs no mask
        masked = memory and window > 1
        # contiguous rows of keys: the attention reads them in place, the table of
        # rel_pos has the heads innermost
        self._masked = (
            window_bias(table, memory, window, window)[0] if masked else table.contiguous()
        )
        self._empty: dict[int, tuple[Tensor, bool]] = {}

    @property
    def table(self) -> Tensor:
        """``(h, W, M + W)``: the table with the window's keys masked (``W > 1``), contiguous."""
        return self._masked

    def get(self, m: int, w: int) -> tuple[Tensor, bool]:
        """The bias ``(h, w, m + w)`` (``(h, 1, m)`` when ``w == 1``) and whether the first
        query sees no key, as `_window_attention.window_bias` returns them."""
        if not m:
            if w not in self._empty:
                with torch.inference_mode(False):  # kept: an ordinary tensor, as above
                    self._empty[w] = window_bias(self._table, 0, w, self._window)
            return self._empty[w]
        M = self._masked.shape[2] - self._window
        return self._masked[:, :w, M - m : M + (w if w > 1 else 0)], False


class KVViews:
    """Views of a key/value buffer ``(2, b h, c, d)`` that every window of a call reads.

    Attributes:
        slots: ``(2, b, h, c, d)``, keys then values.
        keys: ``(b, h, c, d)`` and ``values`` ``(b, h, c, d)``, the attention's operands.
        attention: the attention over them
            (`attention_core.cache_attention.PreparedCacheAttention`, unscaled: the queries
            are scaled by the weights), checked once per call instead of at every window.
    """

    __slots__ = ("_projections", "attention", "keys", "slots", "values")

    def __init__(self, buffer: Tensor, batch: int, heads: int):
        c, d = buffer.shape[2:]
        self.slots = buffer.view(2, batch, heads, c, d)  # "two (b h) c d -> two b h c d"
        self.keys, self.values = self.slots.unbind(0)
        self.attention = PreparedCacheAttention(self.keys, self.values, scale=1.0)
        self._projections: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor | None]] = {}

    def projection(self, b: int, w: int, weight_t: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Return a reusable projection buffer and its views for windows of ``w`` steps.

        The buffer ``(b w, o)`` takes the product with ``weight_t`` ``(dim, o)``; its views
        are the queries ``(b, w, h, d)`` and (``w > 1``) the keys and values
        ``(b, w, 2, h, d)``, made once per window shape."""
        key = (b, w, weight_t.shape[1])
        if key not in self._projections:
            h, d = self.slots.shape[2], self.slots.shape[4]
            # an ordinary tensor even when made under inference mode: a decoding state keeps
            # it, and a later step outside inference mode (torch.compile) writes it
            with torch.inference_mode(False):
                out = weight_t.new_empty(b * w, weight_t.shape[1])
            own = out[:, h * d :].view(b, w, 2, h, d) if w > 1 else None
            self._projections[key] = (out, out[:, : h * d].view(b, w, h, d), own)
        return self._projections[key]


def window(
    weights: InferenceWeights,
    x: Tensor,
    views: KVViews,
    slots: tuple[int, int],
    bias: Tensor,
    first_empty: bool,
    cross: Cross | None,
    proj0: Tensor | None = None,
    write_memory: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Run a window of ``w`` steps through every layer, without autograd.

    Arguments:
        weights: the call's `InferenceWeights` (stacked query weights when ``w > 1``).
        x: ``(b w, dim)`` the embeddings of the window's steps, rows in ``(b, w)`` order.
        views: the `KVViews` of the call's key/value buffer (made once per call or decoding
            state); the window's own keys and values go to the slots after the memory.
        slots: ``(lo, hi)``, the memory slots the window sees.
        bias: ``(h, w, j)`` from `_window_attention.window_bias`.
        first_empty: the first query sees no key (its attention output is zero).
        cross: the context's keys and values per layer and the mask, or ``None``.
        proj0: the first layer's projection ``(b w, o)`` of ``x`` if already computed.
        write_memory: also write the window's memory keys and values to its slots
            ``hi .. hi + w - 1`` of the buffer.

    Returns:
        The last layer's output ``(b w, dim)`` and the window's memory keys and values
        ``(b w, 2 h d)`` (``None`` when the model has no memory, ``mem_len == 0``).
    """
    h, d = weights.heads, weights.dim_head
    w = bias.shape[1]
    rows = x.shape[0]
    b = rows // w
    lo, hi = slots
    end = hi + w if w > 1 else hi
    # the window's slots after the memory, as "two b h w d -> b w two h d": its keys and
    # values at each layer (w > 1), then its memory (``write_memory``)
    own = views.slots[:, :, :, hi : hi + w].permute(1, 3, 0, 2, 4)
    hd = h * d
    empty = w == 1 and lo == hi  # a single step without memory sees nothing
    shape, norm_weight, norm_bias, eps = weights.norm
    # one projection buffer for the layers after the first, with its views made once
    buffer_proj, queries, own_keys = views.projection(b, w, weights.layers[0].projection_t)
    states = [x]
    for i, p in enumerate(weights.layers):
        if i or proj0 is None:
            a = torch.layer_norm(x, shape, norm_weight, norm_bias, eps)
            torch.mm(a, p.projection_t, out=buffer_proj)
            q, kw = queries, own_keys
        else:  # "(b w) ((one + two) h d) -> b w h d, b w two h d"
            q = proj0[:, :hd].view(b, w, h, d)
            kw = proj0[:, hd:].view(b, w, 2, h, d) if w > 1 else None
        if kw is not None:
            own.copy_(kw)
        if empty:
            out = q.new_zeros(rows, hd)
        else:  # "b w h d -> (b w) (h d)"
            out = views.attention(q, lo, end, bias).view(rows, hd)
        if first_empty:
            out.view(b, w, hd)[:, 0] = 0.0  # the first step of each batch element
        x = torch.addmm(p.out_bias, out, p.out_weight_t).add_(x)
        if p.cross is not None:
            if cross is None:
                raise ValueError("a layer with cross attention needs the context's keys and values")
            ck, cv = cross[0][i]
            x += p.cross(x.view(b, w, x.shape[1]), ck, cv, cross[1]).view(x.shape)
        x = p.feed_forward_step(x)  # the pre-norm GEGLU block with its residual
        states.append(x)
    if not weights.has_memory:
        return x, None
    merged = x
    if weights.mix is not None:  # "l, l (r e) -> (r e)": the states stacked contiguously
        merged = (weights.mix @ torch.stack(states).view(len(states), -1)).view(x.shape)
    kv = torch.mm(torch.layer_norm(merged, shape, norm_weight, norm_bias, eps), weights.kv_weight_t)
    if write_memory:  # "(b w) (two h d) -> b w two h d"
        own.copy_(kv.view(b, w, 2, h, d))
    return x, kv


def run(
    model: FeedbackTransformer,
    h: Tensor,
    prefix: tuple[Tensor, Tensor] | None,
    cross: Cross | None,
    seq_len: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """`_window_loop.run` without autograd: the last layer's outputs ``(b, n, dim)`` of the
    embedded tokens ``h`` ``(b, n, dim)`` after the memory ``prefix`` (keys, values
    ``(b, h, m, d)``, ``m <= mem_len``, or ``None``), in windows of ``seq_len`` steps, and
    the keys and values ``(b, h, m', d)`` of the last ``m' = min(mem_len, m + n)`` steps.

    The windows run under ``torch.inference_mode`` (each op dispatches faster: no version
    counters, no view tracking; not while ``torch.compile`` traces the call); the results
    are joined outside it, so they are ordinary tensors that later calls may use with
    autograd."""
    # (a compiled call traces the ops; inference mode would only get in its way there)
    with nullcontext() if torch.compiler.is_compiling() else torch.inference_mode():
        outputs, shape, memory = _windows(model, h, prefix, cross, seq_len)
    b, n, dim = h.shape
    W = seq_len
    count = n // W
    pieces = []
    if count:  # "k (b w) e -> b (k w) e"
        stacked = torch.stack(outputs[:count]).view(count, b, W, dim)
        pieces.append(stacked.transpose(0, 1).reshape(b, count * W, dim))
    if n % W:
        pieces.append(outputs[-1].view(b, n % W, dim))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    if memory is None:
        empty = h.new_zeros(shape)
        return out, empty, empty.clone()
    keep = memory.clone()
    return out, keep[0], keep[1]


def _windows(
    model: FeedbackTransformer,
    h: Tensor,
    prefix: tuple[Tensor, Tensor] | None,
    cross: Cross | None,
    seq_len: int,
) -> tuple[list[Tensor], tuple[int, int, int, int], Tensor | None]:
    """Run the windows of `run` and return their outputs and the memory slots to keep.

    Returns each window's output ``(b w, dim)``, the shape ``(b, h, 0, d)`` of an empty
    memory, and the kept memory slots ``(2, b, h, m', d)`` (a view; ``None`` without
    memory).

    The full windows' rows are laid out window by window once (``(n / w, b w, dim)``), so
    that a window's input and its first layer's projection (one product over all tokens)
    are views, not copies."""
    b, n, dim = h.shape
    W, M, H, D = seq_len, model.mem_len, model.heads, model.dim_head
    m0 = 0 if prefix is None else prefix[0].shape[2]
    # every step's keys and values, written once; with mem_len == 0 only the scratch slots
    buffer = h.new_empty(2, b * H, m0 + n if M else W, D)
    views = KVViews(buffer, b, H)
    if prefix is not None and m0:
        views.keys[:, :, :m0].copy_(prefix[0])
        views.values[:, :, :m0].copy_(prefix[1])
    positions = torch.arange(-M, W, device=h.device)
    bias_full = model.rel_pos(positions[M:], positions)  # (h, W, M + W)
    full = InferenceWeights(model, query_weights(model, stacked=W > 1))
    single = full  # the queries-only weights of a one-step window (a tail of one step)
    if W > 1 and n % W == 1:
        single = InferenceWeights(model, query_weights(model, stacked=False))
    biases = WindowBiases(bias_full, W)
    count = n // W  # full windows; then a tail of n % W steps
    # "b (k w) e -> k (b w) e": each full window's rows contiguous
    steps = h[:, : count * W].reshape(b, count, W, dim).transpose(0, 1).reshape(count, b * W, dim)
    windows = list(steps.unbind(0))
    if n % W:  # "b w e -> (b w) e"
        windows.append(h[:, count * W :].reshape(b * (n % W), dim))
    starts = [m0 + index * W if M else 0 for index in range(len(windows))]
    if chain_serves(model, h, cross):
        chains = WindowChains(model, (single, full), views, biases.table)
        outputs = [chains(x, max(0, hi - M), hi) for x, hi in zip(windows, starts)]
    else:
        first = full.layers[0]  # its projection of every full window in one product
        proj_all = torch.layer_norm(steps, *full.norm) @ first.projection_t
        projections: list[Tensor | None] = [*proj_all.unbind(0), None][: len(windows)]
        outputs = []
        for index, (x, proj0, hi) in enumerate(zip(windows, projections, starts)):
            w = min(W, n - index * W)
            lo = max(0, hi - M)
            bias, first_empty = biases.get(hi - lo, w)
            weights = full if w > 1 else single
            x, _ = window(weights, x, views, (lo, hi), bias, first_empty, cross, proj0, True)
            outputs.append(x)
    if not M:
        return outputs, (b, H, 0, D), None
    return outputs, (b, H, 0, D), views.slots[:, :, :, max(0, m0 + n - M) : m0 + n]
