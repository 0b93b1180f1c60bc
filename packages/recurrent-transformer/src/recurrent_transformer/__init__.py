"""Recurrent (one element at a time) transformer encoders and decoders with constant-cost
token-by-token inference: the successor of ``fast_transformers.recurrent``.

Modules: :mod:`.transformers` (RecurrentTransformerEncoder/Decoder and their layers),
:mod:`.attention` (recurrent self and cross attentions), :mod:`.builders`
(RecurrentEncoderBuilder, RecurrentDecoderBuilder), :mod:`.state` (the documented state
objects) and :mod:`.lm` (a small causal language model for streaming generation).
"""

__version__ = "0.1.0"
