"""Inference speed-up of a recurrent encoder's step: all its layers in one call.

Where every layer of a `RecurrentTransformerEncoder` computes what its sublayer ops compute
(`_fused_step.fusible`: no autograd, dropout or hooks) and its attention is causal linear
attention with the default feature map or softmax attention over a `KVCache`, the whole step
(per layer the query, key and value products, the attention step, the output projection with
its residual and norm, the feed-forward sublayer) runs as one
`attention_core.step_chain.StepChain` call: the same formulas as the layers, without a call
from Python per op (in the 8-layer step of fast-transformers' recurrent example those calls
took longer than the dense products; the chain is about twice as fast as the layers at one
row and at ten). Softmax attention's step writes its key and value into the cache's buffers
in place, as `KVCache.append` does; a cache that cannot take it in place (full, shared with a
newer state, loaded from a file) is first copied into a larger one, as `KVCache.append` would.
Tests prove the paths equal in float64.

The chain is made once per model and kept in a weakly keyed table with the parameter objects
and options it was made for (a chain over `KVCache` buffers is kept with the buffers instead,
on their claim, so that it goes when the states go); it is made again when a parameter is
replaced, an option changes or a cache was reallocated. Its weights are the layers' parameters
themselves (the chain checks their layout at every call), so an in-place update of their values
is seen.
Anything the chain does not run (hooks, event listeners, autograd, dropout, other attentions
or states, subclasses that change a layer's call, ``torch.compile``) takes the layer-by-layer
path.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from math import sqrt
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from attention_core.feature_maps import is_elu_feature_map
from attention_core.step_chain import Position, Slot, StepChain, WeightChangedError
from attention_core.utils import forward_hooks_registered

from ._checks import check_output
from ._fused_step import _ACTIVATION_NAMES, _PROJECTIONS, fusible
from ._kv_cache import KVCache
from .attention.self_attention.attention_layer import RecurrentAttentionLayer
from .attention.self_attention.full_attention import RecurrentFullAttention
from .attention.self_attention.linear_attention import RecurrentLinearAttention
from .state import LinearState, TransformerState

if TYPE_CHECKING:
    from .transformers import RecurrentTransformerEncoder

__all__ = ["chained_step"]

_TENSORS, _OPTIONS = 16, 6  # per layer, see _layer_parts
_LINEAR, _FULL = "linear", "full"  # the attentions a chain runs
# the parameters, options and cache buffers a chain was made for, and the chain
Entry = tuple[tuple, tuple, tuple, StepChain]
_CHAINS: WeakKeyDictionary[nn.Module, Entry] = WeakKeyDictionary()  # chains without caches


def self_attention_parts(attention: Any) -> tuple[tuple, tuple] | None:
    """The query, key and value weights and biases of a recurrent self-attention layer and
    its options ``(kind, heads, number)`` (``number``: linear attention's eps, softmax
    attention's scale), or ``None`` when a chain would not compute what its call does: the
    attention layer, its inner attention and its projections of exactly their library types
    (a subclass, or a parametrization, may compute something else from the same parameters),
    no listeners, hooks or dropout."""
    if type(attention) is not RecurrentAttentionLayer or attention.event_dispatcher.has_listeners:
        return None
    inner = attention._modules["inner_attention"]
    if type(inner) is RecurrentLinearAttention:
        kind, feature_map = _LINEAR, inner._modules["feature_map"]
        if feature_map is None or not is_elu_feature_map(feature_map):
            return None
        if forward_hooks_registered(inner, feature_map):
            return None
    elif type(inner) is RecurrentFullAttention:
        kind = _FULL
        if not plain_attention(inner):
            return None
    else:
        return None
    query, key, value = (attention._modules[name] for name in _PROJECTIONS[:3])
    if type(query) is not nn.Linear or type(key) is not nn.Linear or type(value) is not nn.Linear:
        return None
    heads = attention.n_heads
    width = query.weight.shape[0]
    if key.weight.shape[0] != width or width % heads or value.weight.shape[0] % heads:
        return None  # the chain's step takes queries and keys of one width
    tensors = (query.weight, query.bias, key.weight, key.bias, value.weight, value.bias)
    # linear attention: its eps; softmax attention: the scale of q . k
    number = inner.eps if kind == _LINEAR else inner.softmax_temp or 1.0 / sqrt(width // heads)
    return tensors, (kind, heads, number)


def plain_attention(inner: Any) -> bool:
    """A softmax attention's call is what the chain computes: its own dropout, inactive, no
    listeners or hooks."""
    dropout = inner._modules["dropout"]
    return (
        type(dropout) is nn.Dropout
        and not inner.event_dispatcher.has_listeners
        and not (inner.training and dropout.p)
        and not forward_hooks_registered(inner, dropout)
    )


def _layer_parts(layer: Any, layer_type: Any) -> tuple[tuple, tuple] | None:
    """The tensors and options of ``layer``'s step in a chain, or ``None`` when the chain
    would not compute what the layer's call does: the layer must be of exactly
    ``layer_type`` and `fusible`, its attention as `self_attention_parts` says."""
    if type(layer) is not layer_type or forward_hooks_registered(layer):
        return None
    modules = layer._modules
    attention, norm1, norm2 = modules["attention"], modules["norm1"], modules["norm2"]
    if not fusible(layer, (norm1, norm2), (attention,)):
        return None
    found = self_attention_parts(attention)
    if found is None:
        return None
    # `fusible` took the norms, the output and feed-forward products of exactly their types
    out, p1, p2 = attention.out_projection, modules["linear1"], modules["linear2"]
    tensors = (
        *found[0], out.weight, out.bias, norm1.weight, norm1.bias, p1.weight, p1.bias,
        p2.weight, p2.bias, norm2.weight, norm2.bias,
    )  # fmt: skip
    options = (*found[1], norm1.eps, norm2.eps, _ACTIVATION_NAMES[layer.activation])
    return tensors, options


def _make_chain(
    width: int, tensors: tuple, options: tuple, layers: int, buffers: tuple
) -> StepChain:
    """The chain of ``layers`` post-norm layers (see `_layer_parts`); ``buffers`` holds the
    key and value buffers of each softmax layer's cache, in layer order. A call passes the
    positions of `cache_positions`."""
    chain = StepChain(width)
    x = chain.input
    positions = cache_positions(chain, buffers)
    caches = iter(buffers)
    for i in range(layers):
        layer, option = tensors[_TENSORS * i : _TENSORS * (i + 1)], options[_OPTIONS * i :]
        wo, bo, g1, b1, w1, c1, w2, c2, g2, b2 = layer[6:]
        eps1, eps2, activation = option[3:6]
        attended = add_self_attention(chain, x, layer[:6], option[:3], caches, positions)
        x = chain.linear(
            attended, wo, bo, residual=x, norm_weight=g1, norm_bias=b1, norm=True, eps=eps1
        )
        x = chain.feed_forward(x, w1, c1, w2, c2, g2, b2, activation=activation, eps=eps2)
    return chain


def cache_positions(chain: StepChain, buffers: tuple) -> tuple[Position, ...]:
    """The positions of the softmax layers' caches (``buffers``, none: no positions): the
    step's slot ``t``, one past it and the first slot read (``0``), passed as
    ``[t, t + 1, 0]`` for caches of ``t`` steps."""
    if not buffers:
        return ()
    C = min(buffer.shape[2] for buffer in buffers)
    return chain.position(C), chain.position(C), chain.position(0)


def add_self_attention(
    chain: StepChain,
    x: Slot,
    tensors: tuple,
    options: tuple,
    caches: Iterator[Tensor],
    positions: tuple[Position, ...],
) -> Slot:
    """Add a self-attention step of ``x`` (`self_attention_parts`' tensors and options):
    linear attention's step, or the key and value written to the next cache's buffers
    (from ``caches``) at the step's slot and softmax attention over the cache."""
    wq, bq, wk, bk, wv, bv = tensors
    kind, heads, number = options
    q, k, v = chain.linear(x, wq, bq), chain.linear(x, wk, bk), chain.linear(x, wv, bv)
    if kind == _LINEAR:
        return chain.linear_attention_step(q, k, v, heads, number)
    here, end, start = positions
    keys, values = next(caches), next(caches)
    chain.cache_write(k, keys, here)
    chain.cache_write(v, values, here)
    return chain.cache_attention(q, keys, values, start, end, scale=number)


class SelfStates:
    """The self-attention states of a chained step, layer by layer: the ``(S, Z)`` of each
    linear layer's state and the `KVCache` of each softmax layer's (an empty one for a first
    step; one that cannot take the step in place, or that an earlier layer's step writes, a
    copy, as `KVCache.append` makes)."""

    def __init__(self, x: Tensor):
        self.x = x
        self.pairs: list[tuple[Tensor, Tensor] | None] = []
        self.caches: list[KVCache] = []
        self._claims: set[int] = set()
        self._storages: set[int] = set()

    def add(self, state: Any, tensors: tuple, options: tuple) -> bool:
        """Take ``state`` of a layer with `self_attention_parts` ``tensors`` and ``options``;
        ``False`` when the chain cannot take it (the layers then take the step, and their own
        checks say what is wrong)."""
        x = self.x
        kind, heads = options[:2]
        N, E, M = x.shape[0], tensors[0].shape[0] // heads, tensors[4].shape[0] // heads
        if kind == _FULL:
            if state is None:
                state = KVCache.empty(N, heads, E, M, dtype=x.dtype, device=x.device)
            if type(state) is not KVCache or not _cache_fits(state, (N, heads, E, M), x):
                return False
            taken = (
                id(state._claim) in self._claims or state.key_buffer.data_ptr() in self._storages
            )
            if taken or not state._in_place_ok(state.length + 1):
                state = state.with_room(state.length + 1)
            self._claims.add(id(state._claim))
            self._storages.add(state.key_buffer.data_ptr())
            self.caches.append(state)
            return True
        if state is None:
            self.pairs.append(None)
            return True
        if type(state) is not LinearState:
            return False
        S, Z = state.S, state.Z
        if not (_plain(S, (N, heads, E, M), x) and _plain(Z, (N, heads, E), x)):
            return False
        self.pairs.append((S, Z))
        return True

    @property
    def buffers(self) -> tuple[Tensor, ...]:
        """The caches' key and value buffers, in layer order."""
        return tuple(t for cache in self.caches for t in (cache.key_buffer, cache.value_buffer))

    def length(self) -> int | None:
        """The caches' common length ``t`` (0 without caches), ``None`` if they differ."""
        length = self.caches[0].length if self.caches else 0
        return None if any(c.length != length for c in self.caches) else length

    def positions(self, length: int) -> list[int]:
        """The call's positions for caches of ``length`` steps (see `cache_positions`)."""
        return [length, length + 1, 0] if self.caches else []

    def new_states(self, kinds: list[str], new: list, length: int) -> list[Any]:
        """The layers' new states after the chain's call: ``new`` the chain's ``(S, Z)``;
        the caches, which the chain wrote at slot ``length``, one step longer."""
        linear, full = iter(new), iter(self.caches)
        states: list[Any] = []
        for kind in kinds:
            if kind == _LINEAR:
                S, Z = next(linear)
                states.append(LinearState(S, Z))
            else:
                cache = next(full)
                claim = cache._claim
                claim.filled = length + 1  # type: ignore[union-attr]
                states.append(KVCache(cache.key_buffer, cache.value_buffer, length + 1, claim))
        return states


def _plain(t: object, shape: tuple[int, ...], x: Tensor) -> bool:
    """``t`` a plain tensor of ``shape`` with ``x``'s dtype and device."""
    return type(t) is Tensor and t.shape == shape and t.dtype == x.dtype and t.device == x.device


def _cache_fits(cache: KVCache, shape: tuple[int, ...], x: Tensor) -> bool:
    """``cache``'s buffers fit a step of ``x`` (``shape`` = N, H, E, D)."""
    N, H, E, D = shape
    keys, values = cache.key_buffer, cache.value_buffer
    C = keys.shape[2] if isinstance(keys, Tensor) and keys.dim() == 4 else -1
    return (
        _plain(keys, (N, H, C, E), x) and _plain(values, (N, H, C, D), x) and 0 <= cache.length <= C
    )


def chained_step(
    model: RecurrentTransformerEncoder, x: Tensor, states: list, layer_type: type
) -> tuple[Tensor, TransformerState] | None:
    """``model``'s step of ``x`` ``(N, E)`` with ``states`` (one per layer) as one chain
    call, or ``None`` when a layer would not take the fused step (see the module docstring).

    The model has checked ``x``; its layers must be of exactly ``layer_type``
    (`RecurrentTransformerEncoderLayer`, passed in: this module is imported by the one that
    defines it)."""
    if not step_may_chain(model, x):
        return None
    layers = model.layers
    gathered = gather_parts([_layer_parts(layer, layer_type) for layer in layers])
    if gathered is None:
        return None
    tensors, options = gathered
    selfs = SelfStates(x)
    for i, state in enumerate(states):
        if not selfs.add(state, tensors[_TENSORS * i :], options[_OPTIONS * i :]):
            return None
    length = selfs.length()
    if length is None:
        return None
    buffers, caches = selfs.buffers, selfs.caches
    # a chain over caches lives with them (on the first one's claim), not with the model: it
    # holds their buffers, which must go when the states that use them go
    kept = caches[0]._claim.chain if caches else _CHAINS.get(model)  # type: ignore[union-attr]
    if kept is not None and entry_fits(kept, tensors, options, buffers, x):
        entry: Entry = kept
    else:
        entry = _new_entry(x.shape[1], tensors, options, len(layers), buffers)
    positions = selfs.positions(length)
    try:
        y, new = entry[3](x, selfs.pairs, positions=positions)
    except WeightChangedError:  # a parameter given another shape or dtype: a new chain
        entry = _new_entry(x.shape[1], tensors, options, len(layers), buffers)
        y, new = entry[3](x, selfs.pairs, positions=positions)
    if caches:
        caches[0]._claim.chain = entry  # type: ignore[union-attr]
    else:
        _CHAINS[model] = entry
    if model.norm is not None:
        y = model.norm(y)
    check_output(y, type(model).__name__)
    kinds = [options[_OPTIONS * i] for i in range(len(layers))]
    return y, TransformerState(tuple(selfs.new_states(kinds, new, length)))


def step_may_chain(model: Any, x: Tensor) -> bool:
    """Whether a step of ``x`` may run as a chain: plain float32 or float64 CPU rows, no
    listeners on the model, nothing being compiled."""
    return not (
        torch.compiler.is_compiling()
        or model.event_dispatcher.has_listeners
        or type(x) is not Tensor
        or x.dtype not in (torch.float32, torch.float64)
        or not x.is_cpu
        or x.shape[0] == 0
    )


def gather_parts(parts: list[tuple[tuple, tuple] | None]) -> tuple[tuple, tuple] | None:
    """The layers' tensors and options one after another, or ``None`` when a layer has
    none (it would not take the chain's step) or there are no layers."""
    if not parts or any(part is None for part in parts):
        return None
    tensors = tuple(t for part in parts for t in part[0])  # type: ignore[index]
    options = tuple(o for part in parts for o in part[1])  # type: ignore[index]
    return tensors, options


def entry_fits(entry: Entry, tensors: tuple, options: tuple, buffers: tuple, x: Tensor) -> bool:
    """Whether a kept ``(tensors, options, buffers, chain)`` entry was made for these
    parameter objects, options and cache buffers, and ``x``'s dtype and device."""
    return not (
        entry[1] != options
        or len(entry[0]) != len(tensors)
        or not all(map(operator.is_, entry[0], tensors))
        or len(entry[2]) != len(buffers)
        or not all(map(operator.is_, entry[2], buffers))
        or (entry[3].dtype, entry[3].device) != (x.dtype, x.device)  # e.g. after model.float()
    )


def _new_entry(width: int, tensors: tuple, options: tuple, layers: int, buffers: tuple) -> Entry:
    return tensors, options, buffers, _make_chain(width, tensors, options, layers, buffers)
