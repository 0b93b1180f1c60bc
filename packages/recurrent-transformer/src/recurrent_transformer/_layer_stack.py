"""Running a stack of recurrent layers: the per-layer states of a model state, the layers in
order with their events and checks, and the checks of a decoder's memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from attention_core.checks import check_model_dtype, check_tensor
from attention_core.events import IntermediateOutput
from attention_core.masking import BaseMask

from ._checks import check_output, end_layer_checks, start_layer_checks
from .state import TransformerState

if TYPE_CHECKING:
    from .transformers import (
        RecurrentTransformerDecoder,
        RecurrentTransformerDecoderLayer,
        RecurrentTransformerEncoder,
    )

__all__ = ["check_memory", "layer_states", "run_layers"]


def layer_states(state: Any, n_layers: int, owner: str) -> list:
    """The per-layer states of a model state (``None``: a new sequence)."""
    if state is None:
        return [None] * n_layers
    if not isinstance(state, (TransformerState, list, tuple)):
        raise TypeError(
            f"{owner} needs the TransformerState it returned (or a list of per-layer states) as "
            f"state; got {type(state).__name__}"
        )
    states = list(state)
    if len(states) != n_layers:
        raise ValueError(
            f"{owner} has {n_layers} layers but the state holds {len(states)} layer states "
            "(a state belongs to one model: start a new one with state=None)"
        )
    return states


def run_layers(
    model: RecurrentTransformerEncoder | RecurrentTransformerDecoder,
    x: Tensor,
    states: list,
    call: Callable[[Any, Tensor, Any], tuple[Tensor, Any]],
) -> tuple[Tensor, Any]:
    """Run every layer of ``model`` on ``x`` with its state, then ``model.norm``.

    ``x, states[i] = call(layer, x, states[i])`` for every layer (dispatching an
    `IntermediateOutput` event after each). The model has checked ``x``: the layers skip their
    finiteness checks and the output is checked once instead."""
    token = start_layer_checks()
    try:
        for i, layer in enumerate(model.layers):
            x, states[i] = call(layer, x, states[i])
            if model.event_dispatcher.has_listeners:
                model.event_dispatcher.dispatch(IntermediateOutput(layer, x))
    finally:
        end_layer_checks(token)
    if model.norm is not None:
        x = model.norm(x)
    check_output(x, type(model).__name__)
    return x, TransformerState(tuple(states))


def check_memory(
    memory: Tensor | None,
    memory_length_mask: BaseMask | None,
    N: int,
    layer: RecurrentTransformerDecoderLayer,
) -> None:
    # the memory's width is the cross attention's key width (cross_model_dimensions)
    d_model = getattr(layer.cross_attention, "d_model_keys", layer.d_model)
    memory = check_tensor("memory", memory, dim=3, floating=True)
    if memory.shape[0] != N or memory.shape[2] != d_model:
        raise ValueError(f"memory must have shape ({N}, S, {d_model}); got {tuple(memory.shape)}")
    check_model_dtype("memory", memory, layer.linear1.weight.dtype)
    S = memory.shape[1]
    if memory_length_mask is None:
        return
    if not isinstance(memory_length_mask, BaseMask):
        raise TypeError(
            "memory_length_mask must be a BaseMask (e.g. LengthMask); got "
            f"{type(memory_length_mask).__name__}"
        )
    if tuple(memory_length_mask.shape) != (N, S):
        raise ValueError(
            f"memory_length_mask must have shape (N, S) = ({N}, {S}), the batch size and the "
            f"length of memory; got a mask of shape {tuple(memory_length_mask.shape)}"
        )
