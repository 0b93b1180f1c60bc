"""Recurrent transformer encoders and decoders with constant-cost token-by-token inference.

They process one element at a time: the successor of ``fast_transformers.recurrent``.

Modules: `.transformers` (RecurrentTransformerEncoder/Decoder and their layers),
`.attention` (recurrent self and cross attentions), `.builders`
(RecurrentEncoderBuilder, RecurrentDecoderBuilder), `.state` (the documented state
objects) and `.lm` (a small causal language model for streaming generation).
"""

__version__ = "0.1.0"
