"""attention-core: fast and efficient attention for PyTorch.

The successor of ``fast_transformers`` with the same module layout: replace the import
prefix ``fast_transformers.`` with ``attention_core.``.
"""

# torch first, always: the compiled extension attention_core._C links libgomp.so.1, which must
# resolve to the copy torch loads (one OpenMP runtime and thread pool), even for a caller whose
# first import is attention_core._C itself.
import torch  # noqa: F401

__version__ = "0.1.0"
