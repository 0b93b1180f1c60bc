"""Transformer encoders and decoders that take any attention layer.

Post-norm like ``torch.nn.TransformerEncoderLayer``. Reference: Vaswani et al. 2017, arXiv
1706.03762.

Shapes: ``x`` is ``(N, L, E)``, ``memory`` is ``(N, S, E)``; masks are
`attention_core.masking` objects: ``attn_mask``/``x_mask`` ``(L, L)``, ``memory_mask``
``(L, S)``, length masks ``(N, L)`` and ``(N, S)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_model_dtype, check_positive_int, check_tensor
from .events import EventDispatcher, IntermediateOutput
from .masking import BaseMask, FullMask, LengthMask

__all__ = [
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)}; got {name!r}"
        ) from None


def _check_input(name: str, x: Tensor, d_model: int, model_dtype: torch.dtype) -> tuple[int, int]:
    check_tensor(name, x, dim=3, floating=True)
    if x.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape (N, L, {d_model}); got {tuple(x.shape)}")
    check_model_dtype(name, x, model_dtype)
    return x.shape[0], x.shape[1]


def _check_length_mask(name: str, mask, N: int, L: int, of: str, axes: str = "N, L") -> None:
    """A user's length mask must be ``(N, L)``: the batch and the length of ``of``."""
    if mask is None:
        return
    if not isinstance(mask, BaseMask):
        raise TypeError(f"{name} must be a BaseMask (e.g. LengthMask); got {type(mask).__name__}")
    if tuple(mask.shape) != (N, L):
        raise ValueError(
            f"{name} must have shape ({axes}) = ({N}, {L}), the batch size and the sequence "
            f"length of {of}; got a mask of shape {tuple(mask.shape)}"
        )


def _full_lengths(x: Tensor, N: int, L: int) -> LengthMask:
    mask = LengthMask(torch.full((N,), L, dtype=torch.int64, device=x.device), max_len=L)
    mask._all_ones = True  # known without reading the lengths (also when compiling)
    return mask


class TransformerEncoderLayer(nn.Module):
    """Self attention followed by a feed-forward network.

    Each has a residual connection and a LayerNorm after it.

    Arguments:
        attention: an attention layer such as `AttentionLayer`,
            called as ``attention(x, x, x, attn_mask, query_lengths, key_lengths)``.
        d_model: the feature size ``E``.
        d_ff: the hidden size of the feed-forward network (default: ``4 * d_model``).
        dropout: dropout after attention and in the feed-forward network (default: 0.1).
        activation: ``"relu"`` or ``"gelu"`` (default: ``"relu"``).
        event_dispatcher: dispatcher instance or key for `IntermediateOutput`.
    """

    def __init__(
        self, attention, d_model, d_ff=None, dropout=0.1, activation="relu", event_dispatcher=""
    ):
        super().__init__()
        check_positive_int("d_model", d_model)
        d_ff = d_ff or 4 * d_model
        check_positive_int("d_ff", d_ff)
        self.attention = attention
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.d_model = d_model
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(
        self, x: Tensor, attn_mask: BaseMask | None = None, length_mask: BaseMask | None = None
    ) -> Tensor:
        """Apply the layer.

        Arguments:
            x: ``(N, L, E)``.
            attn_mask: ``(L, L)`` mask (default: all ones).
            length_mask: ``(N, L)`` length mask (default: no padding).

        Returns:
            ``(N, L, E)``.
        """
        N, L = _check_input("x", x, self.d_model, self.linear1.weight.dtype)
        _check_length_mask("length_mask", length_mask, N, L, "x")
        attn_mask = FullMask(L, device=x.device) if attn_mask is None else attn_mask
        length_mask = _full_lengths(x, N, L) if length_mask is None else length_mask
        x = x + self.dropout(
            self.attention(
                x, x, x, attn_mask=attn_mask, query_lengths=length_mask, key_lengths=length_mask
            )
        )
        y = x = self.norm1(x)
        y = self.dropout(self.activation(self.linear1(y)))
        y = self.dropout(self.linear2(y))
        return self.norm2(x + y)


class TransformerEncoder(nn.Module):
    """A stack of encoder layers with an optional final normalisation.

    Arguments:
        layers: the `TransformerEncoderLayer` instances.
        norm_layer: applied to the output of the last layer (default: None).
        event_dispatcher: dispatcher instance or key; each layer's output is dispatched as
            an `IntermediateOutput` event.

    Example:
        >>> from attention_core.builders import TransformerEncoderBuilder
        >>> builder = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=4)
        >>> encoder = builder.get()
        >>> encoder(torch.rand(3, 20, 256)).shape
        torch.Size([3, 20, 256])
    """

    def __init__(self, layers, norm_layer=None, event_dispatcher=""):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm_layer
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(
        self, x: Tensor, attn_mask: BaseMask | None = None, length_mask: BaseMask | None = None
    ) -> Tensor:
        """Apply every layer.

        Arguments:
            x: ``(N, L, E)``.
            attn_mask: ``(L, L)`` mask, e.g. `TriangularCausalMask` (default: all ones).
            length_mask: ``(N, L)`` length mask of padded sequences (default: no padding).

        Returns:
            ``(N, L, E)``.
        """
        check_tensor("x", x, dim=3, floating=True)
        N, L = x.shape[0], x.shape[1]
        _check_length_mask("length_mask", length_mask, N, L, "x")
        attn_mask = FullMask(L, device=x.device) if attn_mask is None else attn_mask
        length_mask = _full_lengths(x, N, L) if length_mask is None else length_mask
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask, length_mask=length_mask)
            if self.event_dispatcher.has_listeners:
                self.event_dispatcher.dispatch(IntermediateOutput(layer, x))
        if self.norm is not None:
            x = self.norm(x)
        return x


class TransformerDecoderLayer(nn.Module):
    """Self attention, cross attention over ``memory``, then a feed-forward network.

    Each has a residual connection followed by LayerNorm.

    Arguments:
        self_attention: attention layer over ``x``.
        cross_attention: attention layer from ``x`` to ``memory``.
        d_model: the feature size ``E``.
        d_ff: feed-forward hidden size (default: ``4 * d_model``).
        dropout: dropout rate (default: 0.1).
        activation: ``"relu"`` or ``"gelu"`` (default: ``"relu"``).
        event_dispatcher: dispatcher instance or key.
    """

    def __init__(
        self,
        self_attention,
        cross_attention,
        d_model,
        d_ff=None,
        dropout=0.1,
        activation="relu",
        event_dispatcher="",
    ):
        super().__init__()
        check_positive_int("d_model", d_model)
        d_ff = d_ff or 4 * d_model
        check_positive_int("d_ff", d_ff)
        self.self_attention = self_attention
        self.cross_attention = cross_attention
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.d_model = d_model
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        x_mask: BaseMask | None = None,
        x_length_mask: BaseMask | None = None,
        memory_mask: BaseMask | None = None,
        memory_length_mask: BaseMask | None = None,
    ) -> Tensor:
        """Apply the layer.

        Arguments:
            x: ``(N, L, E)``.
            memory: ``(N, S, E)``.
            x_mask: ``(L, L)`` self-attention mask (default: all ones).
            x_length_mask: ``(N, L)`` (default: no padding).
            memory_mask: ``(L, S)`` cross-attention mask (default: all ones).
            memory_length_mask: ``(N, S)`` (default: no padding).

        Returns:
            ``(N, L, E)``.
        """
        dtype = self.linear1.weight.dtype
        N, L = _check_input("x", x, self.d_model, dtype)
        memory_width = getattr(self.cross_attention, "d_model_keys", self.d_model)
        N_memory, S = _check_input("memory", memory, memory_width, dtype)
        if N_memory != N:
            raise ValueError(f"x and memory must have the same batch size; got {N} and {N_memory}")
        _check_length_mask("x_length_mask", x_length_mask, N, L, "x")
        _check_length_mask("memory_length_mask", memory_length_mask, N, S, "memory", "N, S")
        x_mask = FullMask(L, device=x.device) if x_mask is None else x_mask
        x_length_mask = _full_lengths(x, N, L) if x_length_mask is None else x_length_mask
        memory_mask = FullMask(L, S, device=x.device) if memory_mask is None else memory_mask
        if memory_length_mask is None:
            memory_length_mask = _full_lengths(x, N, S)
        x = x + self.dropout(
            self.self_attention(
                x, x, x, attn_mask=x_mask, query_lengths=x_length_mask, key_lengths=x_length_mask
            )
        )
        x = self.norm1(x)
        x = x + self.dropout(
            self.cross_attention(
                x,
                memory,
                memory,
                attn_mask=memory_mask,
                query_lengths=x_length_mask,
                key_lengths=memory_length_mask,
            )
        )
        y = x = self.norm2(x)
        y = self.dropout(self.activation(self.linear1(y)))
        y = self.dropout(self.linear2(y))
        return self.norm3(x + y)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers with an optional final normalisation.

    Arguments:
        layers: the `TransformerDecoderLayer` instances.
        norm_layer: applied to the output (default: None).
        event_dispatcher: dispatcher instance or key.
    """

    def __init__(self, layers, norm_layer=None, event_dispatcher=""):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm_layer
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        x_mask: BaseMask | None = None,
        x_length_mask: BaseMask | None = None,
        memory_mask: BaseMask | None = None,
        memory_length_mask: BaseMask | None = None,
    ) -> Tensor:
        """Apply every layer; arguments as `TransformerDecoderLayer.forward`.

        Returns:
            ``(N, L, E)``.
        """
        check_tensor("x", x, dim=3, floating=True)
        check_tensor("memory", memory, dim=3, floating=True)
        N, L, S = x.shape[0], x.shape[1], memory.shape[1]
        _check_length_mask("x_length_mask", x_length_mask, N, L, "x")
        _check_length_mask("memory_length_mask", memory_length_mask, N, S, "memory", "N, S")
        x_mask = FullMask(L, device=x.device) if x_mask is None else x_mask
        x_length_mask = _full_lengths(x, N, L) if x_length_mask is None else x_length_mask
        memory_mask = FullMask(L, S, device=x.device) if memory_mask is None else memory_mask
        if memory_length_mask is None:
            memory_length_mask = _full_lengths(x, N, S)
        for layer in self.layers:
            x = layer(
                x,
                memory,
                x_mask=x_mask,
                x_length_mask=x_length_mask,
                memory_mask=memory_mask,
                memory_length_mask=memory_length_mask,
            )
            if self.event_dispatcher.has_listeners:
                self.event_dispatcher.dispatch(IntermediateOutput(layer, x))
        if self.norm is not None:
            x = self.norm(x)
        return x
