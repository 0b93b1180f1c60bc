"""Feature maps for linear attentions.

The ``feature_map=`` argument of LinearAttention and CausalLinearAttention takes a factory such as
``Favor.factory(n_dims=256)``."""

from .base import ActivationFunctionFeatureMap, FeatureMap, elu_feature_map
from .fourier_features import (
    Favor,
    GeneralizedRandomFeatures,
    RandomFourierFeatures,
    SmoothedRandomFourierFeatures,
)

__all__ = [
    "ActivationFunctionFeatureMap",
    "Favor",
    "FeatureMap",
    "GeneralizedRandomFeatures",
    "RandomFourierFeatures",
    "SmoothedRandomFourierFeatures",
    "elu_feature_map",
]
