"""This module computes one fused step of recurrent (causal) linear attention.

The step follows Katharopoulos et al. 2020, "Transformers are RNNs" (arXiv 2006.16236): the
feature map, the state update and the normalised read run in one pass over the state.

With ``S = sum_j phi(K_j) V_j^T`` and ``Z = sum_j phi(K_j)`` over the previous steps, a step
with query ``q``, key ``k`` and value ``v`` computes

``S' = S + phi(k) v^T``, ``Z' = Z + phi(k)``, ``out = phi(q)^T S' / (phi(q) . Z' + eps)``.

Implementations behind `linear_attention_step`:

- `linear_attention_step_reference` (`attention_core.linear_step.reference`), the formula
  in plain PyTorch: the test oracle and the path for half precision and for devices without
  a kernel;
- the compiled CPU kernel of ``attention_core._C`` (``csrc/linear_step.h``) for float32 and
  float64 CPU tensors: every row of ``S`` is read once, updated, written to the new state and
  used for the output while it is in registers, on torch's thread pool (one thread for small
  states). ``ATTENTION_CORE_FORCE_REFERENCE=1`` forces the reference.

Both are the ``torch.library`` op ``torch.ops.attention_core.linear_attention_step`` (schema
``(Tensor query, Tensor key, Tensor value, Tensor? S, Tensor? Z, float eps,
bool elu_feature_map) -> (Tensor, Tensor, Tensor)``), with a fake registration for
``torch.compile`` and autograd (the backward is the written-out gradient of the formula, in
plain PyTorch).

Precision: for float16/bfloat16 inputs the feature map runs in the input dtype, the state
accumulates in float32 (a half-precision sum of thousands of steps stops growing) and the
output has the input dtype.
"""

from __future__ import annotations

from torch import Tensor

from .._extension import needs_graph
from ._op import check_step, compute_step, linear_attention_step_op
from .reference import (
    accumulation_dtype,
    elu_feature,
    linear_attention_step_backward_reference,
    linear_attention_step_reference,
)

__all__ = [
    "accumulation_dtype",
    "elu_feature",
    "linear_attention_step",
    "linear_attention_step_backward_reference",
    "linear_attention_step_reference",
]


def linear_attention_step(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    state: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-6,
    *,
    elu_feature_map: bool = True,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Take one step of causal linear attention and return its output and the new state.

    ``S' = S + phi(k) v^T``, ``Z' = Z + phi(k)``, ``out = phi(q)^T S' / (phi(q) . Z' + eps)``
    per batch element and head, with ``phi(x) = elu(x) + 1`` (``elu_feature_map=True``) or
    the identity (queries and keys mapped beforehand by any other feature map). The state
    passed in is never modified, so a caller may keep it (e.g. to branch a beam search).
    Stepping through a sequence gives the rows of the batch causal linear attention.

    Differentiable with respect to every tensor; works under ``torch.compile``.

    Arguments:
        query: `(N, H, E)` queries of this step.
        key: `(N, H, E)` keys of this step.
        value: `(N, H, M)` values of this step.
        state: ``(S, Z)`` after the previous steps, ``S`` `(N, H, E, M)` and ``Z``
            `(N, H, E)` in the accumulation dtype (float32 for float16/bfloat16 inputs, else
            the input dtype), or ``None`` for the first step.
        eps: added to the normaliser (default: 1e-6).
        elu_feature_map: apply ``elu(x) + 1`` to ``query`` and ``key`` (default: True).

    Returns:
        ``out`` `(N, H, M)` in the dtype of ``value`` and the new state ``(S', Z')``.

    Raises:
        TypeError: an argument is not a tensor or has the wrong dtype.
        ValueError: shapes or devices disagree, or ``eps`` is negative or not finite.

    Example:
        >>> q, k, v = torch.rand(2, 4, 8), torch.rand(2, 4, 8), torch.rand(2, 4, 16)
        >>> out, (S, Z) = linear_attention_step(q, k, v)
        >>> out.shape, S.shape, Z.shape
        (torch.Size([2, 4, 16]), torch.Size([2, 4, 8, 16]), torch.Size([2, 4, 8]))
        >>> out, state = linear_attention_step(q, k, v, (S, Z))
    """
    S = Z = None
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"state must be a pair (S, Z) or None; got {type(state).__name__}")
        S, Z = state
    check_step(query, key, value, S, Z, eps)
    if needs_graph(query, key, value, S, Z):
        out, S, Z = linear_attention_step_op(query, key, value, S, Z, float(eps), elu_feature_map)
    else:  # the op's own implementation, without the dispatcher's cost (a few microseconds)
        out, S, Z = compute_step(query, key, value, S, Z, float(eps), bool(elu_feature_map))
    return out, (S, Z)
