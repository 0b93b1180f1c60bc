"""Chunked causal dot product (and the normaliser of causal linear attention) in Triton.

Causal linear attention (Katharopoulos et al. 2020, arXiv 2006.16236) computed in chunks of
``CHUNK = 64`` positions, as in the chunked forms of gated/linear attention (Yang et al. 2023,
arXiv 2312.06635): inside a chunk the masked products ``tril(Q K^T) V`` are two ``tl.dot``;
across chunks a float32 state ``S = sum_j K_j V_j^T`` (and ``z = sum_j K_j``) is carried
in registers by one program per (batch, head) (and, in the forward, per block of value
features). The normaliser ``Q_i . z_i + eps`` is computed in the same kernel.

The backward recomputes the chunk states instead of storing them: a forward sweep gives
``dQ`` (and keeps ``1 / den`` and ``d den`` per position, one float32 each), a reverse sweep
carries ``R = grad_S + sum_{i >= j} Q_i dnum_i^T`` and ``r = grad_z + sum_i dden_i Q_i`` and
gives ``dK``, ``dV``, ``dS0 = R`` and ``dz0 = r``. No per-position state is stored.

Inputs are float32, float16 or bfloat16 with any strides; products accumulate in float32
(``tl.dot`` with ``input_precision="ieee"`` for float32 inputs, so results match the CPU
kernel rather than TF32) and outputs take the input dtype. float64 is not accepted (the
public functions send float64 CUDA tensors to the plain-PyTorch path).

Einstein notation: n batch, h heads, l sequence, e query/key features, m value features.

The tests run these kernels under Triton's interpreter (``TRITON_INTERPRET=1``, on CPU
tensors: ``nox -s slow``); no GPU timings are published yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import TRITON_DTYPES
from ._validation import check_causal

__all__ = ["CHUNK", "causal_product_backward", "causal_product_forward"]

CHUNK = 64
# Software pipelining of the chunk loads multiplies the shared memory of the float32 tiles:
# compiled for sm_90 with E = M = 64, the forward / dQ / dK-dV kernels need 128 / 208 / 193 KiB
# at Triton's default of 3 stages and 48 / 80 / 112 KiB with 1 (checked with triton.compile
# for a GPUTarget("cuda", 90, 32), without a GPU). One stage fits A100 and H100; GPUs with
# about 100 KiB per block (sm_86/sm_89) may still reject the dK-dV kernel at E = M = 64.
NUM_STAGES = 1


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    Q, K, V, OUT, S0, Z0, S_OUT, Z_OUT,
    sq_n, sq_h, sq_l, sq_e,
    sk_n, sk_h, sk_l, sk_e,
    sv_n, sv_h, sv_l, sv_m,
    so_n, so_h, so_l, so_m,
    H, L, E, M, eps,
    HAS_S0: tl.constexpr, HAS_Z0: tl.constexpr, NORMALIZE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    block_m = tl.program_id(1)
    n = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_e = offs_e < E
    mask_m = offs_m < M
    causal = offs_c[:, None] >= offs_c[None, :]
    # states are contiguous (N, H, E, M) and (N, H, E)
    state_offsets = bh.to(tl.int64) * E * M + offs_e[:, None] * M + offs_m[None, :]
    state_mask = mask_e[:, None] & mask_m[None, :]
    if HAS_S0:
        S = tl.load(S0 + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK_E, BLOCK_M), dtype=tl.float32)
    if HAS_Z0:
        z = tl.load(Z0 + bh.to(tl.int64) * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        z = tl.zeros((BLOCK_E,), dtype=tl.float32)
    q_base = Q + n * sq_n + h * sq_h
    k_base = K + n * sk_n + h * sk_h
    v_base = V + n * sv_n + h * sv_h
    o_base = OUT + n * so_n + h * so_h
    for start in range(0, L, CHUNK):
        rows = (start + offs_c).to(tl.int64)
        mask_l = rows < L
        qk_mask = mask_l[:, None] & mask_e[None, :]
        vm_mask = mask_l[:, None] & mask_m[None, :]
        q = tl.load(q_base + rows[:, None] * sq_l + offs_e[None, :] * sq_e, mask=qk_mask, other=0.0)
        k = tl.load(k_base + rows[:, None] * sk_l + offs_e[None, :] * sk_e, mask=qk_mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * sv_l + offs_m[None, :] * sv_m, mask=vm_mask, other=0.0)
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        scores = tl.where(causal, scores, 0.0)
        out = tl.dot(q, S, input_precision="ieee") + tl.dot(scores, v, input_precision="ieee")
        if NORMALIZE:
            den = tl.sum(q * z[None, :], axis=1) + tl.sum(scores, axis=1) + eps
            den = tl.where(mask_l, den, 1.0)
            out = out / den[:, None]
            z += tl.sum(k, axis=0)
        tl.store(
            o_base + rows[:, None] * so_l + offs_m[None, :] * so_m,
            out.to(OUT.dtype.element_ty),
            mask=vm_mask,
        )
        S += tl.dot(tl.trans(k), v, input_precision="ieee")
    tl.store(S_OUT + state_offsets, S.to(S_OUT.dtype.element_ty), mask=state_mask)
    if NORMALIZE:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if block_m == 0:
            z_offsets = bh.to(tl.int64) * E + offs_e
            tl.store(Z_OUT + z_offsets, z.to(Z_OUT.dtype.element_ty), mask=mask_e)


@triton.jit
def _backward_queries_kernel(
    G, Q, K, V, OUT, S0, Z0, DQ, INV_DEN, DDEN,
    sg_n, sg_h, sg_l, sg_m,
    sq_n, sq_h, sq_l, sq_e,
    sk_n, sk_h, sk_l, sk_e,
    sv_n, sv_h, sv_l, sv_m,
    so_n, so_h, so_l, so_m,
    sd_n, sd_h, sd_l, sd_e,
    H, L, E, M, eps,
    HAS_S0: tl.constexpr, HAS_Z0: tl.constexpr, NORMALIZE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Forward sweep: dQ_i = S_i dnum_i + dden_i z_i; also keeps 1/den_i and dden_i."""
    bh = tl.program_id(0)
    n = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    mask_e = offs_e < E
    mask_m = offs_m < M
    causal = offs_c[:, None] >= offs_c[None, :]
    state_offsets = bh.to(tl.int64) * E * M + offs_e[:, None] * M + offs_m[None, :]
    state_mask = mask_e[:, None] & mask_m[None, :]
    if HAS_S0:
        S = tl.load(S0 + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK_E, BLOCK_M), dtype=tl.float32)
    if HAS_Z0:
        z = tl.load(Z0 + bh.to(tl.int64) * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        z = tl.zeros((BLOCK_E,), dtype=tl.float32)
    g_base = G + n * sg_n + h * sg_h
    q_base = Q + n * sq_n + h * sq_h
    k_base = K + n * sk_n + h * sk_h
    v_base = V + n * sv_n + h * sv_h
    o_base = OUT + n * so_n + h * so_h
    d_base = DQ + n * sd_n + h * sd_h
    for start in range(0, L, CHUNK):
        rows = (start + offs_c).to(tl.int64)
        mask_l = rows < L
        qk_mask = mask_l[:, None] & mask_e[None, :]
        vm_mask = mask_l[:, None] & mask_m[None, :]
        q = tl.load(q_base + rows[:, None] * sq_l + offs_e[None, :] * sq_e, mask=qk_mask, other=0.0)
        k = tl.load(k_base + rows[:, None] * sk_l + offs_e[None, :] * sk_e, mask=qk_mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * sv_l + offs_m[None, :] * sv_m, mask=vm_mask, other=0.0)
        g = tl.load(g_base + rows[:, None] * sg_l + offs_m[None, :] * sg_m, mask=vm_mask, other=0.0)
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        dnum = g.to(tl.float32)
        scores_v = tl.dot(dnum, tl.trans(v), input_precision="ieee")  # dnum_i . V_j (before 1/den)
        if NORMALIZE:
            o = tl.load(
                o_base + rows[:, None] * so_l + offs_m[None, :] * so_m, mask=vm_mask, other=0.0
            ).to(tl.float32)
            scores = tl.where(causal, tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0)
            den = tl.sum(q * z[None, :], axis=1) + tl.sum(scores, axis=1) + eps
            inv_den = tl.where(mask_l, 1.0 / den, 0.0)
            dden = -tl.sum(dnum * o, axis=1) * inv_den
            dnum = dnum * inv_den[:, None]
            scores_v = scores_v * inv_den[:, None] + dden[:, None]
            tl.store(INV_DEN + bh.to(tl.int64) * L + rows, inv_den, mask=mask_l)
            tl.store(DDEN + bh.to(tl.int64) * L + rows, dden, mask=mask_l)
        A = tl.where(causal, scores_v, 0.0)
        dq = tl.dot(dnum, tl.trans(S), input_precision="ieee")
        dq += tl.dot(A, k, input_precision="ieee")
        if NORMALIZE:
            dq += dden[:, None] * z[None, :]
            z += tl.sum(k, axis=0)
        tl.store(
            d_base + rows[:, None] * sd_l + offs_e[None, :] * sd_e,
            dq.to(DQ.dtype.element_ty),
            mask=qk_mask,
        )
        S += tl.dot(tl.trans(k), v, input_precision="ieee")


@triton.jit
def _backward_keys_values_kernel(
    G, Q, K, V, GS, GZ, INV_DEN, DDEN, DK, DV, DS0, DZ0,
    sg_n, sg_h, sg_l, sg_m,
    sq_n, sq_h, sq_l, sq_e,
    sk_n, sk_h, sk_l, sk_e,
    sv_n, sv_h, sv_l, sv_m,
    sdk_n, sdk_h, sdk_l, sdk_e,
    sdv_n, sdv_h, sdv_l, sdv_m,
    H, L, E, M,
    HAS_GS: tl.constexpr, HAS_GZ: tl.constexpr, NORMALIZE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Reverse sweep: dK_j = R V_j + r + sum_{i >= j} A_ij Q_i, dV_j = R^T K_j +
    sum_{i >= j} (Q_i . K_j) dnum_i, with R and r the states of the later positions."""
    bh = tl.program_id(0)
    n = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    mask_e = offs_e < E
    mask_m = offs_m < M
    causal = offs_c[:, None] >= offs_c[None, :]
    state_offsets = bh.to(tl.int64) * E * M + offs_e[:, None] * M + offs_m[None, :]
    state_mask = mask_e[:, None] & mask_m[None, :]
    if HAS_GS:
        R = tl.load(GS + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        R = tl.zeros((BLOCK_E, BLOCK_M), dtype=tl.float32)
    if HAS_GZ:
        r = tl.load(GZ + bh.to(tl.int64) * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        r = tl.zeros((BLOCK_E,), dtype=tl.float32)
    g_base = G + n * sg_n + h * sg_h
    q_base = Q + n * sq_n + h * sq_h
    k_base = K + n * sk_n + h * sk_h
    v_base = V + n * sv_n + h * sv_h
    dk_base = DK + n * sdk_n + h * sdk_h
    dv_base = DV + n * sdv_n + h * sdv_h
    n_chunks = tl.cdiv(L, CHUNK)
    for index in range(0, n_chunks):
        rows = ((n_chunks - 1 - index) * CHUNK + offs_c).to(tl.int64)
        mask_l = rows < L
        qk_mask = mask_l[:, None] & mask_e[None, :]
        vm_mask = mask_l[:, None] & mask_m[None, :]
        q = tl.load(q_base + rows[:, None] * sq_l + offs_e[None, :] * sq_e, mask=qk_mask, other=0.0)
        k = tl.load(k_base + rows[:, None] * sk_l + offs_e[None, :] * sk_e, mask=qk_mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * sv_l + offs_m[None, :] * sv_m, mask=vm_mask, other=0.0)
        g = tl.load(g_base + rows[:, None] * sg_l + offs_m[None, :] * sg_m, mask=vm_mask, other=0.0)
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        dnum = g.to(tl.float32)
        if NORMALIZE:
            inv_den = tl.load(INV_DEN + bh.to(tl.int64) * L + rows, mask=mask_l, other=0.0)
            dden = tl.load(DDEN + bh.to(tl.int64) * L + rows, mask=mask_l, other=0.0)
            dnum = dnum * inv_den[:, None]
        A = tl.dot(dnum, tl.trans(v), input_precision="ieee")  # A[i, j] = dnum_i . V_j
        if NORMALIZE:
            A += dden[:, None]
        A = tl.where(causal, A, 0.0)
        P = tl.where(causal, tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0)
        dk = tl.dot(v, tl.trans(R), input_precision="ieee")
        dk += tl.dot(tl.trans(A), q, input_precision="ieee")
        dv = tl.dot(k, R, input_precision="ieee")
        dv += tl.dot(tl.trans(P), dnum, input_precision="ieee")
        if NORMALIZE:
            dk += r[None, :]
            r += tl.sum(dden[:, None] * q, axis=0)
        tl.store(
            dk_base + rows[:, None] * sdk_l + offs_e[None, :] * sdk_e,
            dk.to(DK.dtype.element_ty),
            mask=qk_mask,
        )
        tl.store(
            dv_base + rows[:, None] * sdv_l + offs_m[None, :] * sdv_m,
            dv.to(DV.dtype.element_ty),
            mask=vm_mask,
        )
        R += tl.dot(tl.trans(q), dnum, input_precision="ieee")
    tl.store(DS0 + state_offsets, R.to(DS0.dtype.element_ty), mask=state_mask)
    if NORMALIZE:
        tl.store(DZ0 + bh.to(tl.int64) * E + offs_e, r.to(DZ0.dtype.element_ty), mask=mask_e)


# ---------------------------------------------------------------------------------------
# launch functions
# ---------------------------------------------------------------------------------------


def _block(size: int, cap: int | None = None) -> int:
    """A power of two >= size and >= 16 (the smallest ``tl.dot`` operand), at most ``cap``."""
    block = max(16, triton.next_power_of_2(max(size, 1)))
    return block if cap is None else min(block, cap)


def _new_nhl(like: Tensor, N: int, H: int, L: int, D: int, sequence_first: bool) -> Tensor:
    """An uninitialised ``(N, H, L, D)`` tensor, stored as ``(N, L, H, D)`` if sequence_first."""
    if sequence_first:
        return like.new_empty(N, L, H, D).transpose(1, 2)
    return like.new_empty(N, H, L, D)


def _state(
    t: Tensor | None, shape: tuple[int, ...], name: str, device: torch.device
) -> Tensor | None:
    if t is None:
        return None
    if tuple(t.shape) != shape or not t.is_floating_point() or t.device != device:
        raise ValueError(
            f"{name} must be a floating tensor of shape {shape} on {device}; got "
            f"{t.dtype} {tuple(t.shape)} on {t.device}"
        )
    return t.contiguous()


def _copy_or_zero(target: Tensor, source: Tensor | None) -> None:
    if source is None:
        target.zero_()
    else:
        target.copy_(source)


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    n, h, l, e = t.stride()
    return n, h, l, e


def causal_product_forward(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    S0: Tensor | None = None,
    z0: Tensor | None = None,
    *,
    normalize: bool = False,
    eps: float = 1e-6,
    sequence_first: bool = False,
    state_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal dot product (optionally normalised) with the chunked Triton kernel.

    ``out_i = S_i^T Q_i`` with ``S_i = S0 + sum_{j <= i} K_j V_j^T``, divided by
    ``Q_i . z_i + eps`` (``z_i = z0 + sum_{j <= i} K_j``) when ``normalize``.

    Arguments:
        Q: ``(N, H, L, E)`` float32/float16/bfloat16, any strides.
        K: ``(N, H, L, E)`` same dtype and device.
        V: ``(N, H, L, M)`` same dtype and device.
        S0: ``(N, H, E, M)`` initial state, or ``None`` for zeros (any floating dtype).
        z0: ``(N, H, E)`` initial normaliser state, or ``None`` (ignored unless
            ``normalize``).
        normalize: divide by the normaliser.
        eps: added to the normaliser.
        sequence_first: store ``out`` as ``(N, L, H, M)`` (returned as its transpose).
        state_dtype: dtype of the returned states (default float32 for half-precision inputs,
            else the input dtype).

    Returns:
        ``out (N, H, L, M)`` in the input dtype, the final ``S (N, H, E, M)`` and, when
        normalising, the final ``z (N, H, E)`` (``(N, H, 0)`` otherwise).
    """
    check_causal(Q, K, V, {}, eps, TRITON_DTYPES)
    N, H, L, E = Q.shape
    M = V.shape[-1]
    if state_dtype is None:
        state_dtype = torch.float32 if Q.dtype != torch.float32 else Q.dtype
    z0 = z0 if normalize else None
    S0 = _state(S0, (N, H, E, M), "S0", Q.device)
    z0 = _state(z0, (N, H, E), "z0", Q.device)
    out = _new_nhl(Q, N, H, L, M, sequence_first)
    S = Q.new_empty(N, H, E, M, dtype=state_dtype)
    z = Q.new_empty(N, H, E if normalize else 0, dtype=state_dtype)
    if N * H * E * M == 0:  # nothing for a kernel to do: zero products, states pass through
        out.zero_()
        _copy_or_zero(S, S0)
        _copy_or_zero(z, z0)
        return out, S, z
    BLOCK_M = _block(M, 64)
    grid = (N * H, triton.cdiv(M, BLOCK_M))
    _forward_kernel[grid](
        Q, K, V, out, S if S0 is None else S0, z if z0 is None else z0, S, z,
        *_strides(Q), *_strides(K), *_strides(V), *_strides(out),
        H, L, E, M, float(eps),
        HAS_S0=S0 is not None, HAS_Z0=z0 is not None, NORMALIZE=bool(normalize),
        CHUNK=CHUNK, BLOCK_E=_block(E), BLOCK_M=BLOCK_M, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out, S, z


def causal_product_backward(
    grad: Tensor | None,
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    out: Tensor | None = None,
    S0: Tensor | None = None,
    z0: Tensor | None = None,
    grad_S: Tensor | None = None,
    grad_z: Tensor | None = None,
    *,
    normalize: bool = False,
    eps: float = 1e-6,
    sequence_first: bool = False,
    state_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`causal_product_forward`, recomputing the chunk states.

    Arguments:
        grad: ``(N, H, L, M)`` gradient of ``out`` (``None`` for zeros).
        Q, K, V, S0, z0, normalize, eps, sequence_first, state_dtype: as in the forward.
        out: ``(N, H, L, M)`` the forward output (required when normalising).
        grad_S: ``(N, H, E, M)`` gradient of the final state, or ``None``.
        grad_z: ``(N, H, E)`` gradient of the final normaliser state, or ``None`` (ignored
            unless ``normalize``).

    Returns:
        ``dQ (N, H, L, E)``, ``dK (N, H, L, E)``, ``dV (N, H, L, M)`` in the input dtype
        (sequence-first storage if ``sequence_first``), ``dS0 (N, H, E, M)`` and
        ``dz0 (N, H, E)`` (``(N, H, 0)`` when not normalising).
    """
    check_causal(Q, K, V, {}, eps, TRITON_DTYPES)
    N, H, L, E = Q.shape
    M = V.shape[-1]
    if state_dtype is None:
        state_dtype = torch.float32 if Q.dtype != torch.float32 else Q.dtype
    if not normalize:
        z0 = grad_z = None
    if grad is None:
        grad = Q.new_zeros(N, H, L, M)
    if grad.shape != (N, H, L, M) or (normalize and (out is None or out.shape != grad.shape)):
        raise ValueError(
            f"grad (and out when normalising) must have shape {(N, H, L, M)}; got "
            f"{tuple(grad.shape)} and {None if out is None else tuple(out.shape)}"
        )
    S0 = _state(S0, (N, H, E, M), "S0", Q.device)
    z0 = _state(z0, (N, H, E), "z0", Q.device)
    grad_S = _state(grad_S, (N, H, E, M), "grad_S", Q.device)
    grad_z = _state(grad_z, (N, H, E), "grad_z", Q.device)
    dQ = _new_nhl(Q, N, H, L, E, sequence_first)
    dK = _new_nhl(Q, N, H, L, E, sequence_first)
    dV = _new_nhl(Q, N, H, L, M, sequence_first)
    dS0 = Q.new_empty(N, H, E, M, dtype=state_dtype)
    dz0 = Q.new_empty(N, H, E if normalize else 0, dtype=state_dtype)
    if N * H * E * M == 0:
        for t in (dQ, dK, dV):
            t.zero_()
        _copy_or_zero(dS0, grad_S)
        _copy_or_zero(dz0, grad_z)
        return dQ, dK, dV, dS0, dz0
    if normalize:
        inv_den = Q.new_empty(N, H, L, dtype=torch.float32)
        dden = Q.new_empty(N, H, L, dtype=torch.float32)
    else:
        inv_den = dden = dS0  # never read
    out = grad if out is None or not normalize else out  # out is read only when normalising
    meta = dict(
        CHUNK=CHUNK, BLOCK_E=_block(E), BLOCK_M=_block(M), NORMALIZE=bool(normalize),
        num_stages=NUM_STAGES,
    )  # fmt: skip
    _backward_queries_kernel[(N * H,)](
        grad, Q, K, V, out, dS0 if S0 is None else S0, dz0 if z0 is None else z0,
        dQ, inv_den, dden,
        *_strides(grad), *_strides(Q), *_strides(K), *_strides(V), *_strides(out),
        *_strides(dQ), H, L, E, M, float(eps),
        HAS_S0=S0 is not None, HAS_Z0=z0 is not None, **meta,
    )  # fmt: skip
    _backward_keys_values_kernel[(N * H,)](
        grad, Q, K, V, dS0 if grad_S is None else grad_S, dz0 if grad_z is None else grad_z,
        inv_den, dden, dK, dV, dS0, dz0,
        *_strides(grad), *_strides(Q), *_strides(K), *_strides(V),
        *_strides(dK), *_strides(dV), H, L, E, M,
        HAS_GS=grad_S is not None, HAS_GZ=grad_z is not None, **meta,
    )  # fmt: skip
    return dQ, dK, dV, dS0, dz0
