"""The ``torch.library`` ops ``attention_core::residual_feed_forward`` and
``attention_core::residual_linear``: their checks, their CPU kernels
(``csrc/residual_step.h``) with the plain-PyTorch fallback, fake registrations and autograd
(through the reference).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import PLAIN_TENSORS, check_like, check_tensor, plain_eps
from .._extension import address, binding, needs_graph, use_kernels
from .._reference_autograd import register_reference_autograd
from .reference import ACTIVATIONS, residual_feed_forward_reference, residual_linear_reference

__all__ = [
    "check_feed_forward",
    "check_layer_norm",
    "check_linear",
    "compute_feed_forward",
    "compute_linear",
    "feed_forward",
    "linear",
    "residual_feed_forward_op",
    "residual_linear_op",
    "run_feed_forward",
    "run_linear",
]


def _check_x(x: Tensor) -> None:
    check_tensor("x", x, floating=True)
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., D); got a 0-dim tensor {tuple(x.shape)}")


def _check_param(
    name: str, t: Tensor | None, shape: tuple[int, ...], like: Tensor, optional: bool = True
) -> None:
    if t is not None or not optional:
        check_like(name, t, like, "x", shape)


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite non-negative number; got {eps!r}")
    if eps < 0:
        raise ValueError(f"eps must be a finite non-negative number; got {eps!r}")


def check_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> None:
    """Check a layer norm over the last dimension of ``x`` `(..., D)`: ``weight`` and
    ``bias`` `(D,)` of its dtype and device or ``None``, ``eps`` finite and non-negative."""
    _check_x(x)
    D = x.shape[-1]
    _check_param("weight", weight, (D,), x)
    _check_param("bias", bias, (D,), x)
    _check_eps(eps)


# The accepting fast paths of the checks: one pass of comparisons that is ``True`` only for
# arguments the full checks below accept (a recurrent step calls these ops with a few rows,
# where the checks' function calls cost as much as the kernel). Anything else, a wrong
# argument or merely an unusual one (an int ``eps``, a tensor subclass), goes through the
# full checks, which name the argument, the expected and the actual value.


def _param_accepted(
    t: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> bool:
    """``t`` is ``None`` or a plain tensor of ``shape``, ``dtype`` and ``device``."""
    return t is None or (
        type(t) in PLAIN_TENSORS and t.shape == shape and t.dtype == dtype and t.device == device
    )


def _feed_forward_accepted(
    x: Tensor,
    linear1_weight: Tensor,
    linear1_bias: Tensor | None,
    linear2_weight: Tensor,
    linear2_bias: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    activation: str,
    norm_first: bool,
    eps: float,
) -> bool:
    if type(x) not in PLAIN_TENSORS or type(linear2_weight) not in PLAIN_TENSORS:
        return False
    if not x.is_floating_point() or x.dim() < 1 or linear2_weight.dim() != 2:
        return False
    if type(norm_first) is not bool or not plain_eps(eps):
        return False
    D, hidden = x.shape[-1], linear2_weight.shape[1]
    if activation == "geglu":
        first = 2 * hidden
    elif activation == "relu" or activation == "gelu":
        first = hidden
    else:
        return False
    dtype, device = x.dtype, x.device
    return (
        linear1_weight is not None
        and _param_accepted(linear1_weight, (first, D), dtype, device)
        and _param_accepted(linear1_bias, (first,), dtype, device)
        and _param_accepted(linear2_weight, (D, hidden), dtype, device)
        and _param_accepted(linear2_bias, (D,), dtype, device)
        and _param_accepted(norm_weight, (D,), dtype, device)
        and _param_accepted(norm_bias, (D,), dtype, device)
    )


def _linear_accepted(
    x: Tensor,
    inputs: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm: bool,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
) -> bool:
    if type(x) not in PLAIN_TENSORS or type(inputs) not in PLAIN_TENSORS:
        return False
    if not x.is_floating_point() or x.dim() < 1 or inputs.dim() != x.dim():
        return False
    if type(norm) is not bool or not plain_eps(eps):
        return False
    dtype, device = x.dtype, x.device
    if inputs.shape[:-1] != x.shape[:-1] or inputs.dtype != dtype or inputs.device != device:
        return False
    D, K = x.shape[-1], inputs.shape[-1]
    return (
        weight is not None
        and _param_accepted(weight, (D, K), dtype, device)
        and _param_accepted(bias, (D,), dtype, device)
        and _param_accepted(norm_weight, (D,), dtype, device)
        and _param_accepted(norm_bias, (D,), dtype, device)
    )


def check_feed_forward(
    x: Tensor,
    linear1_weight: Tensor,
    linear1_bias: Tensor | None,
    linear2_weight: Tensor,
    linear2_bias: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    activation: str,
    norm_first: bool,
    eps: float,
) -> None:
    """Check every argument of `residual_feed_forward` before a kernel runs.

    ``x`` `(..., D)` floating; ``linear1_weight`` `(F, D)` (`(2 F, D)` for ``geglu``),
    ``linear2_weight`` `(D, F)`, biases and norm parameters of matching length or ``None``,
    all of the dtype and device of ``x``; ``activation`` one of ``relu``, ``gelu``, ``geglu``;
    ``norm_first`` a bool; ``eps`` finite and non-negative."""
    if _feed_forward_accepted(
        x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight, norm_bias,
        activation, norm_first, eps,
    ):  # fmt: skip
        return
    _check_x(x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    if not isinstance(norm_first, bool):
        raise TypeError(f"norm_first must be a bool; got {type(norm_first).__name__}")
    _check_eps(eps)
    D = x.shape[-1]
    if not isinstance(linear2_weight, Tensor) or linear2_weight.dim() != 2:
        raise ValueError(
            f"linear2_weight must be a (D, F) = ({D}, F) tensor; got "
            f"{getattr(linear2_weight, 'shape', type(linear2_weight).__name__)}"
        )
    hidden = linear2_weight.shape[1]
    first = 2 * hidden if activation == "geglu" else hidden
    _check_param("linear1_weight", linear1_weight, (first, D), x, optional=False)
    _check_param("linear1_bias", linear1_bias, (first,), x)
    _check_param("linear2_weight", linear2_weight, (D, hidden), x, optional=False)
    _check_param("linear2_bias", linear2_bias, (D,), x)
    _check_param("norm_weight", norm_weight, (D,), x)
    _check_param("norm_bias", norm_bias, (D,), x)


def check_linear(
    x: Tensor,
    inputs: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm: bool,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
) -> None:
    """Check every argument of `residual_linear` before a kernel runs.

    ``x`` `(..., D)` and ``inputs`` `(..., K)` with one leading shape, ``weight`` `(D, K)`,
    ``bias``, ``norm_weight`` and ``norm_bias`` `(D,)` or ``None``, all of one dtype and
    device; ``norm`` a bool; ``eps`` finite and non-negative."""
    if _linear_accepted(x, inputs, weight, bias, norm, norm_weight, norm_bias, eps):
        return
    _check_x(x)
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor; got {type(inputs).__name__}")
    if inputs.dim() != x.dim() or inputs.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"inputs must have shape ({', '.join(map(str, x.shape[:-1]))}, K), the leading "
            f"shape of x; got {tuple(inputs.shape)}"
        )
    if inputs.dtype != x.dtype or inputs.device != x.device:
        raise TypeError(
            f"inputs must have the dtype and device of x ({x.dtype}, {x.device}); got "
            f"{inputs.dtype}, {inputs.device}"
        )
    if not isinstance(norm, bool):
        raise TypeError(f"norm must be a bool; got {type(norm).__name__}")
    _check_eps(eps)
    D, K = x.shape[-1], inputs.shape[-1]
    _check_param("weight", weight, (D, K), x, optional=False)
    _check_param("bias", bias, (D,), x)
    _check_param("norm_weight", norm_weight, (D,), x)
    _check_param("norm_bias", norm_bias, (D,), x)


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``(R, width)`` rows with contiguous features (a copy only when needed)."""
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    return (
        t
        if t.stride(-1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])
        else (t.contiguous())
    )


def _contiguous(*tensors: Tensor | None) -> list[Tensor | None]:
    """Each of ``tensors`` contiguous (``None`` kept); the caller holds them while the kernel
    reads their addresses."""
    return [None if t is None else t.contiguous() for t in tensors]


def compute_feed_forward(
    x: Tensor,
    linear1_weight: Tensor,
    linear1_bias: Tensor | None,
    linear2_weight: Tensor,
    linear2_bias: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    activation: str,
    norm_first: bool,
    eps: float,
) -> Tensor:
    """Compute `residual_feed_forward` on arguments that `check_feed_forward` has accepted.

    The compiled kernel runs for float32 and float64 CPU tensors, the reference elsewhere.
    Returns a new contiguous `(..., D)` tensor; never writes its inputs."""
    if not use_kernels(x):
        return residual_feed_forward_reference(
            x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight,
            norm_bias, activation, norm_first, eps,
        ).contiguous()  # fmt: skip
    weights = _contiguous(
        linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight, norm_bias
    )
    return run_feed_forward(
        x, _rows(x), linear2_weight.shape[1], tuple(map(address, weights)), float(eps),
        ACTIVATIONS.index(activation), norm_first,
    )  # fmt: skip


def run_feed_forward(
    x: Tensor,
    rows: Tensor,
    hidden: int,
    addresses: tuple[int, ...],
    eps: float,
    activation: int,
    norm_first: bool,
) -> Tensor:
    """Run the compiled feed-forward kernel (the weights held by the caller at ``addresses``,
    in the order of `residual_feed_forward`, 0 for ``None``) on ``rows``, ``x`` as rows
    with contiguous features; returns a new tensor shaped like ``x``. Everything has been
    checked: this only passes addresses."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    binding("residual_feed_forward", x.dtype)(
        rows.data_ptr(), rows.stride(0), rows.shape[0], x.shape[-1], hidden, *addresses, eps,
        activation, norm_first, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def compute_linear(
    x: Tensor,
    inputs: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm: bool,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Compute `residual_linear` on arguments that `check_linear` has accepted.

    The compiled kernel runs for float32 and float64 CPU tensors, the reference elsewhere.
    Returns a new contiguous `(..., D)` tensor; never writes its inputs."""
    if not use_kernels(x):
        return residual_linear_reference(
            x, inputs, weight, bias, norm, norm_weight, norm_bias, eps
        ).contiguous()
    weights = _contiguous(weight, bias, norm_weight, norm_bias)
    return run_linear(x, _rows(x), _rows(inputs), tuple(map(address, weights)), norm, float(eps))


def run_linear(
    x: Tensor, rows: Tensor, inputs: Tensor, addresses: tuple[int, ...], norm: bool, eps: float
) -> Tensor:
    """Call the `residual_linear` kernel: the residual ``rows`` ``(R, D)`` and the ``inputs``
    ``(R, K)``, both rows with contiguous features, the contiguous weight, bias, norm weight
    and norm bias at ``addresses`` (0 for ``None``); returns a new tensor shaped like ``x``
    (``rows`` is ``x`` as rows). Everything has been checked."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    binding("residual_linear", x.dtype)(
        rows.data_ptr(), rows.stride(0), inputs.data_ptr(), inputs.stride(0), rows.shape[0],
        rows.shape[1], inputs.shape[1], *addresses[:2], norm, *addresses[2:], eps,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def feed_forward(
    x: Tensor,
    linear1_weight: Tensor,
    linear1_bias: Tensor | None,
    linear2_weight: Tensor,
    linear2_bias: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    activation: str,
    norm_first: bool,
    eps: float,
) -> Tensor:
    """`residual_feed_forward`: check every argument, then run the registered op where
    autograd records or ``torch.compile`` traces the call, else the kernel directly."""
    args = (x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight)
    check_feed_forward(*args, norm_bias, activation, norm_first, eps)
    if needs_graph(*args, norm_bias):
        return residual_feed_forward_op(*args, norm_bias, activation, norm_first, float(eps))
    return compute_feed_forward(*args, norm_bias, activation, norm_first, float(eps))


def linear(
    x: Tensor,
    inputs: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm: bool,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
) -> Tensor:
    """`residual_linear`: check every argument, then run the registered op where autograd
    records or ``torch.compile`` traces the call, else the kernel directly."""
    check_linear(x, inputs, weight, bias, norm, norm_weight, norm_bias, eps)
    if needs_graph(x, inputs, weight, bias, norm_weight, norm_bias):
        return residual_linear_op(x, inputs, weight, bias, norm, norm_weight, norm_bias, float(eps))
    return compute_linear(x, inputs, weight, bias, norm, norm_weight, norm_bias, float(eps))


@torch.library.custom_op("attention_core::residual_feed_forward", mutates_args=())
def residual_feed_forward_op(
    x: Tensor,
    linear1_weight: Tensor,
    linear1_bias: Tensor | None,
    linear2_weight: Tensor,
    linear2_bias: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    activation: str,
    norm_first: bool,
    eps: float,
) -> Tensor:
    """A feed-forward sublayer step (see `attention_core.residual_step.residual_feed_forward`).

    Arguments:
        x: `(..., D)`.
        linear1_weight: `(F, D)`, or `(2 F, D)` for ``geglu``.
        linear1_bias: `(F,)` / `(2 F,)` or ``None``.
        linear2_weight: `(D, F)`.
        linear2_bias: `(D,)` or ``None``.
        norm_weight: `(D,)` or ``None``.
        norm_bias: `(D,)` or ``None``.
        activation: ``"relu"``, ``"gelu"`` or ``"geglu"``.
        norm_first: pre-norm (True) or post-norm (False).
        eps: the layer norm's epsilon.

    Returns:
        `(..., D)`.
    """
    args = (x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight)
    check_feed_forward(*args, norm_bias, activation, norm_first, eps)
    return compute_feed_forward(*args, norm_bias, activation, norm_first, eps)


@residual_feed_forward_op.register_fake
def _(x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight, norm_bias,
      activation, norm_first, eps):  # fmt: skip
    args = (x, linear1_weight, linear1_bias, linear2_weight, linear2_bias, norm_weight)
    check_feed_forward(*args, norm_bias, activation, norm_first, eps)
    return x.new_empty(x.shape)


@torch.library.custom_op("attention_core::residual_linear", mutates_args=())
def residual_linear_op(
    x: Tensor,
    inputs: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm: bool,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
) -> Tensor:
    """A projection with residual and optional post-norm (see
    `attention_core.residual_step.residual_linear`).

    Arguments:
        x: `(..., D)`.
        inputs: `(..., K)`.
        weight: `(D, K)`.
        bias: `(D,)` or ``None``.
        norm: apply the layer norm after the residual add.
        norm_weight: `(D,)` or ``None``.
        norm_bias: `(D,)` or ``None``.
        eps: the layer norm's epsilon.

    Returns:
        `(..., D)`.
    """
    check_linear(x, inputs, weight, bias, norm, norm_weight, norm_bias, eps)
    return compute_linear(x, inputs, weight, bias, norm, norm_weight, norm_bias, eps)


@residual_linear_op.register_fake
def _(x, inputs, weight, bias, norm, norm_weight, norm_bias, eps):
    check_linear(x, inputs, weight, bias, norm, norm_weight, norm_bias, eps)
    return x.new_empty(x.shape)


register_reference_autograd(residual_feed_forward_op, residual_feed_forward_reference)
register_reference_autograd(residual_linear_op, residual_linear_reference)
