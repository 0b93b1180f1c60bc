"""Triton kernels for CUDA tensors: the third implementation of each op, beside the
plain-PyTorch reference and the compiled CPU kernel.

One module per op holds its kernels and the Python launch functions that allocate outputs
and call them (``causal_product``, ``local_product``, ``sparse_product``, ``aggregate``; no
Triton kernel for hashing or hamming clustering yet). :mod:`attention_core._triton.ops`
registers those launch functions as the ``"cuda"`` kernels of the ``torch.library`` custom
ops defined in :mod:`attention_core._kernels`, so the public functions reach them through the
same ops, autograd and fake registrations as the CPU kernels. The op modules import triton
(an optional dependency) on their first call, which only CUDA tensors make; CPU-only use
never imports it.

The kernels also run on CPU tensors under Triton's interpreter: set ``TRITON_INTERPRET=1``
before triton is first imported (``triton.jit`` reads it when it decorates a function, and
triton's own library functions such as ``tl.sum`` are decorated when triton is imported).
That is how the tests check the kernels on machines without a GPU (in a subprocess).

GPU timings of these kernels have not been measured: they were written and checked under the
interpreter in a session without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

__all__ = ["DTYPES", "DTYPE_RULE", "available", "installed"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# how the shared input checks of attention_core._kernels name them in errors
DTYPE_RULE = (DTYPES, "share one dtype among float32, float16 and bfloat16")


def installed() -> bool:
    """``True`` when a ``triton`` package is installed (found without importing it, so that
    importing attention_core does not pay for importing triton)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def available() -> bool:
    """``True`` when ``triton`` (and ``triton.language``) can be imported."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True
