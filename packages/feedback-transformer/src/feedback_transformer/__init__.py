"""The Feedback Transformer (Fan et al. 2021, arXiv 2002.09402) for PyTorch.

``FeedbackTransformer`` is the language model of feedback-transformer-pytorch's README (with
its cross attention), ``FeedbackMemory`` what it returns and accepts as memory, and
``FeedbackState`` its token-by-token decoding state (``prefill``/``step``).

Modules, in reading order: :mod:`.model` (the model, its checks and its window loop),
:mod:`.layers` (one layer's blocks), :mod:`.attention` (a window's attention over the
memory), :mod:`.memory` (the memory and its buffers), :mod:`.linear` (per-step linear maps
with one weight gradient per call), :mod:`.kernel` (the compiled inference path) and
:mod:`.generation` (decoding).
"""

from .generation import FeedbackState
from .memory import FeedbackMemory
from .model import FeedbackTransformer

__version__ = "0.1.0"

__all__ = ["FeedbackMemory", "FeedbackState", "FeedbackTransformer", "__version__"]
