"""Inference speed-up of a recurrent encoder's step: all its layers in one call.

Where every layer of a `RecurrentTransformerEncoder` computes what its sublayer ops compute
(`_fused_step.fusible`: no autograd, dropout or hooks) and its attention is causal linear
attention with the default feature map, the whole step (per layer the query, key and value
products, the attention step, the output projection with its residual and norm, the
feed-forward sublayer) runs as one
`attention_core.step_chain.StepChain` call: the same formulas as the layers, without a call
from Python per op (in the 8-layer step of fast-transformers' recurrent example those calls
took longer than the dense products; the chain is about twice as fast as the layers at one
row and at ten). Tests prove the paths equal in float64.

The chain is made once per model and kept in a weakly keyed table with the parameter objects
and options it was made for; it is made again when a parameter is replaced or an option
changes. Its weights are the layers' parameters themselves (the chain checks their layout at
every call), so an in-place update of their values is seen. Anything the chain does not run
(hooks, event listeners, autograd, dropout, other attentions or states, subclasses that change
a layer's call, ``torch.compile``) takes the layer-by-layer path.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from attention_core.feature_maps import is_elu_feature_map
from attention_core.step_chain import StepChain, WeightChangedError
from attention_core.utils import forward_hooks_registered

from ._checks import check_output
from ._fused_step import _ACTIVATION_NAMES, _PROJECTIONS, fusible
from .attention.self_attention.attention_layer import RecurrentAttentionLayer
from .attention.self_attention.linear_attention import RecurrentLinearAttention
from .state import LinearState, TransformerState

if TYPE_CHECKING:
    from .transformers import RecurrentTransformerEncoder

__all__ = ["chained_step"]

_TENSORS, _OPTIONS = 16, 5  # per layer, see _layer_parts
_CHAINS: WeakKeyDictionary[nn.Module, tuple[tuple, tuple, StepChain]] = WeakKeyDictionary()


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
    if type(inner) is not RecurrentLinearAttention:
        return None
    feature_map = inner._modules["feature_map"]
    if feature_map is None or not is_elu_feature_map(feature_map):
        return None
    if forward_hooks_registered(inner, feature_map):
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
    options = (heads, inner.eps, norm1.eps, norm2.eps, _ACTIVATION_NAMES[layer.activation])
    return tensors, options


def _make_chain(width: int, tensors: tuple, options: tuple, layers: int) -> StepChain:
    """The chain of ``layers`` post-norm linear-attention layers (see `_layer_parts`)."""
    chain = StepChain(width)
    x = chain.input
    for i in range(layers):
        wq, bq, wk, bk, wv, bv, wo, bo, g1, b1, w1, c1, w2, c2, g2, b2 = tensors[
            _TENSORS * i : _TENSORS * (i + 1)
        ]
        heads, eps, eps1, eps2, activation = options[_OPTIONS * i : _OPTIONS * (i + 1)]
        q, k, v = chain.linear(x, wq, bq), chain.linear(x, wk, bk), chain.linear(x, wv, bv)
        attended = chain.linear_attention_step(q, k, v, heads, eps)
        x = chain.linear(
            attended, wo, bo, residual=x, norm_weight=g1, norm_bias=b1, norm=True, eps=eps1
        )
        x = chain.feed_forward(x, w1, c1, w2, c2, g2, b2, activation=activation, eps=eps2)
    return chain


def _linear_states(
    states: list, x: Tensor, tensors: tuple, options: tuple
) -> list[tuple[Tensor, Tensor] | None] | None:
    """The ``(S, Z)`` of each layer's state, or ``None`` when one is not a `LinearState` of
    plain tensors of the step's shape, dtype and device (the layers' own checks then say what
    is wrong)."""
    pairs: list[tuple[Tensor, Tensor] | None] = []
    N, dtype, device = x.shape[0], x.dtype, x.device
    for i, state in enumerate(states):
        if state is None:
            pairs.append(None)
            continue
        if type(state) is not LinearState:
            return None
        S, Z = state.S, state.Z
        heads = options[_OPTIONS * i]
        E = tensors[_TENSORS * i].shape[0] // heads  # query width / heads
        M = tensors[_TENSORS * i + 4].shape[0] // heads  # value width / heads
        if not (
            type(S) is Tensor
            and type(Z) is Tensor
            and S.shape == (N, heads, E, M)
            and Z.shape == (N, heads, E)
            and S.dtype == dtype
            and Z.dtype == dtype
            and S.device == device
            and Z.device == device
        ):
            return None
        pairs.append((S, Z))
    return pairs


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
    pairs = _linear_states(states, x, tensors, options)
    if pairs is None:
        return None
    entry = _CHAINS.get(model)
    if (
        entry is None
        or entry[1] != options
        or not all(map(operator.is_, entry[0], tensors))
        or (entry[2].dtype, entry[2].device) != (x.dtype, x.device)  # e.g. after model.float()
    ):
        entry = (tensors, options, _make_chain(x.shape[1], tensors, options, len(layers)))
        _CHAINS[model] = entry
    try:
        y, new = entry[2](x, pairs)
    except WeightChangedError:  # a parameter given another shape or dtype: a new chain
        entry = (tensors, options, _make_chain(x.shape[1], tensors, options, len(layers)))
        _CHAINS[model] = entry
        y, new = entry[2](x, pairs)
    if model.norm is not None:
        y = model.norm(y)
    check_output(y, type(model).__name__)
    return y, TransformerState(tuple(LinearState(S, Z) for S, Z in new))
