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
from math import sqrt
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from attention_core.feature_maps import is_elu_feature_map
from attention_core.step_chain import StepChain, WeightChangedError
from attention_core.utils import forward_hooks_registered

from ._checks import check_output
from ._fused_step import _ACTIVATION_NAMES, _PROJECTIONS, fusible
from ._kv_cache import _MIN_CAPACITY, KVCache
from .attention.self_attention.attention_layer import RecurrentAttentionLayer
from .attention.self_attention.full_attention import RecurrentFullAttention
from .attention.self_attention.linear_attention import RecurrentLinearAttention
from .state import LinearState, TransformerState

if TYPE_CHECKING:
    from .transformers import RecurrentTransformerEncoder

__all__ = ["chained_step"]

_TENSORS, _OPTIONS = 16, 6  # per layer, see _layer_parts
_LINEAR, _FULL = "linear", "full"  # the attentions a chain runs
# per model: the parameters, options and cache buffers a chain was made for, and the chain
_CHAINS: WeakKeyDictionary[nn.Module, tuple[tuple, tuple, tuple, StepChain]] = WeakKeyDictionary()


def _layer_parts(layer: Any, layer_type: Any) -> tuple[tuple, tuple] | None:
    """The tensors and options of ``layer``'s step in a chain, or ``None`` when the chain
    would not compute what the layer's call does: the layer must be `fusible`, and it, its
    attention layer, its linear attention and its query, key and value products of exactly
    their library types (a subclass, or a parametrization, may compute something else from
    the same parameters)."""
    if type(layer) is not layer_type or forward_hooks_registered(layer):
        return None
    modules = layer._modules
    attention, norm1, norm2 = modules["attention"], modules["norm1"], modules["norm2"]
    if type(attention) is not RecurrentAttentionLayer or attention.event_dispatcher.has_listeners:
        return None
    if not fusible(layer, (norm1, norm2), (attention,)):
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
        dropout = inner._modules["dropout"]
        if type(dropout) is not nn.Dropout or inner.event_dispatcher.has_listeners:
            return None
        if inner.training and dropout.p:
            return None
        if forward_hooks_registered(inner, dropout):
            return None
    else:
        return None
    # `fusible` took the norms, the output and feed-forward products of exactly their types
    projections = attention._modules
    linears: list[Any] = [projections[name] for name in _PROJECTIONS]
    linears += (modules["linear1"], modules["linear2"])
    if any(type(m) is not nn.Linear for m in linears[:3]):
        return None
    heads = attention.n_heads
    query, key, value, out, p1, p2 = (m._parameters for m in linears)
    width = query["weight"].shape[0]
    if key["weight"].shape[0] != width or width % heads or value["weight"].shape[0] % heads:
        return None  # the chain's step takes queries and keys of one width
    n1, n2 = norm1._parameters, norm2._parameters
    tensors = (
        query["weight"], query["bias"], key["weight"], key["bias"], value["weight"],
        value["bias"], out["weight"], out["bias"], n1["weight"], n1["bias"],
        p1["weight"], p1["bias"], p2["weight"], p2["bias"], n2["weight"], n2["bias"],
    )  # fmt: skip
    # linear attention: its eps; softmax attention: the scale of q . k
    number = inner.eps if kind == _LINEAR else inner.softmax_temp or 1.0 / sqrt(width // heads)
    options = (kind, heads, number, norm1.eps, norm2.eps, _ACTIVATION_NAMES[layer.activation])
    return tensors, options


def _make_chain(
    width: int, tensors: tuple, options: tuple, layers: int, buffers: tuple
) -> StepChain:
    """The chain of ``layers`` post-norm layers (see `_layer_parts`); ``buffers`` holds the
    key and value buffers of each softmax layer's cache, in layer order. A call passes the
    positions ``[t, t + 1, 0]`` for a cache of ``t`` steps (all of one length)."""
    chain = StepChain(width)
    x = chain.input
    if buffers:  # the step's slot, one past it, and the first slot read
        C = min(buffer.shape[2] for buffer in buffers)
        here, end, start = chain.position(C), chain.position(C), chain.position(0)
    caches = iter(buffers)
    for i in range(layers):
        wq, bq, wk, bk, wv, bv, wo, bo, g1, b1, w1, c1, w2, c2, g2, b2 = tensors[
            _TENSORS * i : _TENSORS * (i + 1)
        ]
        kind, heads, number, eps1, eps2, activation = options[_OPTIONS * i : _OPTIONS * (i + 1)]
        q, k, v = chain.linear(x, wq, bq), chain.linear(x, wk, bk), chain.linear(x, wv, bv)
        if kind == _LINEAR:
            attended = chain.linear_attention_step(q, k, v, heads, number)
        else:
            keys, values = next(caches), next(caches)
            chain.cache_write(k, keys, here)
            chain.cache_write(v, values, here)
            attended = chain.cache_attention(q, keys, values, start, end, scale=number)
        x = chain.linear(
            attended, wo, bo, residual=x, norm_weight=g1, norm_bias=b1, norm=True, eps=eps1
        )
        x = chain.feed_forward(x, w1, c1, w2, c2, g2, b2, activation=activation, eps=eps2)
    return chain


def _chain_states(
    states: list, x: Tensor, tensors: tuple, options: tuple
) -> tuple[list[tuple[Tensor, Tensor] | None], list[KVCache], int] | None:
    """The ``(S, Z)`` of each linear layer's state, the `KVCache` of each softmax layer's
    (an empty one for a first step) and the caches' common length; or ``None`` when a state
    is not one the chain can take (the layers then take the step, and their own checks say
    what is wrong)."""
    pairs: list[tuple[Tensor, Tensor] | None] = []
    caches: list[KVCache] = []
    claims: set[int] = set()
    storages: set[int] = set()
    N, dtype, device = x.shape[0], x.dtype, x.device
    for i, state in enumerate(states):
        kind, heads = options[_OPTIONS * i : _OPTIONS * i + 2]
        E = tensors[_TENSORS * i].shape[0] // heads  # query width / heads
        M = tensors[_TENSORS * i + 4].shape[0] // heads  # value width / heads
        if kind == _FULL:
            if state is None:
                state = KVCache.empty(N, heads, E, M, dtype=dtype, device=device)
            if type(state) is not KVCache or not _cache_fits(state, (N, heads, E, M), x):
                return None
            # a cache that cannot take the step in place, or that an earlier layer's step
            # writes (one cache given to several layers), is copied as `KVCache.append` would
            taken = id(state._claim) in claims or state.key_buffer.data_ptr() in storages
            if taken or not state._in_place_ok(state.length + 1):
                capacity = max(_MIN_CAPACITY, state.length + 1, 2 * state.capacity)
                state = KVCache.from_tensors(state.keys, state.values, capacity)
            claims.add(id(state._claim))
            storages.add(state.key_buffer.data_ptr())
            caches.append(state)
            continue
        if state is None:
            pairs.append(None)
            continue
        if type(state) is not LinearState:
            return None
        S, Z = state.S, state.Z
        if not (_plain(S, (N, heads, E, M), x) and _plain(Z, (N, heads, E), x)):
            return None
        pairs.append((S, Z))
    length = caches[0].length if caches else 0
    if any(cache.length != length for cache in caches):
        return None
    return pairs, caches, length


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
    if (
        torch.compiler.is_compiling()
        or model.event_dispatcher.has_listeners
        or type(x) is not Tensor
        or x.dtype not in (torch.float32, torch.float64)
        or not x.is_cpu
        or x.shape[0] == 0
    ):
        return None
    layers = model.layers
    parts = [_layer_parts(layer, layer_type) for layer in layers]
    if not parts or any(part is None for part in parts):
        return None
    tensors = tuple(t for part in parts for t in part[0])  # type: ignore[index]
    options = tuple(o for part in parts for o in part[1])  # type: ignore[index]
    found = _chain_states(states, x, tensors, options)
    if found is None:
        return None
    pairs, caches, length = found
    buffers = tuple(t for cache in caches for t in (cache.key_buffer, cache.value_buffer))
    # a chain over caches lives with them (on the first one's claim), not with the model: it
    # holds their buffers, which must go when the states that use them go
    entry = caches[0]._claim.chain if caches else _CHAINS.get(model)  # type: ignore[union-attr]
    if (
        entry is None
        or entry[1] != options
        or not all(map(operator.is_, entry[0], tensors))
        or len(entry[2]) != len(buffers)
        or not all(map(operator.is_, entry[2], buffers))
        or (entry[3].dtype, entry[3].device) != (x.dtype, x.device)  # e.g. after model.float()
    ):
        entry = _new_entry(x.shape[1], tensors, options, len(layers), buffers)
    positions = [length, length + 1, 0] if buffers else []
    try:
        y, new = entry[3](x, pairs, positions=positions)
    except WeightChangedError:  # a parameter given another shape or dtype: a new chain
        entry = _new_entry(x.shape[1], tensors, options, len(layers), buffers)
        y, new = entry[3](x, pairs, positions=positions)
    if caches:
        caches[0]._claim.chain = entry  # type: ignore[union-attr]
    else:
        _CHAINS[model] = entry
    if model.norm is not None:
        y = model.norm(y)
    check_output(y, type(model).__name__)
    linear, full = iter(new), iter(caches)
    out_states: list[Any] = []
    for i in range(len(layers)):
        if options[_OPTIONS * i] == _LINEAR:
            S, Z = next(linear)
            out_states.append(LinearState(S, Z))
        else:  # the chain wrote the step's key and value at slot `length`
            cache = next(full)
            claim = cache._claim
            claim.filled = length + 1  # type: ignore[union-attr]
            out_states.append(KVCache(cache.key_buffer, cache.value_buffer, length + 1, claim))
    return y, TransformerState(tuple(out_states))


def _new_entry(
    width: int, tensors: tuple, options: tuple, layers: int, buffers: tuple
) -> tuple[tuple, tuple, tuple, StepChain]:
    return tensors, options, buffers, _make_chain(width, tensors, options, layers, buffers)
