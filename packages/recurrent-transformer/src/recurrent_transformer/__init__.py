"""Recurrent (one element at a time) transformer encoders and decoders with constant-cost
token-by-token inference.

Status: this package is a skeleton in version 0.1.0; see its README for what is coming.
"""

__version__ = "0.1.0"
