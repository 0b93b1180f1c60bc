"""Inference speed-up of a recurrent decoder's step: all its layers in one call.

The decoder's counterpart of `_step_chain`: where every layer of a
`RecurrentTransformerDecoder` computes what its sublayer ops compute (`_fused_step.fusible`),
its self attention is one the encoder's chain runs (causal linear attention with the default
feature map, or softmax attention over a `KVCache`) and its cross attention is softmax
attention over a memory already projected (a `MemoryState`, from the first step), the whole
step (per layer the self-attention step, its output projection with residual and norm, the
cross attention's query product, the attention over the memory, its output projection with
residual and norm, the feed-forward sublayer) runs as one `attention_core.step_chain.StepChain`
call. A padded memory's mask becomes a per-batch bias of the chain's attention (``-inf`` at
the padded positions; a batch element without memory gets zeros, as the layers give). The
first step, which projects the memory, other attentions, hooks, listeners, autograd, dropout
and ``torch.compile`` take the layer-by-layer path. Tests prove the paths equal in float64.

The chain holds the memory's keys and values (and the self-attention caches' buffers), so it is
kept with the states: on the first cache's claim when the self attention is softmax attention
(as the encoder's chain), else with the first layer's `MemoryState` in a weakly keyed table.
"""

from __future__ import annotations

from math import sqrt
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from attention_core.step_chain import StepChain, WeightChangedError
from attention_core.utils import forward_hooks_registered

from ._checks import check_output
from ._fused_step import _ACTIVATION_NAMES, fusible
from ._step_chain import (
    Entry,
    SelfStates,
    add_self_attention,
    cache_positions,
    entry_fits,
    gather_parts,
    plain_attention,
    self_attention_parts,
    step_may_chain,
)
from .attention.cross_attention.attention_layer import RecurrentCrossAttentionLayer
from .attention.cross_attention.full_attention import RecurrentCrossFullAttention
from .state import DecoderLayerState, MemoryState, TransformerState

if TYPE_CHECKING:
    from .transformers import RecurrentTransformerDecoder

__all__ = ["chained_decoder_step"]

_TENSORS, _OPTIONS = 22, 9  # per layer, see _layer_parts
_CHAINS: WeakKeyDictionary[MemoryState, Entry] = WeakKeyDictionary()


def _layer_parts(layer: Any, layer_type: Any) -> tuple[tuple, tuple] | None:
    """The tensors and options of a decoder layer's step in a chain, or ``None`` when the
    chain would not compute what the layer's call does (see the module docstring)."""
    if type(layer) is not layer_type or forward_hooks_registered(layer):
        return None
    modules = layer._modules
    attention, cross = modules["self_attention"], modules["cross_attention"]
    norm1, norm2, norm3 = modules["norm1"], modules["norm2"], modules["norm3"]
    if not fusible(layer, (norm1, norm2, norm3), (attention, cross)):
        return None
    found = self_attention_parts(attention)
    if found is None:
        return None
    if type(cross) is not RecurrentCrossAttentionLayer or cross.event_dispatcher.has_listeners:
        return None
    inner, query = cross._modules["inner_attention"], cross._modules["query_projection"]
    if type(inner) is not RecurrentCrossFullAttention or not plain_attention(inner):
        return None
    heads = cross.n_heads
    if type(query) is not nn.Linear or query.weight.shape[0] % heads:
        return None
    scale = inner.softmax_temp or 1.0 / sqrt(query.weight.shape[0] // heads)
    # `fusible` took the norms, the output and feed-forward products of exactly their types
    out1, out2 = attention.out_projection, cross.out_projection
    p1, p2 = modules["linear1"], modules["linear2"]
    tensors = (
        *found[0], out1.weight, out1.bias, norm1.weight, norm1.bias, query.weight, query.bias,
        out2.weight, out2.bias, norm2.weight, norm2.bias, p1.weight, p1.bias, p2.weight,
        p2.bias, norm3.weight, norm3.bias,
    )  # fmt: skip
    options = (
        *found[1], norm1.eps, heads, scale, norm2.eps, norm3.eps,
        _ACTIVATION_NAMES[layer.activation],
    )  # fmt: skip
    return tensors, options


def _make_chain(
    width: int,
    tensors: tuple,
    options: tuple,
    layers: int,
    held: tuple,
    caches: int,
    biases: tuple,
) -> StepChain:
    """The chain of ``layers`` decoder layers: ``held`` holds the self-attention caches' key
    and value buffers (the first ``caches``) and then each layer's memory keys and values;
    ``biases`` each layer's memory bias (`_padding_bias`) or ``None``. A call passes the
    positions of `_step_chain.cache_positions`, then ``[0, S]``."""
    chain = StepChain(width)
    x = chain.input
    positions = cache_positions(chain, held[:caches])
    buffers, memories = iter(held[:caches]), iter(held[caches : caches + 2 * layers])
    S = held[caches].shape[2]
    start, end = chain.position(0), chain.position(S)
    for i in range(layers):
        t, o = tensors[_TENSORS * i : _TENSORS * (i + 1)], options[_OPTIONS * i :]
        attended = add_self_attention(chain, x, t[:6], o[:3], buffers, positions)
        x = chain.linear(
            attended, t[6], t[7], residual=x, norm_weight=t[8], norm_bias=t[9], norm=True,
            eps=o[3],
        )  # fmt: skip
        keys, values = next(memories), next(memories)
        q = chain.linear(x, t[10], t[11])
        attended = chain.cache_attention(q, keys, values, start, end, biases[i], scale=o[5])
        x = chain.linear(
            attended, t[12], t[13], residual=x, norm_weight=t[14], norm_bias=t[15], norm=True,
            eps=o[6],
        )  # fmt: skip
        x = chain.feed_forward(
            x, t[16], t[17], t[18], t[19], t[20], t[21], activation=o[8], eps=o[7]
        )
    return chain


def _memory(state: Any, x: Tensor, tensors: tuple, options: tuple) -> MemoryState | None:
    """A cross attention's state the chain reads: a `MemoryState` whose keys ``(N, H, S, E)``
    and values ``(N, H, S, D)`` are contiguous tensors of ``x``'s dtype and device, and whose
    mask, if any, is an ``(N, S)`` bool tensor on that device."""
    if type(state) is not MemoryState:
        return None
    keys, values, mask = state.keys, state.values, state.key_mask
    heads = options[4]
    E, D = tensors[10].shape[0] // heads, tensors[12].shape[1] // heads
    for t, width in ((keys, E), (values, D)):
        if not (
            type(t) is Tensor
            and t.dim() == 4
            and t.shape[:2] == (x.shape[0], heads)
            and t.shape[3] == width
            and t.shape[2] > 0
            and t.dtype == x.dtype
            and t.device == x.device
            and t.is_contiguous()
        ):
            return None
    S = keys.shape[2]
    if values.shape[2] != S:
        return None
    if mask is not None and not (
        type(mask) is Tensor
        and mask.dtype == torch.bool
        and mask.shape == (x.shape[0], S)
        and mask.device == x.device
    ):
        return None
    return state


def chained_decoder_step(
    model: RecurrentTransformerDecoder, x: Tensor, states: list, layer_type: type
) -> tuple[Tensor, TransformerState] | None:
    """``model``'s step of ``x`` ``(N, E)`` with ``states`` (one per layer) as one chain
    call, or ``None`` when a layer would not take it (see the module docstring).

    The model has checked ``x``'s shape; its layers must be of exactly ``layer_type``
    (`RecurrentTransformerDecoderLayer`, passed in: this module is imported by the one that
    defines it)."""
    if not step_may_chain(model, x):
        return None
    layers = model.layers
    gathered = gather_parts([_layer_parts(layer, layer_type) for layer in layers])
    if gathered is None:
        return None
    tensors, options = gathered
    if any(x.dtype != t.dtype for t in tensors[16::_TENSORS]):  # each layer's linear1 weight
        return None  # the layers' own check names the dtype
    selfs, memories = SelfStates(x), []
    for i, state in enumerate(states):
        if type(state) is not DecoderLayerState:
            return None
        layer_tensors, layer_options = tensors[_TENSORS * i :], options[_OPTIONS * i :]
        memory = _memory(state.cross_attention, x, layer_tensors, layer_options)
        if memory is None or not selfs.add(state.self_attention, layer_tensors, layer_options):
            return None
        memories.append(memory)
    length = selfs.length()
    S = memories[0].keys.shape[2]
    if length is None or any(m.keys.shape[2] != S for m in memories):
        return None
    buffers = selfs.buffers
    # the masks are held for the kept entry's identity check only (their biases are its own)
    held = (
        *buffers,
        *(t for m in memories for t in (m.keys, m.values)),
        *(m.key_mask for m in memories),
    )
    # kept with the self-attention caches when there are some (on the first one's claim, as
    # the encoder's chain), else with the memory: it holds their tensors
    caches = selfs.caches
    kept = caches[0]._claim.chain if caches else _CHAINS.get(memories[0])  # type: ignore[union-attr]
    if kept is not None and entry_fits(kept, tensors, options, held, x):
        entry: Entry = kept
    else:
        entry = _new_entry(x.shape[1], tensors, options, len(layers), held, len(buffers))
    positions = [*selfs.positions(length), 0, S]
    try:
        y, new = entry[3](x, selfs.pairs, positions=positions)
    except WeightChangedError:  # a parameter given another shape or dtype: a new chain
        entry = _new_entry(x.shape[1], tensors, options, len(layers), held, len(buffers))
        y, new = entry[3](x, selfs.pairs, positions=positions)
    if caches:
        caches[0]._claim.chain = entry  # type: ignore[union-attr]
    else:
        _CHAINS[memories[0]] = entry
    if model.norm is not None:
        y = model.norm(y)
    check_output(y, type(model).__name__)
    kinds = [options[_OPTIONS * i] for i in range(len(layers))]
    new_states = selfs.new_states(kinds, new, length)
    return y, TransformerState(tuple(DecoderLayerState(s, m) for s, m in zip(new_states, memories)))


def _padding_bias(mask: Tensor | None, heads: int, dtype: torch.dtype) -> Tensor | None:
    """``(N, H, 1, S)``: ``0`` at the memory positions ``mask`` `(N, S)` keeps, ``-inf`` at the
    padded ones; ``None`` without a mask."""
    if mask is None:
        return None
    N, S = mask.shape
    bias = torch.zeros(N, heads, 1, S, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask[:, None, None, :], float("-inf"))


def _new_entry(
    width: int, tensors: tuple, options: tuple, layers: int, held: tuple, caches: int
) -> Entry:
    masks = held[caches + 2 * layers :]
    biases = tuple(
        _padding_bias(mask, options[_OPTIONS * i + 4], held[caches].dtype)
        for i, mask in enumerate(masks)
    )
    chain = _make_chain(width, tensors, options, layers, held, caches, biases)
    return tensors, options, held, chain
