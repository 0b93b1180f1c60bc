"""The Feedback Transformer (Fan et al. 2021, arXiv 2002.09402) for PyTorch.

`FeedbackTransformer` is the language model of feedback-transformer-pytorch's README (with
its cross attention), `FeedbackMemory` what it returns and accepts as memory, and
`FeedbackState` its token-by-token decoding state (``prefill``/``step``).

Modules, in reading order: `reference` (the model as the paper writes it, layer by layer
and window by window), `layers` (one layer's blocks), `memory` (the memory a call returns
and accepts), `model` (the model's parameters and its `forward`) and `generation`
(token-by-token decoding). The private modules (``_window_loop``, ``_fused_window_step``,
``_window_attention``, ``_step_linear``, ``_kv_store``) compute the same function faster.
"""

from .generation import FeedbackState
from .memory import FeedbackMemory
from .model import FeedbackTransformer

__version__ = "0.1.0"

__all__ = ["FeedbackMemory", "FeedbackState", "FeedbackTransformer", "__version__"]
