"""Gates that replace the residual connections of the recurrent direction.

The recurrent (horizontal) direction of the Block-Recurrent Transformer. Reference: Hutchins et al.
2022, arXiv 2203.07852, section 3.3.

Both combine the previous state ``c`` with an update ``z`` computed from the attention output
``h`` (or the feed-forward hidden activations):

* fixed gate: ``g = sigmoid(b)`` with a learned bias ``b`` per feature, then
  ``c' = c * g + z * (1 - g)``. The gate does not depend on the input; it is a learned
  exponential moving average.
* LSTM gate: ``i = sigmoid(W_i h + b_i - 1)``, ``f = sigmoid(W_f h + b_f + 1)``,
  ``c' = c * f + tanh(z) * i``; the constant offsets bias a fresh gate towards remembering.

Initialisation follows the paper's code (meliad): biases ``N(0, 0.1)``, gate kernels at 0.1x
the usual scale.

Einstein notation: ``...`` leading axes (batch, state vectors), ``d`` model feature,
``k`` gate input feature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attention_core.checks import check_positive_int

__all__ = ["GATE_TYPES", "FixedGate", "LSTMGate", "make_gate"]


class FixedGate(nn.Module):
    """``c' = c * sigmoid(b) + z * (1 - sigmoid(b))`` with a learned bias ``b`` ``(d,)``.

    Arguments:
        dim: feature size ``d``.

    Shapes: ``forward(h (..., k), state (..., d), update (..., d))`` -> ``(..., d)``; ``h`` is
    ignored (accepted so that every gate has one signature).
    """

    def __init__(self, dim: int):
        super().__init__()
        check_positive_int("dim", dim)
        self.bias = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, h: Tensor, state: Tensor, update: Tensor) -> Tensor:
        """Mix ``state`` and ``update`` ``(..., d)`` with the fixed learned gate."""
        g = self.bias.sigmoid()
        return state * g + update * (1.0 - g)


class LSTMGate(nn.Module):
    """LSTM-style input and forget gates computed from ``h``.

    ``c' = c * sigmoid(W_f h + b_f + 1) + tanh(z) * sigmoid(W_i h + b_i - 1)``.

    Arguments:
        dim_in: size ``k`` of the gate input ``h``.
        dim: feature size ``d`` of the state.

    Shapes: ``forward(h (..., k), state (..., d), update (..., d))`` -> ``(..., d)``.
    """

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        check_positive_int("dim_in", dim_in)
        check_positive_int("dim", dim)
        self.to_gates = nn.Linear(dim_in, 2 * dim)
        with torch.no_grad():
            self.to_gates.weight.mul_(0.1)
            self.to_gates.bias.normal_(0.0, 0.1)

    def forward(self, h: Tensor, state: Tensor, update: Tensor) -> Tensor:
        """Gate ``state`` ``(..., d)`` and ``tanh(update)`` with gates computed from ``h``."""
        input_gate, forget_gate = self.to_gates(h).chunk(2, dim=-1)
        i = torch.sigmoid(input_gate - 1.0)
        f = torch.sigmoid(forget_gate + 1.0)
        return state * f + torch.tanh(update) * i


GATE_TYPES = ("fixed", "lstm")


def make_gate(gate_type: str, dim_in: int, dim: int) -> nn.Module:
    """A `FixedGate` (``"fixed"``) or an `LSTMGate` (``"lstm"``)."""
    if gate_type == "fixed":
        return FixedGate(dim)
    if gate_type == "lstm":
        return LSTMGate(dim_in, dim)
    raise ValueError(f"gate_type must be one of {GATE_TYPES}; got {gate_type!r}")
