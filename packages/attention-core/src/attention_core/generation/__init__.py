"""Autoregressive decoding: logit filters and sampling, and a ``prefill``/``step``
protocol with `stream` and `generate` loops shared by every model family."""

from .generate import StepModel, generate, stream
from .sampling import filter_by_threshold, sample, top_k_filter, top_p_filter

__all__ = [
    "StepModel",
    "filter_by_threshold",
    "generate",
    "sample",
    "stream",
    "top_k_filter",
    "top_p_filter",
]
