"""Feature maps for linear attention.

A feature map is a ``phi`` such that ``phi(q) . phi(k)`` stands in for the softmax kernel
``exp(q . k)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..utils import forward_hooks_registered

__all__ = ["ActivationFunctionFeatureMap", "FeatureMap", "elu_feature_map", "is_elu_feature_map"]


class FeatureMap(nn.Module):
    """Base class of feature maps.

    Arguments:
        query_dims: the head dimension ``E`` of the queries and keys it maps.
    """

    def __init__(self, query_dims: int):
        super().__init__()
        self.query_dims = query_dims

    def new_feature_map(self, device: torch.device | str) -> None:
        """Sample new random parameters, if any; attentions call this on every forward."""
        raise NotImplementedError

    def forward_queries(self, x: Tensor) -> Tensor:
        """Map queries ``(..., E)`` to features ``(..., F)``."""
        return self(x)

    def forward_keys(self, x: Tensor) -> Tensor:
        """Map keys ``(..., E)`` to features ``(..., F)``."""
        return self(x)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(..., E)`` to ``(..., F)``."""
        raise NotImplementedError

    @classmethod
    def factory(cls, *args: Any, **kwargs: Any) -> Callable[[int], FeatureMap]:
        """Return ``query_dims -> cls(query_dims, *args, **kwargs)``.

        Attentions receive feature maps as such factories because they know the query
        dimension only when built.

        Example:
            >>> make = Favor.factory(n_dims=128)  # doctest: +SKIP
            >>> LinearAttention(64, feature_map=make)  # doctest: +SKIP
        """

        def inner(query_dims: int) -> FeatureMap:
            return cls(query_dims, *args, **kwargs)

        inner.__doc__ = f"Build a {cls.__name__} for queries of ``query_dims`` features."
        return inner


class ActivationFunctionFeatureMap(FeatureMap):
    """A deterministic feature map that applies ``activation_function`` elementwise.

    Arguments:
        query_dims: the head dimension.
        activation_function: ``Tensor -> Tensor``, must return positive values for the
            normaliser of linear attention to be positive.
    """

    def __init__(self, query_dims: int, activation_function: Callable[[Tensor], Tensor]):
        super().__init__(query_dims)
        self.activation_function = activation_function

    def new_feature_map(self, device: torch.device | str) -> None:
        return

    def forward(self, x: Tensor) -> Tensor:
        return self.activation_function(x)


def _elu_plus_one(x: Tensor) -> Tensor:
    return torch.nn.functional.elu(x) + 1


elu_feature_map = ActivationFunctionFeatureMap.factory(_elu_plus_one)
"""Factory of the ``elu(x) + 1`` feature map of Katharopoulos et al. 2020 (the default)."""


def is_elu_feature_map(feature_map: nn.Module) -> bool:
    """Tell whether ``feature_map`` is the default ``elu(x) + 1`` map built by `elu_feature_map`.

    A kernel that applies ``elu(x) + 1`` itself (for example
    `attention_core.linear_step.linear_attention_step` with ``elu_feature_map=True``) may then
    replace the module call: the map has no forward hooks, and no global forward hooks are set.

    Arguments:
        feature_map: a feature map module (any `FeatureMap`).

    Returns:
        ``True`` for an unhooked ``elu(x) + 1`` map, else ``False``.

    Example:
        >>> is_elu_feature_map(elu_feature_map(8))
        True
    """
    return (
        type(feature_map) is ActivationFunctionFeatureMap
        and feature_map.activation_function is _elu_plus_one
        and not forward_hooks_registered(feature_map)
    )
