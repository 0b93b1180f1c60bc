"""The Block-Recurrent Transformer for PyTorch, built on attention-core.

Reference: Hutchins et al. 2022, arXiv 2203.07852.

* `BlockRecurrentTransformer`: the language model; ``forward(seq, xl_memories=None,
  states=None, return_loss=False) -> (out, mems, states)``.
* `RecurrentTrainerWrapper`: segment-by-segment training with structured dropout of
  memories and states, and generation with recurrence.
* `XLMemories` / `LayerMemory`: the memories a call returns.
"""

from .memory import LayerMemory, XLMemories
from .transformer import BlockRecurrentTransformer, DecodeState
from .wrapper import RecurrentTrainerWrapper

__version__ = "0.1.0"

__all__ = [
    "BlockRecurrentTransformer",
    "DecodeState",
    "LayerMemory",
    "RecurrentTrainerWrapper",
    "XLMemories",
]
