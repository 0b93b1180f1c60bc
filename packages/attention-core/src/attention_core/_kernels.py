"""The Python side of the compiled CPU kernels in ``attention_core._C``.

Each kernel is wrapped in a ``torch.library.custom_op`` so that ``torch.compile``,
``torch.export`` and FX treat it as one opaque operator, with a ``register_fake`` that
allocates its output exactly like the real op. The public functions (for example
:func:`attention_core.hashing.compute_hashes`) decide between these ops and their
plain-PyTorch references with :func:`use_kernels`.

Set the environment variable ``ATTENTION_CORE_FORCE_REFERENCE=1`` to force the
plain-PyTorch path everywhere (useful to tell a kernel bug from a model bug).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # torch is imported first so that the extension finds its shared libraries
    from . import _C
except ImportError:  # a source checkout that was never compiled
    _C = None

__all__ = [
    "FORCE_REFERENCE_ENV",
    "causal_product_backward",
    "causal_product_forward",
    "compute_hashes_kernel",
    "kernels_available",
    "use_kernels",
]

FORCE_REFERENCE_ENV = "ATTENTION_CORE_FORCE_REFERENCE"

_KERNEL_DTYPES = (torch.float32, torch.float64)


def kernels_available() -> bool:
    """``True`` when the compiled extension ``attention_core._C`` could be imported."""
    return _C is not None


def use_kernels(*tensors: Tensor) -> bool:
    """``True`` when the compiled kernels should handle ``tensors``: the extension is
    available, ``ATTENTION_CORE_FORCE_REFERENCE`` is unset (or ``"0"``), and every tensor is
    a float32/float64 CPU tensor."""
    if _C is None or os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0"):
        return False
    return all(t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES for t in tensors)


# ---------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("attention_core::compute_hashes", mutates_args=(), device_types="cpu")
def compute_hashes_kernel(X: Tensor, A: Tensor) -> Tensor:
    """Random-hyperplane hashes with the compiled kernel.

    Arguments:
        X: ``(M, D)`` float32 or float64 CPU tensor.
        A: ``(B, D + 1)`` hyperplanes of the same dtype, the last column a bias.

    Returns:
        ``(M,)`` int64; bit ``b`` is set when ``X @ A[b, :D] + A[b, D] > 0``.
    """
    if _C is None:
        raise RuntimeError("attention_core._C is not compiled; use the reference path")
    if X.dtype not in _KERNEL_DTYPES or A.dtype != X.dtype:
        raise TypeError(f"X and A must both be float32 or float64; got {X.dtype} and {A.dtype}")
    if X.dim() != 2 or A.dim() != 2 or A.shape[1] != X.shape[1] + 1:
        raise ValueError(
            f"X must be (M, D) and A (B, D + 1); got {tuple(X.shape)} and {tuple(A.shape)}"
        )
    X = X.contiguous()
    A = A.contiguous()
    H = X.new_empty(X.shape[0], dtype=torch.int64)
    kernel = _C.compute_hashes_f32 if X.dtype == torch.float32 else _C.compute_hashes_f64
    kernel(X.data_ptr(), A.data_ptr(), H.data_ptr(), X.shape[0], X.shape[1], A.shape[0])
    return H


@compute_hashes_kernel.register_fake
def _(X: Tensor, A: Tensor) -> Tensor:
    return X.new_empty(X.shape[0], dtype=torch.int64)


# ---------------------------------------------------------------------------------------
# causal product (numerator, or numerator and normaliser of causal linear attention)
# ---------------------------------------------------------------------------------------
# Every (N, H, L, features) operand reaches the kernel as a pointer plus the element strides
# of its n, h and l dimensions, so transposed views (for example (N, L, H, E) storage seen as
# (N, H, L, E)) need no copy; only the feature dimension must be contiguous. Outputs are
# allocated heads-first, or sequence-first (an (N, L, H, .) tensor seen through a transpose)
# when ``sequence_first`` is set, which is what CausalLinearAttention wants.


def _new_nhl(like: Tensor, N: int, H: int, L: int, D: int, sequence_first: bool) -> Tensor:
    """An uninitialised ``(N, H, L, D)`` tensor, stored as ``(N, L, H, D)`` if sequence_first."""
    if sequence_first:
        return like.new_empty(N, L, H, D).transpose(1, 2)
    return like.new_empty(N, H, L, D)


def _rows(t: Tensor) -> Tensor:
    """``t`` with a contiguous last dimension (a copy only when it is not)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _nhl(t: Tensor) -> tuple[int, int, int]:
    return (t.stride(0), t.stride(1), t.stride(2))


def _check_causal(Q: Tensor, K: Tensor, V: Tensor, states: dict[str, Tensor | None]) -> None:
    if _C is None:
        raise RuntimeError("attention_core._C is not compiled; use the reference path")
    if Q.dtype not in _KERNEL_DTYPES or not (Q.dtype == K.dtype == V.dtype):
        raise TypeError(
            f"Q, K and V must all be float32 or float64; got {Q.dtype}, {K.dtype}, {V.dtype}"
        )
    if Q.dim() != 4 or K.shape != Q.shape or V.dim() != 4 or V.shape[:3] != Q.shape[:3]:
        raise ValueError(
            "Q and K must be (N, H, L, E) and V (N, H, L, M); got "
            f"{tuple(Q.shape)}, {tuple(K.shape)} and {tuple(V.shape)}"
        )
    N, H, _, E = Q.shape
    M = V.shape[-1]
    expected = {"S0": (N, H, E, M), "z0": (N, H, E), "grad_S": (N, H, E, M), "grad_z": (N, H, E)}
    for name, t in states.items():
        if t is not None and (tuple(t.shape) != expected[name] or t.dtype != Q.dtype):
            raise ValueError(
                f"{name} must be a {Q.dtype} tensor of shape {expected[name]}; got "
                f"{t.dtype} {tuple(t.shape)}"
            )


@torch.library.custom_op(
    "attention_core::causal_product_forward", mutates_args=(), device_types="cpu"
)
def causal_product_forward(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    S0: Tensor | None,
    z0: Tensor | None,
    normalize: bool,
    eps: float,
    sequence_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal dot product with the compiled kernel, optionally normalised.

    Arguments:
        Q: ``(N, H, L, E)`` float32 or float64 CPU tensor (any strides).
        K: ``(N, H, L, E)``.
        V: ``(N, H, L, M)``.
        S0: ``(N, H, E, M)`` initial state ``sum_j K_j V_j^T``, or ``None`` for zeros.
        z0: ``(N, H, E)`` initial normaliser state ``sum_j K_j``, or ``None`` for zeros
            (ignored unless ``normalize``).
        normalize: divide by ``Q_i . z_i + eps`` (causal linear attention).
        eps: added to the normaliser.
        sequence_first: store the output as ``(N, L, H, M)`` (returned as its
            ``(N, H, L, M)`` transpose).

    Returns:
        ``out (N, H, L, M)``, the final state ``S (N, H, E, M)`` and, when normalising, the
        final normaliser state ``z (N, H, E)`` (``(N, H, 0)`` otherwise).
    """
    z0 = z0 if normalize else None
    _check_causal(Q, K, V, {"S0": S0, "z0": z0})
    N, H, L, E = Q.shape
    M = V.shape[-1]
    Q, K, V = _rows(Q), _rows(K), _rows(V)
    S0 = None if S0 is None else S0.contiguous()
    z0 = None if z0 is None else z0.contiguous()
    out = _new_nhl(Q, N, H, L, M, sequence_first)
    S = Q.new_empty(N, H, E, M)
    z = Q.new_empty(N, H, E if normalize else 0)
    kernel = (
        _C.causal_product_forward_f32 if Q.dtype == torch.float32 else _C.causal_product_forward_f64
    )
    kernel(
        Q.data_ptr(), _nhl(Q), K.data_ptr(), _nhl(K), V.data_ptr(), _nhl(V),
        out.data_ptr(), _nhl(out), _ptr(S0), _ptr(z0), S.data_ptr(), z.data_ptr(),
        N, H, L, E, M, normalize, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out, S, z


@causal_product_forward.register_fake
def _(Q, K, V, S0, z0, normalize, eps, sequence_first):
    N, H, L, E = Q.shape
    M = V.shape[-1]
    out = _new_nhl(Q, N, H, L, M, sequence_first)
    return out, Q.new_empty(N, H, E, M), Q.new_empty(N, H, E if normalize else 0)


@torch.library.custom_op(
    "attention_core::causal_product_backward", mutates_args=(), device_types="cpu"
)
def causal_product_backward(
    grad: Tensor,
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    out: Tensor | None,
    S0: Tensor | None,
    z0: Tensor | None,
    grad_S: Tensor | None,
    grad_z: Tensor | None,
    normalize: bool,
    eps: float,
    sequence_first: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`causal_product_forward`, recomputing the states (no per-position
    state is stored).

    Arguments:
        grad: ``(N, H, L, M)`` gradient of ``out``.
        Q, K, V, S0, z0, normalize, eps, sequence_first: as in the forward.
        out: ``(N, H, L, M)`` the forward output (needed when normalising, else ``None``).
        grad_S: ``(N, H, E, M)`` gradient of the final state, or ``None``.
        grad_z: ``(N, H, E)`` gradient of the final normaliser state, or ``None`` (ignored
            unless ``normalize``).

    Returns:
        ``dQ (N, H, L, E)``, ``dK (N, H, L, E)``, ``dV (N, H, L, M)`` (sequence-first storage
        if ``sequence_first``), ``dS0 (N, H, E, M)`` and ``dz0 (N, H, E)`` (``(N, H, 0)`` when
        not normalising).
    """
    if not normalize:  # the plain product has no normaliser state
        z0 = grad_z = None
    _check_causal(Q, K, V, {"S0": S0, "z0": z0, "grad_S": grad_S, "grad_z": grad_z})
    N, H, L, E = Q.shape
    M = V.shape[-1]
    if grad.shape != (N, H, L, M) or (normalize and (out is None or out.shape != grad.shape)):
        raise ValueError(
            f"grad (and out when normalising) must have shape {(N, H, L, M)}; got "
            f"{tuple(grad.shape)} and {None if out is None else tuple(out.shape)}"
        )
    grad, Q, K, V = _rows(grad.to(Q.dtype)), _rows(Q), _rows(K), _rows(V)
    out = _rows(out) if normalize else None
    S0, z0, grad_S, grad_z = (
        None if t is None else t.contiguous() for t in (S0, z0, grad_S, grad_z)
    )
    dQ = _new_nhl(Q, N, H, L, E, sequence_first)
    dK = _new_nhl(Q, N, H, L, E, sequence_first)
    dV = _new_nhl(Q, N, H, L, M, sequence_first)
    dS0 = Q.new_empty(N, H, E, M)
    dz0 = Q.new_empty(N, H, E if normalize else 0)
    kernel = (
        _C.causal_product_backward_f32
        if Q.dtype == torch.float32
        else _C.causal_product_backward_f64
    )
    kernel(
        grad.data_ptr(), _nhl(grad), Q.data_ptr(), _nhl(Q), K.data_ptr(), _nhl(K),
        V.data_ptr(), _nhl(V), _ptr(out), (0, 0, 0) if out is None else _nhl(out),
        _ptr(S0), _ptr(z0), _ptr(grad_S), _ptr(grad_z),
        dQ.data_ptr(), _nhl(dQ), dK.data_ptr(), _nhl(dK), dV.data_ptr(), _nhl(dV),
        dS0.data_ptr(), dz0.data_ptr(), N, H, L, E, M, normalize, eps, torch.get_num_threads(),
    )  # fmt: skip
    return dQ, dK, dV, dS0, dz0


@causal_product_backward.register_fake
def _(grad, Q, K, V, out, S0, z0, grad_S, grad_z, normalize, eps, sequence_first):
    N, H, L, E = Q.shape
    M = V.shape[-1]
    return (
        _new_nhl(Q, N, H, L, E, sequence_first),
        _new_nhl(Q, N, H, L, E, sequence_first),
        _new_nhl(Q, N, H, L, M, sequence_first),
        Q.new_empty(N, H, E, M),
        Q.new_empty(N, H, E if normalize else 0),
    )


def _causal_setup_context(ctx, inputs, output) -> None:
    Q, K, V, S0, z0, normalize, eps, sequence_first = inputs
    out = output[0] if normalize else None
    ctx.save_for_backward(Q, K, V, out, S0, z0)
    ctx.options = (normalize, eps, sequence_first)


def _causal_backward(ctx, grad_out, grad_S, grad_z):
    Q, K, V, out, S0, z0 = ctx.saved_tensors
    normalize, eps, sequence_first = ctx.options
    if grad_out is None:
        grad_out = torch.zeros_like(out if out is not None else V)
    dQ, dK, dV, dS0, dz0 = causal_product_backward(
        grad_out, Q, K, V, out, S0, z0, grad_S, grad_z, normalize, eps, sequence_first
    )
    return (
        dQ,
        dK,
        dV,
        None if S0 is None else dS0,
        None if z0 is None else dz0,
        None,
        None,
        None,
    )


causal_product_forward.register_autograd(_causal_backward, setup_context=_causal_setup_context)
