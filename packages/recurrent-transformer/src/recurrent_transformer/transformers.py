"""Transformer encoders and decoders as recurrent networks, one element per call.

A state is carried from call to call. Reference: Katharopoulos et al. 2020, "Transformers are RNNs",
arXiv 2006.16236.

They are the recurrent duals of `attention_core.transformers` (post-norm layers, the same
parameter names): stepping through a sequence gives the outputs of the batch model with a
`TriangularCausalMask` on self attention (and a full mask on
cross attention). ``prefill`` consumes a whole prompt in one parallel pass and returns the same
outputs and state as stepping through it.

Shapes: ``x`` is ``(N, E)`` per step or ``(N, T, E)`` for ``prefill``; ``memory`` is
``(N, S, E)``; ``memory_length_mask`` is a mask of shape ``(N, S)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, nn

from attention_core.checks import check_model_dtype
from attention_core.masking import BaseMask
from attention_core.transformers import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from attention_core.utils import check_state

from ._checks import (
    check_element,
    check_prompt,
    layer_checks_enabled,
)
from ._decoder_chain import chained_decoder_step
from ._fused_step import (
    attention_sublayer,
    feed_forward_sublayer,
    fused_step_enabled,
    self_attention_heads,
)
from ._layer_stack import check_memory, layer_states, run_layers
from ._step_chain import chained_step
from .state import DecoderLayerState, TransformerState

if TYPE_CHECKING:
    from .attention import RecurrentAttentionLayer, RecurrentCrossAttentionLayer

__all__ = [
    "RecurrentTransformerDecoder",
    "RecurrentTransformerDecoderLayer",
    "RecurrentTransformerEncoder",
    "RecurrentTransformerEncoderLayer",
]

# helpers


def _width(layers: nn.ModuleList) -> int:
    """The feature size ``E`` of the first of ``layers``."""
    return cast(int, layers[0].d_model)


class _FeedForward(nn.Module):
    """Shared by the layers: the position-wise feed-forward block with its residual."""

    # set by attention_core's layers, which the recurrent layers extend
    dropout: nn.Dropout
    activation: Callable[[Tensor], Tensor]
    linear1: nn.Linear
    linear2: nn.Linear

    def _drop(self, x: Tensor) -> Tensor:
        # dropout is the identity in eval mode: skip the module call on the per-step path
        return self.dropout(x) if self.training else x

    def _feed_forward(self, x: Tensor, norm: nn.Module) -> Tensor:
        y = self._drop(self.activation(self.linear1(x)))
        y = self._drop(self.linear2(y))
        return norm(x + y)


# encoder


class RecurrentTransformerEncoderLayer(_FeedForward, TransformerEncoderLayer):
    """Self attention to the previous elements and a feed-forward network, one step at a time.

    Each has a residual connection and a LayerNorm after it. The recurrent dual of
    `attention_core.transformers.TransformerEncoderLayer`, whose constructor and parameters it
    shares (so a state_dict moves between the two).

    Arguments:
        attention: a `RecurrentAttentionLayer`.
        d_model: the feature size ``E``.
        d_ff: the hidden size of the feed-forward network (default: ``4 * d_model``).
        dropout: dropout after attention and in the feed-forward network (default: 0.1).
        activation: ``"relu"`` or ``"gelu"`` (default: ``"relu"``).
        event_dispatcher: dispatcher instance or key.
    """

    attention: RecurrentAttentionLayer

    # the recurrent layer shares the batch layer's constructor and parameters, not its call
    def forward(  # type: ignore[override]
        self, x: Tensor, state: Any = None, memory: Any = None
    ) -> tuple[Tensor, Any]:
        """Apply the layer to one element.

        Arguments:
            x: ``(N, E)``, one element of each sequence.
            state: the attention's state from the previous element, or ``None``.
            memory: deprecated name of ``state``.

        Returns:
            ``(N, E)`` and the new state.
        """
        state = check_state(state, memory)
        if layer_checks_enabled():  # else the model has checked x
            check_element("x", x, self.d_model, type(self).__name__)
            check_model_dtype("x", x, self.linear1.weight.dtype)
        modules: dict[str, Any] = self._modules  # dict lookups: cheaper than __getattr__
        attention, norm1, norm2 = modules["attention"], modules["norm1"], modules["norm2"]
        if fused_step_enabled(self, x, (norm1, norm2), (attention,)):
            heads, state = self_attention_heads(attention, x, state)
            x = attention_sublayer(x, heads, attention._modules["out_projection"], norm1)
            return feed_forward_sublayer(self, x, norm2), state
        x2, state = self.attention(x, x, x, state)
        return self._feed_forward(self.norm1(x + self._drop(x2)), self.norm2), state

    def prefill(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """Apply the layer to ``T`` elements at once, as ``T`` calls of `forward` would.

        Arguments:
            x: ``(N, T, E)``.
            state: the state to continue from, or ``None``.

        Returns:
            ``(N, T, E)`` and the state after the last element.
        """
        check_prompt("x", x, self.d_model)
        check_model_dtype("x", x, self.linear1.weight.dtype)
        x2, state = self.attention.prefill(x, x, x, state)
        return self._feed_forward(self.norm1(x + self._drop(x2)), self.norm2), state


class RecurrentTransformerEncoder(TransformerEncoder):
    """A stack of recurrent encoder layers with an optional final normalisation.

    It keeps one state per layer in a `TransformerState`.

    Arguments:
        layers: `RecurrentTransformerEncoderLayer` instances.
        norm_layer: applied to the output of the last layer (default: None).
        event_dispatcher: dispatcher instance or key; each layer's output is dispatched as an
            `IntermediateOutput` event.

    Example:
        >>> from recurrent_transformer.builders import RecurrentEncoderBuilder
        >>> model = RecurrentEncoderBuilder.from_kwargs(
        ...     n_layers=2, n_heads=4, query_dimensions=16, value_dimensions=16,
        ...     attention_type="linear").get()
        >>> x, state = model(torch.rand(3, 64))
        >>> x, state = model(x, state=state)
        >>> x.shape, len(state)
        (torch.Size([3, 64]), 2)
    """

    # the recurrent stack shares the batch stack's constructor, not its call
    def forward(  # type: ignore[override]
        self, x: Tensor, state: Any = None, memory: Any = None
    ) -> tuple[Tensor, TransformerState]:
        """Apply every layer to one element.

        Arguments:
            x: ``(N, E)``, one element of each sequence.
            state: the `TransformerState` returned for the previous element, or
                ``None`` for the first element.
            memory: deprecated name of ``state`` (warns).

        Returns:
            ``(N, E)`` and the new `TransformerState`.
        """
        state = check_state(state, memory)
        if self.layers:
            check_element("x", x, _width(self.layers), type(self).__name__)
            if isinstance(self.layers[0], RecurrentTransformerEncoderLayer):
                check_model_dtype("x", x, self.layers[0].linear1.weight.dtype)
        states = layer_states(state, len(self.layers), type(self).__name__)
        chained = (
            chained_step(self, x, states, RecurrentTransformerEncoderLayer) if self.layers else None
        )
        if chained is not None:  # every layer in one call (see _step_chain)
            return chained
        return run_layers(self, x, states, lambda layer, x, s: layer(x, s))

    def prefill(self, x: Tensor, state: Any = None) -> tuple[Tensor, TransformerState]:
        """Consume ``T`` elements in one parallel pass, as ``T`` calls of `forward` would.

        For example a prompt before generating.

        Arguments:
            x: ``(N, T, E)``.
            state: the state to continue from, or ``None``.

        Returns:
            ``(N, T, E)`` (the outputs of all ``T`` elements) and the state after the last.
        """
        if self.layers:
            check_prompt("x", x, _width(self.layers))
        states = layer_states(state, len(self.layers), type(self).__name__)
        return run_layers(self, x, states, lambda layer, x, s: layer.prefill(x, s))


# decoder


class RecurrentTransformerDecoderLayer(_FeedForward, TransformerDecoderLayer):
    """Self attention, cross attention to a memory, then a feed-forward network, one step at a time.

    The self attention sees the previous elements; each block has a residual connection followed by
    LayerNorm. The recurrent dual of `attention_core.transformers.TransformerDecoderLayer`, whose
    constructor and parameters it shares (so a state_dict moves between the two).

    Arguments:
        self_attention: a `RecurrentAttentionLayer`.
        cross_attention: a
            `RecurrentCrossAttentionLayer`.
        d_model: the feature size ``E``.
        d_ff: feed-forward hidden size (default: ``4 * d_model``).
        dropout: dropout rate (default: 0.1).
        activation: ``"relu"`` or ``"gelu"`` (default: ``"relu"``).
        event_dispatcher: dispatcher instance or key.
    """

    self_attention: RecurrentAttentionLayer
    cross_attention: RecurrentCrossAttentionLayer

    def _states(self, state: Any) -> tuple[Any, Any]:
        if state is None:
            return None, None
        if not isinstance(state, (DecoderLayerState, list, tuple)) or len(state) != 2:
            raise TypeError(
                f"{type(self).__name__} needs the DecoderLayerState it returned as state; "
                f"got {type(state).__name__}"
            )
        return tuple(state)

    # the recurrent layer shares the batch layer's constructor and parameters, not its call
    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_length_mask: BaseMask | None = None,
        state: Any = None,
    ) -> tuple[Tensor, DecoderLayerState]:
        """Apply the layer to one element.

        Arguments:
            x: ``(N, E)``, one element of each sequence.
            memory: ``(N, S, E)``, read (projected) only at the first element; later calls
                may pass ``None``.
            memory_length_mask: ``(N, S)`` mask of the real memory positions (default: all).
            state: the `DecoderLayerState` from the previous element, or ``None``.

        Returns:
            ``(N, E)`` and the new `DecoderLayerState`.
        """
        N = check_element("x", x, self.d_model, type(self).__name__)[0]
        check_model_dtype("x", x, self.linear1.weight.dtype)
        self_state, cross_state = self._states(state)
        if cross_state is None:
            check_memory(memory, memory_length_mask, N, self)
        norms = (self.norm1, self.norm2, self.norm3)
        if fused_step_enabled(self, x, norms, (self.self_attention, self.cross_attention)):
            heads, self_state = self_attention_heads(self.self_attention, x, self_state)
            x = attention_sublayer(x, heads, self.self_attention.out_projection, self.norm1)
            heads, cross_state = self.cross_attention.heads(
                x, memory, memory, memory_length_mask, cross_state
            )
            x = attention_sublayer(x, heads, self.cross_attention.out_projection, self.norm2)
            x = feed_forward_sublayer(self, x, self.norm3)
            return x, DecoderLayerState(self_state, cross_state)
        x2, self_state = self.self_attention(x, x, x, self_state)
        x = self.norm1(x + self._drop(x2))
        x2, cross_state = self.cross_attention(x, memory, memory, memory_length_mask, cross_state)
        x = self.norm2(x + self._drop(x2))
        return self._feed_forward(x, self.norm3), DecoderLayerState(self_state, cross_state)

    def prefill(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_length_mask: BaseMask | None = None,
        state: Any = None,
    ) -> tuple[Tensor, DecoderLayerState]:
        """Apply the layer to ``T`` elements at once.

        Arguments as `forward` with ``x`` of shape ``(N, T, E)``.

        Returns:
            ``(N, T, E)`` and the state after the last element.
        """
        N = check_prompt("x", x, self.d_model)[0]
        check_model_dtype("x", x, self.linear1.weight.dtype)
        self_state, cross_state = self._states(state)
        if cross_state is None:
            check_memory(memory, memory_length_mask, N, self)
        x2, self_state = self.self_attention.prefill(x, x, x, self_state)
        x = self.norm1(x + self._drop(x2))
        x2, cross_state = self.cross_attention.prefill(
            x, memory, memory, memory_length_mask, cross_state
        )
        x = self.norm2(x + self._drop(x2))
        return self._feed_forward(x, self.norm3), DecoderLayerState(self_state, cross_state)


class RecurrentTransformerDecoder(TransformerDecoder):
    """A stack of recurrent decoder layers with an optional final normalisation.

    One `DecoderLayerState` per layer in a `TransformerState`.

    Arguments:
        layers: `RecurrentTransformerDecoderLayer` instances.
        norm_layer: applied to the output (default: None).
        event_dispatcher: dispatcher instance or key.
    """

    # the recurrent stack shares the batch stack's constructor, not its call
    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_length_mask: BaseMask | None = None,
        state: Any = None,
    ) -> tuple[Tensor, TransformerState]:
        """Apply every layer to one element.

        Arguments:
            x: ``(N, E)``, one element of each sequence.
            memory: ``(N, S, E)``, the sequence to attend to (read at the first element).
            memory_length_mask: ``(N, S)`` mask of the real memory positions (default: all).
            state: the `TransformerState` from the previous element, or ``None``.

        Returns:
            ``(N, E)`` and the new `TransformerState`.
        """
        if self.layers:
            check_element("x", x, _width(self.layers), type(self).__name__)
        states = layer_states(state, len(self.layers), type(self).__name__)

        chained = (
            chained_decoder_step(self, x, states, RecurrentTransformerDecoderLayer)
            if self.layers
            else None
        )
        if chained is not None:  # every layer in one call (see _decoder_chain)
            return chained

        def call(layer, x, layer_state):
            return layer(x, memory, memory_length_mask=memory_length_mask, state=layer_state)

        return run_layers(self, x, states, call)

    def prefill(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_length_mask: BaseMask | None = None,
        state: Any = None,
    ) -> tuple[Tensor, TransformerState]:
        """Consume ``T`` elements in one parallel pass.

        Arguments as `forward` with ``x`` of shape ``(N, T, E)``.

        Returns:
            ``(N, T, E)`` and the state after the last element.
        """
        if self.layers:
            check_prompt("x", x, _width(self.layers))
        states = layer_states(state, len(self.layers), type(self).__name__)

        def call(layer, x, layer_state):
            return layer.prefill(x, memory, memory_length_mask, layer_state)

        return run_layers(self, x, states, call)
