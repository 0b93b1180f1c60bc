"""Output buffers in fast-transformers' calling convention.

fast-transformers' compiled modules (``aggregate_cpu``, ``causal_product_cpu``, ...) take the
output tensors as arguments and fill them. The compatibility modules of this package keep that
convention on top of the functional ops; this leaf module checks and fills such a buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor

__all__ = ["fill_buffer"]


def fill_buffer(
    name: str,
    out: Tensor,
    result: Tensor,
    *,
    accumulate: bool = False,
    where: Tensor | None = None,
) -> Tensor:
    """Write ``result`` into the caller's buffer ``out`` and return ``out``.

    Arguments:
        name: the buffer's argument name, for error messages.
        out: the buffer, of the shape of ``result`` up to dimensions of size 1 (any floating
            dtype for a floating ``result``, an integer dtype otherwise), on its device.
        result: the values to write.
        accumulate: add ``result`` to ``out`` instead of overwriting it.
        where: optional bool tensor broadcastable to ``result``: only these entries are
            written (the others keep their content).

    Returns:
        ``out``.
    """
    check_tensor(name, out, device=result.device)
    if out.shape != result.shape:
        # fast-transformers' kernels see memory only: (N, H, C) serves for (N, H, C, 1)
        squeezed = [size for size in result.shape if size != 1]
        if [size for size in out.shape if size != 1] != squeezed:
            raise ValueError(
                f"{name} must have shape {tuple(result.shape)}; got {tuple(out.shape)}"
            )
        if where is not None:
            where = torch.broadcast_to(where, result.shape).reshape(out.shape)
        result = result.reshape(out.shape)
    if out.is_floating_point() != result.is_floating_point():
        raise TypeError(f"{name} must have a dtype like {result.dtype}; got {out.dtype}")
    result = result.detach().to(out.dtype)
    if accumulate:
        result = out + result
    if where is not None:
        result = result.where(where, out)
    return out.copy_(result)
