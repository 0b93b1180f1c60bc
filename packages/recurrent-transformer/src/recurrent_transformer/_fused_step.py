"""Inference speed-up of the recurrent layers: each residual sublayer of a step in one call.

A step works on one element of each sequence (``N`` rows), so the layer's small ops (output
projection, residual add, layer norm, the feed-forward products and activation) cost more in
dispatch than in arithmetic. Without autograd and dropout a layer runs its sublayers as
`attention_core.residual_step.residual_linear` (output projection, residual and norm) and
`attention_core.residual_step.residual_feed_forward` (the post-norm feed-forward block): the
same formulas as the composed modules, two calls instead of about a dozen ops. The query, key
and value projections of a self attention run as one product with the three weights stacked
(`self_attention_heads`): one call instead of three, and a product three times wider, which
splits better over threads. Tests prove the paths equal in float64.

The modules are read from ``_modules`` and ``_parameters`` (plain dictionary lookups: a
module's ``__getattr__`` costs about as much as a small op here). A module that the fused
step would not call (the attention layer, its projections, the feed-forward products, the
norms) keeps its forward hooks only on the composed path, so any hook on one of them, or a
global forward hook, selects the composed path.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_core.residual_step import (
    MIN_ROWS,
    PreparedFeedForward,
    PreparedResidualLinear,
    residual_feed_forward,
    residual_linear,
)
from attention_core.utils import forward_hooks_registered

from .attention.self_attention.attention_layer import RecurrentAttentionLayer
from .attention.self_attention.base import RecurrentAttention

__all__ = [
    "attention_sublayer",
    "feed_forward_sublayer",
    "fused_step_enabled",
    "fusible",
    "self_attention_heads",
    "stacked_qkv",
]

_ACTIVATION_NAMES = {F.relu: "relu", F.gelu: "gelu"}
_PROJECTIONS = ("query_projection", "key_projection", "value_projection", "out_projection")


def _plain_norm(norm: Any) -> bool:
    return type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1


def _own_call(module: nn.Module, *names: str) -> bool:
    """Whether ``module``'s methods ``names`` are the library's own (not a subclass's, which
    the fused step would skip)."""
    for name in names:
        owner = next(c for c in type(module).__mro__ if name in c.__dict__)
        if not owner.__module__.startswith(("recurrent_transformer.", "attention_core.")):
            return False
    return True


def _attention_hooked(attention: nn.Module) -> bool:
    """Whether forward hooks see a call of ``attention`` or one of its projections (the fused
    step calls none of them)."""
    modules = attention._modules
    return forward_hooks_registered(attention, *(modules.get(name) for name in _PROJECTIONS))


def fused_step_enabled(
    layer: Any, x: Tensor, norms: tuple[Any, ...], attentions: tuple[Any, ...]
) -> bool:
    """Whether ``layer``'s step of ``x`` ``(N, E)`` may run fused: at least ``MIN_ROWS`` rows
    (with fewer the composed ops are faster) and `fusible`."""
    return x.shape[0] >= MIN_ROWS and fusible(layer, norms, attentions)


def fusible(layer: Any, norms: tuple[Any, ...], attentions: tuple[Any, ...]) -> bool:
    """Whether ``layer``'s step computes what its sublayer ops compute.

    That is: no autograd recording, no dropout (evaluation or ``p == 0``), a relu or gelu
    feed-forward activation, ``nn.LayerNorm`` norms over the last dimension and ``nn.Linear``
    feed-forward and output products (exactly those types: a subclass or a parametrization
    may compute something else from the same parameters), the library's own calls of the
    layer and its attention layers (which have a ``heads`` method), and no forward hooks on
    the modules that the fused step does not call (the attention layers and their
    projections, the feed-forward products, the norms) nor global ones."""
    if torch.is_grad_enabled() or (layer.training and layer.dropout.p):
        return False
    if layer.activation not in _ACTIVATION_NAMES or not all(_plain_norm(n) for n in norms):
        return False
    modules = layer._modules
    linears = (modules["linear1"], modules["linear2"])
    if any(type(m) is not nn.Linear for m in linears) or not _own_call(
        layer, "_feed_forward", "_drop"
    ):
        return False  # a subclass or a parametrization may compute something else
    if forward_hooks_registered(*linears, *norms):
        return False
    return all(
        hasattr(a, "heads")
        and _own_call(a, "forward")
        and type(a._modules.get("out_projection")) is nn.Linear
        and not _attention_hooked(a)
        for a in attentions
    )


# the query, key and value projections as one product


def _layout(t: Tensor | None) -> tuple | None:
    """Where and how ``t`` stores its values."""
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def stacked_qkv(
    query: nn.Linear, key: nn.Linear, value: nn.Linear, cache: dict[str, Any]
) -> tuple[Tensor, Tensor | None, tuple[int, int]] | None:
    """The weights and biases of three projections stacked, ``(Fq + Fk + Fv, E)`` and
    ``(Fq + Fk + Fv,)``, and ``(Fq, Fq + Fk)``: ``F.linear(x, W, b)`` holds the three outputs
    side by side, split at these two columns.

    The parameters are made views of the stacked tensors (their values copied once, the
    parameter objects kept): a change of their values in any way (an optimiser step,
    ``load_state_dict``, an in-place op on ``.data``) is a change of the stacked tensors.
    What is kept in ``cache`` is checked at every call: a parameter replaced, or given other
    storage (a new ``.data``, ``module.to(...)``), restacks the three. ``None`` when they
    cannot be stacked: other module types than ``nn.Linear``, different input widths,
    dtypes or devices, one parameter shared by two of them, some with a bias and some
    without."""
    if not (type(query) is type(key) is type(value) is nn.Linear):
        return None
    q, k, v = query._parameters, key._parameters, value._parameters
    params = (q.get("weight"), k.get("weight"), v.get("weight"),
              q.get("bias"), k.get("bias"), v.get("bias"))  # fmt: skip
    entry = cache.get("qkv")
    if entry is not None:
        cached, layouts, stacked = entry
        if all(p is c for p, c in zip(params, cached)) and layouts == tuple(map(_layout, params)):
            return stacked
    weights: list[Tensor] = [w for w in params[:3] if w is not None and w.dim() == 2]
    biases: list[Tensor] = [b for b in params[3:] if b is not None and b.dim() == 1]
    if len(weights) != 3 or len(biases) not in (0, 3):
        return None
    if len({id(p) for p in params if p is not None}) != 3 + len(biases):
        return None
    if any(t.is_inference() for t in (*weights, *biases)):
        return None  # parameters made under torch.inference_mode: left as they are
    like = (weights[0].shape[1], weights[0].dtype, weights[0].device)
    rows = [w.shape[0] for w in weights]
    if any((w.shape[1], w.dtype, w.device) != like for w in weights) or any(
        (b.shape[0], b.dtype, b.device) != (n, *like[1:]) for b, n in zip(biases, rows)
    ):
        return None
    # normal tensors even under torch.inference_mode: the parameters become views of them,
    # and an inference tensor could not take part in training later
    with torch.inference_mode(False), torch.no_grad():
        W = torch.cat(weights)
        B = torch.cat(biases) if biases else None
        for w, view in zip(weights, W.split(rows)):
            w.data = view
        if B is not None:
            for b, view in zip(biases, B.split(rows)):
                b.data = view
    stacked = (W, B, (rows[0], rows[0] + rows[1]))
    cache["qkv"] = (params, tuple(map(_layout, params)), stacked)
    return stacked


def self_attention_heads(attention: Any, x: Tensor, state: Any) -> tuple[Tensor, Any]:
    """``attention.heads(x, x, x, state)`` of a `RecurrentAttentionLayer`, with the three
    projections of ``x`` as one product.

    ``x`` is ``(N, d_model)``; returns the heads joined ``(N, H D)`` and the new state. The
    composed `heads` runs where the projections cannot be stacked, where a listener waits
    for the `QKVEvent`, and under ``torch.compile`` (which traces the three products, and
    cannot trace the cache's address checks). Called only where `fused_step_enabled` holds
    (no hooks)."""
    modules = attention._modules
    stacked = None
    if (
        type(attention).heads is RecurrentAttentionLayer.heads  # not a subclass's own heads
        and not attention.event_dispatcher.has_listeners
        and not torch.compiler.is_compiling()
    ):
        cache = attention.__dict__.setdefault("_stacked_projections", {})
        query, key, value = (modules.get(name) for name in _PROJECTIONS[:3])
        stacked = stacked_qkv(query, key, value, cache)
    if stacked is None:
        return attention.heads(x, x, x, state)
    W, B, (k_start, v_start) = stacked
    N, H = x.shape[0], attention.n_heads
    qkv = F.linear(x, W, B)
    inner = modules["inner_attention"]
    if v_start != 2 * k_start or W.shape[0] != 3 * k_start or k_start % H:
        q = qkv[:, :k_start].view(N, H, -1)
        k = qkv[:, k_start:v_start].view(N, H, -1)
        v = qkv[:, v_start:].view(N, H, -1)
        out, state = inner(q, k, v, state)
        return out.flatten(1), state
    q, k, v = qkv.view(N, 3, H, -1).unbind(1)  # one view and one split instead of six ops
    if forward_hooks_registered(inner) or type(inner).forward is not RecurrentAttention.forward:
        out, state = inner(q, k, v, state)
    else:  # what its forward does: the checks of the heads hold by construction here
        out, state = inner.step(q, k, v, state)
    return out.flatten(1), state


# the sublayers after the attention


# Each sublayer's prepared op (its weights checked once, then only the step's inputs and the
# weights' layout: `attention_core.residual_step.PreparedResidualLinear` and
# `PreparedFeedForward`), kept per module with the parameter objects and options it was made
# for; another parameter object or option makes a new one. A module shared by several layers
# (tied weights) keeps one per combination, up to _PER_MODULE. Weakly keyed: nothing is added
# to the module, so copies, pickles and state_dicts are as before, and the entries go with it.
# Under torch.compile the functions run instead (it would guard on the table's contents).
_PREPARED: WeakKeyDictionary[nn.Module, list[tuple[tuple, tuple, Any]]] = WeakKeyDictionary()
_PER_MODULE = 4


def _prepared(owner: nn.Module, params: tuple, options: tuple, make: Callable[[], Any]) -> Any:
    """The prepared op of ``owner`` for ``params`` (compared by identity) and ``options``
    (compared by equality), made by ``make`` when there is none."""
    entries = _PREPARED.get(owner)
    if entries is None:
        entries = _PREPARED[owner] = []
    for held, held_options, op in entries:
        if held_options == options and all(map(operator.is_, held, params)):
            return op
    op = make()
    entries.insert(0, (params, options, op))
    del entries[_PER_MODULE:]  # the oldest: replaced parameters are not held for long
    return op


def attention_sublayer(x: Tensor, heads: Tensor, out_projection: nn.Linear, norm: Any) -> Tensor:
    """``norm(x + out_projection(heads))`` for ``x`` ``(N, E)`` and ``heads`` ``(N, H D)``."""
    p: dict[str, Any] = out_projection._parameters
    n = norm._parameters
    weights = (p["weight"], p["bias"], n["weight"], n["bias"])
    if torch.compiler.is_compiling():  # the op itself: no table for torch.compile to guard
        return residual_linear(x, heads, *weights, norm=True, eps=norm.eps)
    project = _prepared(
        out_projection,
        weights,
        (norm.eps,),
        lambda: PreparedResidualLinear(*weights, norm=True, eps=norm.eps),
    )
    return project(x, heads)


def feed_forward_sublayer(layer: Any, x: Tensor, norm: Any) -> Tensor:
    """``norm(x + linear2(act(linear1(x))))`` of ``layer`` for ``x`` ``(N, E)``."""
    modules = layer._modules
    p1, p2, n = modules["linear1"]._parameters, modules["linear2"]._parameters, norm._parameters
    weights = (p1["weight"], p1["bias"], p2["weight"], p2["bias"], n["weight"], n["bias"])
    activation = _ACTIVATION_NAMES[layer.activation]
    if torch.compiler.is_compiling():  # as above
        return residual_feed_forward(
            x, *weights, activation=activation, norm_first=False, eps=norm.eps
        )
    feed_forward = _prepared(
        modules["linear1"],
        weights,
        (activation, norm.eps),
        lambda: PreparedFeedForward(
            *weights, activation=activation, norm_first=False, eps=norm.eps
        ),
    )
    return feed_forward(x)
