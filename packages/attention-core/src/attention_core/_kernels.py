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
    "aggregate_backward",
    "aggregate_forward",
    "broadcast_backward",
    "broadcast_forward",
    "causal_product_backward",
    "causal_product_forward",
    "compute_hashes_kernel",
    "hamming_cluster",
    "kernels_available",
    "local_dot_product_backward",
    "local_dot_product_forward",
    "local_weighted_average_backward",
    "local_weighted_average_forward",
    "sparse_dot_product_backward",
    "sparse_dot_product_forward",
    "sparse_weighted_average_backward",
    "sparse_weighted_average_forward",
    "use_kernels",
]

FORCE_REFERENCE_ENV = "ATTENTION_CORE_FORCE_REFERENCE"

_KERNEL_DTYPES = (torch.float32, torch.float64)


def kernels_available() -> bool:
    """``True`` when the compiled extension ``attention_core._C`` could be imported."""
    return _C is not None


def use_kernels(*tensors: Tensor, triton: bool = False) -> bool:
    """``True`` when the compiled kernels should handle ``tensors``: the extension is
    available, ``ATTENTION_CORE_FORCE_REFERENCE`` is unset (or ``"0"``), and every tensor is
    a float32/float64 CPU tensor. With ``triton=True`` (ops with a Triton kernel registered
    for ``"cuda"``), float32/float16/bfloat16 CUDA tensors also qualify when triton is
    importable; float64 CUDA tensors do not (they take the plain-PyTorch path)."""
    if os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0"):
        return False
    if triton and tensors and all(t.device.type == "cuda" for t in tensors):
        from ._triton import available

        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        return available() and all(t.dtype in dtypes for t in tensors)
    if _C is None:
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


# ---------------------------------------------------------------------------------------
# local product (banded dot product and weighted average of local attention)
# ---------------------------------------------------------------------------------------
# Operands reach the kernels as pointers plus the strides of their first three dimensions,
# like the causal product; outputs are contiguous (N, H, L, .) tensors.


# the dtypes a kernel family accepts and how its error message names them; the Triton kernels
# (attention_core._triton) share these checks with their own rule
DtypeRule = tuple[tuple[torch.dtype, ...], str]
CPU_DTYPES: DtypeRule = (_KERNEL_DTYPES, "all be float32 or float64 (one dtype)")


def _check_floats(names: str, *tensors: Tensor, dtypes: DtypeRule | None = None) -> None:
    """Four-dimensional tensors of one allowed dtype on one device (``dtypes``: the CPU
    kernels' rule by default, which also needs the compiled extension)."""
    if dtypes is None:
        if _C is None:
            raise RuntimeError("attention_core._C is not compiled; use the reference path")
        dtypes = CPU_DTYPES
    allowed, phrase = dtypes
    got = [t.dtype for t in tensors]
    if got[0] not in allowed or any(d != got[0] for d in got):
        raise TypeError(f"{names} must {phrase}; got {', '.join(str(d) for d in got)}")
    for t in tensors:
        if t.dim() != 4:
            raise ValueError(f"{names} must be 4-dimensional; got {tuple(t.shape)}")
        if t.device != tensors[0].device:
            raise ValueError(f"{names} must be on one device; got {t.device}")


def _kernel(name: str, dtype: torch.dtype):
    return getattr(_C, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _check_local(Q: Tensor, K: Tensor, local_context: int, dtypes: DtypeRule | None = None) -> None:
    _check_floats("Q and K", Q, K, dtypes=dtypes)
    if K.shape[:2] != Q.shape[:2] or K.shape[3] != Q.shape[3]:
        raise ValueError(
            f"Q must be (N, H, L, E) and K (N, H, S, E); got {tuple(Q.shape)} and {tuple(K.shape)}"
        )
    if local_context < 1:
        raise ValueError(f"local_context must be a positive int; got {local_context}")


def _check_lengths(key_lengths: Tensor, N: int) -> None:
    if key_lengths.dtype != torch.int64 or tuple(key_lengths.shape) != (N,):
        raise ValueError(
            f"key_lengths must be an int64 tensor of shape ({N},); got {key_lengths.dtype} "
            f"{tuple(key_lengths.shape)}"
        )


@torch.library.custom_op(
    "attention_core::local_dot_product_forward", mutates_args=(), device_types="cpu"
)
def local_dot_product_forward(
    Q: Tensor, K: Tensor, attn_mask: Tensor, key_lengths: Tensor, local_context: int
) -> Tensor:
    """Banded dot products with the compiled kernel.

    Arguments:
        Q: ``(N, H, L, E)`` float32 or float64 CPU tensor (any strides).
        K: ``(N, H, S, E)``.
        attn_mask: ``(L, S)`` additive mask of the same dtype (any strides).
        key_lengths: ``(N,)`` int64 number of valid keys of each sequence.
        local_context: the window size ``C``.

    Returns:
        ``(N, H, L, C)``: ``Q_l . K_j + attn_mask[l, j]`` for ``j = l - C // 2 + k`` in
        ``[0, min(S, key_lengths[n]))`` and ``-inf`` elsewhere.
    """
    _check_local(Q, K, local_context)
    N, H, L, E = Q.shape
    S = K.shape[2]
    if attn_mask.dtype != Q.dtype or tuple(attn_mask.shape) != (L, S):
        raise ValueError(
            f"attn_mask must be a {Q.dtype} tensor of shape ({L}, {S}); got {attn_mask.dtype} "
            f"{tuple(attn_mask.shape)}"
        )
    _check_lengths(key_lengths, N)
    Q, K = _rows(Q), _rows(K)
    lengths = key_lengths.contiguous()
    out = Q.new_empty(N, H, L, local_context)
    _kernel("local_dot_product_forward", Q.dtype)(
        Q.data_ptr(), _nhl(Q), K.data_ptr(), _nhl(K), attn_mask.data_ptr(),
        (attn_mask.stride(0), attn_mask.stride(1)), lengths.data_ptr(), out.data_ptr(),
        _nhl(out), N, H, L, S, E, local_context, torch.get_num_threads(),
    )  # fmt: skip
    return out


@local_dot_product_forward.register_fake
def _(Q, K, attn_mask, key_lengths, local_context):
    N, H, L, _ = Q.shape
    return Q.new_empty(N, H, L, local_context)


@torch.library.custom_op(
    "attention_core::local_dot_product_backward", mutates_args=(), device_types="cpu"
)
def local_dot_product_backward(
    grad: Tensor, Q: Tensor, K: Tensor, key_lengths: Tensor, local_context: int
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`local_dot_product_forward` with respect to ``Q`` and ``K``.

    Arguments:
        grad: ``(N, H, L, C)`` gradient of the output.
        Q, K, key_lengths, local_context: as in the forward.

    Returns:
        ``dQ (N, H, L, E)`` and ``dK (N, H, S, E)``; slots outside the window or the key
        lengths pass no gradient.
    """
    _check_local(Q, K, local_context)
    N, H, L, E = Q.shape
    S = K.shape[2]
    if tuple(grad.shape) != (N, H, L, local_context):
        raise ValueError(
            f"grad must have shape {(N, H, L, local_context)}; got {tuple(grad.shape)}"
        )
    _check_lengths(key_lengths, N)
    grad, Q, K = _rows(grad.to(Q.dtype)), _rows(Q), _rows(K)
    lengths = key_lengths.contiguous()
    dQ = Q.new_empty(N, H, L, E)
    dK = Q.new_empty(N, H, S, E)
    _kernel("local_dot_product_backward", Q.dtype)(
        grad.data_ptr(), _nhl(grad), Q.data_ptr(), _nhl(Q), K.data_ptr(), _nhl(K),
        lengths.data_ptr(), dQ.data_ptr(), _nhl(dQ), dK.data_ptr(), _nhl(dK),
        N, H, L, S, E, local_context, torch.get_num_threads(),
    )  # fmt: skip
    return dQ, dK


@local_dot_product_backward.register_fake
def _(grad, Q, K, key_lengths, local_context):
    return Q.new_empty(Q.shape), Q.new_empty(K.shape)


def _local_dot_setup_context(ctx, inputs, output) -> None:
    Q, K, _, key_lengths, local_context = inputs
    ctx.save_for_backward(Q, K, key_lengths)
    ctx.local_context = local_context


def _local_dot_backward(ctx, grad):
    Q, K, key_lengths = ctx.saved_tensors
    dQ, dK = local_dot_product_backward(grad, Q, K, key_lengths, ctx.local_context)
    return dQ, dK, None, None, None


local_dot_product_forward.register_autograd(
    _local_dot_backward, setup_context=_local_dot_setup_context
)


def _check_average(attention: Tensor, V: Tensor, dtypes: DtypeRule | None = None) -> None:
    _check_floats("attention and V", attention, V, dtypes=dtypes)
    if V.shape[:2] != attention.shape[:2] or attention.shape[3] < 1:
        raise ValueError(
            "attention must be (N, H, L, C) with C > 0 and V (N, H, S, D); got "
            f"{tuple(attention.shape)} and {tuple(V.shape)}"
        )


@torch.library.custom_op(
    "attention_core::local_weighted_average_forward", mutates_args=(), device_types="cpu"
)
def local_weighted_average_forward(attention: Tensor, V: Tensor) -> Tensor:
    """Banded weighted average with the compiled kernel.

    Arguments:
        attention: ``(N, H, L, C)`` float32 or float64 CPU tensor (any strides).
        V: ``(N, H, S, D)`` of the same dtype.

    Returns:
        ``(N, H, L, D)``: ``sum_k attention[l, k] V_j`` over ``j = l - C // 2 + k`` in
        ``[0, S)``.
    """
    _check_average(attention, V)
    N, H, L, C = attention.shape
    S, D = V.shape[2], V.shape[3]
    attention, V = _rows(attention), _rows(V)
    out = V.new_empty(N, H, L, D)
    _kernel("local_weighted_average_forward", V.dtype)(
        attention.data_ptr(), _nhl(attention), V.data_ptr(), _nhl(V), out.data_ptr(), _nhl(out),
        N, H, L, S, D, C, torch.get_num_threads(),
    )  # fmt: skip
    return out


@local_weighted_average_forward.register_fake
def _(attention, V):
    N, H, L, _ = attention.shape
    return V.new_empty(N, H, L, V.shape[3])


@torch.library.custom_op(
    "attention_core::local_weighted_average_backward", mutates_args=(), device_types="cpu"
)
def local_weighted_average_backward(
    grad: Tensor, attention: Tensor, V: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`local_weighted_average_forward`.

    Arguments:
        grad: ``(N, H, L, D)`` gradient of the output.
        attention, V: as in the forward.

    Returns:
        ``dattention (N, H, L, C)`` (zero for slots outside ``[0, S)``) and ``dV (N, H, S, D)``.
    """
    _check_average(attention, V)
    N, H, L, C = attention.shape
    S, D = V.shape[2], V.shape[3]
    if tuple(grad.shape) != (N, H, L, D):
        raise ValueError(f"grad must have shape {(N, H, L, D)}; got {tuple(grad.shape)}")
    grad, attention, V = _rows(grad.to(V.dtype)), _rows(attention), _rows(V)
    dA = V.new_empty(N, H, L, C)
    dV = V.new_empty(N, H, S, D)
    _kernel("local_weighted_average_backward", V.dtype)(
        grad.data_ptr(), _nhl(grad), attention.data_ptr(), _nhl(attention), V.data_ptr(),
        _nhl(V), dA.data_ptr(), _nhl(dA), dV.data_ptr(), _nhl(dV),
        N, H, L, S, D, C, torch.get_num_threads(),
    )  # fmt: skip
    return dA, dV


@local_weighted_average_backward.register_fake
def _(grad, attention, V):
    return V.new_empty(attention.shape), V.new_empty(V.shape)


def _local_average_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _local_average_backward(ctx, grad):
    attention, V = ctx.saved_tensors
    return local_weighted_average_backward(grad, attention, V)


local_weighted_average_forward.register_autograd(
    _local_average_backward, setup_context=_local_average_setup_context
)


# ---------------------------------------------------------------------------------------
# sparse and clustered sparse products
# ---------------------------------------------------------------------------------------
# One pair of ops serves both: ``topk`` is ``(N, H, L, k)`` (a key list per query) when
# ``groups`` is None, else ``(N, H, C, k)`` (a list per cluster) and ``groups (N, H, L)``
# picks each query's cluster. ``limits (N, H)``, when given, marks queries ``l >= limits``
# (padding) as having no keys. Queries without keys (also those whose group is outside
# ``[0, C)``) get zero outputs and pass no gradient.


def _check_sparse_index(
    topk: Tensor, groups: Tensor | None, limits: Tensor | None, N: int, H: int, L: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The index tensors as contiguous int64 after checking their shapes."""
    if topk.dtype != torch.int64 or topk.dim() != 4 or tuple(topk.shape[:2]) != (N, H):
        raise ValueError(
            f"topk must be an int64 tensor of shape ({N}, {H}, R, k); got {topk.dtype} "
            f"{tuple(topk.shape)}"
        )
    if groups is None and topk.shape[2] != L:
        raise ValueError(f"topk must have {L} rows (one per query); got {tuple(topk.shape)}")
    for name, t, shape in (("groups", groups, (N, H, L)), ("limits", limits, (N, H))):
        if t is not None and (t.dtype != torch.int64 or tuple(t.shape) != shape):
            raise ValueError(
                f"{name} must be an int64 tensor of shape {shape}; got {t.dtype} {tuple(t.shape)}"
            )
    return (
        topk.contiguous(),
        None if groups is None else groups.contiguous(),
        None if limits is None else limits.contiguous(),
    )


def _check_rows(names: str, A: Tensor, B: Tensor, dtypes: DtypeRule | None = None) -> None:
    """``A (N, H, L, .)`` and ``B (N, H, S, .)`` float tensors of one dtype."""
    _check_floats(names, A, B, dtypes=dtypes)
    if A.shape[:2] != B.shape[:2]:
        first, second = names.split(" and ")
        raise ValueError(
            f"{first} and {second} must have the same (N, H); got {tuple(A.shape)} and "
            f"{tuple(B.shape)}"
        )


def _sparse_tail(topk: Tensor, groups: Tensor | None, limits: Tensor | None) -> tuple:
    return (topk.data_ptr(), topk.shape[2], _ptr(groups), _ptr(limits))


@torch.library.custom_op(
    "attention_core::sparse_dot_product_forward", mutates_args=(), device_types="cpu"
)
def sparse_dot_product_forward(
    Q: Tensor, K: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """Dot products of every query with its selected keys, with the compiled kernel.

    Arguments:
        Q: ``(N, H, L, E)`` float32 or float64 CPU tensor (any strides).
        K: ``(N, H, S, E)``.
        topk: ``(N, H, L, k)`` int64 key indices in ``[0, S)``, or ``(N, H, C, k)`` with
            ``groups``.
        groups: ``(N, H, L)`` int64 cluster of every query, or ``None``.
        limits: ``(N, H)`` int64 number of valid queries, or ``None``.

    Returns:
        ``(N, H, L, k)``: ``Q_l . K_{topk[l, t]}``, zero for queries without keys.
    """
    _check_rows("Q and K", Q, K)
    N, H, L, E = Q.shape
    S = K.shape[2]
    if K.shape[3] != E:
        raise ValueError(f"Q and K must have the same feature size; got {E} and {K.shape[3]}")
    topk, groups, limits = _check_sparse_index(topk, groups, limits, N, H, L)
    k = topk.shape[3]
    Q, K = _rows(Q), _rows(K)
    out = Q.new_empty(N, H, L, k)
    _kernel("sparse_dot_product_forward", Q.dtype)(
        Q.data_ptr(), _nhl(Q), K.data_ptr(), _nhl(K), out.data_ptr(), _nhl(out),
        *_sparse_tail(topk, groups, limits), N, H, L, S, E, k, torch.get_num_threads(),
    )  # fmt: skip
    return out


@sparse_dot_product_forward.register_fake
def _(Q, K, topk, groups, limits):
    N, H, L, _ = Q.shape
    return Q.new_empty(N, H, L, topk.shape[3])


@torch.library.custom_op(
    "attention_core::sparse_dot_product_backward", mutates_args=(), device_types="cpu"
)
def sparse_dot_product_backward(
    grad: Tensor,
    Q: Tensor,
    K: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`sparse_dot_product_forward`.

    Arguments:
        grad: ``(N, H, L, k)`` gradient of the output.
        Q, K, topk, groups, limits: as in the forward.

    Returns:
        ``dQ (N, H, L, E)`` and ``dK (N, H, S, E)``.
    """
    _check_rows("Q and K", Q, K)
    N, H, L, E = Q.shape
    S = K.shape[2]
    topk, groups, limits = _check_sparse_index(topk, groups, limits, N, H, L)
    k = topk.shape[3]
    if tuple(grad.shape) != (N, H, L, k):
        raise ValueError(f"grad must have shape {(N, H, L, k)}; got {tuple(grad.shape)}")
    grad, Q, K = _rows(grad.to(Q.dtype)), _rows(Q), _rows(K)
    dQ = Q.new_empty(N, H, L, E)
    dK = Q.new_empty(N, H, S, E)
    _kernel("sparse_dot_product_backward", Q.dtype)(
        grad.data_ptr(), _nhl(grad), Q.data_ptr(), _nhl(Q), K.data_ptr(), _nhl(K),
        dQ.data_ptr(), _nhl(dQ), dK.data_ptr(), _nhl(dK),
        *_sparse_tail(topk, groups, limits), N, H, L, S, E, k, torch.get_num_threads(),
    )  # fmt: skip
    return dQ, dK


@sparse_dot_product_backward.register_fake
def _(grad, Q, K, topk, groups, limits):
    return Q.new_empty(Q.shape), Q.new_empty(K.shape)


def _sparse_dot_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _sparse_dot_backward(ctx, grad):
    Q, K, topk, groups, limits = ctx.saved_tensors
    dQ, dK = sparse_dot_product_backward(grad, Q, K, topk, groups, limits)
    return dQ, dK, None, None, None


sparse_dot_product_forward.register_autograd(
    _sparse_dot_backward, setup_context=_sparse_dot_setup_context
)


@torch.library.custom_op(
    "attention_core::sparse_weighted_average_forward", mutates_args=(), device_types="cpu"
)
def sparse_weighted_average_forward(
    weights: Tensor, values: Tensor, topk: Tensor, groups: Tensor | None, limits: Tensor | None
) -> Tensor:
    """Weighted average of every query's selected values, with the compiled kernel.

    Arguments:
        weights: ``(N, H, L, k)`` float32 or float64 CPU tensor (any strides).
        values: ``(N, H, S, D)``.
        topk, groups, limits: as in :func:`sparse_dot_product_forward`.

    Returns:
        ``(N, H, L, D)``: ``sum_t weights[l, t] values_{topk[l, t]}``, zero for queries
        without keys.
    """
    _check_rows("weights and values", weights, values)
    N, H, L, k = weights.shape
    S, D = values.shape[2], values.shape[3]
    topk, groups, limits = _check_sparse_index(topk, groups, limits, N, H, L)
    if topk.shape[3] != k:
        raise ValueError(f"topk must have k = {k} columns (from weights); got {tuple(topk.shape)}")
    weights, values = _rows(weights), _rows(values)
    out = values.new_empty(N, H, L, D)
    _kernel("sparse_weighted_average_forward", values.dtype)(
        weights.data_ptr(), _nhl(weights), values.data_ptr(), _nhl(values), out.data_ptr(),
        _nhl(out), *_sparse_tail(topk, groups, limits), N, H, L, S, D, k,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


@sparse_weighted_average_forward.register_fake
def _(weights, values, topk, groups, limits):
    N, H, L, _ = weights.shape
    return values.new_empty(N, H, L, values.shape[3])


@torch.library.custom_op(
    "attention_core::sparse_weighted_average_backward", mutates_args=(), device_types="cpu"
)
def sparse_weighted_average_backward(
    grad: Tensor,
    weights: Tensor,
    values: Tensor,
    topk: Tensor,
    groups: Tensor | None,
    limits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`sparse_weighted_average_forward`.

    Arguments:
        grad: ``(N, H, L, D)`` gradient of the output.
        weights, values, topk, groups, limits: as in the forward.

    Returns:
        ``dweights (N, H, L, k)`` and ``dvalues (N, H, S, D)``.
    """
    _check_rows("weights and values", weights, values)
    N, H, L, k = weights.shape
    S, D = values.shape[2], values.shape[3]
    topk, groups, limits = _check_sparse_index(topk, groups, limits, N, H, L)
    if topk.shape[3] != k or tuple(grad.shape) != (N, H, L, D):
        raise ValueError(
            f"topk must have k = {k} columns and grad shape {(N, H, L, D)}; got "
            f"{tuple(topk.shape)} and {tuple(grad.shape)}"
        )
    grad, weights, values = _rows(grad.to(values.dtype)), _rows(weights), _rows(values)
    dW = values.new_empty(N, H, L, k)
    dV = values.new_empty(N, H, S, D)
    _kernel("sparse_weighted_average_backward", values.dtype)(
        grad.data_ptr(), _nhl(grad), weights.data_ptr(), _nhl(weights), values.data_ptr(),
        _nhl(values), dW.data_ptr(), _nhl(dW), dV.data_ptr(), _nhl(dV),
        *_sparse_tail(topk, groups, limits), N, H, L, S, D, k, torch.get_num_threads(),
    )  # fmt: skip
    return dW, dV


@sparse_weighted_average_backward.register_fake
def _(grad, weights, values, topk, groups, limits):
    return values.new_empty(weights.shape), values.new_empty(values.shape)


def _sparse_average_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _sparse_average_backward(ctx, grad):
    weights, values, topk, groups, limits = ctx.saved_tensors
    dW, dV = sparse_weighted_average_backward(grad, weights, values, topk, groups, limits)
    return dW, dV, None, None, None


sparse_weighted_average_forward.register_autograd(
    _sparse_average_backward, setup_context=_sparse_average_setup_context
)


# ---------------------------------------------------------------------------------------
# aggregate and broadcast (clustered attention's bookkeeping)
# ---------------------------------------------------------------------------------------
# ``G (N, H, L)`` int64 groups, ``F (N, H, C)`` factors of the rows' dtype and optional
# ``limits (N, H)`` int64 (positions ``l >= limits`` are padding). A position whose group is
# outside ``[0, C)`` or that is padding takes no part. The backward passes are the same two
# kernels plus a reduction over the features for the factors' gradient.


def _check_groups(
    X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None, dtypes: DtypeRule | None = None
) -> None:
    _check_floats("rows and F", X, F.unsqueeze(-1), dtypes=dtypes)
    N, H = X.shape[:2]
    if G.dtype != torch.int64 or G.dim() != 3 or tuple(G.shape[:2]) != (N, H):
        raise ValueError(
            f"G must be an int64 tensor of shape ({N}, {H}, L); got {G.dtype} {tuple(G.shape)}"
        )
    if tuple(F.shape[:2]) != (N, H):
        raise ValueError(f"F must have shape ({N}, {H}, C); got {tuple(F.shape)}")
    if limits is not None and (limits.dtype != torch.int64 or tuple(limits.shape) != (N, H)):
        raise ValueError(
            f"limits must be an int64 tensor of shape ({N}, {H}); got {limits.dtype} "
            f"{tuple(limits.shape)}"
        )


def _group_rows(
    rows: Tensor, G: Tensor, F: Tensor | None, limits: Tensor | None, C: int, broadcast: bool
) -> Tensor:
    """The kernel: aggregate ``rows (N, H, L, E)`` into ``(N, H, C, E)``, or broadcast
    ``rows (N, H, C, E)`` to ``(N, H, L, E)``; ``F=None`` means factors of one."""
    N, H, _, E = rows.shape
    L = G.shape[2]
    rows = _rows(rows)
    G = G.contiguous()
    F = None if F is None else F.contiguous()
    limits = None if limits is None else limits.contiguous()
    out = rows.new_empty(N, H, L if broadcast else C, E)
    _kernel("group_rows", rows.dtype)(
        rows.data_ptr(), _nhl(rows), out.data_ptr(), _nhl(out), G.data_ptr(), _ptr(F),
        _ptr(limits), N, H, L, C, E, broadcast, torch.get_num_threads(),
    )  # fmt: skip
    return out


@torch.library.custom_op("attention_core::aggregate_forward", mutates_args=(), device_types="cpu")
def aggregate_forward(X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Group sums scaled by the group factors, with the compiled kernel.

    Arguments:
        X: ``(N, H, L, E)`` float32 or float64 CPU tensor (any strides).
        G: ``(N, H, L)`` int64 group of every row.
        F: ``(N, H, C)`` factors, the dtype of ``X``.
        limits: ``(N, H)`` int64 number of non-padding positions, or ``None``.

    Returns:
        ``(N, H, C, E)``: ``F_c * sum_{l valid, G_l = c} X_l``.
    """
    _check_groups(X, G, F, limits)
    if G.shape[2] != X.shape[2]:
        raise ValueError(f"G must have {X.shape[2]} positions; got {tuple(G.shape)}")
    return _group_rows(X, G, F, limits, F.shape[2], False)


@aggregate_forward.register_fake
def _(X, G, F, limits):
    N, H, _, E = X.shape
    return X.new_empty(N, H, F.shape[2], E)


@torch.library.custom_op("attention_core::aggregate_backward", mutates_args=(), device_types="cpu")
def aggregate_backward(
    grad: Tensor, X: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`aggregate_forward`: ``dX (N, H, L, E)`` and ``dF (N, H, C)``.

    Arguments:
        grad: ``(N, H, C, E)`` gradient of the output.
        X, G, F, limits: as in the forward.
    """
    _check_groups(X, G, F, limits)
    grad = grad.to(X.dtype)
    dX = _group_rows(grad, G, F, limits, F.shape[2], True)
    sums = _group_rows(X, G, None, limits, F.shape[2], False)
    return dX, torch.einsum("nhce,nhce->nhc", grad, sums).contiguous()


@aggregate_backward.register_fake
def _(grad, X, G, F, limits):
    return X.new_empty(X.shape), F.new_empty(F.shape)


def _aggregate_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _aggregate_backward(ctx, grad):
    X, G, F, limits = ctx.saved_tensors
    dX, dF = aggregate_backward(grad, X, G, F, limits)
    return dX, None, dF, None


aggregate_forward.register_autograd(_aggregate_backward, setup_context=_aggregate_setup_context)


@torch.library.custom_op("attention_core::broadcast_forward", mutates_args=(), device_types="cpu")
def broadcast_forward(Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None) -> Tensor:
    """Every valid position gets its group's row scaled by the group's factor, with the
    compiled kernel.

    Arguments:
        Y: ``(N, H, C, E)`` float32 or float64 CPU tensor (any strides).
        G: ``(N, H, L)`` int64 group of every position.
        F: ``(N, H, C)`` factors, the dtype of ``Y``.
        limits: ``(N, H)`` int64 number of non-padding positions, or ``None``.

    Returns:
        ``(N, H, L, E)``: ``F_g Y_g`` with ``g = G_l`` for valid positions, zero elsewhere.
    """
    _check_groups(Y, G, F, limits)
    if F.shape[2] != Y.shape[2]:
        raise ValueError(f"F must have shape {tuple(Y.shape[:3])}; got {tuple(F.shape)}")
    return _group_rows(Y, G, F, limits, Y.shape[2], True)


@broadcast_forward.register_fake
def _(Y, G, F, limits):
    N, H, _, E = Y.shape
    return Y.new_empty(N, H, G.shape[2], E)


@torch.library.custom_op("attention_core::broadcast_backward", mutates_args=(), device_types="cpu")
def broadcast_backward(
    grad: Tensor, Y: Tensor, G: Tensor, F: Tensor, limits: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`broadcast_forward`: ``dY (N, H, C, E)`` and ``dF (N, H, C)``.

    Arguments:
        grad: ``(N, H, L, E)`` gradient of the output.
        Y, G, F, limits: as in the forward.
    """
    _check_groups(Y, G, F, limits)
    sums = _group_rows(grad.to(Y.dtype), G, None, limits, Y.shape[2], False)
    return sums * F.unsqueeze(-1), torch.einsum("nhce,nhce->nhc", Y, sums).contiguous()


@broadcast_backward.register_fake
def _(grad, Y, G, F, limits):
    return Y.new_empty(Y.shape), F.new_empty(F.shape)


def _broadcast_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _broadcast_backward(ctx, grad):
    Y, G, F, limits = ctx.saved_tensors
    dY, dF = broadcast_backward(grad, Y, G, F, limits)
    return dY, None, dF, None


broadcast_forward.register_autograd(_broadcast_backward, setup_context=_broadcast_setup_context)


# ---------------------------------------------------------------------------------------
# hamming k-means
# ---------------------------------------------------------------------------------------


def _hamming_outputs(hashes: Tensor, C: int, bits: int) -> tuple[Tensor, ...]:
    N, H, L = hashes.shape
    i32 = torch.int32
    return (
        hashes.new_empty(N, H, L, dtype=i32),
        hashes.new_empty(N, H, C, dtype=i32),
        hashes.new_empty(N, H, C, dtype=torch.int64),
        hashes.new_empty(N, H, L, dtype=i32),
        hashes.new_empty(N, H, C, bits, dtype=i32),
    )


@torch.library.custom_op("attention_core::hamming_cluster", mutates_args=(), device_types="cpu")
def hamming_cluster(
    hashes: Tensor, lengths: Tensor, clusters: int, iterations: int, bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """K-means of every sequence's hashes under the Hamming distance, with the compiled kernel
    (Lloyd iterations from deterministic initial centroids; see
    :func:`attention_core.clustering.hamming.cluster`).

    Arguments:
        hashes: ``(N, H, L)`` int64 CPU tensor.
        lengths: ``(N,)`` int64 number of valid positions.
        clusters: ``C``.
        iterations: Lloyd rounds, ``>= 0``.
        bits: how many least significant bits count, in ``[1, 63]``.

    Returns:
        ``groups (N, H, L)`` int32 (``C`` for padding), ``counts (N, H, C)`` int32,
        ``centroids (N, H, C)`` int64, ``distances (N, H, L)`` int32 and
        ``bitcounts (N, H, C, bits)`` int32.
    """
    if _C is None:
        raise RuntimeError("attention_core._C is not compiled; use the reference path")
    if hashes.dtype != torch.int64 or hashes.dim() != 3:
        raise TypeError(
            f"hashes must be an (N, H, L) int64 tensor; got {hashes.dtype} {tuple(hashes.shape)}"
        )
    N, H, L = hashes.shape
    if lengths.dtype != torch.int64 or tuple(lengths.shape) != (N,):
        raise ValueError(
            f"lengths must be an int64 tensor of shape ({N},); got {lengths.dtype} "
            f"{tuple(lengths.shape)}"
        )
    hashes, lengths = hashes.contiguous(), lengths.contiguous()
    outputs = _hamming_outputs(hashes, clusters, bits)
    _C.hamming_cluster(
        hashes.data_ptr(), lengths.data_ptr(), *(t.data_ptr() for t in outputs),
        N, H, L, clusters, bits, iterations, torch.get_num_threads(),
    )  # fmt: skip
    return outputs


@hamming_cluster.register_fake
def _(hashes, lengths, clusters, iterations, bits):
    return _hamming_outputs(hashes, clusters, bits)


from ._triton import ops as _triton_ops  # noqa: E402, F401  (CUDA kernels, if triton imports)
