"""attention-core: fast and efficient attention for PyTorch.

The successor of ``fast_transformers`` with the same module layout: replace the import
prefix ``fast_transformers.`` with ``attention_core.``.
"""

__version__ = "0.1.0"
