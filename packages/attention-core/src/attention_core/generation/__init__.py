"""Autoregressive decoding: logit filters and sampling, and a ``prefill``/``step``
protocol with :func:`stream` and :func:`generate` loops shared by every model family."""

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
