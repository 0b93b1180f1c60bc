"""The Block-Recurrent Transformer (Hutchins et al. 2022) for PyTorch.

Status: this package is a skeleton in version 0.1.0; see its README for what is coming.
"""

__version__ = "0.1.0"
