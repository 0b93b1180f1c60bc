"""Autoregressive decoding shared by every model family.

Logit filters and sampling, and a ``prefill``/``step`` protocol with the `stream` and `generate`
loops."""

from .generate import StepModel, generate, stream
from .sampling import filter_by_threshold, sample, threshold_top_k, top_k_filter, top_p_filter

__all__ = [
    "StepModel",
    "filter_by_threshold",
    "generate",
    "sample",
    "stream",
    "threshold_top_k",
    "top_k_filter",
    "top_p_filter",
]
