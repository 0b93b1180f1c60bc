"""Conditional full attention as a recurrence.

Softmax attention while the sequence is short, another recurrent attention once it is long.
Reference for softmax attention: Vaswani et al. 2017, arXiv 1706.03762.

The batch ``conditional-full`` decides once per call from the whole length ``L``: full
attention when ``L <= length_limit``, the other attention otherwise. A recurrent model does not
know ``L`` in advance, so this form decides per step from the number of elements seen so far,
which is what the batch attention does on each prefix: steps ``1 .. length_limit`` are softmax
attention over a `KVCache`, later steps use the other
attention. The other attention is stepped from the first element (it needs the whole history
when it takes over) and the cache is dropped at the switch. Stepping through a sequence of
length ``<= length_limit`` therefore equals the batch attention exactly; for longer sequences
the first ``length_limit`` outputs are the exact softmax ones instead of the other attention's.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attention_core.attention.conditional_full_attention import ConditionalFullAttention
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
)

from ...state import ConditionalState, check_state_type
from .base import RecurrentAttention
from .full_attention import RecurrentFullAttention

__all__ = ["RecurrentConditionalFullAttention"]


# the batch attention gives the constructor, parameters and registry entry (with a recurrent
# full attention inside); the recurrent interface (first in the MRO) replaces its forward
class RecurrentConditionalFullAttention(RecurrentAttention, ConditionalFullAttention):  # type: ignore[misc]
    """Recurrent softmax attention for the first ``length_limit`` steps, then ``attention``.

    Builders create it from composite types such as ``"conditional-full:linear"``. The
    submodules are named ``full_attention`` and ``other_attention`` as in the batch attention.

    Arguments:
        attention: the recurrent attention used after ``length_limit`` steps.
        length_limit: the number of steps done with softmax attention (default: 512).
        softmax_temp: see `RecurrentFullAttention`.
        attention_dropout: see `RecurrentFullAttention`.
        event_dispatcher: dispatcher instance or key, given to the full attention.

    Shapes: query and key ``(N, H, E)``, value ``(N, H, D)``; returns ``(N, H, D)``. The state
    is a `ConditionalState`.
    """

    full_attention_class = RecurrentFullAttention
    full_attention: RecurrentFullAttention

    def step(self, query: Tensor, key: Tensor, value: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Step both attentions while within ``length_limit``, then only the other one."""
        if state is None:
            full_state, other_state, length = None, None, 0
        else:
            state = check_state_type("state", state, ConditionalState, type(self).__name__)
            full_state, other_state, length = state.full, state.other, state.length
        out, other_state = self.other_attention(query, key, value, other_state)
        if length < self.length_limit:
            out, full_state = self.full_attention.step(query, key, value, full_state)
        else:
            full_state = None
        return out, ConditionalState(full_state, other_state, length + 1)


RecurrentAttentionRegistry.register(
    "conditional-full",
    RecurrentConditionalFullAttention,
    AttentionRegistry.parameter_tuples("conditional-full"),
)
